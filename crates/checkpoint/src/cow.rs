//! The copy-on-write checkpoint, end to end, with one entry point, [`take`]:
//! pause the guest, save its vCPU and device state, `fork()` the VMM and
//! resume the guest at once, in the same KVM VM. The child process sees guest
//! memory frozen at the fork (private anonymous memory: the kernel copies a
//! page only when the guest, in the parent, first writes it) and writes it to
//! the checkpoint, while a thread of the parent writes the rest and commits.
//! The guest waits for the state and the fork only, never for memory to move:
//! no second instance, no pre-copy, and memory is held twice only where the
//! guest writes meanwhile.
//!
//! A writable disk is handed over as by CEVM ([`crate::cevm`]), without a
//! second instance: in the same pause the block device switches from T, the
//! overlay the guest wrote until then, to a fresh overlay U over the same
//! base; T is never written again and becomes the checkpoint's disk, while the
//! seed's two protocols integrate T into U (messages over in-process channels,
//! U taking the disk's name at the end).
//!
//! The child is a copy of a multi-threaded process of which only the forking
//! thread goes on. It only reads guest memory and writes the memory image: no
//! KVM descriptor, no logging, no lock another thread could have held (glibc
//! makes `malloc` safe after `fork`). It reports through a pipe and counts its
//! progress into a page shared with the parent, and dies with the parent's
//! thread that forked it (`PR_SET_PDEATHSIG`).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use snapshot::{CheckpointWriter, MemoryLayout, MemoryProgress, MemoryStats};
use vmm::persist::codec::{self, Encoding};
use vmm::placement::CpuList;
use vmm::{Instance, InstanceConfig, MemoryBackend};

use crate::cevm::{FrozenDisk, GuestRuns, OldSideLink, OnWritten};
use crate::incremental::{self, Increment, Pages, Tracked};
use crate::{memory_layout, ms, report, CheckpointReport, Error, Failure, Method, Progress, Result, Written};

/// Whether the cow strategy can checkpoint a guest of `config`: its memory
/// must be private (a fork shares a memfd's pages instead of copying them),
/// and a writable disk must be a qcow2 overlay over a base image, as for CEVM.
pub fn supports(config: &InstanceConfig) -> Result<()> {
    if config.memory_backend != MemoryBackend::Private {
        return Err(Error::Unsupported(
            "the cow strategy needs the guest's memory to be private (cevm run --memory-backend private): a fork \
             shares the pages of shared memory instead of freezing them"
                .into(),
        ));
    }
    crate::cevm::supports_handover(config, "cow")
}

/// A copy-on-write checkpoint to take.
pub struct Request<'a> {
    /// The directory the checkpoint is committed to.
    pub out: &'a Path,
    /// CPUs for the writer process (and the parent's threads that commit and
    /// hand the disk over).
    pub writer_cpus: Option<&'a CpuList>,
    /// Follows the checkpoint to its commit.
    pub progress: &'a Arc<Progress>,
    /// All of memory, or the pages written since a base (incremental).
    pub pages: Pages<'a>,
}

/// What the writer process reports through its pipe.
#[derive(Serialize, Deserialize)]
enum ChildReport {
    /// memory.img is written and fsynced; `crc32` is its entry's checksum.
    Written {
        stats: MemoryStats,
        crc32: String,
    },
    Failed(String),
}

/// What the parent's writer thread gets once the child runs.
struct Forked {
    child: WriterChild,
    state_json: Vec<u8>,
    /// The disk the guest wrote until the pause, and its hand-over to U.
    disk: Option<(Arc<disk::GuestDisk>, Arc<disk::GuestDisk>, Link)>,
    pause_ms: f64,
    /// An incremental checkpoint's parent and pages, and the tracking to settle.
    inc: Option<Increment>,
    tracked: Option<Tracked>,
}

