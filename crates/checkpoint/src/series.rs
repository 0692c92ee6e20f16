//! A series of checkpoints in one directory, as periodic checkpointing makes
//! them (`cevm run --checkpoint-every D --keep K --checkpoint-dir DIR`):
//! `DIR/ckpt-000001`, `DIR/ckpt-000002`, ..., each complete and restorable on
//! its own, and `DIR/latest`, a symbolic link to the newest complete one.
//!
//! Every change to the directory is one atomic rename, in an order that keeps
//! the series whole if the VMM is killed between any two of them:
//! 1. a checkpoint appears whole under its name (the `snapshot` crate's commit);
//! 2. `latest` is replaced by a new link renamed over it, and the directory is
//!    fsynced; it only ever moves to a newer checkpoint (numbers follow the
//!    order checkpoints were started in, and CEVM checkpoints, written while
//!    the guest runs on, may commit out of that order);
//! 3. a checkpoint beyond the newest `keep` complete ones is first renamed to
//!    a hidden `.ckpt-N.deleting` (the directory fsynced), then removed: a
//!    removal cut short leaves that hidden name, never a `ckpt-N` with files
//!    missing.
//!
//! [`Series::open`] sweeps what a killed VMM left: it finishes removals,
//! removes temporary directories of writers that died, points `latest` at the
//! newest complete checkpoint and removes the ones beyond `keep`, and says
//! what it did ([`Series::repairs`]). Dropping a series (the VMM ends)
//! settles it the same way, since a CEVM checkpoint may commit after the
//! control loop stopped listening. From the first commit on, a complete
//! checkpoint exists at every instant, and after a sweep `latest` names the
//! newest one, whatever failed or crashed.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const PREFIX: &str = "ckpt-";
/// The link to the newest committed checkpoint.
pub const LATEST: &str = "latest";
/// Suffix of a checkpoint being removed (`.ckpt-000001.deleting`).
const DELETING: &str = ".deleting";
/// Infix of the snapshot writer's temporary directories
/// (`.ckpt-000001.tmp-PID-N`, see `snapshot::CheckpointWriter`).
const WRITING: &str = ".tmp-";
/// A manifest larger than this is not one cevm wrote.
const MAX_MANIFEST: u64 = 16 << 20;

/// The checkpoints of one directory.
#[derive(Debug)]
pub struct Series {
    dir: PathBuf,
    keep: usize,
    next: u64,
    repairs: Vec<Repair>,
}

/// Settles the series (see [`Series::settle`]) and says what that changed.
impl Drop for Series {
    fn drop(&mut self) {
        // Gone (removed by its owner): nothing to settle.
        if !self.dir.is_dir() {
            return;
        }
        let settled = self.settle();
        let dir = self.dir.display();
        match settled {
            Ok(done) => done.iter().for_each(|r| eprintln!("cevm: checkpoint series {dir}: {r}")),
            Err(e) => eprintln!("cevm: checkpoint series {dir}: {e}"),
        }
    }
}

