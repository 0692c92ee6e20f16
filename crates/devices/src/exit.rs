//! The exit port: the built-in guests end the VM by writing a 32-bit status to it.

use crate::{IoAction, PioDevice};

/// A write of 1 to 4 bytes ends the VM with that status (little-endian, zero-extended).
/// Reads return all ones, as an unclaimed port would. The device has no state.
#[derive(Debug, Default)]
pub struct ExitPort;

impl PioDevice for ExitPort {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> IoAction {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        IoAction::GuestExit(u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_ends_the_vm_with_the_status() {
        let mut p = ExitPort;
        assert_eq!(p.write(0, &7u32.to_le_bytes()), IoAction::GuestExit(7));
        assert_eq!(p.write(0, &[3]), IoAction::GuestExit(3));
        let mut b = [0u8; 2];
        p.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