/// Takes a copy-on-write checkpoint of `instance`. Returns once the guest runs
/// again (if it ran before), with the thread that finishes the checkpoint:
/// it calls `on_written` when committed or failed, then ends. The guest runs
/// here whatever happens ([`GuestRuns::Here`]).
pub fn take(
    instance: &mut Instance,
    req: &Request<'_>,
    on_written: OnWritten,
) -> std::result::Result<std::thread::JoinHandle<()>, Failure> {
    let t0 = Instant::now();
    let progress = req.progress.clone();
    progress.start(Method::Cow, req.out, "state");
    let failed = |e: Error| {
        req.progress.end(Some(e.to_string()));
        Failure::new(GuestRuns::Here, e)
    };
    // A previous checkpoint's disk hand-over ends before another begins.
    if let Some(d) = instance.disk() {
        d.wait_integrated();
    }
    supports(instance.config()).map_err(failed)?;
    incremental::prepare(instance, req.pages).map_err(failed)?;
    let writer = CheckpointWriter::create(req.out).map_err(|e| failed(e.into()))?;
    let layout = memory_layout(instance);
    let image = writer.tmp_path().join(snapshot::MEMORY_FILE);
    let guest = serde_json::to_value(instance.config()).map_err(|e| failed(Error::Encode(e.to_string())))?;
    // The fresh overlay is made before the pause (it waits, unused, until the
    // hand-over's first message); dropped unused, it removes itself.
    let next = match instance.config().disk.as_ref().filter(|d| !d.read_only) {
        Some(d) => Some(Arc::new(disk::GuestDisk::for_integration(&d.path).map_err(|e| failed(e.into()))?)),
        None => None,
    };
    let counters = SharedCounters::new().map_err(|e| failed(Error::Writer(format!("shared counters: {e}"))))?;
    let (report_rx, report_tx) = pipe().map_err(|e| failed(Error::Writer(format!("pipe: {e}"))))?;
    // The thread that finishes the checkpoint exists before the pause, so that
    // once the guest writes into U something is sure to serve it.
    let (go_tx, go_rx) = mpsc::channel::<Forked>();
    let out = req.out.to_path_buf();
    let writer_cpus = req.writer_cpus.map(|c| c.0.clone());
    let child_layout = layout.clone();
    // A handle of the guest memory's mappings: the writer thread mends the
    // huge pages the guest split meanwhile once the checkpoint is done, and
    // the handle keeps them mapped until then whatever becomes of the instance.
    let mappings = instance.memory().mmap().clone();
    let finisher = {
        let (progress, writer_cpus) = (progress.clone(), writer_cpus.clone());
        let counters = counters.clone();
        std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            // Nothing arrives when the checkpoint failed before its fork: the
            // writer, dropped, removes its temporary directory.
            let Ok(forked) = go_rx.recv() else { return };
            let r = finish(
                writer,
                forked,
                FinishCtx { out, layout, guest, t0, report_rx, counters, writer_cpus, progress: &progress },
            );
            progress.end(r.as_ref().err().map(ToString::to_string));
            on_written(r.map_err(|e| Failure::new(GuestRuns::Here, e)));
            // The child is gone (reaped whatever happened): the pages the guest
            // wrote since the fork sit in split huge pages, which would make
            // the next checkpoint's fork, in the guest's pause, copy 512 page
            // table entries for each. This thread is the writer's, on its
            // CPUs; the VMM joins it before it answers the request, so the
            // answer comes once this is done too (3-17 ms for a 64 MiB working
            // set at 1 GiB), and the next checkpoint forks merged memory.
            let c = vmm::GuestMemory::collapse_huge_pages(&mappings);
            tracing::debug!(
                "cow: guest memory in huge pages again after {:.2} ms: {} ranges of 2 MiB huge, {} left split",
                ms(c.took),
                c.huge,
                c.failed
            );
        })
    }
    .map_err(|e| failed(Error::Writer(format!("cannot start the writer thread: {e}"))))?;

    // The pause: state, the disk switch, the fork.
    let paused_at = Instant::now();
    let was_running = instance.run_state() == vmm::instance::RunState::Running;
    let child = ChildPlan { image: &image, layout: &child_layout, cpus: &writer_cpus, counters: &counters };
    let r = freeze(instance, req, next.as_ref(), &child, report_tx.as_raw_fd(), paused_at);
    // The child holds its own end of the pipe: the parent's goes, so that the
    // child's end (by exit or death) is seen as end of file.
    drop(report_tx);
    if was_running {
        if let Err(e) = instance.resume() {
            // The instance cannot run again: there is nothing to checkpoint
            // for. The writer stops and ends first, then its directory goes.
            drop(r);
            drop(go_tx);
            let _ = finisher.join();
            return Err(failed(e.into()));
        }
    }
    let pause_ms = ms(paused_at.elapsed());
    match r {
        Ok(forked) => {
            let _ = go_tx.send(Forked { pause_ms, ..forked });
            Ok(finisher)
        }
        Err(e) => {
            drop(go_tx);
            let _ = finisher.join();
            Err(failed(e))
        }
    }
}

/// What the writer process is given.
struct ChildPlan<'a> {
    image: &'a Path,
    layout: &'a MemoryLayout,
    cpus: &'a Option<Vec<usize>>,
    counters: &'a SharedCounters,
}

