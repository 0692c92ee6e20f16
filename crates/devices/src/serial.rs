//! The 8250 UART (COM1) on vm-superio, with its interrupt on an eventfd (KVM irqfd)
//! and its output to any writer (the console).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{Device, Persist};
use crate::{IoAction, PioDevice};

/// IIR: the transmitter-empty and received-data interrupts are pending.
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RECEIVED_DATA: u8 = 0x04;
/// IER: the same two interrupts are enabled.
const IER_RECEIVED_DATA: u8 = 0x01;
const IER_THR_EMPTY: u8 = 0x02;

/// The interrupt line of the UART: an eventfd the VMM registers as a KVM irqfd.
pub struct IrqEvent(pub EventFd);

impl Trigger for IrqEvent {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Saved state of the UART: its registers and the bytes waiting in its receive FIFO.
/// (vm-superio's own state struct has no serde support, so it is mirrored here.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SuperioState> for SerialState {
    fn from(s: SuperioState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for SuperioState {
    fn from(s: &SerialState) -> Self {
        SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The saved state does not describe a valid UART.
    #[error("invalid serial state: {0:?}")]
    State(vm_superio::serial::Error<std::io::Error>),
}

/// COM1: an 8250 UART whose output goes to `out`.
pub struct Serial {
    uart: vm_superio::Serial<IrqEvent, NoEvents, Box<dyn Write + Send>>,
}

/// What a UART is built on: its interrupt line (an eventfd the VMM registers as a
/// KVM irqfd) and where its output goes.
pub struct SerialResources {
    pub irq: EventFd,
    pub out: Box<dyn Write + Send>,
}

impl Serial {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial { uart: vm_superio::Serial::new(IrqEvent(irq), out) }
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Resources = SerialResources;
    type Error = Error;

    fn save(&self) -> Result<SerialState, Error> {
        Ok(self.uart.state().into())
    }

    fn restore(resources: SerialResources, state: &SerialState) -> Result<Self, Error> {
        let SerialResources { irq, out } = resources;
        let uart = vm_superio::Serial::from_state(&state.into(), IrqEvent(irq), NoEvents, out).map_err(Error::State)?;
        Ok(Serial { uart })
    }
}

impl Device for Serial {
    fn create(resources: SerialResources) -> Self {
        Serial::new(resources.irq, resources.out)
    }

    /// Raises the interrupt line again if the UART holds an enabled interrupt the
    /// guest has not yet taken (IIR names it, IER enables it: the condition under
    /// which vm-superio raises it on restore).
    ///
    /// vm-superio raises such an interrupt when it restores the state, but the VMM
    /// builds the devices before it loads the saved irqchip, which then overwrites
    /// what that raise delivered. And the saved irqchip may well lack the
    /// interrupt: a KVM irqfd on an IOAPIC/PIC pin is injected from a kernel work
    /// item, so an interrupt raised just before the source paused can reach the old
    /// VM only after `KVM_GET_IRQCHIP` read it. Linux's 8250 driver then waits
    /// forever for the transmit-empty interrupt (vm-superio never raises an
    /// interrupt IIR already names), and the guest's console falls silent after
    /// the switch. A second delivery of an interrupt the guest did take is
    /// harmless: its handler finds IIR empty.
    fn reassert_pending_interrupt(&self) -> std::io::Result<()> {
        let s = self.uart.state();
        let (iir, ier) = (s.interrupt_identification, s.interrupt_enable);
        let thr = iir & IIR_THR_EMPTY != 0 && ier & IER_THR_EMPTY != 0;
        let rda = iir & IIR_RECEIVED_DATA != 0 && ier & IER_RECEIVED_DATA != 0;
        if thr || rda {
            self.uart.interrupt_evt().trigger()?;
        }
        Ok(())
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // An 8250 register is one byte wide; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failed write is the console's (e.g. a closed pipe) or the irqfd's problem,
            // never the guest's: the guest goes on, as it would with a disconnected cable.
            let _ = self.uart.write(off, value);
            let _ = self.uart.writer_mut().flush();
        }
        IoAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::raised;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_restored_uart_raises_again_only_an_interrupt_the_guest_has_not_taken() {
        let sink = Sink::default();
        let src_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut src = Serial::new(src_irq.try_clone().unwrap(), Box::new(sink.clone()));
        // As Linux's 8250 driver starts a transmission: enable the THR-empty
        // interrupt, which the empty transmitter raises at once.
        src.write(1, &[0x02]);
        assert!(raised(&src_irq));

        // Saved before the guest's handler read IIR: the restored UART raises it
        // again.
        let pending = serde_json_roundtrip(&src.save().unwrap());
        let dst_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dst = restored(&pending, dst_irq.try_clone().unwrap(), sink.clone()).unwrap();
        // vm-superio raises it while restoring, before a VMM can have loaded the
        // VM's irqchip (which then overwrites it); the VMM raises it once more after.
        raised(&dst_irq);
        dst.reassert_pending_interrupt().unwrap();
        assert!(raised(&dst_irq));
        // And the guest's handler then finds it in IIR and transmits.
        let mut iir = [0u8; 1];
        dst.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR names the THR-empty interrupt");
        dst.write(0, b"x");
        assert!(raised(&dst_irq));
        assert_eq!(&*sink.0.lock().unwrap(), b"x");

        // Pending but masked (as Linux's console masks IER while it writes): a
        // real UART's line stays low, so nothing is raised.
        let mut masked = pending.clone();
        masked.interrupt_enable = 0;
        let dst_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dst = restored(&masked, dst_irq.try_clone().unwrap(), sink.clone()).unwrap();
        dst.reassert_pending_interrupt().unwrap();
        assert!(!raised(&dst_irq));

        // Saved after the handler read IIR: nothing to raise.
        src.read(2, &mut iir);
        let taken = serde_json_roundtrip(&src.save().unwrap());
        let dst_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dst = restored(&taken, dst_irq.try_clone().unwrap(), sink).unwrap();
        assert!(!raised(&dst_irq));
        dst.reassert_pending_interrupt().unwrap();
        assert!(!raised(&dst_irq));
    }

    #[test]
    fn output_and_state_roundtrip() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        s.write(7, &[0x5a]); // scratch register
        s.write(3, &[0x03]); // 8N1
        let st = s.save().unwrap();
        let json = serde_json_roundtrip(&st);
        let mut r = restored(&json, EventFd::new(0).unwrap(), sink).unwrap();
        let mut v = [0u8; 1];
        r.read(7, &mut v);
        assert_eq!(v[0], 0x5a);
        r.read(3, &mut v);
        assert_eq!(v[0], 0x03);
        // LSR says the transmitter is empty, so a guest's putc loop never stalls.
        r.read(5, &mut v);
        assert_ne!(v[0] & 0x20, 0);
    }

    fn restored(state: &SerialState, irq: EventFd, out: Sink) -> Result<Serial, Error> {
        Serial::restore(SerialResources { irq, out: Box::new(out) }, state)
    }

    fn serde_json_roundtrip(s: &SerialState) -> SerialState {
        // The state must survive serialization unchanged (it goes into the checkpoint).
        let v = serde_json::to_vec(s).unwrap();
        serde_json::from_slice(&v).unwrap()
    }
}
