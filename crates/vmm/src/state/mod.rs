//! The saved state of an instance: plain serde structs (DESIGN.md rule 1), one per
//! component, gathered in [`InstanceState`]. Encoded, with its version, by
//! `persist::codec` into a checkpoint's `state.json` or a migration's `State` frame.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

mod device_states;

pub use device_states::DeviceStates;

/// Everything KVM holds for one vCPU. The x87/SSE state is inside `xsave` (a superset
/// of `KVM_GET_FPU`), so it is not saved a second time.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    /// The CPUID the guest sees; restored as saved so a restore elsewhere keeps it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's MSR index list this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// VM-wide KVM state: kvmclock, the in-kernel interrupt controllers and the PIT.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// The whole saved state of an instance, apart from guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}
