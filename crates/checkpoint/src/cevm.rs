//! The CEVM checkpoint, end to end, in one module with one entry point,
//! [`take`]: live-migrate the guest to a fresh instance (in this process or in
//! another VMM); the old instance, frozen at the switch, writes the checkpoint
//! while the guest runs on. A guest's writable disk is handed over meanwhile:
//! T, the overlay the guest wrote until the switch, is integrated into the new
//! instance's overlay U (the protocols of crate `integrate`, driven over images
//! by `disk::integration`, their messages carried by an in-process channel or by
//! `migrate::disk_link` over the migration connection) and becomes the
//! checkpoint's disk. The new instance's side starts with the migration
//! (`migrate::accept_guest`); this module runs the old side.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use snapshot::CheckpointWriter;
use vmm::placement::CpuList;
use vmm::{Instance, InstanceConfig};

use crate::{
    absolute_backing, disk_file, report, write_paused, CheckpointReport, DiskHandover, Error, Method, Progress, Result,
};

/// Where the guest runs after a checkpoint failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestRuns {
    /// In this VMM's instance, as before the checkpoint.
    Here,
    /// In the new instance of this VMM (a thread-based CEVM checkpoint after its switch).
    NewInstance,
    /// In another VMM (a process-based CEVM checkpoint after its switch).
    Elsewhere,
    /// Perhaps at the migration's destination (see [`migrate::GuestAt::Undecided`]):
    /// this VMM's instance stays paused.
    Undecided,
    /// Nowhere: the guest had ended.
    Ended,
}

impl From<migrate::GuestAt> for GuestRuns {
    fn from(g: migrate::GuestAt) -> Self {
        match g {
            migrate::GuestAt::Source => GuestRuns::Here,
            migrate::GuestAt::Undecided => GuestRuns::Undecided,
            migrate::GuestAt::Ended => GuestRuns::Ended,
        }
    }
}

impl std::fmt::Display for GuestRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestRuns::Here => "the guest goes on",
            GuestRuns::NewInstance => "the guest goes on in the new instance",
            GuestRuns::Elsewhere => "the guest goes on in the other VMM",
            GuestRuns::Undecided => "the guest may run at the destination; this VMM keeps its copy paused",
            GuestRuns::Ended => "the guest had ended",
        })
    }
}

/// Why a checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum FailureKind {
    /// The live migration to the new instance failed.
    #[error("live migration: {0}")]
    Migration(migrate::Failure),
    /// The old instance could not start its side of the disk hand-over (there is
    /// no checkpoint; the new instance completes its disk from T by itself).
    #[error("disk hand-over: {0}")]
    DiskLink(migrate::Error),
    /// Writing or committing the checkpoint failed.
    #[error(transparent)]
    Write(#[from] Error),
    /// The writer thread could not be placed on `writer_cpus`.
    #[error("writer_cpus: {0}")]
    WriterPlacement(vmm::Error),
    /// The writer thread could not be started.
    #[error("cannot start the checkpoint writer: {0}")]
    WriterThread(std::io::Error),
}

/// A failed checkpoint: why, and where the guest runs now.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint failed ({guest}): {error}")]
pub struct Failure {
    pub guest: GuestRuns,
    #[source]
    pub error: FailureKind,
}

impl Failure {
    /// A failure after which the guest runs `guest`.
    pub fn new(guest: GuestRuns, error: impl Into<FailureKind>) -> Self {
        Failure { guest, error: error.into() }
    }
}

/// Whether the cevm strategy can checkpoint a guest of `config`; asked before
/// its live migration starts. A writable disk must be a qcow2 overlay over a
/// base image: the new instance then writes a fresh overlay U over the same
/// base while the old one, T, becomes the checkpoint's disk.
pub fn supports(config: &InstanceConfig) -> Result<()> {
    supports_handover(config, "cevm")
}

