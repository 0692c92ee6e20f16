//! Whether a saved state can be restored into an instance of its configuration,
//! checked without KVM: the one check that a checkpoint's verification, its
//! restore and a migration's destination all run ([`Instance::restore_into`]
//! begins with it), so a state that verifies is a state that restores.
//!
//! [`Instance::restore_into`]: crate::Instance::restore_into

use devices::virtio::block::QUEUE_MAX_SIZES;
use devices::virtio::mmio::MmioState;
use devices::{Persist, Serial, SerialResources, SerialState};
use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device_ids;
use crate::config::InstanceConfig;
use crate::error::{Error, Result};
use crate::layout::MAX_VCPUS;
use crate::state::{DeviceStates, InstanceState, VcpuState};

/// The most MSRs a vCPU's state holds: it saves those of KVM's MSR index list,
/// which kvm-ioctls reads into a list of at most this many.
pub const MAX_SAVED_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Checks what a configuration asks for: 1 to [`MAX_VCPUS`] vCPUs, and a memory
/// size a guest can have.
pub fn check_config(config: &InstanceConfig) -> Result<()> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!("{} vCPUs: between 1 and {MAX_VCPUS} are supported", config.vcpus)));
    }
    crate::memory::check_size(config.mem_size)
}

/// The devices an instance of `config` has, by the ids of their sections.
pub fn device_ids_of(config: &InstanceConfig) -> Vec<&'static str> {
    let mut ids = vec![device_ids::SERIAL];
    if config.disk.is_some() {
        ids.push(device_ids::VIRTIO_BLK);
    }
    ids
}

/// Checks that `state` can be restored into an instance of `config`: the
/// configuration itself, one saved vCPU per configured vCPU, in order, each
/// within KVM's limits, the VM's interrupt controllers, and exactly one
/// section per device of the instance, each a state its device takes.
pub fn check_restorable(config: &InstanceConfig, state: &InstanceState) -> Result<()> {
    check_config(config)?;
    if state.vcpus.len() != config.vcpus as usize {
        return Err(Error::Config(format!(
            "the state holds {} vCPUs, the configuration {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        check_vcpu(i, v)?;
    }
    let chips = [&state.vm.pic_master, &state.vm.pic_slave, &state.vm.ioapic];
    for (want, chip) in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC].into_iter().zip(chips) {
        if chip.chip_id != want {
            return Err(Error::Config(format!("irqchip {want} of the state is chip {}", chip.chip_id)));
        }
    }
    check_devices(config, &state.devices)
}

fn check_vcpu(position: usize, v: &VcpuState) -> Result<()> {
    let bad = |msg: String| Err(Error::Vcpu { id: v.id, msg });
    if v.id as usize != position {
        return bad(format!("saved at position {position} of the vCPU list"));
    }
    if v.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return bad(format!("{} CPUID entries, KVM takes at most {KVM_MAX_CPUID_ENTRIES}", v.cpuid.len()));
    }
    if v.msrs.len() > MAX_SAVED_MSRS {
        return bad(format!("{} MSRs, a vCPU saves at most {MAX_SAVED_MSRS}", v.msrs.len()));
    }
    let mut indices: Vec<u32> = v.msrs.iter().map(|m| m.index).collect();
    indices.sort_unstable();
    if let Some(w) = indices.windows(2).find(|w| w[0] == w[1]) {
        return bad(format!("MSR {:#x} saved twice", w[0]));
    }
    Ok(())
}

fn check_devices(config: &InstanceConfig, saved: &DeviceStates) -> Result<()> {
    let expected = device_ids_of(config);
    if let Some(id) = saved.ids().find(|id| !expected.contains(id)) {
        return Err(Error::DeviceSet(format!(
            "the saved state holds device `{id}`, which an instance of this configuration lacks"
        )));
    }
    for id in expected {
        let missing = || Error::DeviceSet(format!("the saved state has no section for device `{id}`"));
        match id {
            device_ids::SERIAL => {
                let state: SerialState = saved.get(id).ok_or_else(missing)??;
                // The UART's own restore, on an interrupt line and console of no consequence.
                let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Device(format!("eventfd: {e}")))?;
                Serial::restore(SerialResources { irq, out: Box::new(std::io::sink()) }, &state)
                    .map_err(|e| Error::device_state(id, e))?;
            }
            _ => {
                let state: MmioState = saved.get(id).ok_or_else(missing)??;
                state.queues(QUEUE_MAX_SIZES.len()).map_err(|e| Error::device_state(id, e))?;
            }
        }
    }
    Ok(())
}