/// The pause of [`take`] (begun at `paused_at`): stops the vCPUs, saves the
/// state, plans an incremental checkpoint's pages, switches the disk to
/// `next`, forks the writer. On failure the disk is the guest's T again (the
/// caller resumes the guest).
fn freeze(
    instance: &mut Instance,
    req: &Request<'_>,
    next: Option<&Arc<disk::GuestDisk>>,
    child: &ChildPlan<'_>,
    report_fd: RawFd,
    paused_at: Instant,
) -> Result<Forked> {
    instance.pause()?;
    let stopped = paused_at.elapsed();
    let state = instance.save_state()?;
    let state_json = codec::encode(&state, Encoding::Json).map_err(|e| Error::Encode(e.to_string()))?;
    let saved = paused_at.elapsed();
    let (inc, tracked) = incremental::plan(instance, req.pages, child.layout, req.out)?;
    let extents = inc.as_ref().map(|i| incremental::extents(i, child.layout));
    let frozen = match next {
        Some(u) => Some(instance.replace_disk(u.clone())?),
        None => None,
    };
    let child = match fork_writer(
        instance,
        child.image,
        child.layout,
        extents.as_deref(),
        child.cpus,
        child.counters,
        report_fd,
    ) {
        Ok(c) => c,
        Err(e) => {
            if let Some(t) = frozen {
                // U never began: the guest goes on writing T.
                if let Err(back) = instance.replace_disk(t) {
                    tracing::error!("the guest's disk could not be switched back to its overlay: {back}");
                }
            }
            return Err(e);
        }
    };
    tracing::debug!(
        "cow pause: vCPUs stopped after {:.2} ms, state saved after {:.2} ms, forked after {:.2} ms",
        ms(stopped),
        ms(saved),
        ms(paused_at.elapsed())
    );
    let disk = match (frozen, next.cloned()) {
        (Some(t), Some(u)) => Some((t, u.clone(), link_to(&u))),
        _ => None,
    };
    Ok(Forked { child, state_json, disk, pause_ms: 0.0, inc, tracked })
}

/// What [`finish`] needs besides the writer and the fork.
struct FinishCtx<'a> {
    out: PathBuf,
    layout: MemoryLayout,
    guest: serde_json::Value,
    t0: Instant,
    report_rx: OwnedFd,
    counters: SharedCounters,
    writer_cpus: Option<Vec<usize>>,
    progress: &'a Progress,
}

/// The parent's half, after the guest resumed: hands the disk over, writes
/// the state, waits for the child's memory image, commits.
fn finish(mut writer: CheckpointWriter, forked: Forked, cx: FinishCtx<'_>) -> Result<CheckpointReport> {
    let Forked { mut child, state_json, disk, pause_ms, inc, tracked } = forked;
    // The disk hand-over threads started here inherit the placement; they
    // start whatever else fails, since the guest's disk depends on them.
    let placed = match &cx.writer_cpus {
        Some(c) => vmm::placement::set_affinity(vmm::placement::this_thread(), c),
        None => Ok(()),
    };
    let job = match disk {
        Some((t, u, link)) => Some(hand_over(t, u, link, writer.tmp_path())?),
        None => None,
    };
    placed?;
    cx.progress.phase("state");
    writer.write_file(snapshot::STATE_FILE, &state_json)?;
    let total = cx.layout.regions.iter().map(|r| r.size).sum();
    let shown = cx.progress.memory(total);
    let t = Instant::now();
    let (stats, crc32) = child.wait(&cx.report_rx, &cx.counters, &shown)?;
    let write_time = t.elapsed();
    writer.record_memory(&cx.layout, stats.clone(), &crc32)?;
    cx.progress.phase("disk");
    let disk_handover = job.map(|j| j.finish(&mut writer)).transpose()?;
    if let Some(i) = inc {
        writer.set_parent(i.parent, &i.pages)?;
    }
    cx.progress.phase("commit");
    let (manifest, replaced) = writer.commit_replacing(Method::Cow.strategy(), env!("CARGO_PKG_VERSION"), cx.guest)?;
    let written = Written {
        memory: stats,
        state_bytes: state_json.len() as u64,
        write_time,
        disk_handover,
        replaced,
        id: manifest.id,
        parent: manifest.parent.map(|p| p.dir),
    };
    Ok(CheckpointReport { tracked, ..report(&cx.out, Method::Cow, pause_ms, cx.t0, written, false) })
}