/// Whether a guest of `config` can have its disk handed over to a fresh
/// overlay, as the `strategy` (cevm or cow) does.
pub(crate) fn supports_handover(config: &InstanceConfig, strategy: &str) -> Result<()> {
    let Some(d) = config.disk.as_ref().filter(|d| !d.read_only) else { return Ok(()) };
    let overlay = disk::probe_format(&d.path)? == disk::ImageFormat::Qcow2 && disk::backing_file(&d.path)?.is_some();
    if !overlay {
        return Err(Error::Unsupported(format!(
            "the {strategy} strategy needs the guest's disk to be a qcow2 overlay over a base image, and {} is not; \
             make one (qemu-img create -f qcow2 -b BASE -F FORMAT OVERLAY) or use stop-and-save",
            d.path.display()
        )));
    }
    let leftover = disk::integration::overlay_path(&d.path);
    if leftover.exists() {
        return Err(Error::Unsupported(format!(
            "{} is left over from an interrupted disk hand-over (its data belongs to no checkpoint); remove it to \
             checkpoint this disk again",
            leftover.display()
        )));
    }
    Ok(())
}

/// A CEVM checkpoint to take.
pub struct Request<'a> {
    /// The directory the checkpoint is committed to.
    pub out: &'a Path,
    /// Where the guest goes on.
    pub to: &'a migrate::Destination,
    /// CPUs for the thread that runs the live migration.
    pub migration_cpus: Option<&'a CpuList>,
    /// CPUs for the thread that writes the checkpoint (and the disk hand-over
    /// thread it starts).
    pub writer_cpus: Option<&'a CpuList>,
    /// Follows the checkpoint, from its migration to its commit.
    pub progress: &'a Arc<Progress>,
    /// A group checkpoint's member: the switch waits for the group's cut
    /// ([`migrate::barrier`]).
    pub barrier: Option<Arc<migrate::barrier::Barrier>>,
}

/// Answers a thread-based CEVM checkpoint once its writer has written.
pub type OnWritten = Box<dyn FnOnce(std::result::Result<CheckpointReport, Failure>) + Send>;

/// A CEVM checkpoint under way, or done.
pub enum Taken {
    /// Thread-based: `instance` is now the new instance, running the guest; the
    /// old one is being written by `writer`, which calls the `OnWritten` given
    /// to [`take`] when done, then ends.
    Writing { writer: std::thread::JoinHandle<()>, migration: migrate::Report },
    /// Process-based: the guest runs in the other VMM; the checkpoint was
    /// written here, or failed (`written` says).
    WrittenAway { written: std::result::Result<CheckpointReport, Failure>, migration: migrate::Report },
    /// The guest moved but its checkpoint cannot be written (the disk link or
    /// the writer thread could not start): `why.guest` says where it runs,
    /// [`GuestRuns::NewInstance`] (then `instance` is the new instance) or
    /// [`GuestRuns::Elsewhere`].
    NotWritten { migration: migrate::Report, why: Failure },
}

