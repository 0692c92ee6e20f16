//! The saved state of an instance's devices: one section per device, under the
//! device's id, holding that device's own state struct.
//!
//! A section is written in the encoding of the whole state: in JSON (a
//! checkpoint's state.json) it reads as the device's state struct; in the binary
//! encoding (the migration stream, inside the guest's downtime) it is that
//! struct's own postcard bytes. A section just saved keeps the device's state
//! as it is and encodes it only when the whole state is encoded, so the switch
//! of a migration never goes through JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The saved state of every device of an instance: one section per device, by
/// the device's id (see `persist::device_ids`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceStates(BTreeMap<String, Section>);

/// A device state just saved, encoded in whichever form the whole state takes.
trait SavedState: Send + Sync {
    fn to_json(&self) -> serde_json::Result<serde_json::Value>;
    fn to_postcard(&self) -> postcard::Result<Vec<u8>>;
}

impl<T: Serialize + Send + Sync> SavedState for T {
    fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::to_value(self)
    }
    fn to_postcard(&self) -> postcard::Result<Vec<u8>> {
        postcard::to_stdvec(self)
    }
}

impl PartialEq for DeviceStates {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|((a, x), (b, y))| a == b && x == y)
    }
}

impl PartialEq for Section {
    /// The same state: the same JSON value, or the same bytes of the binary
    /// encoding (a section read as bytes cannot be compared with the others).
    fn eq(&self, other: &Self) -> bool {
        let json = |s: &Section| match s {
            Section::Saved(st) => st.to_json().ok(),
            Section::Json(v) => Some(v.clone()),
            Section::Binary(_) => None,
        };
        match (self, other) {
            (Section::Binary(a), Section::Binary(b)) => a == b,
            (Section::Binary(_), _) | (_, Section::Binary(_)) => false,
            _ => json(self) == json(other),
        }
    }
}

/// One device's saved state (see the module documentation).
#[derive(Clone)]
enum Section {
    /// Saved by this process, not encoded yet.
    Saved(Arc<dyn SavedState>),
    /// Read from JSON.
    Json(serde_json::Value),
    /// Read from the binary encoding: the state's postcard bytes.
    Binary(Vec<u8>),
}

impl std::fmt::Debug for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Section::Saved(s) => write!(f, "Saved({:?})", s.to_json().ok()),
            Section::Json(v) => write!(f, "Json({v})"),
            Section::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl Serialize for Section {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        match (self, s.is_human_readable()) {
            (Section::Json(v), true) => v.serialize(s),
            (Section::Binary(b), false) => s.serialize_bytes(b),
            (Section::Saved(st), true) => st.to_json().map_err(S::Error::custom)?.serialize(s),
            (Section::Saved(st), false) => s.serialize_bytes(&st.to_postcard().map_err(S::Error::custom)?),
            // A section read in one encoding is written in the other only when a
            // state is converted (never on the switch's path).
            (Section::Binary(_), true) | (Section::Json(_), false) => {
                Err(S::Error::custom("a device section read in one encoding cannot be written in the other"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Section {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        if d.is_human_readable() {
            serde_json::Value::deserialize(d).map(Section::Json)
        } else {
            serde_bytes_vec(d).map(Section::Binary)
        }
    }
}

/// A byte string of a binary format, as written by `serialize_bytes`.
fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl serde::de::Visitor<'_> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a device state's bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> std::result::Result<Vec<u8>, E> {
            Ok(v)
        }
    }
    d.deserialize_byte_buf(Bytes)
}

impl DeviceStates {
    /// The saved state of device `id`, as a JSON value (for showing it).
    pub fn section(&self, id: &str) -> Option<serde_json::Value> {
        match self.0.get(id)? {
            Section::Saved(s) => s.to_json().ok(),
            Section::Json(v) => Some(v.clone()),
            Section::Binary(b) => Some(serde_json::Value::String(format!("<{} bytes of binary state>", b.len()))),
        }
    }

    /// The ids of the devices saved, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Puts `state` in as the section of device `id`.
    pub(crate) fn insert<T: Serialize + Send + Sync + 'static>(&mut self, id: &str, state: T) {
        self.0.insert(id.to_string(), Section::Saved(Arc::new(state)));
    }

    /// The section of device `id` decoded as `T`, if there is one.
    pub(crate) fn get<T: DeserializeOwned>(&self, id: &str) -> Option<Result<T>> {
        let err = |e: &dyn std::fmt::Display| Error::device_state(id, std::io::Error::other(e.to_string()));
        Some(match self.0.get(id)? {
            Section::Json(v) => T::deserialize(v).map_err(|e| err(&e)),
            Section::Binary(b) => postcard::from_bytes(b).map_err(|e| err(&e)),
            // Saved here and read back (a converted older state, tests): through
            // JSON, which checks the state's shape.
            Section::Saved(s) => s.to_json().and_then(T::deserialize).map_err(|e| err(&e)),
        })
    }
}
