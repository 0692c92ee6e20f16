//! Whether a saved state can be restored into an instance of its configuration,
//! checked without KVM: the one check that a checkpoint's verification, its
//! restore and a migration's destination all run ([`Instance::restore_into`]
//! begins with it), so a state that verifies is a state that restores.
//!
//! [`Instance::restore_into`]: crate::Instance::restore_into

use devices::virtio::mmio::MmioState;
use devices::{Persist, Serial, SerialResources, SerialState};
use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device_ids;
use crate::config::InstanceConfig;
use crate::error::{Error, Result};
use crate::layout::{MAX_NICS, MAX_VCPUS};
use crate::state::{DeviceStates, InstanceState, VcpuState};

/// The most MSRs a vCPU's state holds: it saves those of KVM's MSR index list,
/// which kvm-ioctls reads into a list of at most this many.
pub const MAX_SAVED_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Checks what a configuration asks for: 1 to [`MAX_VCPUS`] vCPUs, a memory
/// size a guest can have, at most [`MAX_NICS`] NICs, each MAC used once.
pub fn check_config(config: &InstanceConfig) -> Result<()> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!("{} vCPUs: between 1 and {MAX_VCPUS} are supported", config.vcpus)));
    }
    if config.nics.len() > MAX_NICS {
        return Err(Error::Config(format!("{} NICs: at most {MAX_NICS} are supported", config.nics.len())));
    }
    for (i, n) in config.nics.iter().enumerate() {
        if let Some(j) = config.nics[..i].iter().position(|m| m.mac == n.mac) {
            return Err(Error::Config(format!("NICs {j} and {i} have the same MAC address {}", n.mac)));
        }
    }
    crate::memory::check_size(config.mem_size)
}

/// The devices an instance of `config` has, by the ids of their sections.
pub fn device_ids_of(config: &InstanceConfig) -> Vec<&'static str> {
    let mut ids = vec![device_ids::SERIAL];
    if config.disk.is_some() {
        ids.push(device_ids::VIRTIO_BLK);
    }
    ids.extend(device_ids::VIRTIO_NET.iter().take(config.nics.len()));
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
                let queues = match id {
                    device_ids::VIRTIO_BLK => devices::virtio::block::QUEUE_MAX_SIZES.len(),
                    _ => devices::virtio::net::QUEUE_MAX_SIZES.len(),
                };
                let state: MmioState = saved.get(id).ok_or_else(missing)??;
                state.queues(queues).map_err(|e| Error::device_state(id, e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Boot, DiskConfig};
    use crate::persist::codec::{decode, Encoding};

    /// The state.json of the checkpoint cevm wrote at commit f3e6526: one vCPU,
    /// 8 MiB, no disk.
    const V1_JSON: &[u8] = include_bytes!("../../../cevm/tests/fixtures/main-f3e6526/state.json");

    fn config() -> InstanceConfig {
        InstanceConfig {
            boot: Boot::Builtin { guest: "digest".into(), args: String::new() },
            mem_size: 8 << 20,
            vcpus: 1,
            memory_backend: crate::MemoryBackend::Shared,
            disk: None,
            nics: vec![],
        }
    }

    fn refused(config: &InstanceConfig, state: &InstanceState) -> String {
        check_restorable(config, state).expect_err("refused").to_string()
    }

    #[test]
    fn a_state_and_configuration_that_match_pass() {
        check_restorable(&config(), &decode(V1_JSON, Encoding::Json).unwrap()).unwrap();
    }

    #[test]
    fn what_no_instance_can_take_is_refused_by_name() {
        let state = || decode(V1_JSON, Encoding::Json).unwrap();
        let e = refused(&InstanceConfig { vcpus: 0, ..config() }, &state());
        assert!(e.contains("0 vCPUs: between 1 and 64"), "{e}");
        let e = refused(&InstanceConfig { vcpus: 2, ..config() }, &state());
        assert!(e.contains("the state holds 1 vCPUs, the configuration 2"), "{e}");
        let e = refused(&InstanceConfig { mem_size: 0, ..config() }, &state());
        assert!(e.contains("guest memory size 0 bytes"), "{e}");

        let mut s = state();
        let first = s.vcpus[0].msrs[0];
        s.vcpus[0].msrs.push(first);
        assert!(refused(&config(), &s).contains(&format!("MSR {:#x} saved twice", first.index)));
        s.vcpus[0].msrs = vec![first; MAX_SAVED_MSRS + 1];
        assert!(refused(&config(), &s).contains("257 MSRs, a vCPU saves at most 256"));

        let mut s = state();
        s.vcpus[0].id = 3;
        assert!(refused(&config(), &s).contains("vCPU 3: saved at position 0"));
        let mut s = state();
        s.vm.ioapic.chip_id = 0;
        assert!(refused(&config(), &s).contains("irqchip 2 of the state is chip 0"));
    }

    #[test]
    fn device_sections_must_be_those_of_the_configuration() {
        let state = || decode(V1_JSON, Encoding::Json).unwrap();
        let disk = InstanceConfig { disk: Some(DiskConfig { path: "d.raw".into(), read_only: false }), ..config() };
        let e = refused(&disk, &state());
        assert!(e.contains("no section for device `virtio-blk`"), "{e}");
        let mut s = state();
        s.devices.insert(device_ids::VIRTIO_BLK, "not a transport");
        let e = refused(&config(), &s);
        assert!(e.contains("holds device `virtio-blk`, which an instance of this configuration lacks"), "{e}");
        let e = refused(&disk, &s);
        assert!(e.starts_with("device `virtio-blk`: "), "{e}");
        // A transport of the right shape, with queues its device does not have.
        let transport = MmioState {
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: vec![],
        };
        s.devices.insert(device_ids::VIRTIO_BLK, transport);
        let e = refused(&disk, &s);
        assert!(e.contains("wrong number of queues (the device has 1)"), "{e}");
        let mut s = state();
        s.devices.insert(device_ids::SERIAL, 7u32);
        assert!(refused(&config(), &s).starts_with("device `serial`: "));
    }
}
