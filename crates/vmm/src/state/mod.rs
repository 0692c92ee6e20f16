//! The saved state of an instance: plain serde structs (DESIGN.md rule 1), one per
//! component, gathered in [`InstanceState`]. Encoded, with its version, by
//! `persist::codec` into a checkpoint's `state.json` or a migration's `State` frame.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

mod device_states;
mod exact;

pub use device_states::DeviceStates;

/// Everything KVM holds for one vCPU. The x87/SSE state is inside `xsave` (a superset
/// of `KVM_GET_FPU`), so it is not saved a second time. Each KVM struct decodes
/// only from exactly its size in bytes (see `exact`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    /// The CPUID the guest sees; restored as saved so a restore elsewhere keeps it.
    #[serde(deserialize_with = "exact::list")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(deserialize_with = "exact::one")]
    pub mp_state: kvm_mp_state,
    #[serde(deserialize_with = "exact::one")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "exact::one")]
    pub sregs: kvm_sregs,
    #[serde(deserialize_with = "exact::one")]
    pub xsave: kvm_xsave,
    #[serde(deserialize_with = "exact::one")]
    pub xcrs: kvm_xcrs,
    #[serde(deserialize_with = "exact::one")]
    pub debug_regs: kvm_debugregs,
    #[serde(deserialize_with = "exact::one")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's MSR index list this vCPU could read.
    #[serde(deserialize_with = "exact::list")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(deserialize_with = "exact::one")]
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// VM-wide KVM state: kvmclock, the in-kernel interrupt controllers and the PIT.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    #[serde(deserialize_with = "exact::one")]
    pub clock: kvm_clock_data,
    #[serde(deserialize_with = "exact::one")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "exact::one")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "exact::one")]
    pub ioapic: kvm_irqchip,
    #[serde(deserialize_with = "exact::one")]
    pub pit: kvm_pit_state2,
}

/// The whole saved state of an instance, apart from guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}
