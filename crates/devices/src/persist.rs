//! The persistence contract every stateful part of an instance keeps (DESIGN.md
//! rule 1): its state as a plain serde struct, `save` to produce it, `restore` to
//! build the part again from it. Devices add [`Device`]: a fresh construction
//! from the same host resources, and the re-raise of an interrupt the guest had
//! not taken when the state was saved. The VMM's device set drives every device
//! through these two traits alone.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Saving a component's state and building the component again from it.
pub trait Persist: Sized {
    /// The saved state: plain data, serializable.
    type State: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the component is built on besides its state: host resources that do
    /// not travel with a checkpoint or a migration (eventfds, files, the
    /// console, guest memory, a fresh KVM object).
    type Resources;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The component's state, taken while nothing changes it (the instance paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// The component built on `resources`, in the saved `state`.
    fn restore(resources: Self::Resources, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A device of an instance, as the VMM's device set drives it.
pub trait Device: Persist {
    /// The device built on `resources` in its reset state (a new guest).
    fn create(resources: Self::Resources) -> Self;

    /// Raises the device's interrupt line again if it holds an interrupt the guest
    /// has not taken yet; called on a restored device once the VM's interrupt
    /// controllers are loaded (loading them overwrites what the device raised
    /// while it was restored, and the saved controllers may lack an interrupt
    /// that a KVM irqfd delivered late).
    fn reassert_pending_interrupt(&self) -> std::io::Result<()>;
}
