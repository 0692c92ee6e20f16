//! A group checkpoint: the checkpoints of every member VM of a job, taken at
//! one consistent cut (see `cevm group checkpoint`), as one directory:
//!
//! ```text
//! ckpt-000007/            a checkpoint of a series (see [`crate::series`])
//!   group.json            the group manifest, written last
//!   m0/  m1/  ...         each member's own checkpoint (manifest.json, ...)
//! ```
//!
//! Each member commits its own checkpoint into the group's directory (the
//! `snapshot` crate's atomic commit). Only when every one has is the group
//! manifest written (to a temporary name, fsynced, renamed, the directory
//! fsynced): it names the members, where they ran (API socket, taps) and the
//! checksum of each member's manifest. A group checkpoint is complete exactly
//! when its manifest is there, sealed, and every member it lists is complete
//! with the manifest it recorded; a series then treats it as one checkpoint
//! (`latest`, retention), so a group checkpoint cut short by a failure or a
//! kill is never taken for one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The group manifest's file name in a group checkpoint.
pub const GROUP_MANIFEST: &str = "group.json";
/// The version of the group manifest this cevm writes and reads.
pub const GROUP_FORMAT_VERSION: u32 = 1;
/// A group manifest larger than this is not one cevm wrote.
const MAX_GROUP_MANIFEST: u64 = 4 << 20;
/// The bytes every group manifest begins with, up to its checksum's digits
/// (the same seal as a member's manifest: `snapshot::seal_manifest`).
const HEADER: &str = "{\n  \"manifest_crc32\": \"";

/// What a group checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupManifest {
    pub format_version: u32,
    pub cevm_version: String,
    pub created_unix_ms: u64,
    /// How the members were checkpointed (a [`crate::Method`]'s name).
    pub method: String,
    /// How long the group was held at the cut: from the first member paused
    /// to the last one running again, as the coordinator saw it.
    pub group_pause_ms: f64,
    pub members: Vec<Member>,
}

/// One member of a group checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its directory in the group checkpoint, and its name in the group.
    pub name: String,
    /// The API socket its VMM served (a group restore serves it there again,
    /// unless told otherwise).
    pub api_sock: Option<PathBuf>,
    /// The `--control` endpoint (HOST:PORT) its VMM on another host served,
    /// if it was reached there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    /// The taps of its NICs, in order.
    pub taps: Vec<String>,
    /// The checksum of its checkpoint's manifest (8 hex digits): the member
    /// checkpoint this group checkpoint was committed with, and no other.
    pub manifest_crc32: String,
    /// How long this member's own checkpoint took, as its VMM reported it
    /// (its guest was paused from before it until the group resumed).
    pub pause_ms: f64,
}

/// Whether `name` can name a member (a directory of a group checkpoint).
pub fn check_member_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "`{name}` cannot name a group member (letters, digits, '-', '_' and '.', not first, at most 64)"
        )))
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Decode { path: path.to_path_buf(), reason: format!("{what}: {e}") }
}

fn hex(v: u32) -> String {
    format!("{v:08x}")
}

/// The checksum of the member checkpoint at `dir`'s manifest, once it is
/// complete (see [`crate::series::incomplete`]).
pub fn member_manifest_crc(dir: &Path) -> Result<String> {
    if let Some(why) = crate::series::incomplete(dir) {
        return Err(Error::Decode { path: dir.to_path_buf(), reason: format!("not a complete checkpoint: {why}") });
    }
    let path = dir.join(snapshot::MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path, "cannot read"))?;
    Ok(hex(crc32fast::hash(&bytes)))
}

impl GroupManifest {
    fn encode(&self) -> Result<String> {
        let body = serde_json::to_string_pretty(self).map_err(|e| Error::Encode(e.to_string()))?;
        let rest = body.strip_prefix('{').unwrap_or(&body);
        Ok(snapshot::seal_manifest(&format!("{HEADER}00000000\",{rest}")))
    }

    fn decode(path: &Path, text: &str) -> Result<GroupManifest> {
        let bad = |reason: String| Error::Decode { path: path.to_path_buf(), reason };
        if !text.starts_with(HEADER) || snapshot::seal_manifest(text) != text {
            return Err(bad("its checksum does not match (damaged, or not a group manifest)".into()));
        }
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match value.get("format_version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(GROUP_FORMAT_VERSION) => {}
            Some(v) => return Err(bad(format!("group format version {v} (this cevm reads {GROUP_FORMAT_VERSION})"))),
            None => return Err(bad("no format_version".into())),
        }
        if let Some(o) = value.as_object_mut() {
            o.remove("manifest_crc32");
        }
        let m: GroupManifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if m.members.is_empty() {
            return Err(bad("a group without members".into()));
        }
        for (i, a) in m.members.iter().enumerate() {
            check_member_name(&a.name).map_err(|e| bad(e.to_string()))?;
            if m.members[..i].iter().any(|b| b.name == a.name) {
                return Err(bad(format!("member {} twice", a.name)));
            }
        }
        Ok(m)
    }
}

/// Commits the group checkpoint at `dir` whose members have each committed
/// their checkpoint to `dir/NAME`: fills in each member's manifest checksum,
/// then writes the group manifest atomically. Fails, writing nothing, if a
/// member's checkpoint is not complete.
pub fn commit(dir: &Path, mut manifest: GroupManifest) -> Result<GroupManifest> {
    for m in &mut manifest.members {
        check_member_name(&m.name)?;
        m.manifest_crc32 = member_manifest_crc(&dir.join(&m.name))?;
    }
    let text = manifest.encode()?;
    let tmp = dir.join(format!(".{GROUP_MANIFEST}.tmp"));
    let path = dir.join(GROUP_MANIFEST);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp, "cannot create"))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&tmp, "cannot write"))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path, "cannot rename into place"))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "cannot fsync"))?;
    Ok(manifest)
}

/// Reads the group checkpoint at `dir` and checks that it is complete: its
/// manifest sealed, every member's checkpoint complete and the one it was
/// committed with. Reads no member's memory (see [`verify`]).
pub fn open(dir: &Path) -> Result<GroupManifest> {
    use std::io::Read;
    let path = dir.join(GROUP_MANIFEST);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_GROUP_MANIFEST).read_to_string(&mut text))
        .map_err(io(&path, "cannot read"))?;
    let m = GroupManifest::decode(&path, &text)?;
    for member in &m.members {
        let mdir = dir.join(&member.name);
        let crc = member_manifest_crc(&mdir)?;
        if crc != member.manifest_crc32 {
            return Err(Error::Decode {
                path: mdir,
                reason: format!(
                    "its manifest is not the one the group committed (checksum {crc}, the group recorded {})",
                    member.manifest_crc32
                ),
            });
        }
    }
    Ok(m)
}

/// Whether `dir` holds a group checkpoint (complete or not): it has a group
/// manifest.
pub fn is_group(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(GROUP_MANIFEST)).is_ok()
}

/// Checks a group checkpoint completely: [`open`], then every member's
/// checkpoint with every checksum ([`crate::verify`]). Returns the manifest
/// and each member's report.
pub fn verify(dir: &Path) -> Result<(GroupManifest, Vec<snapshot::VerifyReport>)> {
    let m = open(dir)?;
    let reports = m.members.iter().map(|member| crate::verify(&dir.join(&member.name))).collect::<Result<_>>()?;
    Ok((m, reports))
}

#[cfg(test)]
mod tests;
