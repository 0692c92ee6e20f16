//! The devices of an instance as one set: each is added with one call, restored
//! from its own section of the saved state or created fresh; the set saves them
//! all, and raises again the interrupts they hold after a restore, in one loop.
//! A new device implements `Device` in its own file and is added with one line.

use std::sync::{Arc, Mutex};

use devices::persist::Device;

use crate::bus::lock;
use crate::error::{Error, Result};
use crate::state::DeviceStates;

/// One device of the set, whatever its type.
trait Member: Send {
    fn id(&self) -> &'static str;
    fn save_into(&self, states: &mut DeviceStates) -> Result<()>;
    fn reassert_pending_interrupt(&self) -> Result<()>;
}

/// A device shared with the buses that dispatch the guest's accesses to it.
struct Shared<D> {
    id: &'static str,
    device: Arc<Mutex<D>>,
}

impl<D: Device + Send> Member for Shared<D> {
    fn id(&self) -> &'static str {
        self.id
    }

    fn save_into(&self, states: &mut DeviceStates) -> Result<()> {
        let state = lock(&self.device).save().map_err(|e| Error::device_state(self.id, e))?;
        states.insert(self.id, state);
        Ok(())
    }

    fn reassert_pending_interrupt(&self) -> Result<()> {
        lock(&self.device).reassert_pending_interrupt().map_err(|e| Error::device_state(self.id, e))
    }
}

/// The devices of an instance, in the order they were added.
#[derive(Default)]
pub struct DeviceSet {
    members: Vec<Box<dyn Member>>,
}

impl DeviceSet {
    /// Adds device `id`, built on `resources`: restored from its section of
    /// `saved` when the instance is restored (a missing section is an error),
    /// else created in its reset state. Returns it shared, for the buses.
    pub fn add<D: Device + Send + 'static>(
        &mut self,
        id: &'static str,
        resources: D::Resources,
        saved: Option<&DeviceStates>,
    ) -> Result<Arc<Mutex<D>>> {
        if self.members.iter().any(|m| m.id() == id) {
            return Err(Error::DeviceSet(format!("two devices are called `{id}`")));
        }
        let device = match saved {
            Some(states) => {
                let state = states
                    .get::<D::State>(id)
                    .ok_or_else(|| Error::DeviceSet(format!("the saved state has no section for device `{id}`")))??;
                D::restore(resources, &state).map_err(|e| Error::device_state(id, e))?
            }
            None => D::create(resources),
        };
        let device = Arc::new(Mutex::new(device));
        self.members.push(Box::new(Shared { id, device: device.clone() }));
        Ok(device)
    }

    /// Checks that every section of `saved` went to a device of the set: a state
    /// with a device this instance lacks cannot be restored without losing it.
    pub fn check_all_restored(&self, saved: &DeviceStates) -> Result<()> {
        match saved.ids().find(|id| !self.members.iter().any(|m| m.id() == *id)) {
            Some(id) => {
                Err(Error::DeviceSet(format!("the saved state holds device `{id}`, which this instance lacks")))
            }
            None => Ok(()),
        }
    }

    /// The state of every device.
    pub fn save(&self) -> Result<DeviceStates> {
        let mut states = DeviceStates::default();
        for m in &self.members {
            m.save_into(&mut states)?;
        }
        Ok(states)
    }

    /// Raises again every interrupt a device holds and the guest has not taken:
    /// after a restore, once the VM's interrupt controllers are loaded (see
    /// `Device::reassert_pending_interrupt`).
    pub fn reassert_pending_interrupts(&self) -> Result<()> {
        self.members.iter().try_for_each(|m| m.reassert_pending_interrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::{PioDevice, Serial, SerialResources};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn uart(irq: &EventFd) -> SerialResources {
        SerialResources { irq: irq.try_clone().unwrap(), out: Box::new(std::io::sink()) }
    }

    fn raised(irq: &EventFd) -> bool {
        irq.read().is_ok_and(|n| n > 0)
    }

    #[test]
    fn each_device_is_saved_into_and_restored_from_its_own_section() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut set = DeviceSet::default();
        let com1 = set.add::<Serial>("com1", uart(&irq), None).unwrap();
        let com2 = set.add::<Serial>("com2", uart(&irq), None).unwrap();
        lock(&com1).write(7, &[0x11]); // scratch registers
        lock(&com2).write(7, &[0x22]);
        let saved = set.save().unwrap();
        assert_eq!(saved.ids().collect::<Vec<_>>(), ["com1", "com2"]);

        let mut restored = DeviceSet::default();
        let com2 = restored.add::<Serial>("com2", uart(&irq), Some(&saved)).unwrap();
        let com1 = restored.add::<Serial>("com1", uart(&irq), Some(&saved)).unwrap();
        restored.check_all_restored(&saved).unwrap();
        let mut scratch = [0u8];
        lock(&com1).read(7, &mut scratch);
        assert_eq!(scratch[0], 0x11);
        lock(&com2).read(7, &mut scratch);
        assert_eq!(scratch[0], 0x22);
        assert_eq!(restored.save().unwrap(), saved);
    }

    #[test]
    fn a_state_that_does_not_match_the_devices_is_refused_by_device_name() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut set = DeviceSet::default();
        set.add::<Serial>("com1", uart(&irq), None).unwrap();
        let e = set.add::<Serial>("com1", uart(&irq), None).err().expect("refused");
        assert!(e.to_string().contains("two devices are called `com1`"), "{e}");
        let saved = set.save().unwrap();

        // A device the state has no section for.
        let e = DeviceSet::default().add::<Serial>("com2", uart(&irq), Some(&saved)).err().expect("refused");
        assert!(e.to_string().contains("no section for device `com2`"), "{e}");
        // A section no device of the instance takes.
        let e = DeviceSet::default().check_all_restored(&saved).unwrap_err();
        assert!(e.to_string().contains("holds device `com1`"), "{e}");
        // A section that is not the device's state.
        let mut wrong = DeviceStates::default();
        wrong.insert("com1", "not a UART");
        let e = DeviceSet::default().add::<Serial>("com1", uart(&irq), Some(&wrong)).err().expect("refused");
        assert!(e.to_string().starts_with("device `com1`: "), "{e}");
    }

    #[test]
    fn pending_interrupts_are_raised_again_for_every_device_that_holds_one() {
        let (irq1, irq2) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        let mut set = DeviceSet::default();
        let com1 = set.add::<Serial>("com1", uart(&irq1), None).unwrap();
        set.add::<Serial>("com2", uart(&irq2), None).unwrap();
        // COM1 enables its transmitter-empty interrupt, which is raised at once
        // and pending until the guest reads IIR; COM2 holds none.
        lock(&com1).write(1, &[0x02]);
        let saved = set.save().unwrap();

        let (irq1, irq2) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        let mut restored = DeviceSet::default();
        restored.add::<Serial>("com1", uart(&irq1), Some(&saved)).unwrap();
        restored.add::<Serial>("com2", uart(&irq2), Some(&saved)).unwrap();
        raised(&irq1); // what vm-superio raised while restoring
        restored.reassert_pending_interrupts().unwrap();
        assert!(raised(&irq1));
        assert!(!raised(&irq2));
    }
}