/// What opening (or settling) a series did to put right what a killed (or
/// ended) VMM left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// A removal a VMM had begun (`.ckpt-N.deleting`) was finished.
    FinishedRemoval(PathBuf),
    /// `ckpt-N`, older than the newest complete checkpoint and missing files
    /// (its removal by an older cevm was cut short), was removed.
    RemovedIncomplete { path: PathBuf, why: String },
    /// `ckpt-N`, newer than every complete checkpoint, is not complete; it is
    /// left as it is, and neither linked nor counted.
    LeftIncomplete { path: PathBuf, why: String },
    /// The temporary directory of a checkpoint writer that died was removed.
    RemovedTemporary(PathBuf),
    /// `latest` was made to name the newest complete checkpoint.
    Latest { was: Option<String>, now: String },
    /// `latest` named no complete checkpoint, and there is none: it was removed.
    RemovedLatest { was: String },
    /// A complete checkpoint beyond the newest `keep` was removed (the VMM was
    /// killed, or ended, between a commit and the removal it allowed).
    Pruned(PathBuf),
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::FinishedRemoval(p) => write!(f, "finished removing {}, whose removal was cut short", p.display()),
            Repair::RemovedIncomplete { path, why } => {
                write!(f, "removed {}, an old checkpoint whose removal was cut short ({why})", path.display())
            }
            Repair::LeftIncomplete { path, why } => {
                write!(f, "{} is not a complete checkpoint ({why}); left as it is, not counted", path.display())
            }
            Repair::RemovedTemporary(p) => write!(f, "removed {}, left by a checkpoint writer that died", p.display()),
            Repair::Latest { was: Some(was), now } => {
                write!(f, "`{LATEST}` named {was}; now the newest complete, {now}")
            }
            Repair::Latest { was: None, now } => {
                write!(f, "`{LATEST}` was missing; now names the newest complete, {now}")
            }
            Repair::RemovedLatest { was } => write!(f, "removed `{LATEST}`, which named {was}: no complete checkpoint"),
            Repair::Pruned(p) => write!(f, "removed {}, beyond the checkpoints to keep", p.display()),
        }
    }
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

fn name_of(n: u64) -> String {
    format!("{PREFIX}{n:06}")
}

/// What an entry of a series directory is, by its name.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Checkpoint(u64),
    /// `.ckpt-N.deleting`.
    Deleting(u64),
    /// `.ckpt-N.tmp-PID-K`: a snapshot writer's, of process PID.
    Writing(u64, i32),
    /// `.latest.tmp-PID`: a link about to become `latest` (`.latest.tmp`, as
    /// earlier cevm named it: no PID).
    NewLatest(Option<i32>),
    Other,
}

fn entry(name: &str) -> Entry {
    if let Some(n) = number(name) {
        return Entry::Checkpoint(n);
    }
    let Some(hidden) = name.strip_prefix('.') else { return Entry::Other };
    if let Some(n) = hidden.strip_suffix(DELETING).and_then(number) {
        return Entry::Deleting(n);
    }
    if let Some(rest) = hidden.strip_prefix(LATEST) {
        if rest == WRITING.trim_end_matches('-') {
            return Entry::NewLatest(None);
        }
        if let Some(pid) = rest.strip_prefix(WRITING).and_then(|p| p.parse().ok()) {
            return Entry::NewLatest(Some(pid));
        }
    }
    let Some((ckpt, rest)) = hidden.split_once(WRITING) else { return Entry::Other };
    match (number(ckpt), rest.split('-').next().and_then(|p| p.parse().ok())) {
        (Some(n), Some(pid)) => Entry::Writing(n, pid),
        _ => Entry::Other,
    }
}

