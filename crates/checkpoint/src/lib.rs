//! Checkpoint strategies and restore.
//!
//! A strategy turns a running [`vmm::Instance`] into a checkpoint directory (format
//! of the `snapshot` crate). This issue brings the baseline, **stop-and-save**: pause
//! the vCPUs, write state and memory, commit, resume (the seed's traditional
//! checkpoint, `T_cpt`); the CEVM checkpoint, end to end, is [`cevm`]; every way
//! of taking a checkpoint is a [`Method`].

pub mod cevm;
pub mod cow;
pub mod group;
pub mod incremental;
pub mod lazy;
mod method;
mod progress;
pub mod series;
mod uffd;

pub use cevm::{Failure, FailureKind, GuestRuns};
pub use incremental::{Base, Pages, Tracked};
pub use lazy::{LazyMemory, LazyOptions, LazyStatus};
pub use method::Method;
pub use progress::{Progress, ProgressView};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::{
    Checkpoint, CheckpointWriter, MemoryLayout, MemoryRegionLayout, MemorySource, MemoryStats, MemoryTarget,
};
use vmm::persist::codec::{self, CodecError, Encoding};
use vmm::{Instance, InstanceConfig, InstanceState, VmEvent};

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint files are missing, damaged or could not be written.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// The instance could not be paused, saved or restored.
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// The guest's disk could not be saved or restored.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// A checked file does not decode into what this cevm expects.
    #[error("{path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    /// The state could not be serialized.
    #[error("cannot serialize the instance state: {0}")]
    Encode(String),
    /// The state file holds no instance state this cevm reads (another state
    /// version, or damaged content under a valid checksum).
    #[error("{path}: {source}")]
    State { path: PathBuf, source: CodecError },
    /// The strategy cannot checkpoint this guest.
    #[error("{0}")]
    Unsupported(String),
    /// A NIC of the checkpoint cannot be bound to a tap here.
    #[error("{0}")]
    Network(String),
    /// A copy-on-write checkpoint's writer process failed, or could not be made.
    #[error("the checkpoint writer process: {0}")]
    Writer(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What a checkpoint cost and produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The committed checkpoint directory.
    pub dir: PathBuf,
    /// The strategy's name, as the manifest records it (`stop-and-save`, `cevm`).
    pub strategy: String,
    pub method: Method,
    /// How long the guest's vCPUs were paused (until resumed, or until the
    /// checkpoint was committed when the instance stays stopped).
    pub pause_ms: f64,
    /// From the request to the committed checkpoint.
    pub total_ms: f64,
    /// A CEVM checkpoint held for a group's cut: of `pause_ms`, the wait for
    /// the group's go after this member's switch (its own switch is the rest).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_ms: f64,
    /// CEVM: when the switch began to stop the vCPUs, on the host's monotonic
    /// clock (µs; 0: not recorded), comparable between the VMMs of one host.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub paused_at_us: u64,
    /// Bytes of memory pages written (zero pages are never written).
    pub memory: MemoryStats,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Memory bytes written per second of writing (data pages only).
    pub write_mib_per_s: f64,
    /// Whether the instance was left stopped (`--stop`) instead of resumed.
    pub stopped: bool,
    /// CEVM with a disk: how the disk hand-over to the new instance went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_handover: Option<DiskHandover>,
    /// The checkpoint's identity (its manifest's `id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// An incremental checkpoint's parent, as its manifest names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// An incremental request's tracking, for the caller to settle with the
    /// instance (see [`incremental`]).
    #[serde(skip)]
    pub tracked: Option<Tracked>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// The old instance's part of a CEVM disk hand-over.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskHandover {
    /// Clusters of T integrated into the new instance's overlay, in address order.
    pub clusters: u64,
    /// Clusters the new instance asked for ahead of the cursor.
    pub t_reads: u64,
    /// Bytes of T's data sent.
    pub bytes: u64,
    /// From the switch to the end of the integration.
    pub ms: f64,
    /// Whether T went into the checkpoint as a second name of the same file
    /// (else it was copied: another file system).
    pub linked: bool,
    /// Why the integration did not end normally (the checkpoint holds the disk of
    /// the switch either way; the new instance completed its disk from T).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The memory layout of an instance, as the checkpoint records it.
fn memory_layout(instance: &Instance) -> MemoryLayout {
    MemoryLayout {
        page_size: vmm::layout::PAGE_SIZE,
        regions: instance
            .memory()
            .ranges()
            .iter()
            .map(|r| MemoryRegionLayout { guest_addr: r.guest_addr, size: r.size })
            .collect(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Stop-and-save: pauses the instance, writes its state and memory to `out`
/// (committed atomically), then resumes it, or leaves it paused when `stop`.
/// If writing fails the instance is resumed anyway (unless `stop`) and `out`,
/// if it held an older checkpoint, still holds it.
/// `progress` follows it.
pub fn stop_and_save(
    instance: &mut Instance,
    out: &Path,
    stop: bool,
    pages: Pages<'_>,
    progress: &Progress,
) -> Result<CheckpointReport> {
    progress.start(Method::StopAndSave, out, "state");
    // A cow or CEVM checkpoint's disk hand-over ends first: the disk it
    // copies is then one image under its own name.
    if let Some(d) = instance.disk() {
        d.wait_integrated();
    }
    let r = stop_and_save_paused(instance, out, stop, pages, progress);
    progress.end(r.as_ref().err().map(ToString::to_string));
    r
}

fn stop_and_save_paused(
    instance: &mut Instance,
    out: &Path,
    stop: bool,
    pages: Pages<'_>,
    progress: &Progress,
) -> Result<CheckpointReport> {
    let t0 = Instant::now();
    let was_running = instance.run_state() == vmm::instance::RunState::Running;
    incremental::prepare(instance, pages)?;
    // The guest's pause starts here: the dirty log's work above ran while it ran.
    let paused_at = Instant::now();
    instance.pause()?;
    let written = incremental::plan(instance, pages, &memory_layout(instance), out).and_then(|(inc, tracked)| {
        Ok((write_paused(instance, out, Method::StopAndSave, None, inc, progress)?, tracked))
    });
    // An instance the user had paused before stays paused.
    if was_running && !stop {
        instance.resume()?;
    }
    let pause_ms = ms(paused_at.elapsed());
    let (written, tracked) = written?;
    Ok(CheckpointReport { tracked, ..report(out, Method::StopAndSave, pause_ms, t0, written, stop) })
}

/// Whether a checkpoint can be committed to `out` (see
/// [`snapshot::CheckpointWriter::check_target`]): checked before a guest is
/// paused or moved for it.
pub fn check_out(out: &Path) -> Result<()> {
    CheckpointWriter::check_target(out)?;
    Ok(())
}

/// The report of a committed checkpoint: `written` as [`write_paused`] returns it.
pub(crate) fn report(
    out: &Path,
    method: Method,
    pause_ms: f64,
    t0: Instant,
    written: Written,
    stopped: bool,
) -> CheckpointReport {
    let Written { memory, state_bytes, write_time, disk_handover, replaced, id, parent } = written;
    let report = CheckpointReport {
        dir: out.to_path_buf(),
        strategy: method.strategy().into(),
        method,
        pause_ms,
        total_ms: ms(t0.elapsed()),
        held_ms: 0.0,
        paused_at_us: 0,
        write_mib_per_s: memory.data_bytes as f64 / (1 << 20) as f64 / write_time.as_secs_f64().max(1e-9),
        memory,
        state_bytes,
        stopped,
        disk_handover,
        id,
        parent,
        tracked: None,
    };
    // The checkpoint `out` replaced goes now, the guest resumed (and the
    // report's times taken).
    drop(replaced);
    report
}

/// What writing a checkpoint produced.
pub(crate) struct Written {
    memory: MemoryStats,
    state_bytes: u64,
    /// Time spent writing memory.
    write_time: Duration,
    disk_handover: Option<DiskHandover>,
    /// The older checkpoint at `out`, removed when this is dropped: removing a
    /// large sparse memory image takes tens of milliseconds, whatever it holds,
    /// so not while the guest is paused.
    replaced: snapshot::Replaced,
    /// The manifest's `id`, and its parent's directory if incremental.
    id: String,
    parent: Option<String>,
}

/// Writes the checkpoint of a paused instance: state, memory, disk (copied, or,
/// with `link`, T handed over as described at [`cevm::write_frozen`]).
pub(crate) fn write_paused(
    instance: &mut Instance,
    out: &Path,
    method: Method,
    link: Option<cevm::OldSideLink>,
    inc: Option<incremental::Increment>,
    progress: &Progress,
) -> Result<Written> {
    progress.phase("state");
    let state = instance.save_state()?;
    let state_json = codec::encode(&state, Encoding::Json).map_err(|e| Error::Encode(e.to_string()))?;
    let mut writer = CheckpointWriter::create(out)?;
    // The hand-over starts first and runs beside the memory write; whatever
    // happens to the checkpoint, it is waited for (see `cevm::FrozenDisk`).
    let job = match link {
        Some(l) => match instance.disk() {
            Some(t) => Some(cevm::FrozenDisk::start(t, writer.tmp_path(), l)?),
            None => None,
        },
        _ => None,
    };
    writer.write_file(snapshot::STATE_FILE, &state_json)?;
    let layout = memory_layout(instance);
    writer.track(progress.memory(layout.regions.iter().map(|r| r.size).sum()));
    let t = Instant::now();
    let extents = inc.as_ref().map(|i| incremental::extents(i, &layout));
    // SAFETY: the instance is paused (every vCPU stopped), and its only device that
    // writes guest memory (virtio-blk) does so from a vCPU thread serving a guest
    // notification, so nothing writes guest memory meanwhile.
    let stats = unsafe { with_memory_sources(instance.memory(), extents, |s| writer.write_memory(&layout, s)) }?;
    let write_time = t.elapsed();
    progress.phase("disk");
    let disk_handover = match job {
        Some(job) => Some(job.finish(&mut writer)?),
        None => {
            save_disk(instance, &mut writer)?;
            None
        }
    };
    if let Some(i) = inc {
        writer.set_parent(i.parent, &i.pages)?;
    }
    let guest = serde_json::to_value(instance.config()).map_err(|e| Error::Encode(e.to_string()))?;
    progress.phase("commit");
    let (manifest, replaced) = writer.commit_replacing(method.strategy(), env!("CARGO_PKG_VERSION"), guest)?;
    Ok(Written {
        memory: stats,
        state_bytes: state_json.len() as u64,
        write_time,
        disk_handover,
        replaced,
        id: manifest.id,
        parent: manifest.parent.map(|p| p.dir),
    })
}

/// Calls `write` with the memory sources of `memory` that a checkpoint
/// writes: the pages of `extents` (an incremental checkpoint's), else those
/// that may hold data, mapped in first (one call per extent, not a fault per
/// page).
///
/// # Safety
/// Nothing may write guest memory until `write` returns (see
/// [`vmm::GuestMemory::slices`]).
pub(crate) unsafe fn with_memory_sources<R>(
    memory: &vmm::GuestMemory,
    extents: Option<Vec<Vec<std::ops::Range<u64>>>>,
    write: impl FnOnce(&[MemorySource<'_>]) -> R,
) -> R {
    let extents = extents.unwrap_or_else(|| memory.data_extents());
    memory.prefault(&extents);
    // SAFETY: the caller guarantees that nothing writes guest memory meanwhile.
    let slices = unsafe { memory.slices() };
    let sources: Vec<MemorySource<'_>> = slices
        .iter()
        .zip(&extents)
        .map(|((a, d), e)| MemorySource { guest_addr: *a, data: d, data_extents: Some(e) })
        .collect();
    write(&sources)
}

/// Makes the backing file name of `copy` (a copy of `original`) absolute, so the
/// copy finds its base from the checkpoint directory.
pub(crate) fn absolute_backing(copy: &Path, original: &Path) -> Result<()> {
    if let Some(backing) = disk::backing_file(copy)? {
        if !Path::new(&backing).is_absolute() {
            let dir = original.parent().unwrap_or(Path::new("."));
            let abs = std::path::absolute(dir.join(&backing))
                .map_err(|e| Error::Decode { path: original.into(), reason: format!("backing file {backing}: {e}") })?;
            disk::set_backing_file(copy, &abs.to_string_lossy())?;
        }
    }
    Ok(())
}

/// Name of the disk image in a checkpoint: `disk.qcow2` or `disk.raw`.
pub(crate) fn disk_file(format: disk::ImageFormat) -> String {
    format!("disk.{}", format.name())
}

/// Stop-and-save's disk: with the guest paused, every completed write is flushed,
/// then the image the guest writes (its overlay) is copied, sparse, into the
/// checkpoint. Its backing file name is made absolute so the copy finds the base
/// from the checkpoint directory. The checkpoint then holds exactly the disk that
/// matches its memory image.
fn save_disk(instance: &Instance, writer: &mut CheckpointWriter) -> Result<()> {
    let Some(d) = instance.disk() else { return Ok(()) };
    instance.flush_disk()?;
    let path = d.current_path();
    let name = disk_file(disk::probe_format(&path)?);
    let copy = writer.tmp_path().join(&name);
    disk::copy_image(&path, &copy)?;
    absolute_backing(&copy, &path)?;
    writer.add_file(&name)?;
    Ok(())
}

/// A checkpoint opened and checked (manifest, state file, sizes), with its
/// configuration and state decoded. The memory image is checked when loaded.
pub struct OpenCheckpoint {
    pub checkpoint: Checkpoint,
    /// An incremental checkpoint's parents, the full one first (each opened
    /// and checked as `checkpoint` is, the links between them too); empty for
    /// a full checkpoint.
    pub ancestors: Vec<Checkpoint>,
    pub config: InstanceConfig,
    pub state: InstanceState,
    /// The name of the guest's disk image in the checkpoint, if the guest has a disk.
    pub disk_file: Option<String>,
}

/// Opens and checks the checkpoint at `dir` and decodes what it holds: every
/// check but memory.img's checksum (see [`verify`]). The one check both
/// `cevm verify` and `cevm restore` run: the files as the snapshot crate checks
/// them (regular files, listed once, nothing unlisted, sizes and checksums),
/// then what they hold as the VMM checks a state before restoring it
/// ([`vmm::persist::check_restorable`]), the memory layout of the configuration,
/// and a disk image exactly when the guest has a disk.
pub fn open(dir: &Path) -> Result<OpenCheckpoint> {
    let mut ancestors = snapshot::open_chain(dir)?;
    let checkpoint = ancestors.pop().expect("a chain ends with its leaf");
    let manifest_path = dir.join(snapshot::MANIFEST_FILE);
    let config: InstanceConfig = serde_json::from_value(checkpoint.manifest.guest.clone())
        .map_err(|e| Error::Decode { path: manifest_path.clone(), reason: format!("guest configuration: {e}") })?;
    let disk_file = check_disk_file(dir, &checkpoint, &config)?;
    let state_path = dir.join(snapshot::STATE_FILE);
    let state = codec::decode(&checkpoint.read_file(snapshot::STATE_FILE)?, Encoding::Json)
        .map_err(|source| Error::State { path: state_path.clone(), source })?;
    vmm::persist::check_restorable(&config, &state)
        .map_err(|e| Error::Decode { path: state_path, reason: format!("cannot be restored: {e}") })?;
    let expected: Vec<_> = vmm::memory::ram_ranges(config.mem_size)
        .iter()
        .map(|r| MemoryRegionLayout { guest_addr: r.guest_addr, size: r.size })
        .collect();
    if checkpoint.manifest.memory.regions != expected {
        return Err(Error::Decode {
            path: manifest_path,
            reason: format!("memory layout does not match a guest of {} bytes", config.mem_size),
        });
    }
    Ok(OpenCheckpoint { checkpoint, ancestors, config, state, disk_file })
}

/// The checkpoint's disk image: there is one, `disk.raw` or `disk.qcow2` as its
/// content says, exactly when the guest has a disk.
fn check_disk_file(dir: &Path, checkpoint: &Checkpoint, config: &InstanceConfig) -> Result<Option<String>> {
    let manifest_path = dir.join(snapshot::MANIFEST_FILE);
    let bad = |reason: String| Error::Decode { path: manifest_path.clone(), reason };
    let disks: Vec<&str> =
        checkpoint.manifest.files.iter().map(|f| f.name.as_str()).filter(|n| n.starts_with("disk.")).collect();
    let name = match (&config.disk, disks.as_slice()) {
        (None, []) => return Ok(None),
        (None, [name, ..]) => return Err(bad(format!("the guest has no disk but the checkpoint holds {name}"))),
        (Some(_), []) => return Err(bad("the guest has a disk but the checkpoint holds no disk image".into())),
        (Some(_), [name]) => name.to_string(),
        (Some(_), _) => return Err(bad(format!("the checkpoint holds {} disk images", disks.len()))),
    };
    let path = dir.join(&name);
    let format = disk::probe_format_of(&checkpoint.open_file(&name)?, &path)?;
    if name != disk_file(format) {
        return Err(Error::Decode { path, reason: format!("holds a {} image", format.name()) });
    }
    Ok(Some(name))
}

/// Where a restored guest's disk goes when the caller does not say: beside the
/// checkpoint directory, `<dir>.disk.<format>`.
pub fn default_restored_disk(dir: &Path, format: disk::ImageFormat) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!("{name}.disk.{}", format.name()))
}

/// A file that is removed when dropped, unless kept: what a restore made
/// before a later step failed.
struct Made(Option<PathBuf>);

impl Made {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How a restore fills guest memory.
pub enum Memory<'a> {
    /// All of it read and checked before the guest runs, calling
    /// `progress(done, total)` with the bytes of memory.img loaded and
    /// checked so far as it goes.
    Load(&'a mut dyn FnMut(u64, u64)),
    /// Nothing read before the guest runs: each chunk is read, checked and
    /// put in place when first touched, or in the background ([`lazy`]).
    /// `on_fail` gets the error of a damaged chunk, which stops the VM.
    Lazy(LazyOptions, Box<dyn FnOnce(String) + Send>),
}

/// A restored instance, not started.
pub struct Restored {
    pub instance: Instance,
    /// The guest's disk, made for this restore.
    pub disk: Option<PathBuf>,
    /// A lazy restore's loader: keep it while the instance lives (drop it
    /// after the instance's vCPUs have stopped).
    pub lazy: Option<LazyMemory>,
}

/// Restores the checkpoint at `dir` into a new instance, memory loaded and checked,
/// vCPUs not started. Nothing of the guest runs unless every check passed. A
/// guest disk is copied from the checkpoint to `disk_to` (or
/// [`default_restored_disk`]), which must not exist: the checkpoint itself stays
/// untouched, so it can be restored again. That copy is made only once every
/// check passed (memory.img's checksum included), and removed again if the
/// instance cannot be made: a refused restore leaves nothing behind. A lazy
/// restore ([`Memory::Lazy`]) checks everything but memory.img that way, and
/// each chunk of memory.img before the guest sees any of it.
pub fn restore(
    dir: &Path,
    disk_to: Option<&Path>,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    taps: &[String],
    memory: Memory<'_>,
) -> Result<Restored> {
    let host = migrate::HostBinding { vcpu_cpus: Vec::new(), taps: taps.to_vec() };
    let early = early_shell(dir, &host);
    let OpenCheckpoint { checkpoint, ancestors, mut config, state, disk_file } = open(dir)?;
    // The taps, before anything is read or made: NIC i binds `taps[i]`, or the
    // tap it had when the checkpoint was taken.
    host.apply(&mut config).map_err(Error::Network)?;
    for (i, nic) in config.nics.iter().enumerate() {
        if let Err(e) = devices::virtio::net::Tap::open(&nic.tap) {
            let given = if i < taps.len() { "given for it" } else { "it was bound to when the checkpoint was taken" };
            return Err(Error::Network(format!(
                "NIC {i} ({}): the tap {given} cannot be used here: {e}; bind it to another with --net tap=NAME (one --net per NIC, in order)",
                nic.mac
            )));
        }
    }
    let disk = match &disk_file {
        Some(name) => {
            let src = checkpoint.open_file(name)?;
            let format = disk::probe_format_of(&src, &dir.join(name))?;
            let target = match disk_to {
                Some(p) => p.to_path_buf(),
                None => default_restored_disk(dir, format),
            };
            if std::fs::symlink_metadata(&target).is_ok() {
                return Err(Error::Decode {
                    path: target,
                    reason: "exists; not overwriting it (choose another path for the restored disk)".into(),
                });
            }
            Some((src, target))
        }
        None => None,
    };
    // The shell made beside the checks, if it is for exactly the
    // configuration checked (else it is made now).
    let shell = match early.join() {
        Ok(Some((c, shell))) if c == config => shell,
        _ => vmm::Shell::new(&config, None)?,
    };
    let chain: Vec<Checkpoint> = ancestors.into_iter().chain([checkpoint.clone()]).collect();
    let lazy = match memory {
        Memory::Load(progress) => {
            // SAFETY: the shell's vCPUs have not started and it has no devices: nothing
            // else touches its memory.
            let mut slices = unsafe { shell.memory().slices_mut() };
            let mut targets: Vec<MemoryTarget<'_>> =
                slices.iter_mut().map(|(a, d)| MemoryTarget { guest_addr: *a, data: d }).collect();
            snapshot::load_chain(&chain, &mut targets, progress)?;
            None
        }
        // The memory the shell just mapped is untouched: every page of it is
        // missing, so the first touch of each goes to the loader.
        Memory::Lazy(options, on_fail) => {
            Some(LazyMemory::start(snapshot::ChunkReader::open(&chain)?, shell.memory(), options, on_fail)?)
        }
    };
    // Every check passed: only now is anything made outside the process.
    let made = match (&mut config.disk, disk) {
        (Some(d), Some((src, target))) => {
            let made = Made(Some(target.clone()));
            if let Err(e) = disk::copy_image_from(&src, &dir.join(disk_file.unwrap_or_default()), &target) {
                if matches!(&e, disk::Error::Create { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
                {
                    // Made by someone else since the check above: not ours to remove.
                    made.keep();
                }
                return Err(e.into());
            }
            d.path = target;
            made
        }
        _ => Made(None),
    };
    let instance = Instance::restore_into(shell, config, &state, console, events)?;
    Ok(Restored { instance, disk: made.keep(), lazy })
}

/// Starts making the KVM VM, its memory and vCPUs for the guest of the
/// checkpoint at `dir` (its manifest's configuration with `host`'s taps)
/// while the caller checks the checkpoint: a memslot of a few GiB costs KVM
/// milliseconds on shadow-paging hosts (these machines': 5.6 ms at 4 GiB),
/// which the checks need not wait for. Nothing outside the process is made:
/// a guest with NICs gets no early shell (making one opens its taps, which the
/// checks must find free). `None` from the thread if anything failed: the
/// caller then makes the shell itself, after its checks, and reports their
/// errors.
fn early_shell(
    dir: &Path,
    host: &migrate::HostBinding,
) -> std::thread::JoinHandle<Option<(InstanceConfig, vmm::Shell)>> {
    let (dir, host) = (dir.to_path_buf(), host.clone());
    std::thread::spawn(move || {
        let manifest = snapshot::read_manifest(&dir).ok()?;
        let mut config: InstanceConfig = serde_json::from_value(manifest.guest).ok()?;
        host.apply(&mut config).ok()?;
        if !config.nics.is_empty() {
            return None;
        }
        let shell = vmm::Shell::new(&config, None).ok()?;
        Some((config, shell))
    })
}

/// Verifies a checkpoint completely: everything [`open`] checks (so a checkpoint
/// that verifies is one that restore accepts), and memory.img's checksum.
/// Returns the snapshot crate's report.
pub fn verify(dir: &Path) -> Result<snapshot::VerifyReport> {
    verify_with(dir, &mut |_, _| {})
}

/// [`verify`], calling `progress(done, total)` with the bytes of memory.img
/// checked so far as it goes.
pub fn verify_with(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<snapshot::VerifyReport> {
    let OpenCheckpoint { checkpoint, ancestors, .. } = open(dir)?;
    let manifest = checkpoint.manifest.clone();
    let chain: Vec<Checkpoint> = ancestors.into_iter().chain([checkpoint]).collect();
    snapshot::verify_chain_memory(&chain, progress)?;
    Ok(snapshot::VerifyReport { files: manifest.files.clone(), manifest })
}
