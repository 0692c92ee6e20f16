//! cevm's devices. Each device is logic without I/O of its own: it takes register
//! reads and writes from the VMM's bus and keeps the persistence contract of
//! [`persist`]: a plain, serde-serializable state struct, `save` and `restore`, so
//! it can be tested and checkpointed without KVM.

pub mod exit;
pub mod persist;
pub mod power;
pub mod serial;
pub mod virtio;

#[cfg(test)]
mod test_util {
    use vmm_sys_util::eventfd::EventFd;

    /// Whether a device's interrupt eventfd (non-blocking) was written since it
    /// was last read.
    pub fn raised(irq: &EventFd) -> bool {
        match irq.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd: {e}"),
        }
    }
}

pub use exit::ExitPort;
pub use persist::{Device, Persist};
pub use power::AcpiPower;
pub use serial::{Serial, SerialResources, SerialState};

/// Guest memory as cevm maps it: every write the VMM itself makes through it
/// (device DMA, virtqueue updates, loaders) is recorded in a per-page dirty bitmap,
/// because KVM's dirty log sees only the guest's own writes and a live migration
/// needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// What the VMM must do after a device handled a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: the guest goes on.
    None,
    /// The guest asked to end the VM with this status.
    GuestExit(u32),
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset.
    Reboot,
}

/// A device on the MMIO bus. `offset` is relative to the device's base address.
pub trait MmioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction;
}

/// A device on the x86 I/O port bus. `offset` is relative to the device's first port.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction;
}
