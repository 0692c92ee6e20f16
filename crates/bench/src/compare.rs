//! `cevm bench compare`: cevm's checkpoint strategies and QEMU's checkpoint
//! methods, side by side, on the same Linux guest running the same workload.
//!
//! The guest runs `cevm-work` (guest-linux/work.c): it fills part of its memory
//! with data, keeps rewriting a working set at a set rate, and prints a
//! heartbeat line every few milliseconds. Each VMM's console is a pipe read
//! here; every heartbeat is stamped when it arrives. So beside each VMM's own
//! downtime figure there is one measured from outside the same way for both:
//! the longest gap in the heartbeat stream around the checkpoint (the guest's
//! own clock does not see a pause), and the pages the guest wrote over time.
//!
//! cevm is driven as a user drives it: `cevm run` processes and their API.
//! QEMU over QMP: stop-and-save (`stop`, migrate to a file, `cont`), live
//! migration to a second QEMU over a unix socket (the guest then runs on there,
//! as after cevm's process-based migration), and `background-snapshot` (its
//! copy-on-write live snapshot into a file). Restore time: from starting the
//! VMM on a stop-and-save checkpoint to the restored guest's first heartbeat.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::host::allocated_bytes;
use crate::qemu::{self, Qemu};
use cevm::api::{CheckpointRequest, Client, MigrateRequest};
use cevm::child::{child_ended, spawn_piped};
use checkpoint::Method as Cevm;

/// What the comparison measures: one of cevm's methods, or one of QEMU's.
/// Named `cevm-stop-and-save`, `cevm-migrate-thread`, ..., `cevm-thread`,
/// `cevm-process` (cevm's CEVM methods keep their own name), `qemu-stop-and-save`,
/// `qemu-migrate`, `qemu-background-snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Method {
    Cevm(Cevm),
    Qemu(QemuMethod),
}

/// QEMU's ways, over QMP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QemuMethod {
    /// `stop`, `migrate` to a file, `cont`.
    StopAndSave,
    /// Live migration to a second QEMU over a unix socket.
    Migrate,
    /// `migrate` with the `background-snapshot` capability into a file.
    BackgroundSnapshot,
}

impl Method {
    pub const CEVM: [Method; 6] = [
        Method::Cevm(Cevm::StopAndSave),
        Method::Cevm(Cevm::MigrateThread),
        Method::Cevm(Cevm::MigrateProcess),
        Method::Cevm(Cevm::CevmThread),
        Method::Cevm(Cevm::CevmProcess),
        Method::Cevm(Cevm::Cow),
    ];
    pub const QEMU: [Method; 3] = [
        Method::Qemu(QemuMethod::StopAndSave),
        Method::Qemu(QemuMethod::Migrate),
        Method::Qemu(QemuMethod::BackgroundSnapshot),
    ];

    pub fn is_qemu(self) -> bool {
        matches!(self, Method::Qemu(_))
    }

    /// Whether it writes a checkpoint (the migrations only move the guest).
    pub fn writes_checkpoint(self) -> bool {
        match self {
            Method::Cevm(m) => m.writes_checkpoint(),
            Method::Qemu(q) => q != QemuMethod::Migrate,
        }
    }

    pub fn name(self) -> String {
        match self {
            Method::Cevm(m) if m.name().starts_with("cevm-") => m.name().into(),
            Method::Cevm(m) => format!("cevm-{}", m.name()),
            Method::Qemu(QemuMethod::StopAndSave) => "qemu-stop-and-save".into(),
            Method::Qemu(QemuMethod::Migrate) => "qemu-migrate".into(),
            Method::Qemu(QemuMethod::BackgroundSnapshot) => "qemu-background-snapshot".into(),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Method::Cevm(Cevm::StopAndSave) => "cevm stop-and-save",
            Method::Cevm(Cevm::MigrateThread) => "cevm migration (thread)",
            Method::Cevm(Cevm::MigrateProcess) => "cevm migration (process)",
            Method::Cevm(Cevm::CevmThread) => "cevm CEVM (thread)",
            Method::Cevm(Cevm::CevmProcess) => "cevm CEVM (process)",
            Method::Cevm(Cevm::Cow) => "cevm copy-on-write (fork)",
            Method::Qemu(QemuMethod::StopAndSave) => "QEMU stop + migrate to file + cont",
            Method::Qemu(QemuMethod::Migrate) => "QEMU live migration",
            Method::Qemu(QemuMethod::BackgroundSnapshot) => "QEMU background-snapshot",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = || Method::CEVM.iter().chain(&Method::QEMU).copied();
        all()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("`{s}`: methods are {}", all().map(Method::name).collect::<Vec<_>>().join(", ")))
    }
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.name()
    }
}