/// Whether process `pid` has ended (its temporary files are anybody's to remove).
fn dead(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks whether the process exists.
    pid > 0
        && unsafe { libc::kill(pid, 0) } == -1
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Why the checkpoint at `dir` is not complete, if it is not (a group
/// checkpoint: see [`crate::group::open`]): its manifest must
/// be a regular file whose own checksum holds, and every file it lists a
/// regular file of the listed size. Cheap, and enough to tell a committed
/// checkpoint from one half removed: no content but the manifest's is read
/// (`cevm verify` and restore check every checksum).
pub fn incomplete(dir: &Path) -> Option<String> {
    // A group checkpoint: complete with its group manifest over complete members.
    if crate::group::is_group(dir) {
        return crate::group::open(dir).err().map(|e| e.to_string());
    }
    let regular = |name: &str| -> std::result::Result<u64, String> {
        let meta = std::fs::symlink_metadata(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        if meta.is_file() {
            Ok(meta.len())
        } else {
            Err(format!("{name} is not a regular file"))
        }
    };
    let check = || -> std::result::Result<(), String> {
        let mname = snapshot::MANIFEST_FILE;
        if regular(mname)? > MAX_MANIFEST {
            return Err(format!("{mname} is larger than any manifest"));
        }
        let mut text = String::new();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join(mname))
            .and_then(|f| f.take(MAX_MANIFEST).read_to_string(&mut text))
            .map_err(|e| format!("{mname}: {e}"))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{mname}: {e}"))?;
        if value.get("manifest_crc32").is_none() || snapshot::seal_manifest(&text) != text {
            return Err(format!("{mname}: its checksum does not match"));
        }
        let files = value.get("files").and_then(|f| f.as_array()).ok_or(format!("{mname} lists no files"))?;
        for f in files {
            let (Some(name), Some(size)) =
                (f.get("name").and_then(|n| n.as_str()), f.get("size").and_then(|s| s.as_u64()))
            else {
                return Err(format!("{mname}: a file without name or size"));
            };
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!("{mname}: bad file name `{name}`"));
            }
            let actual = regular(name)?;
            if actual != size {
                return Err(format!("{name} holds {actual} bytes, not {size}"));
            }
        }
        Ok(())
    };
    check().err()
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "cannot fsync the checkpoint directory"))
}

/// Removes a directory tree; one already gone is no error.
fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(p, "cannot remove")(e)),
        _ => Ok(()),
    }
}

/// Simulated kills, for the tests: a step named here stops [`Series::committed`]
/// as a SIGKILL there would.
#[cfg(test)]
mod kill {
    use std::cell::Cell;

    thread_local! {
        pub static AT: Cell<Option<&'static str>> = const { Cell::new(None) };
    }

    pub fn point(step: &'static str) -> crate::Result<()> {
        if AT.with(|a| a.get()) == Some(step) {
            return Err(crate::Error::Unsupported(format!("killed at {step}")));
        }
        Ok(())
    }
}

/// Without the tests, no step stops.
#[cfg(not(test))]
mod kill {
    #[inline(always)]
    pub fn point(_step: &'static str) -> crate::Result<()> {
        Ok(())
    }
}