/// Starts the disk hand-over from T to U: U's side on a thread of its own,
/// T's side by [`FrozenDisk`] (which keeps T for the checkpoint). T's writes
/// are made durable first: the checkpoint keeps T's file, and U reads that
/// file itself if T's side cannot run. Once the hand-over runs, dropping the
/// returned job waits for its end, so the guest's disk is never left half
/// integrated whatever fails afterwards.
fn hand_over(t: Arc<disk::GuestDisk>, u: Arc<disk::GuestDisk>, link: Link, tmp: &Path) -> Result<FrozenDisk> {
    let (old, inbound) = link;
    let flushed = t.flush();
    let serving = u.clone();
    let started = std::thread::Builder::new().name("disk-handover".into()).spawn(move || {
        if let Err(e) = disk::integration::serve_new_side(&serving, inbound) {
            tracing::warn!("disk integration: {e}");
        }
    });
    if let Err(e) = started {
        // Nothing would serve U: it is completed from T here, at once.
        drop(old);
        if let Err(f) = u.finish_from_t() {
            tracing::error!("the guest's disk could not be completed from T: {f}");
        }
        return Err(Error::Writer(format!("cannot start the disk hand-over: {e}")));
    }
    // Without its old side (an error here), U's side completes U from T's file.
    let job = FrozenDisk::start(t.clone(), tmp, old)?;
    flushed.map_err(|source| disk::Error::Open { path: t.current_path(), source })?;
    Ok(job)
}

/// The old side's link, and the channel U's side reads.
type Link = (OldSideLink, mpsc::Receiver<disk::integration::FromOld>);

/// Connects U to the old side of its hand-over: U's outbox and the old side's
/// link, and the channel U's side reads.
fn link_to(u: &disk::GuestDisk) -> Link {
    let (to_new, from_old) = mpsc::channel();
    let (to_old, inbound) = mpsc::channel();
    u.connect(Box::new(move |m| to_old.send(m).map_err(|_| "the old side of the hand-over is gone".to_string())));
    let outbox: disk::integration::Outbox<disk::integration::FromOld> =
        Box::new(move |m| to_new.send(m).map_err(|_| "the new side of the hand-over is gone".to_string()));
    (OldSideLink { inbound, outbox }, from_old)
}

/// Two counters (`MemoryProgress`) in a page shared with the writer process.
#[derive(Clone)]
struct SharedCounters(Arc<SharedPage>);

struct SharedPage(*mut libc::c_void);

// SAFETY: the page is only accessed through the atomics of `MemoryProgress`.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

const PAGE: usize = 4096;

impl SharedCounters {
    fn new() -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedCounters(Arc::new(SharedPage(p))))
    }

    fn get(&self) -> &MemoryProgress {
        // SAFETY: the page is zero-filled, page-aligned and lives as long as
        // `self`; `MemoryProgress` is `repr(C)` of two atomics, for which all
        // zeros is a valid value.
        unsafe { &*(self.0 .0 as *const MemoryProgress) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.0, PAGE) };
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The writer process. Dropped before it was waited for, it is told to stop
/// (through the shared page: the VMM sends no signal to another process, its
/// seccomp filter lets none through) and waited for, so that the checkpoint's
/// temporary directory is removed after its last write.
struct WriterChild {
    pid: libc::pid_t,
    reaped: bool,
    counters: SharedCounters,
}

impl WriterChild {
    /// Waits for the child's report (copying its progress into `shown` as it
    /// goes) and for its end.
    fn wait(
        &mut self,
        report: &OwnedFd,
        counters: &SharedCounters,
        shown: &MemoryProgress,
    ) -> Result<(MemoryStats, String)> {
        let mut bytes = Vec::new();
        let mut file = std::fs::File::from(report.try_clone().map_err(|e| Error::Writer(format!("pipe: {e}")))?);
        loop {
            let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 50) };
            let c = counters.get();
            shown.done.store(c.done.load(Ordering::Relaxed), Ordering::Relaxed);
            shown.written.store(c.written.load(Ordering::Relaxed), Ordering::Relaxed);
            if n > 0 {
                let mut buf = [0u8; 4096];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => bytes.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::Writer(format!("reading its report: {e}"))),
                }
            }
        }
        let status = self.reap()?;
        let pid = self.pid;
        match (serde_json::from_slice::<ChildReport>(&bytes), status) {
            (Ok(ChildReport::Written { stats, crc32 }), Ok(0)) => Ok((stats, crc32)),
            (Ok(ChildReport::Failed(why)), _) => Err(Error::Writer(why)),
            (_, Err(sig)) => Err(Error::Writer(format!("process {pid} was killed by signal {sig}"))),
            (Ok(_), Ok(code)) => Err(Error::Writer(format!("process {pid} exited with status {code}"))),
            (Err(e), Ok(code)) => {
                Err(Error::Writer(format!("process {pid} exited with status {code} and an unreadable report ({e})")))
            }
        }
    }

    /// Waits for the child to end: its exit status, or the signal that killed it.
    fn reap(&mut self) -> Result<std::result::Result<i32, i32>> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is written by the call.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Writer(format!("waiting for process {}: {e}", self.pid)));
            }
        }
        self.reaped = true;
        Ok(if libc::WIFEXITED(status) { Ok(libc::WEXITSTATUS(status)) } else { Err(libc::WTERMSIG(status)) })
    }
}

