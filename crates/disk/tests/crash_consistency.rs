//! A VMM SIGKILLed at any moment of guest writes leaves a qcow2 overlay that
//! cevm opens again (repairing it if it must), that `qemu-img check` then finds
//! clean, and that holds every write the guest had flushed.
//!
//! The writer is a real process: this test binary run again with [`CHILD_ENV`]
//! set. It writes through cevm's disk layer ([`GuestDisk`], as the virtio-blk
//! device does) and reports on a pipe each write before it starts (`W id`) and
//! each completed flush (`F n`: writes `0..n` are durable). The parent kills it
//! with SIGKILL after a random number of writes, then checks the overlay and
//! every sector any write touched against what the reports allow.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use disk::{Disk, GuestDisk};

/// Set in the child process: `write GEOMETRY PATH START_ID SEED` (the writer), or
/// `open PATH` (cevm's next open of the overlay, whose log on stderr the parent reads).
const CHILD_ENV: &str = "CEVM_DISK_CRASH_WRITER";
const SECTOR: u64 = 512;
const ITERATIONS: usize = 40;

/// Where the writes go: `areas` areas of `area_sectors` sectors, `spacing`
/// bytes apart, wider than one L2 table covers, so new L2 tables keep being
/// allocated while the writer runs. The base holds data in the first
/// `base_sectors` of every area, so partial cluster writes copy base data.
#[derive(Clone, Copy)]
struct Geometry {
    name: &'static str,
    /// The overlay's cluster size; `None`: made by cevm (64 KiB).
    cluster_size: Option<u64>,
    disk_size: u64,
    areas: u64,
    spacing: u64,
    area_sectors: u64,
    base_sectors: u64,
}

/// cevm's own overlays (64 KiB clusters: an L2 table covers 512 MiB).
const CEVM_OVERLAY: Geometry = Geometry {
    name: "cevm",
    cluster_size: None,
    disk_size: 512 << 30,
    areas: 300,
    spacing: 1280 << 20,
    area_sectors: 1024,
    base_sectors: 256,
};

/// 512-byte clusters: a refcount block covers 128 KiB of the file and the first
/// refcount table 8 MiB, so refcount blocks and tables are allocated all along.
const SMALL_CLUSTERS: Geometry = Geometry {
    name: "small",
    cluster_size: Some(512),
    disk_size: 512 << 20,
    areas: 300,
    spacing: 1 << 20,
    area_sectors: 1024,
    base_sectors: 256,
};

fn geometry(name: &str) -> Geometry {
    [CEVM_OVERLAY, SMALL_CLUSTERS].into_iter().find(|g| g.name == name).unwrap()
}

/// One planned guest write: where, how long, and whether a flush follows it.
struct PlannedWrite {
    sector: u64,
    sectors: u64,
    flush_after: bool,
}

/// The write with id `id` of the plan `seed` (the parent recomputes what the
/// writer did from the ids it reported).
fn planned(g: &Geometry, seed: u64, id: u64) -> PlannedWrite {
    let mut rng = fastrand::Rng::with_seed(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let sectors = if rng.u8(..4) == 0 { 128 } else { rng.u64(1..=64) };
    let area = rng.u64(..g.areas);
    let sector = area * g.spacing / SECTOR + rng.u64(..g.area_sectors - sectors);
    PlannedWrite { sector, sectors, flush_after: rng.u8(..4) == 0 }
}

/// Who wrote a sector last: the base image, or guest write `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Base,
    Write(u64),
}

/// The bytes of sector `sector` as `source` leaves them.
fn sector_bytes(g: &Geometry, source: Source, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    let tag = match source {
        Source::Base if sector % (g.spacing / SECTOR) >= g.base_sectors => return b,
        Source::Base => u64::MAX,
        Source::Write(id) => id,
    };
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (tag.wrapping_mul(31).wrapping_add(sector.wrapping_mul(7)).wrapping_add(i as u64)) as u8;
    }
    b
}

fn write_bytes(g: &Geometry, seed: u64, id: u64) -> (u64, Vec<u8>) {
    let w = planned(g, seed, id);
    let data = (w.sector..w.sector + w.sectors).flat_map(|s| sector_bytes(g, Source::Write(id), s)).collect();
    (w.sector * SECTOR, data)
}