/// What the guest does while checkpoints are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Memory filled with data, then nothing but heartbeats.
    Idle,
    /// Rewriting the working set at this many pages per second.
    Dirty(u64),
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Workload::Idle),
            n => n
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .map(Workload::Dirty)
                .ok_or_else(|| format!("`{s}`: a workload is idle or a dirty rate in pages per second")),
        }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Idle => write!(f, "idle"),
            Workload::Dirty(r) => write!(f, "dirty {r} pages/s"),
        }
    }
}

impl Workload {
    pub fn rate(self) -> u64 {
        match self {
            Workload::Idle => 0,
            Workload::Dirty(r) => r,
        }
    }
}

pub struct Options {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qemu: Option<String>,
    /// (guest memory, workload) pairs, measured in this order.
    pub cases: Vec<Case>,
    pub methods: Vec<Method>,
    /// Percent of guest memory the guest fills with data.
    pub fill_pct: u64,
    pub ws_mib: u64,
    pub beat_ms: u64,
    pub runs: usize,
    pub dir: PathBuf,
    pub json: Option<PathBuf>,
}

/// One guest: its memory size and workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub mem: u64,
    pub workload: Workload,
}

impl std::str::FromStr for Case {
    type Err = String;
    /// `SIZE:WORKLOAD`, e.g. `512M:idle`, `1G:10000`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (m, w) =
            s.split_once(':').ok_or_else(|| format!("`{s}`: a case is SIZE:WORKLOAD, e.g. 512M:idle or 1G:10000"))?;
        Ok(Case { mem: cevm::size::parse_size(m)?, workload: w.parse()? })
    }
}

/// One heartbeat as it arrived: ms since the request, pages written so far.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Beat {
    pub ms: f64,
    pub pages: u64,
}

/// One checkpoint (or migration) of one method.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub method: Method,
    pub mem_mib: u64,
    pub workload: Workload,
    pub run: usize,
    /// The guest's pause as the VMM reports it: cevm's `pause_ms` /
    /// `downtime_ms`; QEMU's `downtime` for a live migration and a background
    /// snapshot. For QEMU's stop-and-save, from `stop` to `cont` returning.
    pub downtime_ms: f64,
    /// QEMU's own `downtime` figure (whole ms) where it reports one.
    pub qemu_reported_downtime_ms: Option<f64>,
    /// The longest gap between heartbeats from the request to 0.5 s after the
    /// answer, less one beat: the pause the guest's output shows.
    pub guest_pause_ms: f64,
    /// The same in the second before the request (the stream's own jitter).
    pub quiet_gap_ms: f64,
    /// From the request to the answer: for a checkpoint, until it is on storage.
    pub total_ms: f64,
    /// Allocated bytes of the checkpoint (directory or file).
    pub size_bytes: Option<u64>,
    /// Bytes of guest memory the checkpoint or migration carried.
    pub memory_bytes: Option<u64>,
    /// From starting a VMM on this checkpoint to the restored guest's first heartbeat.
    pub restore_ms: Option<f64>,
    /// Heartbeats from 1 s before the request to 0.5 s after the answer.
    pub beats: Vec<Beat>,
}

/// The guest's memory, working set and fill for a size.
pub fn fill_mib(o: &Options, mem: u64) -> u64 {
    (mem >> 20) * o.fill_pct / 100
}

fn cmdline(o: &Options, mem: u64, w: Workload) -> String {
    format!(
        "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.test=work cevm.work={},{},{},{}",
        fill_mib(o, mem),
        o.ws_mib,
        w.rate(),
        o.beat_ms
    )
}

const T: Duration = Duration::from_secs(900);

/// How long after the answer the heartbeat window reaches.
const AFTER: Duration = Duration::from_millis(500);

/// Heartbeats of one guest (from however many VMM processes it went through).
struct Stream {
    rx: Receiver<(Instant, String)>,
    tx: Sender<(Instant, String)>,
    beats: Vec<(Instant, u64)>,
    lines: Vec<String>,
}

