//! The one codec of an instance's saved state, for checkpoints (JSON, a
//! checkpoint's state.json) and live migration (binary, the `State` frame). The
//! state carries its own version, apart from the checkpoint format's and the
//! migration protocol's: this cevm writes [`STATE_VERSION`] and reads it and
//! [`PREVIOUS_STATE_VERSION`], converting the previous layout.
//!
//! ```text
//! JSON    {"state_version": 2, "vm": ..., "vcpus": [...], "devices": {"serial": ..., ...}}
//!         version 1 had no "state_version" field
//! binary  "CVST", u32 version (little endian), the state in postcard's format
//!         version 1 was the bare postcard bytes (they never begin with "CVST":
//!         their first byte is the length of the saved kvmclock, 48)
//! ```

use serde::{Deserialize, Serialize};

use super::v1::InstanceStateV1;
use crate::state::{DeviceStates, InstanceState, VcpuState, VmState};

/// The version of the state this cevm writes.
pub const STATE_VERSION: u32 = 2;
/// The older version this cevm still reads.
pub const PREVIOUS_STATE_VERSION: u32 = STATE_VERSION - 1;
/// First bytes of a binary-encoded state (from version 2 on).
const BINARY_MAGIC: [u8; 4] = *b"CVST";

/// How a state is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// JSON, readable with `jq`: checkpoints.
    Json,
    /// Compact binary (KVM's state structs as raw bytes, which JSON spells out
    /// number by number): the migration stream, inside the guest's downtime.
    Binary,
}

/// Why a state could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The state is of a version this cevm does not read.
    #[error("unsupported state version {found} (this cevm reads {STATE_VERSION} and {PREVIOUS_STATE_VERSION})")]
    UnsupportedVersion { found: u64 },
    /// The state could not be serialized.
    #[error("cannot encode the instance state: {0}")]
    Encode(String),
    /// The bytes do not hold a state of the version they claim.
    #[error("the instance state (version {version}) does not decode: {reason}")]
    Decode { version: u32, reason: String },
}

/// The JSON document of the current version: the version first, then the state.
#[derive(Serialize)]
struct JsonDocument<'a> {
    state_version: u32,
    vm: &'a VmState,
    vcpus: &'a [VcpuState],
    devices: &'a DeviceStates,
}

/// Just the version field of a JSON document (absent in version 1).
#[derive(Deserialize)]
struct JsonVersion {
    state_version: Option<u64>,
}

/// Encodes `state` in the current version.
pub fn encode(state: &InstanceState, encoding: Encoding) -> Result<Vec<u8>, CodecError> {
    let err = |e: &dyn std::fmt::Display| CodecError::Encode(e.to_string());
    match encoding {
        Encoding::Json => {
            let doc = JsonDocument {
                state_version: STATE_VERSION,
                vm: &state.vm,
                vcpus: &state.vcpus,
                devices: &state.devices,
            };
            serde_json::to_vec(&doc).map_err(|e| err(&e))
        }
        Encoding::Binary => {
            let mut out = Vec::with_capacity(32 << 10);
            out.extend_from_slice(&BINARY_MAGIC);
            out.extend_from_slice(&STATE_VERSION.to_le_bytes());
            postcard::to_extend(state, out).map_err(|e| err(&e))
        }
    }
}

/// Decodes a state of the current or the previous version.
pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<InstanceState, CodecError> {
    match encoding {
        Encoding::Json => decode_json(bytes),
        Encoding::Binary => decode_binary(bytes),
    }
}

fn decode_error(version: u32) -> impl Fn(&dyn std::fmt::Display) -> CodecError {
    move |e| CodecError::Decode { version, reason: e.to_string() }
}

fn decode_json(bytes: &[u8]) -> Result<InstanceState, CodecError> {
    let probe: JsonVersion = serde_json::from_slice(bytes).map_err(|e| decode_error(STATE_VERSION)(&e))?;
    match probe.state_version {
        None => {
            let old: InstanceStateV1 =
                serde_json::from_slice(bytes).map_err(|e| decode_error(PREVIOUS_STATE_VERSION)(&e))?;
            old.upgrade().map_err(|e| decode_error(PREVIOUS_STATE_VERSION)(&e))
        }
        Some(v) if v == u64::from(STATE_VERSION) => {
            serde_json::from_slice(bytes).map_err(|e| decode_error(STATE_VERSION)(&e))
        }
        Some(found) => Err(CodecError::UnsupportedVersion { found }),
    }
}