/// The child process: the writer, which writes the plan from `start` on until
/// it is killed, or one open of the overlay for writing.
fn child(spec: &str) -> ! {
    let mut parts = spec.split(' ');
    if parts.next() == Some("open") {
        // cevm's binary logs through tracing to stderr; so does this child, so
        // that the parent reads the repair warning as an operator would.
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).without_time().init();
        let path = Path::new(parts.next().unwrap());
        match Disk::open(path, true) {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1)
            }
        }
    }
    let g = geometry(parts.next().unwrap());
    let path = Path::new(parts.next().unwrap()).to_path_buf();
    let start: u64 = parts.next().unwrap().parse().unwrap();
    let seed: u64 = parts.next().unwrap().parse().unwrap();
    let disk = GuestDisk::plain(Disk::open(&path, true).unwrap());
    let mut out = std::io::stdout().lock();
    for id in start.. {
        writeln!(out, "W {id}").unwrap();
        out.flush().unwrap();
        let (off, data) = write_bytes(&g, seed, id);
        if let Err(e) = disk.write(&data, off) {
            writeln!(out, "E write {id}: {e}").unwrap();
            std::process::exit(1);
        }
        if planned(&g, seed, id).flush_after {
            if let Err(e) = disk.flush() {
                writeln!(out, "E flush after write {id}: {e}").unwrap();
                std::process::exit(1);
            }
            writeln!(out, "F {}", id + 1).unwrap();
            out.flush().unwrap();
        }
    }
    unreachable!("the writer runs until it is killed")
}

/// What each sector may hold now: the last write known durable (or the base),
/// and any write issued after it that may or may not have reached the disk.
#[derive(Default)]
struct Model {
    allowed: BTreeMap<u64, BTreeSet<Source>>,
}

impl Model {
    fn apply(&mut self, g: &Geometry, seed: u64, id: u64, durable: bool) {
        let w = planned(g, seed, id);
        for s in w.sector..w.sector + w.sectors {
            let set = self.allowed.entry(s).or_insert_with(|| BTreeSet::from([Source::Base]));
            if durable {
                set.clear();
            }
            set.insert(Source::Write(id));
        }
    }

    /// Compares every sector of every cluster a write touched with what it may
    /// hold, then narrows each to what it does hold. Returns the mismatches.
    fn check(&mut self, g: &Geometry, disk: &Disk) -> Vec<String> {
        let cluster_sectors = 65536 / SECTOR;
        let clusters: BTreeSet<u64> = self.allowed.keys().map(|s| s / cluster_sectors).collect();
        let mut bad = Vec::new();
        let mut buf = vec![0u8; 65536];
        for c in clusters {
            if let Err(e) = disk.read(&mut buf, c * 65536) {
                bad.push(format!("cluster {c} cannot be read: {e}"));
                continue;
            }
            for (i, got) in buf.chunks(SECTOR as usize).enumerate() {
                let s = c * cluster_sectors + i as u64;
                let set = self.allowed.entry(s).or_insert_with(|| BTreeSet::from([Source::Base]));
                match set.iter().copied().find(|&src| sector_bytes(g, src, s)[..] == *got) {
                    Some(src) => *set = BTreeSet::from([src]),
                    None => bad.push(format!(
                        "sector {s} holds {:?}, none of {set:?}",
                        &got[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
                    )),
                }
            }
        }
        bad
    }
}

/// `qemu-img check`'s complaints about `image`, summed up (None when it is clean:
/// no errors and no leaks).
fn qemu_img_check(image: &Path) -> Option<String> {
    let o = Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .expect("qemu-img (package qemu-utils)");
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    if o.status.success() && text.contains("No errors were found") {
        return None;
    }
    // One line per kind of complaint, with its count, then qemu-img's own summary.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut summary = Vec::new();
    for line in text.lines() {
        if line.starts_with("ERROR") || line.starts_with("Leaked") || line.starts_with("Warning") {
            let kind = line.split(|c: char| c.is_ascii_digit() || c == '=').next().unwrap_or(line);
            *kinds.entry(kind.trim().to_string()).or_default() += 1;
        } else if !line.trim().is_empty() && !line.starts_with("Image end offset") {
            summary.push(line);
        }
    }
    let kinds: Vec<String> = kinds.into_iter().map(|(k, n)| format!("{n} x {k}")).collect();
    Some(format!("{}; {}", kinds.join(", "), summary.join(" / ")))
}

fn make_base(g: &Geometry, path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(g.disk_size).unwrap();
    for area in 0..g.areas {
        let first = area * g.spacing / SECTOR;
        let data: Vec<u8> = (first..first + g.base_sectors).flat_map(|s| sector_bytes(g, Source::Base, s)).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, first * SECTOR).unwrap();
    }
}