impl Stream {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Stream { rx, tx, beats: Vec::new(), lines: Vec::new() }
    }

    fn take(&mut self, at: Instant, l: String) {
        if let Some(pages) = l.strip_prefix("hb ").and_then(|r| r.split(' ').nth(1)).and_then(|p| p.trim().parse().ok())
        {
            self.beats.push((at, pages));
        } else {
            self.lines.push(l);
        }
    }

    fn pump(&mut self) {
        while let Ok((at, l)) = self.rx.try_recv() {
            self.take(at, l);
        }
    }

    /// Waits for a non-heartbeat line containing `what`; `gone` tells whether
    /// the VMM printing it has ended (then waiting is over).
    fn wait_line(&mut self, what: &str, gone: &mut dyn FnMut() -> Option<String>) -> Result<(), String> {
        if self.lines.iter().any(|l| l.contains(what)) {
            return Ok(());
        }
        self.wait(gone, T, |l| l.contains(what)).map(drop).map_err(|e| format!("waiting for `{what}`: {e}"))
    }

    /// Waits for the next heartbeat; returns when it arrived.
    fn next_beat(&mut self, gone: &mut dyn FnMut() -> Option<String>) -> Result<Instant, String> {
        // A running guest beats every few ms; a restore takes seconds.
        self.wait(gone, Duration::from_secs(180), |l| l.starts_with("hb "))
            .map_err(|e| format!("waiting for a heartbeat: {e}"))
    }

    fn wait(
        &mut self,
        gone: &mut dyn FnMut() -> Option<String>,
        limit: Duration,
        hit: impl Fn(&str) -> bool,
    ) -> Result<Instant, String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok((at, l)) => {
                    let yes = hit(&l);
                    self.take(at, l);
                    if yes {
                        return Ok(at);
                    }
                }
                Err(_) => {
                    if let Some(why) = gone() {
                        return Err(format!("{why}; the guest's last lines: {:?}", self.last_lines()));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("nothing in {limit:?}; the guest's last lines: {:?}", self.last_lines()));
                    }
                }
            }
        }
    }

    fn last_lines(&self) -> Vec<String> {
        self.lines.iter().rev().take(5).rev().cloned().collect()
    }

    /// Sleeps `d`, keeping the stream read.
    fn settle(&mut self, d: Duration) {
        std::thread::sleep(d);
        self.pump();
    }

    /// (guest pause, quiet gap, beats in the window) around `[req, ans]`.
    fn window(&mut self, req: Instant, ans: Instant, beat_ms: u64) -> (f64, f64, Vec<Beat>) {
        self.pump();
        self.beats.sort_by_key(|b| b.0);
        let before = req.checked_sub(Duration::from_secs(1)).unwrap_or(req);
        let after = ans + AFTER;
        let rel = |t: Instant| {
            if t >= req {
                (t - req).as_secs_f64() * 1e3
            } else {
                -((req - t).as_secs_f64() * 1e3)
            }
        };
        let mut pause: f64 = 0.0;
        let mut quiet: f64 = 0.0;
        for w in self.beats.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            let gap = (b - a).as_secs_f64() * 1e3 - beat_ms as f64;
            if b > req && a < after {
                pause = pause.max(gap);
            } else if a >= before && b <= req {
                quiet = quiet.max(gap);
            }
        }
        let beats = self
            .beats
            .iter()
            .filter(|b| b.0 >= before && b.0 <= after)
            .map(|&(t, pages)| Beat { ms: rel(t), pages })
            .collect();
        // Older beats are of no further use.
        self.beats.retain(|b| b.0 >= after);
        (pause.max(0.0), quiet.max(0.0), beats)
    }
}

fn cevm_cmd() -> Result<Command, String> {
    Ok(Command::new(crate::cevm_bin()?))
}

