//! One cevm instance: a KVM VM with its vCPUs, guest memory, I/O bus and devices,
//! booted from a built-in guest or restored from a saved state.
//!
//! The instance knows nothing of checkpoint files: it saves to and restores from
//! plain state structs ([`state::InstanceState`]) and exposes its memory; the
//! `snapshot` and `checkpoint` crates turn those into checkpoints.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod instance;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod persist;
pub mod placement;
pub mod state;
pub mod vcpu;

pub use instance::{Boot, DiskConfig, Instance, InstanceConfig, Shell};
pub use memory::{GuestMemory, MemoryBackend};
pub use state::InstanceState;
/// The vm-memory version this crate's memory types come from.
pub use vm_memory;

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

/// Errors of an instance.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM system or VM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A vCPU operation failed.
    #[error("vCPU {id}: {msg}")]
    Vcpu { id: u32, msg: String },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The memory size is not usable.
    #[error("guest memory size {0} bytes: must be at least 8 MiB and a multiple of 2 MiB")]
    MemorySize(u64),
    /// The configuration is not valid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Setting up the guest for boot failed.
    #[error("boot: {0}")]
    Boot(String),
    /// A device could not be set up or restored.
    #[error("device: {0}")]
    Device(String),
    /// A device's state could not be saved, restored, or re-raise its interrupt.
    #[error("device `{device}`: {source}")]
    DeviceState {
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The saved devices do not match the instance's devices.
    #[error("{0}")]
    DeviceSet(String),
    /// The operation needs the instance in another run state.
    #[error("{0}")]
    RunState(&'static str),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Result of instance operations.
pub type Result<T> = std::result::Result<T, Error>;
