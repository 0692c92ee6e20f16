//! The errors of an instance, one enum for the whole crate.

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

impl Error {
    /// Device `id`'s state could not be saved, encoded, decoded or restored.
    pub(crate) fn device_state(id: &str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::DeviceState { device: id.to_string(), source: Box::new(e) }
    }
}

/// Result of instance operations.
pub type Result<T> = std::result::Result<T, Error>;
