//! A series of checkpoints in one directory, as periodic checkpointing makes
//! them (`cevm run --checkpoint-every D --keep K --checkpoint-dir DIR`):
//! `DIR/ckpt-000001`, `DIR/ckpt-000002`, ..., each complete and restorable on
//! its own, and `DIR/latest`, a symbolic link to the newest committed one.
//!
//! Old checkpoints are removed only after a newer one was committed, and the
//! newest `keep` always stay: from the first commit on, a complete checkpoint
//! exists at every instant, whatever fails or crashes.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const PREFIX: &str = "ckpt-";
/// The link to the newest committed checkpoint.
pub const LATEST: &str = "latest";

/// The checkpoints of one directory.
#[derive(Debug)]
pub struct Series {
    dir: PathBuf,
    keep: usize,
    next: u64,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |e| Error::Decode { path, reason: format!("{what}: {e}") }
}

/// The number of a checkpoint directory's name (`ckpt-000042` → 42).
fn number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

impl Series {
    /// Opens (making it if needed) the series in `dir`, keeping the newest
    /// `keep` (at least 1). Numbering goes on after the highest there.
    pub fn open(dir: &Path, keep: usize) -> Result<Self> {
        if keep == 0 {
            return Err(Error::Unsupported("--keep must be at least 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir, "cannot make the checkpoint directory"))?;
        let mut s = Series { dir: dir.to_path_buf(), keep, next: 1 };
        s.next = s.list()?.last().map_or(1, |(n, _)| n + 1);
        Ok(s)
    }

    /// The committed checkpoints, oldest first, with their numbers.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir, "cannot read the checkpoint directory"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((number(e.file_name().to_str()?)?, e.path())))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Where the next checkpoint goes (each call names a new one).
    pub fn next_path(&mut self) -> PathBuf {
        let p = self.dir.join(format!("{PREFIX}{:06}", self.next));
        self.next += 1;
        p
    }

    /// Records that `path` (from [`Series::next_path`]) was committed: `latest`
    /// now names it, and checkpoints older than the newest `keep` are removed.
    /// Returns the removed ones.
    pub fn committed(&self, path: &Path) -> Result<Vec<PathBuf>> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| number(n).is_some())
            .ok_or_else(|| Error::Decode { path: path.into(), reason: "is not a checkpoint of this series".into() })?;
        // A new link, then renamed over the old one: `latest` always names a
        // committed checkpoint.
        let tmp = self.dir.join(format!(".{LATEST}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(io(&tmp, "cannot make a link"))?;
        let latest = self.dir.join(LATEST);
        std::fs::rename(&tmp, &latest).map_err(io(&latest, "cannot update the link"))?;
        let all = self.list()?;
        let mut removed = Vec::new();
        let newest = number(name).unwrap_or(0);
        for (n, p) in all.iter().take(all.len().saturating_sub(self.keep)) {
            if *n < newest {
                std::fs::remove_dir_all(p).map_err(io(p, "cannot remove an old checkpoint"))?;
                removed.push(p.clone());
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_commit(p: &Path) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("manifest.json"), b"{}").unwrap();
    }

    #[test]
    fn numbering_goes_on_latest_follows_and_only_older_than_the_newest_keep_go() {
        let t = std::env::temp_dir().join(format!("cevm-series-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        assert!(Series::open(&t, 0).is_err());
        let mut s = Series::open(&t, 2).unwrap();
        let a = s.next_path();
        assert!(a.ends_with("ckpt-000001"));
        fake_commit(&a);
        assert!(s.committed(&a).unwrap().is_empty());
        let b = s.next_path();
        // A checkpoint that failed leaves no directory; numbering simply goes on.
        let c = s.next_path();
        fake_commit(&c);
        assert!(s.committed(&c).unwrap().is_empty());
        assert!(!b.exists());
        let d = s.next_path();
        fake_commit(&d);
        assert_eq!(s.committed(&d).unwrap(), vec![a.clone()]);
        assert_eq!(std::fs::read_link(t.join(LATEST)).unwrap(), Path::new("ckpt-000004"));
        assert!(t.join(LATEST).join("manifest.json").exists());
        // Other files in the directory are never touched.
        std::fs::write(t.join("notes.txt"), b"mine").unwrap();
        std::fs::create_dir_all(t.join("ckpt-x")).unwrap();
        // Reopened: numbering continues after the highest.
        let mut s2 = Series::open(&t, 1).unwrap();
        let e = s2.next_path();
        assert!(e.ends_with("ckpt-000005"));
        fake_commit(&e);
        assert_eq!(s2.committed(&e).unwrap(), vec![c.clone(), d.clone()]);
        assert!(t.join("notes.txt").exists() && t.join("ckpt-x").exists() && e.exists());
        assert!(s2.committed(&t.join("notes.txt")).is_err());
        let _ = std::fs::remove_dir_all(&t);
    }
}
