//! Hardware-reduced ACPI power control: three byte-wide I/O ports described by the
//! FADT. The guest powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep
//! control register and reboots by writing the reset value to the reset register.

use crate::{IoAction, PioDevice};

/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// WAK_STS bit of the sleep status register.
const WAK_STS: u8 = 1 << 7;

/// Ports: +0 sleep control, +1 sleep status, +2 reset. No state to save.
#[derive(Debug)]
pub struct AcpiPower {
    /// The sleep type of S5 (soft off), as the DSDT's `_S5_` says.
    pub s5_sleep_type: u8,
    /// The value the FADT tells the guest to write to reset.
    pub reset_value: u8,
}

impl PioDevice for AcpiPower {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            if let Some(b) = data.first_mut() {
                // Always "awake": the guest never waits for a wake-up here.
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction {
        let Some(&v) = data.first() else { return IoAction::None };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == self.s5_sleep_type => IoAction::PowerOff,
            2 if v == self.reset_value => IoAction::Reboot,
            _ => IoAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_the_reset_value_reboots() {
        let mut p = AcpiPower { s5_sleep_type: 5, reset_value: 1 };
        assert_eq!(p.write(0, &[5 << 2 | SLP_EN]), IoAction::PowerOff);
        assert_eq!(p.write(0, &[3 << 2 | SLP_EN]), IoAction::None, "S3 is not supported, not an off");
        assert_eq!(p.write(0, &[5 << 2]), IoAction::None, "without SLP_EN nothing happens");
        assert_eq!(p.write(2, &[1]), IoAction::Reboot);
        assert_eq!(p.write(2, &[7]), IoAction::None);
        let mut b = [0u8];
        p.read(1, &mut b);
        assert_eq!(b[0], WAK_STS);
    }
}