/// Runs the writer once from `start` and kills it after `kill_after` writes.
/// Returns the last write id it began (if any), how many writes it flushed, and
/// the error that stopped it if it stopped before it was killed.
fn run_writer_and_kill(
    test: &str,
    g: &Geometry,
    image: &Path,
    start: u64,
    seed: u64,
    kill_after: usize,
) -> (Option<u64>, u64, Option<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(CHILD_ENV, format!("write {} {} {start} {seed}", g.name, image.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut began, mut flushed, mut seen, mut killed, mut error) = (None, start, 0usize, false, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("W ") {
            began = Some(id.parse::<u64>().unwrap());
            seen += 1;
        } else if let Some(n) = line.strip_prefix("F ") {
            flushed = n.parse().unwrap();
        } else if let Some(e) = line.strip_prefix("E ") {
            error = Some(e.to_string());
        }
        if seen >= kill_after && !killed {
            child.kill().unwrap();
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    if !killed {
        error = Some(format!("the writer ended before it was killed ({status}): {}", error.unwrap_or_default()));
    }
    (began, flushed, error)
}

/// Opens `image` for writing in a child process (as cevm's next run would);
/// returns what it wrote on stderr.
fn open_in_a_process(test: &str, image: &Path) -> String {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(CHILD_ENV, format!("open {}", image.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "cevm could not open {}: {said}", image.display());
    said
}

/// Kills a writer [`ITERATIONS`] times; after each kill, cevm opens the overlay
/// (repairing it if it must), every sector a write touched must hold what the
/// writer's reports allow, and `qemu-img check` must find no error and no leak.
fn kill_writers(test: &str, g: &Geometry, seed: u64) {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.raw");
    let top = t.path().join("top.qcow2");
    make_base(g, &base);
    match g.cluster_size {
        None => Disk::create_overlay(&top, Path::new("base.raw")).unwrap(),
        Some(cs) => {
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw"])
                .args(["-o", &format!("cluster_size={cs}"), top.to_str().unwrap()])
                .output()
                .expect("qemu-img (package qemu-utils)");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut model, mut next, mut failures, mut left_inconsistent) = (Model::default(), 0u64, Vec::new(), Vec::new());
    for iteration in 0..ITERATIONS {
        let (began, flushed, error) = run_writer_and_kill(test, g, &top, next, seed, rng.usize(1..=40));
        if let Some(e) = error {
            failures.push(format!("iteration {iteration}: {e}"));
        }
        let Some(last) = began else { continue };
        for id in next..=last {
            model.apply(g, seed, id, id < flushed);
        }
        next = last + 1;
        // What the kill left; then cevm's next open of the overlay, in a process of
        // its own, must repair it and say so exactly when qemu-img complains.
        let complaint = qemu_img_check(&top);
        let said = open_in_a_process(test, &top);
        let repaired = said.contains(&format!("repaired overlay {}: found ", top.display()));
        if let Some(complaint) = complaint {
            if !repaired {
                failures
                    .push(format!("iteration {iteration}: {complaint}; cevm's open did not say it repaired: {said}"));
            }
            left_inconsistent.push(format!("iteration {iteration}: {complaint}"));
        } else if !said.is_empty() {
            failures.push(format!("iteration {iteration}: a clean overlay, yet cevm's open said: {said}"));
        }
        match Disk::open(&top, true) {
            Ok(d) => {
                let bad = model.check(g, &d);
                if !bad.is_empty() {
                    failures.push(format!("iteration {iteration}: {} sectors wrong, e.g. {}", bad.len(), bad[0]));
                }
            }
            Err(e) => failures.push(format!("iteration {iteration}: cevm cannot open the overlay: {e}")),
        }
        if let Some(complaint) = qemu_img_check(&top) {
            failures.push(format!("iteration {iteration}: qemu-img check after cevm opened it: {complaint}"));
        }
    }
    eprintln!(
        "{}: {} of {ITERATIONS} kills left an overlay qemu-img check complains about:\n{}",
        g.name,
        left_inconsistent.len(),
        left_inconsistent.join("\n")
    );
    let shown: Vec<&String> = failures.iter().take(8).collect();
    assert!(failures.is_empty(), "{} failures in {ITERATIONS} kills; the first:\n{shown:#?}", failures.len());
}

#[test]
fn a_sigkilled_writer_leaves_a_clean_overlay_with_every_flushed_write() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
    }
    kill_writers("a_sigkilled_writer_leaves_a_clean_overlay_with_every_flushed_write", &CEVM_OVERLAY, 0x5eed_cafe);
}

#[test]
fn a_sigkilled_writer_on_small_clusters_leaves_a_clean_overlay_with_every_flushed_write() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
    }
    kill_writers(
        "a_sigkilled_writer_on_small_clusters_leaves_a_clean_overlay_with_every_flushed_write",
        &SMALL_CLUSTERS,
        0x5eed_f00d,
    );
}