fn decode_binary(bytes: &[u8]) -> Result<InstanceState, CodecError> {
    let Some(rest) = bytes.strip_prefix(&BINARY_MAGIC) else {
        return decode_binary_v1(bytes);
    };
    let (version, body) = match rest.split_first_chunk::<4>() {
        Some((v, body)) => (u32::from_le_bytes(*v), body),
        None => return Err(decode_error(STATE_VERSION)(&"it ends inside its version field")),
    };
    match version {
        STATE_VERSION => whole_postcard(body, version),
        PREVIOUS_STATE_VERSION => decode_binary_v1(body),
        found => Err(CodecError::UnsupportedVersion { found: found.into() }),
    }
}

fn decode_binary_v1(body: &[u8]) -> Result<InstanceState, CodecError> {
    let old: InstanceStateV1 = whole_postcard(body, PREVIOUS_STATE_VERSION)?;
    old.upgrade().map_err(|e| decode_error(PREVIOUS_STATE_VERSION)(&e))
}

/// `T` from exactly the postcard bytes of `body`.
fn whole_postcard<T: serde::de::DeserializeOwned>(body: &[u8], version: u32) -> Result<T, CodecError> {
    let (value, trailing) = postcard::take_from_bytes(body).map_err(|e| decode_error(version)(&e))?;
    if !trailing.is_empty() {
        return Err(decode_error(version)(&format_args!("{} bytes follow the state", trailing.len())));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::device_ids;

    /// The state.json of a checkpoint that cevm wrote at commit f3e6526: version 1.
    const V1_JSON: &[u8] = include_bytes!("../../../cevm/tests/fixtures/main-f3e6526/state.json");

    fn json_of(state: &InstanceState) -> serde_json::Value {
        serde_json::from_slice(&encode(state, Encoding::Json).unwrap()).unwrap()
    }

    #[test]
    fn the_previous_version_decodes_from_json_into_sections() {
        let state = decode(V1_JSON, Encoding::Json).unwrap();
        let old: serde_json::Value = serde_json::from_slice(V1_JSON).unwrap();
        assert_eq!(state.vcpus.len(), 1);
        assert_eq!(state.devices.ids().collect::<Vec<_>>(), [device_ids::SERIAL]);
        assert_eq!(state.devices.section(device_ids::SERIAL), Some(old["devices"]["serial"].clone()));
        // Everything else is carried over as it was.
        let new = json_of(&state);
        assert_eq!(new["state_version"], STATE_VERSION);
        assert_eq!(new["vm"], old["vm"]);
        assert_eq!(new["vcpus"], old["vcpus"]);
    }

    #[test]
    fn a_previous_version_disk_becomes_its_virtio_blk_section() {
        let mut old: serde_json::Value = serde_json::from_slice(V1_JSON).unwrap();
        let blk = serde_json::json!({
            "device_features_sel": 1, "driver_features_sel": 0, "driver_features": 4294967296u64, "queue_sel": 0,
            "status": 15, "interrupt_status": 1, "config_generation": 0,
            "queues": [{ "max_size": 256, "size": 256, "ready": true, "desc_table": 4096, "avail_ring": 8192,
                         "used_ring": 12288, "next_avail": 7, "next_used": 7, "event_idx_enabled": false }]
        });
        old["devices"]["virtio_blk"] = blk.clone();
        let state = decode(&serde_json::to_vec(&old).unwrap(), Encoding::Json).unwrap();
        assert_eq!(state.devices.ids().collect::<Vec<_>>(), [device_ids::SERIAL, device_ids::VIRTIO_BLK]);
        assert_eq!(state.devices.section(device_ids::VIRTIO_BLK), Some(blk));
        // A version-1 `null` disk is no section at all.
        old["devices"]["virtio_blk"] = serde_json::Value::Null;
        let state = decode(&serde_json::to_vec(&old).unwrap(), Encoding::Json).unwrap();
        assert_eq!(state.devices.ids().collect::<Vec<_>>(), [device_ids::SERIAL]);
    }

    #[test]
    fn the_previous_version_decodes_from_binary() {
        let old: InstanceStateV1 = serde_json::from_slice(V1_JSON).unwrap();
        // What the migration stream of cevm f3e6526 carried: the bare postcard bytes.
        let v1_binary = postcard::to_stdvec(&old).unwrap();
        let from_binary = decode(&v1_binary, Encoding::Binary).unwrap();
        let from_json = decode(V1_JSON, Encoding::Json).unwrap();
        assert_eq!(json_of(&from_binary), json_of(&from_json));
    }

    #[test]
    fn the_current_version_round_trips_in_both_encodings() {
        let state = decode(V1_JSON, Encoding::Json).unwrap();
        // A state decoded from the binary stream keeps its device sections as
        // bytes until each device reads its own: compare what the devices read.
        let serial = |s: &InstanceState| {
            let uart: devices::SerialState = s.devices.get(device_ids::SERIAL).unwrap().unwrap();
            serde_json::to_value(uart).unwrap()
        };
        for encoding in [Encoding::Json, Encoding::Binary] {
            let bytes = encode(&state, encoding).unwrap();
            let again = decode(&bytes, encoding).unwrap();
            let value = |v: &dyn Fn(&InstanceState) -> serde_json::Value| (v(&again), v(&state));
            let (a, b) = value(&|s| serde_json::to_value(&s.vm).unwrap());
            assert_eq!(a, b, "{encoding:?}");
            let (a, b) = value(&|s| serde_json::to_value(&s.vcpus).unwrap());
            assert_eq!(a, b, "{encoding:?}");
            assert_eq!(serial(&again), serial(&state), "{encoding:?}");
        }
        let json = encode(&state, Encoding::Json).unwrap();
        assert!(json.starts_with(b"{\"state_version\":2,"), "{}", String::from_utf8_lossy(&json[..40]));
        let binary = encode(&state, Encoding::Binary).unwrap();
        assert_eq!(&binary[..8], b"CVST\x02\x00\x00\x00");
        // The devices travel in the binary stream too, section by section.
        let again = decode(&binary, Encoding::Binary).unwrap();
        assert_eq!(again.devices.ids().collect::<Vec<_>>(), state.devices.ids().collect::<Vec<_>>());
    }

    #[test]
    fn an_unknown_version_is_refused_by_name() {
        let state = decode(V1_JSON, Encoding::Json).unwrap();
        let mut json = json_of(&state);
        json["state_version"] = 3.into();
        let e = decode(&serde_json::to_vec(&json).unwrap(), Encoding::Json).unwrap_err();
        assert_eq!(e, CodecError::UnsupportedVersion { found: 3 });
        assert_eq!(e.to_string(), "unsupported state version 3 (this cevm reads 2 and 1)");
        json["state_version"] = 0.into();
        let e = decode(&serde_json::to_vec(&json).unwrap(), Encoding::Json).unwrap_err();
        assert_eq!(e, CodecError::UnsupportedVersion { found: 0 });

        let mut binary = encode(&state, Encoding::Binary).unwrap();
        binary[4..8].copy_from_slice(&99u32.to_le_bytes());
        let e = decode(&binary, Encoding::Binary).unwrap_err();
        assert_eq!(e.to_string(), "unsupported state version 99 (this cevm reads 2 and 1)");
    }

    #[test]
    fn damaged_states_are_refused_with_their_version() {
        let state = decode(V1_JSON, Encoding::Json).unwrap();
        let binary = encode(&state, Encoding::Binary).unwrap();
        for cut in [6, 100, binary.len() - 1] {
            let e = decode(&binary[..cut], Encoding::Binary).unwrap_err();
            assert!(matches!(e, CodecError::Decode { version: STATE_VERSION, .. }), "cut at {cut}: {e}");
        }
        let mut trailing = binary.clone();
        trailing.push(0);
        assert!(decode(&trailing, Encoding::Binary).unwrap_err().to_string().contains("1 bytes follow"));
        let e = decode(&V1_JSON[..V1_JSON.len() / 2], Encoding::Json).unwrap_err();
        assert!(matches!(e, CodecError::Decode { .. }), "{e}");
        let mut json = json_of(&state);
        json["vcpus"] = "none".into();
        let e = decode(&serde_json::to_vec(&json).unwrap(), Encoding::Json).unwrap_err();
        assert!(matches!(e, CodecError::Decode { version: STATE_VERSION, .. }), "{e}");
    }
}