impl Series {
    /// Opens (making it if needed) the series in `dir`, keeping the newest
    /// `keep` (at least 1) complete checkpoints, and sweeps it (see the module
    /// docs; what the sweep did is in [`Series::repairs`]). Numbering goes on
    /// after the highest number there.
    pub fn open(dir: &Path, keep: usize) -> Result<Self> {
        if keep == 0 {
            return Err(Error::Unsupported("--keep must be at least 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir, "cannot make the checkpoint directory"))?;
        let mut s = Series { dir: dir.to_path_buf(), keep, next: 1, repairs: Vec::new() };
        s.sweep()?;
        Ok(s)
    }

    /// What [`Series::open`] did to put the series right, in order.
    pub fn repairs(&self) -> &[Repair] {
        &self.repairs
    }

    fn entries(&self) -> Result<Vec<(Entry, PathBuf)>> {
        Ok(std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir, "cannot read the checkpoint directory"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((entry(e.file_name().to_str()?), e.path())))
            .collect())
    }

    /// The checkpoint directories (complete or not), oldest first, with their numbers.
    fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut v: Vec<(u64, PathBuf)> = self
            .entries()?
            .into_iter()
            .filter_map(|(e, p)| match e {
                // A symbolic link or file named so is not one of ours.
                Entry::Checkpoint(n) if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) => Some((n, p)),
                _ => None,
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// The complete checkpoints, oldest first, with their numbers.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        Ok(self.checkpoints()?.into_iter().filter(|(_, p)| incomplete(p).is_none()).collect())
    }

    /// The series' directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the next checkpoint goes (each call names a new one).
    pub fn next_path(&mut self) -> PathBuf {
        let p = self.dir.join(name_of(self.next));
        self.next += 1;
        p
    }

    /// Records that `path` (from [`Series::next_path`]) was committed: `latest`
    /// names it unless it names a newer one, and complete checkpoints beyond
    /// the newest `keep` are removed. Returns the removed ones.
    pub fn committed(&self, path: &Path) -> Result<Vec<PathBuf>> {
        let not_ours = |reason: &str| Error::Decode { path: path.into(), reason: reason.into() };
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(number)
            .filter(|_| path.parent() == Some(self.dir.as_path()))
            .ok_or_else(|| not_ours("is not a checkpoint of this series"))?;
        if let Some(why) = incomplete(path) {
            return Err(not_ours(&format!("is not a complete checkpoint: {why}")));
        }
        kill::point("committed")?;
        if self.latest()?.is_none_or(|(m, _)| m < n) {
            self.link_latest(n)?;
        }
        kill::point("linked")?;
        self.remove(&self.beyond_keep()?)
    }

    /// The complete checkpoint `latest` names, if it names one.
    fn latest(&self) -> Result<Option<(u64, String)>> {
        let link = self.dir.join(LATEST);
        match std::fs::symlink_metadata(&link) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&link, "cannot read the link")(e)),
            Ok(m) if !m.file_type().is_symlink() => {
                return Err(Error::Decode {
                    path: link,
                    reason: "is not a symbolic link; cevm names the newest checkpoint so and replaces nothing else"
                        .into(),
                })
            }
            Ok(_) => {}
        }
        let target = std::fs::read_link(&link).map_err(io(&link, "cannot read the link"))?;
        let target = target.to_string_lossy().into_owned();
        Ok(number(&target).filter(|_| incomplete(&self.dir.join(&target)).is_none()).map(|n| (n, target)))
    }

    /// Points `latest` at checkpoint `n` atomically: a new link renamed over it,
    /// then the directory fsynced (so no removal that follows can reach the
    /// disk before it).
    fn link_latest(&self, n: u64) -> Result<()> {
        let tmp = self.dir.join(format!(".{LATEST}{WRITING}{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name_of(n), &tmp).map_err(io(&tmp, "cannot make a link"))?;
        kill::point("link-made")?;
        let latest = self.dir.join(LATEST);
        std::fs::rename(&tmp, &latest).map_err(io(&latest, "cannot update the link"))?;
        kill::point("link-renamed")?;
        fsync_dir(&self.dir)
    }

    /// The complete checkpoints beyond the newest `keep`.
    fn beyond_keep(&self) -> Result<Vec<PathBuf>> {
        let all = self.list()?;
        Ok(all.iter().take(all.len().saturating_sub(self.keep)).map(|(_, p)| p.clone()).collect())
    }

    /// Removes checkpoints: each renamed to its hidden `.deleting` name, the
    /// directory fsynced, then each removed. First, oldest first, every
    /// incremental checkpoint of the series built on one of them has that
    /// parent merged into it (`snapshot::merge_parent`, atomic): every
    /// checkpoint left stays restorable. A merge that fails removes nothing.
    fn remove(&self, doomed: &[PathBuf]) -> Result<Vec<PathBuf>> {
        for d in doomed {
            let name = d.file_name().unwrap_or_default().to_string_lossy().into_owned();
            for (_, c) in self.list()? {
                let built_on_d = snapshot::read_manifest(&c)
                    .ok()
                    .and_then(|m| m.parent)
                    .is_some_and(|p| p.dir == name || Path::new(&p.dir) == d.as_path());
                if built_on_d {
                    snapshot::merge_parent(&c)?;
                    kill::point("merged")?;
                }
            }
        }
        let mut hidden = Vec::new();
        for p in doomed {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let h = self.dir.join(format!(".{name}{DELETING}"));
            // A leftover of that name (a number reused by hand) goes first.
            remove_tree(&h)?;
            std::fs::rename(p, &h).map_err(io(p, "cannot remove an old checkpoint"))?;
            hidden.push(h);
            kill::point("condemned-one")?;
        }
        if !hidden.is_empty() {
            fsync_dir(&self.dir)?;
        }
        kill::point("condemned")?;
        for h in &hidden {
            remove_tree(h)?;
            kill::point("removed-one")?;
        }
        Ok(doomed.to_vec())
    }

    /// Puts right what a killed VMM left (see the module docs).
    fn sweep(&mut self) -> Result<()> {
        let mut highest = 0;
        for (e, p) in self.entries()? {
            match e {
                Entry::Deleting(n) => {
                    highest = highest.max(n);
                    remove_tree(&p)?;
                    self.repairs.push(Repair::FinishedRemoval(p));
                }
                // A live writer's number is taken; a dead one's never committed.
                Entry::Writing(n, pid) => {
                    if dead(pid) {
                        remove_tree(&p)?;
                        self.repairs.push(Repair::RemovedTemporary(p));
                    } else {
                        highest = highest.max(n);
                    }
                }
                Entry::NewLatest(pid) if pid.is_none_or(|pid| dead(pid) || pid == std::process::id() as i32) => {
                    std::fs::remove_file(&p).map_err(io(&p, "cannot remove"))?;
                }
                Entry::Checkpoint(n) => highest = highest.max(n),
                _ => {}
            }
        }
        self.next = highest + 1;
        let all = self.checkpoints()?;
        let newest_complete = all.iter().rev().find(|(_, p)| incomplete(p).is_none()).map(|(n, _)| *n);
        for (n, p) in all {
            let Some(why) = incomplete(&p) else { continue };
            if newest_complete.is_some_and(|c| n < c) {
                let removed = self.remove(std::slice::from_ref(&p))?;
                self.repairs
                    .extend(removed.into_iter().map(|path| Repair::RemovedIncomplete { path, why: why.clone() }));
            } else {
                self.repairs.push(Repair::LeftIncomplete { path: p, why });
            }
        }
        self.repair_latest(newest_complete)?;
        let pruned = self.remove(&self.beyond_keep()?)?;
        self.repairs.extend(pruned.into_iter().map(Repair::Pruned));
        Ok(())
    }

    /// Brings the series to what a commit leaves behind: `latest` on the newest
    /// complete checkpoint, none beyond `keep`. For the end of a VMM, whose last
    /// checkpoint may have been committed after its control loop stopped
    /// listening (a CEVM writer finishing as the guest ends); dropping a
    /// series does it. Returns what it changed.
    pub fn settle(&mut self) -> Result<Vec<Repair>> {
        let before = self.repairs.len();
        let newest = self.list()?.last().map(|(n, _)| *n);
        if let Some(n) = newest {
            if self.latest()?.is_none_or(|(m, _)| m < n) {
                self.repair_latest(Some(n))?;
            }
        }
        let pruned = self.remove(&self.beyond_keep()?)?;
        self.repairs.extend(pruned.into_iter().map(Repair::Pruned));
        Ok(self.repairs.split_off(before))
    }

    /// Makes `latest` name the newest complete checkpoint, `newest`.
    fn repair_latest(&mut self, newest: Option<u64>) -> Result<()> {
        let link = self.dir.join(LATEST);
        let was = self.latest()?;
        let was_name = match std::fs::read_link(&link) {
            Ok(t) => Some(t.to_string_lossy().into_owned()),
            Err(_) => None,
        };
        match newest {
            Some(n) if was.as_ref().map(|(m, _)| *m) != Some(n) => {
                self.link_latest(n)?;
                self.repairs.push(Repair::Latest { was: was_name, now: name_of(n) });
            }
            None if was_name.is_some() => {
                std::fs::remove_file(&link).map_err(io(&link, "cannot remove the link"))?;
                fsync_dir(&self.dir)?;
                self.repairs.push(Repair::RemovedLatest { was: was_name.unwrap_or_default() });
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_goes_on_latest_follows_and_only_older_than_the_newest_keep_go() {
        let t = scratch("numbering");
        assert!(Series::open(&t, 0).is_err());
        let mut s = Series::open(&t, 2).unwrap();
        let a = s.next_path();
        assert!(a.ends_with("ckpt-000001"));
        real_commit(&a);
        assert!(s.committed(&a).unwrap().is_empty());
        let b = s.next_path();
        // A checkpoint that failed leaves no directory; numbering simply goes on.
        let c = s.next_path();
        real_commit(&c);
        assert!(s.committed(&c).unwrap().is_empty());
        assert!(!b.exists());
        let d = s.next_path();
        real_commit(&d);
        assert_eq!(s.committed(&d).unwrap(), vec![a.clone()]);
        assert_eq!(latest(&t), "ckpt-000004");
        assert!(t.join(LATEST).join("manifest.json").exists());
        // Other files in the directory are never touched.
        std::fs::write(t.join("notes.txt"), b"mine").unwrap();
        std::fs::create_dir_all(t.join("ckpt-x")).unwrap();
        // Reopened with a smaller `keep`: numbering continues after the highest,
        // and the sweep keeps the newest one only.
        let mut s2 = Series::open(&t, 1).unwrap();
        assert_eq!(s2.repairs(), [Repair::Pruned(c.clone())]);
        let e = s2.next_path();
        assert!(e.ends_with("ckpt-000005"));
        real_commit(&e);
        assert_eq!(s2.committed(&e).unwrap(), vec![d.clone()]);
        assert!(t.join("notes.txt").exists() && t.join("ckpt-x").exists() && e.exists());
        assert!(s2.committed(&t.join("notes.txt")).is_err());
        // Only a complete checkpoint of this series is taken.
        let f = s2.next_path();
        std::fs::create_dir(&f).unwrap();
        assert!(s2.committed(&f).is_err());
        assert_eq!(latest(&t), "ckpt-000005");
        let _ = std::fs::remove_dir_all(&t);
    }

    /// A real, complete checkpoint at `p` (one page of memory, a state file).
    fn real_commit(p: &Path) {
        use snapshot::{CheckpointWriter, MemoryLayout, MemoryRegionLayout, MemorySource};
        let mut w = CheckpointWriter::create(p).unwrap();
        w.write_file(snapshot::STATE_FILE, b"{}").unwrap();
        let layout = MemoryLayout { page_size: 4096, regions: vec![MemoryRegionLayout { guest_addr: 0, size: 4096 }] };
        let page = [7u8; 4096];
        w.write_memory(&layout, &[MemorySource { guest_addr: 0, data: &page, data_extents: None }]).unwrap();
        w.commit("stop-and-save", "test", serde_json::json!({})).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn latest(dir: &Path) -> String {
        std::fs::read_link(dir.join(LATEST)).unwrap().to_string_lossy().into_owned()
    }

    /// The pid of a process that has ended.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    fn scratch(name: &str) -> PathBuf {
        let t = std::env::temp_dir().join(format!("cevm-series-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        t
    }

    /// What VMMs killed at the worst moments leave (an older cevm removed old
    /// checkpoints file by file, and linked `latest` after the commit): opening
    /// the series puts it right.
    #[test]
    fn opening_a_series_finishes_what_a_killed_vmm_left() {
        let t = scratch("sweep");
        for n in 1..=4 {
            real_commit(&t.join(format!("ckpt-{n:06}")));
        }
        // ckpt-1: its removal was cut short (memory.img gone, the rest there);
        // ckpt-2: the same, its manifest gone first.
        std::fs::remove_file(t.join("ckpt-000001/memory.img")).unwrap();
        std::fs::remove_file(t.join("ckpt-000002/manifest.json")).unwrap();
        // ckpt-4 committed, the VMM killed before `latest` moved to it.
        std::os::unix::fs::symlink("ckpt-000003", t.join(LATEST)).unwrap();
        // A writer killed mid-checkpoint, and a link that was never renamed.
        let tmp = t.join(format!(".ckpt-000005.tmp-{}-0", dead_pid()));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("state.json"), b"{").unwrap();
        std::os::unix::fs::symlink("ckpt-000004", t.join(".latest.tmp")).unwrap();
        // Not the series': left alone.
        std::fs::write(t.join("notes.txt"), b"mine").unwrap();
        let mut s = Series::open(&t, 1).unwrap();
        assert_eq!(names(&t), ["ckpt-000004", "latest", "notes.txt"]);
        assert_eq!(latest(&t), "ckpt-000004");
        assert!(s.next_path().ends_with("ckpt-000005"));

        // A first checkpoint committed and no `latest` yet.
        let t2 = scratch("sweep-first");
        real_commit(&t2.join("ckpt-000001"));
        Series::open(&t2, 2).unwrap();
        assert_eq!(latest(&t2), "ckpt-000001");
        let _ = std::fs::remove_dir_all(&t);
        let _ = std::fs::remove_dir_all(&t2);
    }

    /// CEVM checkpoints are written after the guest went on, so a later-started
    /// one may commit first: `latest` stays on the newest, and retention keeps
    /// the newest complete ones.
    #[test]
    fn latest_never_moves_back_to_a_checkpoint_that_committed_late() {
        let t = scratch("order");
        let mut s = Series::open(&t, 2).unwrap();
        let (a, b, c) = (s.next_path(), s.next_path(), s.next_path());
        real_commit(&a);
        s.committed(&a).unwrap();
        real_commit(&c);
        s.committed(&c).unwrap();
        assert_eq!(latest(&t), "ckpt-000003");
        real_commit(&b);
        assert_eq!(s.committed(&b).unwrap(), vec![a.clone()]);
        assert_eq!(latest(&t), "ckpt-000003");
        assert_eq!(names(&t), ["ckpt-000002", "ckpt-000003", "latest"]);
        let _ = std::fs::remove_dir_all(&t);
    }

    /// Every step of a commit where a SIGKILL can land, in order.
    const STEPS: [&str; 7] =
        ["committed", "link-made", "link-renamed", "linked", "condemned-one", "condemned", "removed-one"];

    /// Asserts what a series must look like after a sweep: only complete
    /// checkpoints, at most `keep`, `newest` among them and `latest` naming it,
    /// nothing hidden left.
    fn assert_swept(t: &Path, keep: usize, newest: &str, what: &str) {
        let names = names(t);
        let ckpts: Vec<&String> = names.iter().filter(|n| n.starts_with(PREFIX)).collect();
        assert!(ckpts.len() <= keep && ckpts.last().is_some_and(|n| *n == newest), "{what}: {names:?}");
        for n in &ckpts {
            assert_eq!(incomplete(&t.join(n)), None, "{what}: {n}");
        }
        assert_eq!(latest(t), newest, "{what}");
        assert_eq!(names.len(), ckpts.len() + 1, "{what}: leftovers in {names:?}");
    }

    /// A VMM killed at each step of a commit (in order or out of order, a
    /// removal cut short inside a directory too): until the next start a
    /// `latest` that exists names a complete checkpoint, and the sweep of that
    /// start leaves the series whole, with the newest committed checkpoint.
    #[test]
    fn a_kill_at_any_step_of_a_commit_is_put_right_by_the_next_open() {
        for keep in [1, 2] {
            for late in [false, true] {
                for step in STEPS {
                    let what =
                        format!("keep {keep}, {}, killed at {step}", if late { "out of order" } else { "in order" });
                    let t = scratch("kill");
                    let mut s = Series::open(&t, keep).unwrap();
                    let p: Vec<PathBuf> = (0..4).map(|_| s.next_path()).collect();
                    // 1, 2 (and 4 when out of order) commit normally; then the
                    // last one (3 out of order, else 4) is killed at `step`.
                    let (before, last) = if late { (vec![0, 1, 3], 2) } else { (vec![0, 1, 2], 3) };
                    for i in before {
                        real_commit(&p[i]);
                        s.committed(&p[i]).unwrap();
                    }
                    real_commit(&p[last]);
                    kill::AT.with(|a| a.set(Some(step)));
                    let r = s.committed(&p[last]);
                    kill::AT.with(|a| a.set(None));
                    // Out of order, `latest` stays where it is: its steps never come.
                    let skipped = step == "removed-one" || (late && step.starts_with("link-"));
                    assert!(r.is_err() || skipped, "{what}: the kill did not land");
                    // A removal cut short in the middle of a directory.
                    for (e, h) in s.entries().unwrap() {
                        if matches!(e, Entry::Deleting(_)) {
                            let _ = std::fs::remove_file(h.join(snapshot::MANIFEST_FILE));
                        }
                    }
                    if let Ok(target) = std::fs::read_link(t.join(LATEST)) {
                        assert_eq!(incomplete(&t.join(target)), None, "{what}: `latest` names no complete checkpoint");
                    }
                    let reopened = Series::open(&t, keep).unwrap();
                    assert_swept(&t, keep, "ckpt-000004", &what);
                    assert!(Series::open(&t, keep).unwrap().repairs().is_empty(), "{what}: a second sweep had work");
                    drop(reopened);
                    let _ = std::fs::remove_dir_all(&t);
                }
            }
        }
    }

    /// `latest` that is not a link is a user's file: never replaced, and the
    /// series refuses to start, saying why.
    #[test]
    fn a_latest_that_is_not_a_link_is_left_alone_and_refused() {
        let t = scratch("user-latest");
        real_commit(&t.join("ckpt-000001"));
        std::fs::write(t.join(LATEST), b"mine").unwrap();
        let e = Series::open(&t, 2).unwrap_err().to_string();
        assert!(e.contains("not a symbolic link"), "{e}");
        assert_eq!(std::fs::read(t.join(LATEST)).unwrap(), b"mine");
        let _ = std::fs::remove_dir_all(&t);
    }

    /// A checkpoint newer than every complete one but not complete itself was
    /// not left by a removal: it is reported and left as it is.
    #[test]
    fn an_incomplete_checkpoint_newer_than_the_complete_ones_is_reported_and_left() {
        let t = scratch("newer-incomplete");
        real_commit(&t.join("ckpt-000001"));
        std::fs::create_dir(t.join("ckpt-000002")).unwrap();
        std::fs::write(t.join("ckpt-000002/state.json"), b"{}").unwrap();
        let mut s = Series::open(&t, 1).unwrap();
        assert!(
            matches!(&s.repairs()[0], Repair::LeftIncomplete { path, .. } if path.ends_with("ckpt-000002")),
            "{:?}",
            s.repairs()
        );
        assert_eq!(latest(&t), "ckpt-000001");
        assert!(t.join("ckpt-000002/state.json").exists());
        assert!(s.next_path().ends_with("ckpt-000003"));
        let _ = std::fs::remove_dir_all(&t);
    }

    /// A checkpoint committed after the VMM's control loop stopped listening
    /// (its `committed` never called): dropping the series settles it.
    #[test]
    fn dropping_a_series_settles_a_commit_nobody_recorded() {
        let t = scratch("settle");
        let mut s = Series::open(&t, 2).unwrap();
        let p: Vec<PathBuf> = (0..3).map(|_| s.next_path()).collect();
        real_commit(&p[0]);
        s.committed(&p[0]).unwrap();
        real_commit(&p[1]);
        s.committed(&p[1]).unwrap();
        real_commit(&p[2]);
        drop(s);
        assert_eq!(names(&t), ["ckpt-000002", "ckpt-000003", "latest"]);
        assert_eq!(latest(&t), "ckpt-000003");
        let _ = std::fs::remove_dir_all(&t);
    }
}