/// Waits for `sock` to appear (a VMM listening).
fn wait_path(p: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within 60 s", p.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The guest under cevm: its current API socket and every VMM process it used.
struct CevmGuest {
    api: PathBuf,
    children: Vec<Child>,
}

impl Drop for CevmGuest {
    fn drop(&mut self) {
        let _ = Client::new(&self.api, Duration::from_secs(5)).quit();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One measurement from the request to the answer, for either VMM.
struct Taken {
    req: Instant,
    ans: Instant,
    downtime_ms: f64,
    qemu_reported_downtime_ms: Option<f64>,
    size_bytes: Option<u64>,
    memory_bytes: Option<u64>,
    /// The checkpoint written (removed once measured; restored first if `restore`).
    written: Option<PathBuf>,
    restore: bool,
}

fn cevm_take(
    o: &Options,
    g: &mut CevmGuest,
    s: &mut Stream,
    m: Method,
    tag: &str,
    log: &Path,
) -> Result<Taken, String> {
    let dir = &o.dir;
    let out = dir.join(format!("ckpt-{tag}"));
    let _ = std::fs::remove_dir_all(&out);
    // A process-based method's destination, started before the request (as a
    // user starts `cevm run --incoming` first).
    let mut next_api = None;
    let Method::Cevm(cm) = m else { return Err(format!("{} is not a cevm method", m.label())) };
    let to = if cm.process_based() {
        let inc = dir.join(format!("in-{tag}.sock"));
        let api_sock = dir.join(format!("api-{tag}.sock"));
        let _ = std::fs::remove_file(&inc);
        let to = format!("unix:{}", inc.display());
        let mut cmd = cevm_cmd()?;
        cmd.args(["run", "--incoming", &to, "--api-sock"]).arg(&api_sock);
        g.children.push(spawn_piped(cmd, &s.tx, log)?);
        wait_path(&inc)?;
        next_api = Some(api_sock);
        to
    } else {
        "local".into()
    };
    let api = Client::new(&g.api, T);
    let failed = |e| format!("{}: {e}", m.label());
    let req = Instant::now();
    // (downtime, memory bytes moved or written)
    let (downtime_ms, memory_bytes) = match CheckpointRequest::of_method(cm, out.clone(), Some(to.clone())) {
        Some(c) => api.checkpoint(&c).map(|r| (r.pause_ms, r.memory.data_bytes)).map_err(failed)?,
        None => {
            let mig = MigrateRequest::of_method(cm, &to).expect("a method writes a checkpoint or migrates");
            api.migrate(&mig).map(|r| (r.downtime_ms, r.bytes_sent)).map_err(failed)?
        }
    };
    let ans = Instant::now();
    if let Some(a) = next_api {
        g.api = a;
    }
    let migration = !m.writes_checkpoint();
    let memory_bytes = Some(memory_bytes);
    let size_bytes = (!migration).then(|| allocated_bytes(&out));
    Ok(Taken {
        req,
        ans,
        downtime_ms,
        qemu_reported_downtime_ms: None,
        size_bytes,
        memory_bytes,
        written: (!migration).then_some(out),
        restore: cm == Cevm::StopAndSave,
    })
}

/// `cevm restore` of a checkpoint until the restored guest's first heartbeat, ms.
fn cevm_restore(o: &Options, ckpt: &Path, log: &Path) -> Result<f64, String> {
    let mut s = Stream::new();
    let api_sock = o.dir.join("api-restore.sock");
    let mut cmd = cevm_cmd()?;
    cmd.arg("restore").arg(ckpt).arg("--api-sock").arg(&api_sock);
    let t0 = Instant::now();
    let mut child = spawn_piped(cmd, &s.tx, log)?;
    let r = s.next_beat(&mut || child_ended(&mut child, "cevm", log)).map(|at| (at - t0).as_secs_f64() * 1e3);
    let _ = Client::new(&api_sock, Duration::from_secs(5)).quit();
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn qemu_guest<'a>(o: &'a Options, cmdline: &'a str, mem: u64) -> qemu::Guest<'a> {
    qemu::Guest { kernel: &o.kernel, initrd: &o.initrd, cmdline, mem_mib: mem >> 20, vcpus: 1, extra: &[] }
}

/// What every QEMU of one guest is started with.
struct QemuSetup<'a> {
    o: &'a Options,
    bin: &'a str,
    guest: qemu::Guest<'a>,
    log: &'a Path,
}

fn qemu_take(q: &QemuSetup<'_>, src: &mut Qemu, s: &mut Stream, m: Method, tag: &str) -> Result<Taken, String> {
    let QemuSetup { o, bin, guest, log } = q;
    let (o, bin, guest, log) = (*o, *bin, guest, *log);
    let file = o.dir.join(format!("qemu-{tag}.state"));
    let _ = std::fs::remove_file(&file);
    // QEMU 7.2 has no `file:` URI: a file is written through `exec:cat`.
    let to_file = format!("exec:cat > {}", file.display());
    // cevm's page budget is 1 ms (QEMU's limit is in whole ms) and cevm has no
    // bandwidth cap: give QEMU the same, not its 128 MiB/s default.
    let limit = ::migrate::Params::default().max_downtime_ms.ceil().max(1.0) as u64;
    src.execute("migrate-set-parameters", json!({ "downtime-limit": limit, "max-bandwidth": 1u64 << 40 }))?;
    // Auto-converge for the live migration, as cevm's default; the background
    // snapshot goes without it (QEMU allows no other capability beside it).
    let caps = |bg: bool, ac: bool| {
        json!({ "capabilities": [{ "capability": "background-snapshot", "state": bg },
                                 { "capability": "auto-converge", "state": ac }] })
    };
    src.execute("migrate-set-capabilities", caps(false, false))?;
    let Method::Qemu(qm) = m else { return Err(format!("{} is not a QEMU method", m.label())) };
    src.execute("migrate-set-capabilities", caps(qm == QemuMethod::BackgroundSnapshot, qm == QemuMethod::Migrate))?;
    let t = match qm {
        QemuMethod::StopAndSave => {
            let req = Instant::now();
            src.execute("stop", json!({}))?;
            let r = qemu::migrate_to(src, &to_file);
            let cont = src.execute("cont", json!({}));
            let ans = Instant::now();
            let r = r?;
            cont?;
            Taken {
                req,
                ans,
                downtime_ms: (ans - req).as_secs_f64() * 1e3,
                qemu_reported_downtime_ms: Some(r.downtime_ms),
                size_bytes: Some(allocated_bytes(&file)),
                memory_bytes: Some(r.bytes_sent),
                written: Some(file.clone()),
                restore: true,
            }
        }
        QemuMethod::BackgroundSnapshot => {
            let req = Instant::now();
            let r = qemu::migrate_to(src, &to_file);
            let ans = Instant::now();
            let reset = src.execute("migrate-set-capabilities", caps(false, false));
            let r = r?;
            reset?;
            Taken {
                req,
                ans,
                downtime_ms: r.downtime_ms,
                qemu_reported_downtime_ms: Some(r.downtime_ms),
                size_bytes: Some(allocated_bytes(&file)),
                memory_bytes: Some(r.bytes_sent),
                written: Some(file.clone()),
                restore: false,
            }
        }
        QemuMethod::Migrate => {
            let sock = o.dir.join(format!("qemu-{tag}.sock"));
            let _ = std::fs::remove_file(&sock);
            let uri = format!("unix:{}", sock.display());
            let dst = Qemu::start(bin, guest, qemu::Console::Lines(s.tx.clone()), Some(&uri), &o.dir, log)?;
            let req = Instant::now();
            let r = qemu::migrate_to(src, &uri);
            let ans = Instant::now();
            let _ = std::fs::remove_file(&sock);
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    dst.kill();
                    return Err(e);
                }
            };
            // The guest runs on in the destination, as after cevm's process-based
            // migration; the stopped source ends.
            let old = std::mem::replace(src, dst);
            old.kill();
            Taken {
                req,
                ans,
                downtime_ms: r.downtime_ms,
                qemu_reported_downtime_ms: Some(r.downtime_ms),
                size_bytes: None,
                memory_bytes: Some(r.bytes_sent),
                written: None,
                restore: false,
            }
        }
    };
    Ok(t)
}

/// A QEMU started on a saved state until the restored guest's first heartbeat, ms.
fn qemu_restore(q: &QemuSetup<'_>, file: &Path) -> Result<f64, String> {
    let QemuSetup { o, bin, guest, log } = q;
    let mut s = Stream::new();
    let from = format!("exec:cat {}", file.display());
    let t0 = Instant::now();
    let mut vm = Qemu::start(bin, guest, qemu::Console::Lines(s.tx.clone()), Some(&from), &o.dir, log)?;
    // The state was saved from a stopped VM, and QEMU keeps the VM in the
    // state its source was in: `cont` it once loaded (as `virsh restore` does).
    let r = qemu::wait_loaded(&mut vm)
        .and_then(|()| vm.execute("cont", json!({})).map(drop))
        .and_then(|()| s.next_beat(&mut || vm.ended(log)))
        .map(|at| (at - t0).as_secs_f64() * 1e3);
    vm.kill();
    r
}

/// Cuts the heartbeat window of `t`, then restores its checkpoint (after the
/// window, so that the restore does not compete with the measured guest) with
/// `restore`, and removes it.
fn sample(
    o: &Options,
    s: &mut Stream,
    m: Method,
    (mem, w, run): (u64, Workload, usize),
    t: Taken,
    restore: impl FnOnce(&Path) -> Result<f64, String>,
) -> Result<Sample, String> {
    // Let the stream show the guest after the answer, then cut the window.
    s.settle(AFTER);
    let (guest_pause_ms, quiet_gap_ms, beats) = s.window(t.req, t.ans, o.beat_ms);
    let restore_ms = match (&t.written, t.restore) {
        (Some(p), true) => Some(restore(p)),
        _ => None,
    };
    if let Some(p) = &t.written {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }
    Ok(Sample {
        method: m,
        mem_mib: mem >> 20,
        workload: w,
        run,
        downtime_ms: t.downtime_ms,
        qemu_reported_downtime_ms: t.qemu_reported_downtime_ms,
        guest_pause_ms,
        quiet_gap_ms,
        total_ms: (t.ans - t.req).as_secs_f64() * 1e3,
        size_bytes: t.size_bytes,
        memory_bytes: t.memory_bytes,
        restore_ms: restore_ms.transpose()?,
        beats,
    })
}

fn print_sample(x: &Sample) {
    println!(
        "  {} MiB {}: {} run {}: downtime {:.2} ms, guest-visible pause {:.1} ms (quiet {:.1}), request to answer {:.0} ms{}{}",
        x.mem_mib,
        x.workload,
        x.method.label(),
        x.run + 1,
        x.downtime_ms,
        x.guest_pause_ms,
        x.quiet_gap_ms,
        x.total_ms,
        x.size_bytes.map(|b| format!(", {:.0} MiB on storage", b as f64 / 1048576.0)).unwrap_or_default(),
        x.restore_ms.map(|r| format!(", restore {r:.0} ms")).unwrap_or_default(),
    );
}

/// Settling time before each measurement (the quiet window is its last second).
const SETTLE: Duration = Duration::from_millis(1100);

/// The cevm methods, in turn, `runs` times, on one Linux guest (in cevm's
/// default private memory, which the copy-on-write checkpoint's fork needs).
fn cevm_case(o: &Options, mem: u64, w: Workload, out: &mut Vec<Sample>) -> Result<(), String> {
    let methods: Vec<Method> = o.methods.iter().copied().filter(|m| !m.is_qemu()).collect();
    if methods.is_empty() {
        return Ok(());
    }
    let log = o.dir.join("compare-cevm.log");
    let mut s = Stream::new();
    let api0 = o.dir.join(format!("api-{}-{}.sock", mem >> 20, w.rate()));
    let mut cmd = cevm_cmd()?;
    cmd.arg("run")
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initrd")
        .arg(&o.initrd)
        .args(["--mem", &format!("{}M", mem >> 20), "--cmdline", &cmdline(o, mem, w), "--api-sock"])
        .arg(&api0);
    let mut g = CevmGuest { api: api0, children: vec![spawn_piped(cmd, &s.tx, &log)?] };
    s.wait_line("cevm-work: filled", &mut || g.children.first_mut().and_then(|c| child_ended(c, "cevm", &log)))?;
    for run in 0..o.runs {
        for &m in &methods {
            s.settle(SETTLE);
            let tag = format!("{}-{}-{}-{run}", mem >> 20, w.rate(), m.name());
            let t = cevm_take(o, &mut g, &mut s, m, &tag, &log)?;
            let x = sample(o, &mut s, m, (mem, w, run), t, |p| cevm_restore(o, p, &log))?;
            print_sample(&x);
            out.push(x);
        }
    }
    Ok(())
}

fn qemu_case(o: &Options, bin: &str, mem: u64, w: Workload, out: &mut Vec<Sample>) -> Result<(), String> {
    let methods: Vec<Method> = o.methods.iter().copied().filter(|m| m.is_qemu()).collect();
    if methods.is_empty() {
        return Ok(());
    }
    let log = o.dir.join("compare-qemu.log");
    let cmdline = cmdline(o, mem, w);
    let q = QemuSetup { o, bin, guest: qemu_guest(o, &cmdline, mem), log: &log };
    let mut s = Stream::new();
    let mut src = Qemu::start(bin, &q.guest, qemu::Console::Lines(s.tx.clone()), None, &o.dir, &log)?;
    let r = (|| {
        s.wait_line("cevm-work: filled", &mut || src.ended(&log))?;
        for run in 0..o.runs {
            for &m in &methods {
                s.settle(SETTLE);
                let tag = format!("{}-{}-{}-{run}", mem >> 20, w.rate(), m.name());
                let t = qemu_take(&q, &mut src, &mut s, m, &tag)?;
                let x = sample(o, &mut s, m, (mem, w, run), t, |p| qemu_restore(&q, p))?;
                print_sample(&x);
                out.push(x);
            }
        }
        Ok(())
    })();
    src.kill();
    r
}

/// Everything `compare` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub fill_pct: u64,
    pub ws_mib: u64,
    pub beat_ms: u64,
    pub runs: usize,
    pub qemu_version: Option<String>,
    /// Where the checkpoints were written, and that file system's limits.
    pub limits: crate::host::Limits,
    pub samples: Vec<Sample>,
}

