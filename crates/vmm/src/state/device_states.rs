//! The saved state of an instance's devices: one section per device, under the
//! device's id, holding that device's own state struct.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

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
        let value = serde_json::to_value(state).map_err(|e| Error::device_state(id, e))?;
        self.0.insert(id.to_string(), Section(value));
        Ok(())
    }

    /// The section of device `id` decoded as `T`, if there is one.
    pub(crate) fn get<T: DeserializeOwned>(&self, id: &str) -> Option<Result<T>> {
        self.section(id).map(|v| T::deserialize(v).map_err(|e| Error::device_state(id, e)))
    }
}
