//! A checkpoint directory as `cevm verify` and `cevm restore` read it: every
//! file of it from the fuzzer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use snapshot::{Manifest, MANIFEST_FILE, MEMORY_FILE};

/// memory.img, when the input holds none, is made as a sparse file of the
/// layout's size, up to this size.
const MAX_MEMORY: u64 = 64 << 20;

/// Input: a flags byte, then entries `name_len: u8, name, len: u32 LE, bytes`
/// (names of at most 32 characters from `[a-z0-9._-]`, not starting with a
/// dot; others are skipped, so nothing is ever written outside the directory).
/// Flags bit 0: re-seal, i.e. set every listed file's size and CRC and the
/// manifest's own checksum to what the files hold, so that the fuzzer gets
/// past the checksums into the manifest's and the state's meaning.
/// Then the directory is verified exactly as `cevm verify` does.
pub fn verify(data: &[u8]) {
    verified(data);
}

/// [`verify`], telling whether the directory verified.
pub fn verified(data: &[u8]) -> bool {
    let Some((&flags, mut rest)) = data.split_first() else { return false };
    let dir = scratch();
    let mut have_memory = false;
    while let Some((&n, r)) = rest.split_first() {
        let n = usize::from(n);
        let Some((name, r)) = r.split_at_checked(n) else { break };
        let Some((len, r)) = r.split_first_chunk::<4>() else { break };
        let len = (u32::from_le_bytes(*len) as usize).min(r.len());
        let (bytes, r) = r.split_at(len);
        rest = r;
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if !safe(name) {
            continue;
        }
        have_memory |= name == MEMORY_FILE;
        std::fs::write(dir.join(name), bytes).expect("write into the scratch directory");
    }
    if !have_memory {
        sparse_memory(&dir);
    }
    if flags & 1 != 0 {
        reseal(&dir);
    }
    let ok = checkpoint::verify(&dir).is_ok();
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

fn safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A fresh directory on tmpfs for one input.
fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("cevm-fuzz-ckpt-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("scratch directory");
    dir
}

/// The manifest, if it parses (its checksum field dropped).
fn manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    let mut v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.as_object_mut()?.remove("manifest_crc32");
    serde_json::from_value(v).ok()
}

fn sparse_memory(dir: &Path) {
    let size = manifest(dir).map_or(0, |m| m.memory.image_size()).min(MAX_MEMORY);
    let f = std::fs::File::create(dir.join(MEMORY_FILE)).expect("memory.img");
    f.set_len(size).expect("size memory.img");
}

/// Makes the manifest's entries and checksum agree with the files.
fn reseal(dir: &Path) {
    let Some(mut m) = manifest(dir) else { return };
    for f in &mut m.files {
        if !safe(&f.name) {
            continue;
        }
        let Ok(bytes) = std::fs::read(dir.join(&f.name)) else { continue };
        f.size = bytes.len() as u64;
        f.crc32 = format!("{:08x}", crc32fast::hash(&bytes));
    }
    let Ok(body) = serde_json::to_string_pretty(&m) else { return };
    let rest = body.strip_prefix('{').unwrap_or(&body);
    let text = snapshot::seal_manifest(&format!("{{\n  \"manifest_crc32\": \"00000000\",{rest}"));
    std::fs::write(dir.join(MANIFEST_FILE), text).expect("write the manifest");
}
