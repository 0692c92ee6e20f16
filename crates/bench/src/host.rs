//! This machine's limits and facts: memory copy and sequential write + fdatasync
//! bandwidth, file system type, allocated bytes.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::stats::median_min_max;

/// Sequential write of `bytes` bytes in 8 MiB writes, then fdatasync: MiB/s.
pub fn disk_limit(path: &Path, bytes: u64) -> Result<f64, String> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0xa5u8; 8 << 20];
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off).map_err(|e| format!("{}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_data().map_err(|e| format!("{}: {e}", path.display()))?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(bytes as f64 / (1 << 20) as f64 / secs)
}

/// Allocated bytes of a file, or of every file under a directory.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else { return 0 };
    if m.is_dir() {
        std::fs::read_dir(path).map(|d| d.filter_map(Result::ok).map(|e| allocated_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        m.blocks() * 512
    }
}

/// The physical limits a checkpoint runs against, measured in the same run:
/// memory copy bandwidth, and sequential write + fdatasync on the checkpoint
/// file system.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Limits {
    /// The checkpoint file system: its type and the directory measured.
    pub fs: String,
    /// Bytes per measurement.
    pub bytes: u64,
    /// One sample per run, MiB/s.
    pub memcpy_mib_s: Vec<f64>,
    pub write_fdatasync_mib_s: Vec<f64>,
}

impl Limits {
    /// Measures both limits `runs` times (at least 3) with `bytes` bytes each
    /// (the memory copy at most 512 MiB).
    pub fn measure(dir: &Path, bytes: u64, runs: usize) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let runs = runs.max(3);
        let file = dir.join("limit.bin");
        // Warm-up: the first write into never-written blocks of a thin-provisioned
        // virtual disk runs several times slower than any later one.
        disk_limit(&file, bytes)?;
        let mut write = Vec::new();
        for _ in 0..runs {
            write.push(disk_limit(&file, bytes)?);
        }
        let n = (bytes.min(512 << 20) / 8) as usize;
        let src = vec![0x5a5a_5a5a_5a5a_5a5au64; n];
        let mut dst = vec![1u64; n];
        let mut memcpy = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            memcpy.push((n * 8) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
        }
        Ok(Limits {
            fs: format!("{} at {}", fs_type(dir), dir.display()),
            bytes,
            memcpy_mib_s: memcpy,
            write_fdatasync_mib_s: write,
        })
    }

    pub fn memcpy(&self) -> f64 {
        median_min_max(&self.memcpy_mib_s).0
    }

    pub fn write(&self) -> f64 {
        median_min_max(&self.write_fdatasync_mib_s).0
    }
}

/// The file system type of `dir`, by statfs(2)'s magic number.
fn fs_type(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return "unknown".into() };
    // SAFETY: `statfs` is a plain C struct of integers, for which all zeroes is
    // a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and `st`
    // is a `statfs` we own, which the call only writes.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x0102_1997 => "9p".into(),
        t => format!("fs 0x{t:x}"),
    }
}