/// Takes a CEVM checkpoint of `instance` by `req`: the one entry point of the
/// CEVM strategy. `progress` follows the live migration; `new` is what a new
/// instance in this process is given. Thread-based, `on_written` answers from
/// the writer thread; process-based, it is not called (the result is in
/// [`Taken::WrittenAway`]). Fails before the switch with the guest where it was.
pub fn take(
    instance: &mut Instance,
    req: &Request<'_>,
    progress: &Mutex<migrate::Progress>,
    new: migrate::NewInstance,
    on_written: OnWritten,
) -> std::result::Result<Taken, Failure> {
    let t0 = Instant::now();
    req.progress.start(Method::CevmThread, req.out, "migrating");
    let ended = |f: Failure| {
        req.progress.end(Some(f.to_string()));
        f
    };
    // The previous CEVM checkpoint's disk hand-over may still be ending here
    // (its old side answers when it sent its last message, before this side
    // gives U the disk's name): a second hand-over starts after it, never
    // beside it. (Waiting takes the integration's lock, which its end holds
    // until the rename is done.)
    if let Some(d) = instance.disk() {
        d.wait_integrated();
    }
    supports(instance.config()).map_err(|e| ended(Failure::new(GuestRuns::Here, e)))?;
    let params = migrate::Params { cevm: true, barrier: req.barrier.clone(), ..Default::default() };
    let moved = migrate::migrate_to(instance, req.to, &params, progress, req.migration_cpus, new)
        .map_err(|f| ended(Failure::new(f.guest.into(), FailureKind::Migration(f))))?;
    let migrate::Moved { report: migration, new, disk_link } = moved;
    let method = if new.is_some() { Method::CevmThread } else { Method::CevmProcess };
    let after = if new.is_some() { GuestRuns::NewInstance } else { GuestRuns::Elsewhere };
    // Without its link the hand-over cannot run: the new instance then
    // completes its disk from T by itself, and there is no checkpoint.
    let link = match disk_link.map(migrate::disk_link::old_side_link).transpose() {
        Ok(l) => l.map(|(inbound, outbox)| OldSideLink { inbound, outbox }),
        Err(e) => {
            if let Some(new) = new {
                // Without a checkpoint to write, the old instance goes.
                drop(std::mem::replace(instance, new));
            }
            return Ok(Taken::NotWritten { migration, why: ended(Failure::new(after, FailureKind::DiskLink(e))) });
        }
    };
    let (out, downtime_ms) = (req.out.to_path_buf(), migration.downtime_ms);
    let (held_ms, paused_at_us) = (migration.held_ms, migration.paused_at_us);
    let writer_cpus = req.writer_cpus.map(|c| c.0.clone());
    let progress = req.progress.clone();
    let write = move |old: &mut Instance| -> std::result::Result<CheckpointReport, Failure> {
        let r = (|| {
            if let Some(c) = &writer_cpus {
                // The disk hand-over thread the writer starts inherits this.
                vmm::placement::set_affinity(vmm::placement::this_thread(), c)
                    .map_err(|e| Failure::new(after, FailureKind::WriterPlacement(e)))?;
            }
            write_frozen(old, method, &out, downtime_ms, t0, link, &progress)
                .map(|r| CheckpointReport { held_ms, paused_at_us, ..r })
                .map_err(|e| Failure::new(after, e))
        })();
        progress.end(r.as_ref().err().map(ToString::to_string));
        r
    };
    let Some(new) = new else {
        // Process-based: nothing runs here any more; write now.
        return Ok(Taken::WrittenAway { written: write(instance), migration });
    };
    let mut old = std::mem::replace(instance, new);
    let writer = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
        let r = write(&mut old);
        // The old instance's work is done: its vCPU threads end here.
        drop(old);
        on_written(r);
    });
    Ok(match writer {
        Ok(writer) => Taken::Writing { writer, migration },
        // The OS refused a thread: the link went with the closure, so the new
        // instance completes its disk from T; the guest runs on there.
        Err(e) => Taken::NotWritten {
            migration,
            why: ended(Failure::new(GuestRuns::NewInstance, FailureKind::WriterThread(e))),
        },
    })
}

/// CEVM's second half: `frozen` is the old instance of a live migration, paused
/// at the switch (the guest runs on in the new instance); its state and memory
/// are the guest's at the switch instant, and this writes them to `out`,
/// committed atomically. `pause_ms` is the switch's downtime; `t0` when the
/// checkpoint was asked for. On failure `out`, if it held an older checkpoint,
/// still holds it, and the guest is unaffected.
///
/// With `link` (a guest with a writable disk), the disk hand-over runs
/// meanwhile ([`FrozenDisk`]). It runs to its end even when writing the
/// checkpoint fails, since the guest's disk depends on it.
fn write_frozen(
    frozen: &mut Instance,
    method: Method,
    out: &Path,
    pause_ms: f64,
    t0: Instant,
    link: Option<OldSideLink>,
    progress: &Progress,
) -> Result<CheckpointReport> {
    supports_frozen(frozen.config())?;
    let written = write_paused(frozen, out, method, link, None, progress)?;
    Ok(report(out, method, pause_ms, t0, written, false))
}

/// [`supports`] for the old instance after the switch, when the new
/// instance's overlay may already exist.
fn supports_frozen(config: &InstanceConfig) -> Result<()> {
    match &config.disk {
        Some(d) if !d.read_only && disk::probe_format(&d.path)? != disk::ImageFormat::Qcow2 => {
            Err(Error::Unsupported("the cevm strategy needs the guest's disk to be a qcow2 overlay".into()))
        }
        _ => Ok(()),
    }
}

