//! One cevm instance: a KVM VM with its vCPUs, guest memory, I/O bus and devices,
//! booted from a built-in guest image the caller gives, from a Linux kernel, or
//! restored from a saved state.
//!
//! The instance knows nothing of checkpoint files: it saves to and restores from
//! plain state structs ([`state::InstanceState`]) and exposes its memory; the
//! `snapshot` and `checkpoint` crates turn those into checkpoints. Nor does it
//! know the built-in guests: their images come from the caller (see
//! [`Instance::new`]).
//!
//! The modules form layers; each uses only modules of the layers below it:
//!
//! ```text
//! instance                          the instance: everything below, assembled
//! persist, vcpu, linux, nics        saving and restoring; one vCPU; Linux boot;
//!                                   the NICs and their I/O threads
//! acpi, boot, config                firmware tables; long mode and built-in guest
//!                                   loading; what to run
//! memory, state, bus, placement     guest RAM; saved-state structs; I/O and MMIO
//!                                   buses; CPU affinity
//! layout, error, event              the memory map and ports; the crate's error;
//!                                   what vCPU threads report
//! ```

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod error;
pub mod event;
pub mod instance;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod nics;
pub mod persist;
pub mod placement;
pub mod state;
pub mod vcpu;

pub use config::{Boot, DiskConfig, InstanceConfig, NicConfig};
pub use error::{Error, Result};
pub use event::VmEvent;
pub use instance::{Instance, Shell};
pub use memory::{GuestMemory, MemoryBackend};
pub use state::InstanceState;
/// The vm-memory version this crate's memory types come from.
pub use vm_memory;
