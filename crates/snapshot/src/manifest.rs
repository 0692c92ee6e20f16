//! manifest.json: its fields, and its own checksum (see the crate docs).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{hex, Error, FORMAT_VERSION};

/// One contiguous range of guest memory; in the image at file offset `guest_addr`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionLayout {
    pub guest_addr: u64,
    pub size: u64,
}

/// The guest memory the image holds: page size and regions, sorted, not overlapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub page_size: u64,
    pub regions: Vec<MemoryRegionLayout>,
}

impl MemoryLayout {
    /// Size of the memory image: the end of the last region.
    pub fn image_size(&self) -> u64 {
        self.regions.iter().map(|r| r.guest_addr + r.size).max().unwrap_or(0)
    }

    /// Checks the regions are page-aligned, sorted and disjoint.
    pub(crate) fn check(&self, path: &Path) -> Result<(), Error> {
        let bad = |reason: String| Error::Manifest { path: path.to_path_buf(), reason };
        if self.page_size == 0 || !self.page_size.is_power_of_two() {
            return Err(bad(format!("page size {} is not a power of two", self.page_size)));
        }
        let mut end = 0;
        for r in &self.regions {
            if r.guest_addr % self.page_size != 0 || r.size % self.page_size != 0 {
                return Err(bad(format!("memory region at {:#x} is not page-aligned", r.guest_addr)));
            }
            if r.guest_addr < end {
                return Err(bad(format!("memory region at {:#x} overlaps or is out of order", r.guest_addr)));
            }
            end = r.guest_addr.checked_add(r.size).ok_or_else(|| bad("memory region overflows".into()))?;
        }
        Ok(())
    }
}

/// How many pages of the image hold data, and how many are holes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemoryStats {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub data_bytes: u64,
}

/// Size and CRC32 of one file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// 8 lowercase hex digits.
    pub crc32: String,
}

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub cevm_version: String,
    pub created_unix_ms: u64,
    /// How it was taken, e.g. `stop-and-save`.
    pub strategy: String,
    /// The guest configuration, owned by the VMM.
    pub guest: serde_json::Value,
    pub memory: MemoryLayout,
    pub memory_stats: MemoryStats,
    /// Every file but manifest.json itself, memory.img included.
    pub files: Vec<FileEntry>,
    /// This checkpoint's identity (16 hex digits), which its incremental
    /// children name; kept when its parent is merged into it. Empty in
    /// checkpoints written before incremental ones existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// An incremental checkpoint's parent: memory.img then holds only the
    /// pages `pages.bitmap` marks, every other page is the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The size of the chunks `memory.chunks` checksums one by one (see
    /// [`crate::chunks`]); 0 in checkpoints written before it existed, which
    /// then hold no `memory.chunks` and cannot be restored lazily.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_chunk_size: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The checkpoint an incremental one builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// Its directory's name: a sibling of this checkpoint's directory.
    pub dir: String,
    /// Its manifest's `id`: the link holds only to exactly that checkpoint.
    pub id: String,
}

/// The bytes every manifest starts with, up to its checksum's digits.
const HEADER: &str = "{\n  \"manifest_crc32\": \"";

/// Serializes a manifest with its checksum.
pub(crate) fn encode(m: &Manifest) -> Result<String, serde_json::Error> {
    let body = serde_json::to_string_pretty(m)?;
    // `body` is "{\n  \"format_version\": ...": put the checksum field in front.
    let rest = body.strip_prefix('{').unwrap_or(&body);
    Ok(seal_manifest(&format!("{HEADER}00000000\",{rest}")))
}

/// Recomputes and writes the checksum of a manifest's text (which must begin with
/// the `"manifest_crc32"` field). Returns the text unchanged if it does not.
/// For tools and tests that edit a manifest on purpose.
pub fn seal_manifest(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    if bytes.len() < HEADER.len() + 8 || !bytes.starts_with(HEADER.as_bytes()) {
        return text.to_string();
    }
    let digits = HEADER.len()..HEADER.len() + 8;
    bytes[digits.clone()].copy_from_slice(b"00000000");
    let crc = hex(crc32fast::hash(&bytes));
    bytes[digits].copy_from_slice(crc.as_bytes());
    String::from_utf8(bytes).unwrap_or_else(|_| text.to_string())
}

/// Checks a manifest's bytes (header, checksum, version) and decodes it.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest, Error> {
    let header_ok = bytes.len() >= HEADER.len() + 8
        && bytes.starts_with(HEADER.as_bytes())
        && bytes[HEADER.len()..HEADER.len() + 8].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !header_ok {
        return Err(Error::ManifestHeader { path: path.to_path_buf() });
    }
    let digits = HEADER.len()..HEADER.len() + 8;
    let expected = String::from_utf8_lossy(&bytes[digits.clone()]).into_owned();
    let mut zeroed = bytes.to_vec();
    zeroed[digits].copy_from_slice(b"00000000");
    let actual = hex(crc32fast::hash(&zeroed));
    if actual != expected {
        return Err(Error::Checksum { path: path.to_path_buf(), expected, actual });
    }
    let bad = |reason: String| Error::Manifest { path: path.to_path_buf(), reason };
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let version = value.get("format_version").and_then(serde_json::Value::as_u64);
    match version {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(found) => {
            return Err(Error::UnsupportedVersion { path: path.to_path_buf(), found, supported: FORMAT_VERSION })
        }
        None => return Err(bad("no format_version".into())),
    }
    if let Some(obj) = value.as_object_mut() {
        obj.remove("manifest_crc32");
    }
    let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    m.memory.check(path)?;
    Ok(m)
}