/// The old instance's end of the disk hand-over (over a channel or the
/// migration connection): what the new instance sends, and a way to answer.
pub(crate) struct OldSideLink {
    pub(crate) inbound: std::sync::mpsc::Receiver<integrate::ToOld>,
    pub(crate) outbox: disk::integration::Outbox<disk::integration::FromOld>,
}

/// How T went into the checkpoint's temporary directory.
enum FrozenDiskFile {
    /// A second name of the same file (T is never written after the switch).
    Linked,
    /// Another file system: T, kept open, is copied before the commit (whatever
    /// name it has by then).
    ToCopy(std::fs::File),
}

/// The old instance's side of the disk hand-over, under way: T kept for the
/// checkpoint, the checkpointing protocol on a thread. Dropping it waits for
/// that thread, so the new instance's disk is never left half integrated.
pub(crate) struct FrozenDisk {
    t_path: PathBuf,
    dst: PathBuf,
    kept: Option<FrozenDiskFile>,
    thread: Option<std::thread::JoinHandle<std::result::Result<disk::integration::OldSideReport, String>>>,
}

impl FrozenDisk {
    /// Starts the hand-over of `gd` (T, no longer written) into the
    /// checkpoint being written in `tmp`.
    pub(crate) fn start(gd: Arc<disk::GuestDisk>, tmp: &Path, link: OldSideLink) -> Result<Self> {
        let t_path = gd.current_path();
        let dst = tmp.join(disk_file(disk::ImageFormat::Qcow2));
        // Before the first message, so T is kept even once U takes its name.
        let kept = match std::fs::hard_link(&t_path, &dst) {
            Ok(()) => FrozenDiskFile::Linked,
            Err(_) => FrozenDiskFile::ToCopy(
                std::fs::File::open(&t_path).map_err(|source| disk::Error::Open { path: t_path.clone(), source })?,
            ),
        };
        let OldSideLink { inbound, outbox } = link;
        let thread = std::thread::Builder::new()
            .name("disk-integrate".into())
            .spawn(move || disk::integration::run_old_side(gd.image(), inbound, outbox).map_err(|e| e.to_string()))
            .map_err(|e| Error::Unsupported(format!("cannot start the disk integration thread: {e}")))?;
        Ok(FrozenDisk { t_path, dst, kept: Some(kept), thread: Some(thread) })
    }

    fn join(&mut self) -> std::result::Result<disk::integration::OldSideReport, String> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the disk integration thread panicked".into()),
            None => Err("the disk integration was already waited for".into()),
        }
    }

    /// Waits for the integration and puts T into the checkpoint.
    pub(crate) fn finish(mut self, writer: &mut CheckpointWriter) -> Result<DiskHandover> {
        let kept = self.kept.take().expect("set at start");
        let linked = matches!(kept, FrozenDiskFile::Linked);
        if let FrozenDiskFile::ToCopy(file) = &kept {
            disk::copy_image_from(file, &self.t_path, &self.dst)?;
        }
        let result = self.join();
        if linked && result.is_err() {
            // The integration did not end: U may never have taken T's name, so
            // the guest disk's path may still be T. The checkpoint gets a file of
            // its own, so that nothing written there later can change it.
            let tmp = self.dst.with_extension("copy");
            disk::copy_image(&self.dst, &tmp)?;
            std::fs::rename(&tmp, &self.dst)
                .map_err(|source| disk::Error::Create { path: self.dst.clone(), source })?;
        }
        absolute_backing(&self.dst, &self.t_path)?;
        writer.add_file(&disk_file(disk::ImageFormat::Qcow2))?;
        let mut report = DiskHandover { linked, ..Default::default() };
        match result {
            Ok(r) => {
                (report.clusters, report.t_reads, report.bytes, report.ms) = (r.clusters, r.t_reads, r.bytes, r.ms)
            }
            Err(e) => report.error = Some(e),
        }
        Ok(report)
    }
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}