impl Drop for WriterChild {
    fn drop(&mut self) {
        if !self.reaped {
            self.counters.get().stop.store(1, Ordering::Relaxed);
            let _ = self.reap();
        }
    }
}

/// Forks the writer process. Called with the instance paused: the child's
/// copy of guest memory is the guest's memory at this instant.
fn fork_writer(
    instance: &Instance,
    image: &Path,
    layout: &MemoryLayout,
    extents: Option<&[Vec<std::ops::Range<u64>>]>,
    writer_cpus: &Option<Vec<usize>>,
    counters: &SharedCounters,
    report_fd: RawFd,
) -> Result<WriterChild> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork duplicates the process; the child runs only `child_main`,
    // which never returns (see the module documentation for what it may do).
    match unsafe { libc::fork() } {
        -1 => Err(Error::Writer(format!("fork: {}", std::io::Error::last_os_error()))),
        0 => child_main(instance, image, layout, extents, writer_cpus.as_deref(), counters.get(), report_fd, parent),
        pid => Ok(WriterChild { pid, reaped: false, counters: counters.clone() }),
    }
}

/// The writer process: writes the memory image at `image` (memory.img in the
/// checkpoint's temporary directory; of `extents`, an incremental
/// checkpoint's pages, if given), reports, exits.
#[allow(clippy::too_many_arguments)]
fn child_main(
    instance: &Instance,
    image: &Path,
    layout: &MemoryLayout,
    extents: Option<&[Vec<std::ops::Range<u64>>]>,
    cpus: Option<&[usize]>,
    counters: &MemoryProgress,
    report_fd: RawFd,
    parent: libc::pid_t,
) -> ! {
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> std::result::Result<ChildReport, String> {
            // SAFETY: prctl with integer arguments only; getppid has no preconditions.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                libc::prctl(libc::PR_SET_NAME, c"cevm-cow-writer".as_ptr());
                // Every descriptor but the report's goes: the writer needs
                // none of the VMM's, and a copy of an API connection kept
                // open here would keep its client waiting for the answer's end.
                if report_fd > 3 {
                    libc::syscall(libc::SYS_close_range, 3u32, (report_fd - 1) as u32, 0u32);
                }
                libc::syscall(libc::SYS_close_range, (report_fd + 1) as u32, u32::MAX, 0u32);
            }
            if let Some(c) = cpus {
                vmm::placement::set_affinity(vmm::placement::this_thread(), c).map_err(|e| e.to_string())?;
            }
            // SAFETY: this process is the forking thread alone: no vCPU, device or
            // other thread here writes this copy of guest memory.
            let written = unsafe {
                crate::with_memory_sources(instance.memory(), extents.map(<[_]>::to_vec), |sources| {
                    snapshot::write_memory_image(image, layout, sources, Some(counters))
                })
            };
            let (stats, crc32) = written.map_err(|e| e.to_string())?;
            Ok(ChildReport::Written { stats, crc32 })
        }));
    let report = match result {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => ChildReport::Failed(why),
        Err(_) => ChildReport::Failed("the writer process panicked".into()),
    };
    let bytes = serde_json::to_vec(&report).unwrap_or_default();
    let mut sent = 0;
    while sent < bytes.len() {
        // SAFETY: writes from a live buffer to our end of the pipe.
        let n = unsafe { libc::write(report_fd, bytes[sent..].as_ptr().cast(), bytes.len() - sent) };
        if n <= 0 {
            break;
        }
        sent += n as usize;
    }
    // SAFETY: ends the child without running the parent's destructors or atexit handlers.
    unsafe { libc::_exit(if matches!(report, ChildReport::Written { .. }) { 0 } else { 1 }) }
}
