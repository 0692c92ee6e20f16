//! Saving and restoring an instance: the persistence contract of
//! `devices::persist` (re-exported here), the VM-wide KVM state under that
//! contract ([`KvmVm`]), the [`DeviceSet`] that drives every device through it in
//! one loop, and the versioned codec of the saved state, shared by checkpoints
//! and live migration ([`codec`]).

mod check;
pub mod codec;
mod device_set;
mod v1;

use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;

pub use check::{check_config, check_restorable, device_ids_of, MAX_SAVED_MSRS};
pub use device_set::DeviceSet;
pub use devices::persist::{Device, Persist};

use crate::error::{Error, Result};
pub use crate::state::DeviceStates;
use crate::state::VmState;

/// The ids of the devices of an instance: the names of their sections in the
/// saved state.
pub mod device_ids {
    /// COM1.
    pub const SERIAL: &str = "serial";
    /// The virtio-blk disk, behind its virtio-mmio transport.
    pub const VIRTIO_BLK: &str = "virtio-blk";
    /// NIC i, behind its virtio-mmio transport: `VIRTIO_NET[i]`.
    pub const VIRTIO_NET: [&str; crate::layout::MAX_NICS] = [
        "virtio-net0",
        "virtio-net1",
        "virtio-net2",
        "virtio-net3",
        "virtio-net4",
        "virtio-net5",
        "virtio-net6",
        "virtio-net7",
    ];
}

/// The VM-wide KVM state of an instance (kvmclock, the in-kernel interrupt
/// controllers and the PIT), seen through its VM.
pub struct KvmVm<'a> {
    vm: &'a VmFd,
}

impl<'a> KvmVm<'a> {
    /// The VM-wide state of `vm`.
    pub fn new(vm: &'a VmFd) -> Self {
        KvmVm { vm }
    }

    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        self.vm.get_irqchip(&mut chip).map_err(|e| Error::Kvm("KVM_GET_IRQCHIP", e))?;
        Ok(chip)
    }
}

impl<'a> Persist for KvmVm<'a> {
    type State = VmState;
    type Resources = &'a VmFd;
    type Error = Error;

    fn save(&self) -> Result<VmState> {
        Ok(VmState {
            clock: self.vm.get_clock().map_err(|e| Error::Kvm("KVM_GET_CLOCK", e))?,
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(|e| Error::Kvm("KVM_GET_PIT2", e))?,
        })
    }

    /// Loads the saved interrupt controllers, PIT and clock into `vm`, a VM made
    /// with all three (its vCPUs are restored after).
    fn restore(vm: &'a VmFd, state: &VmState) -> Result<Self> {
        for (chip, saved) in [&state.pic_master, &state.pic_slave, &state.ioapic].into_iter().enumerate() {
            if saved.chip_id != chip as u32 {
                return Err(Error::Config(format!("irqchip {chip} of the state is chip {}", saved.chip_id)));
            }
            vm.set_irqchip(saved).map_err(|e| Error::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&state.pit).map_err(|e| Error::Kvm("KVM_SET_PIT2", e))?;
        // The guest's clock goes on from the saved instant (flags cleared: no
        // adjustment for the time the checkpoint spent on disk).
        let mut clock = state.clock;
        clock.flags = 0;
        vm.set_clock(&clock).map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))?;
        Ok(KvmVm { vm })
    }
}
