//! The devices of an instance as one set: each is added with one call, restored
//! from its own section of the saved state or created fresh; the set saves them
//! all, and raises again the interrupts they hold after a restore, in one loop.
//! A new device implements `Device` in its own file and is added with one line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Device;
use crate::bus::lock;
use crate::{Error, Result};

/// The saved state of every device of an instance: one section per device, by
/// the device's id (see `persist::device_ids`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceStates(BTreeMap<String, Section>);

/// One device's saved state. In JSON (a checkpoint's state.json) it reads as the
/// device's own state struct; in binary encodings (the migration stream, which
/// cannot carry a self-describing value) it travels as that struct's JSON text.
#[derive(Clone, Debug, PartialEq)]
struct Section(serde_json::Value);

impl Serialize for Section {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.0.serialize(s)
        } else {
            s.serialize_str(&self.0.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for Section {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        if d.is_human_readable() {
            serde_json::Value::deserialize(d).map(Section)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map(Section).map_err(D::Error::custom)
        }
    }
}

impl DeviceStates {
    /// The saved state of device `id`, as its JSON value.
    pub fn section(&self, id: &str) -> Option<&serde_json::Value> {
        self.0.get(id).map(|s| &s.0)
    }

    /// The ids of the devices saved, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Puts `state` in as the section of device `id`.
    pub(crate) fn insert<T: Serialize>(&mut self, id: &str, state: &T) -> Result<()> {
        let value = serde_json::to_value(state).map_err(|e| state_error(id, e))?;
        self.0.insert(id.to_string(), Section(value));
        Ok(())
    }

    /// The section of device `id` decoded as `T`, if there is one.
    fn get<T: DeserializeOwned>(&self, id: &str) -> Option<Result<T>> {
        self.section(id).map(|v| T::deserialize(v).map_err(|e| state_error(id, e)))
    }
}

fn state_error(id: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::DeviceState { device: id.to_string(), source: Box::new(e) }
}

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
        let state = lock(&self.device).save().map_err(|e| state_error(self.id, e))?;
        states.insert(self.id, &state)
    }

    fn reassert_pending_interrupt(&self) -> Result<()> {
        lock(&self.device).reassert_pending_interrupt().map_err(|e| state_error(self.id, e))
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
                D::restore(resources, &state).map_err(|e| state_error(id, e))?
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