pub fn run(o: &Options) -> Result<Results, String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let qemu_version = match &o.qemu {
        Some(bin) => Some(qemu::version(bin)?),
        None => None,
    };
    println!(
        "compare: Linux guest, 1 vCPU, {}% of its memory filled with data, working set {} MiB, heartbeat every {} ms; {} runs per method, checkpoints in {}",
        o.fill_pct,
        o.ws_mib,
        o.beat_ms,
        o.runs,
        o.dir.display()
    );
    let limits = crate::host::Limits::measure(&o.dir, o.cases.iter().map(|c| c.mem).max().unwrap_or(1 << 30), o.runs)?;
    println!(
        "  limits: memcpy {:.0} MiB/s, sequential write + fdatasync {:.0} MiB/s on {}",
        limits.memcpy(),
        limits.write(),
        limits.fs
    );
    let mut samples = Vec::new();
    for c in &o.cases {
        cevm_case(o, c.mem, c.workload, &mut samples)?;
        if let Some(bin) = &o.qemu {
            qemu_case(o, bin, c.mem, c.workload, &mut samples)?;
        }
    }
    let res = Results {
        fill_pct: o.fill_pct,
        ws_mib: o.ws_mib,
        beat_ms: o.beat_ms,
        runs: o.runs,
        qemu_version,
        limits,
        samples,
    };
    if let Some(p) = &o.json {
        let text = serde_json::to_string(&res).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("compare: results in {}", p.display());
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_parse() {
        assert_eq!("512M:idle".parse::<Case>(), Ok(Case { mem: 512 << 20, workload: Workload::Idle }));
        assert_eq!("1G:10000".parse::<Case>(), Ok(Case { mem: 1 << 30, workload: Workload::Dirty(10000) }));
        assert!("512M".parse::<Case>().is_err());
        assert!("512M:0".parse::<Case>().is_err());
        assert!("512M:fast".parse::<Case>().is_err());
    }

    /// A stream of beats every 10 ms with one 150 ms gap after the request:
    /// the guest-visible pause is the gap less one beat, the quiet second
    /// before the request shows none, and the window keeps 1 s before to
    /// `AFTER` after the answer.
    #[test]
    fn window_measures_the_gap_after_the_request() {
        let mut s = Stream::new();
        let t0 = Instant::now();
        let ms = |x: u64| t0 + Duration::from_millis(x);
        let mut times: Vec<u64> = (0..=1200).step_by(10).collect();
        times.extend((1350..=2500).step_by(10));
        for (i, &t) in times.iter().enumerate() {
            s.tx.send((ms(t), format!("hb {} {}", i + 1, i * 100))).unwrap();
        }
        s.tx.send((ms(5), "cevm-work: filled".into())).unwrap();
        let (req, ans) = (ms(1000), ms(1300));
        let (pause, quiet, beats) = s.window(req, ans, 10);
        assert!((pause - 140.0).abs() < 1e-6, "pause {pause}");
        assert!(quiet.abs() < 1e-6, "quiet {quiet}");
        assert_eq!(beats.first().map(|b| b.ms.round()), Some(-1000.0));
        let last = 1300 + AFTER.as_millis() as u64;
        assert_eq!(beats.last().map(|b| b.ms.round()), Some((last - 1000) as f64));
        assert_eq!(s.lines, vec!["cevm-work: filled".to_string()]);
        // What was before the window's end is gone; the rest stays for the next.
        assert!(s.beats.iter().all(|b| b.0 >= ms(last)));
    }
}
