//! What the vCPU threads report about a running instance.

/// Something that happened to a running instance, reported by its vCPU threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote its exit status to the exit port.
    GuestExit { status: u32 },
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked to be reset (ACPI reset register).
    Reboot,
    /// A vCPU hit a triple fault (the guest reset itself or crashed).
    Shutdown { id: u32, at: String },
    /// The guest asked KVM for a system event (PSCI-style shutdown/reset).
    SystemEvent { id: u32, kind: u32 },
    /// A vCPU cannot go on.
    VcpuFailed { id: u32, error: String },
}

impl std::fmt::Display for VmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEvent::GuestExit { status } => write!(f, "guest exited with status {status}"),
            VmEvent::PowerOff => write!(f, "guest powered off"),
            VmEvent::Reboot => write!(f, "guest asked for a reboot"),
            VmEvent::Shutdown { id, at } => write!(f, "guest shut down (triple fault on vCPU {id}, {at})"),
            VmEvent::SystemEvent { id, kind } => write!(f, "guest system event {kind} on vCPU {id}"),
            VmEvent::VcpuFailed { id, error } => write!(f, "vCPU {id} failed: {error}"),
        }
    }
}
