//! `cevm batch`: one VM as a restartable batch job, the command a Slurm batch
//! script runs (`scripts/slurm/cevm-job.sh`).
//!
//! On every start of the job it picks up where the last one left off: a
//! series marked finished ends at once with the guest's status; else the
//! newest checkpoint of the series that verifies is restored (a damaged one
//! is said and passed over, for the one before it); else the guest boots
//! (`cevm run` with the arguments after `--`). The VMM runs as a child of
//! this process with periodic checkpoints into the series and `--on-signal
//! checkpoint`; this process, a plain program, passes it the batch system's
//! SIGUSR1 and SIGTERM (Slurm signals the batch script's process; a shell's
//! `trap` was seen to lose one). When the VMM exits 75 (checkpointed, run me
//! again) after Slurm's warning (SIGUSR1) inside a Slurm job, it asks Slurm
//! to requeue the job (`scontrol requeue $SLURM_JOB_ID`), unless
//! `--no-requeue`; after Slurm's SIGTERM it leaves that to Slurm, which
//! requeues a requeued or preempted job itself, and ends a cancelled one.
//!
//! With `--group`, the job is a group of VMs, one per task of the Slurm job
//! ([`group`]).

pub mod group;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueHint;

use crate::exit_code::{ERROR, REQUEUE};
use crate::signals;

/// `cevm batch`.
#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// The job's checkpoint series (on storage every node of the job sees).
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath, value_parser = crate::args::parse_checkpoint_dir)]
    dir: PathBuf,
    /// A periodic checkpoint every DURATION (e.g. 10m): what a node failure loses at most.
    #[arg(long, value_name = "DURATION", value_parser = crate::args::parse_period)]
    every: Option<Duration>,
    /// How many periodic checkpoints to keep.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = crate::args::parse_keep)]
    keep: usize,
    /// Strategy of the periodic checkpoints (cevm or stop-and-save).
    #[arg(long, value_name = "STRATEGY", default_value = "cevm", requires = "every")]
    strategy: String,
    /// The VMM serves its API here (each start anew).
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    api_sock: Option<PathBuf>,
    /// Do not ask Slurm to requeue the job when its VM was checkpointed on the warning (SIGUSR1).
    #[arg(long)]
    no_requeue: bool,
    /// A group of VMs, one per task of this Slurm job (`sbatch -N 2
    /// --ntasks-per-node=1`), started with `srun` and checkpointed together
    /// at one consistent cut; {rank} and {size} in RUN ARGS become each
    /// member's rank (0, 1, ...) and the number of members.
    #[arg(long, conflicts_with = "api_sock")]
    group: bool,
    /// With --group: member RANK's VMM serves its API to the job's coordinator
    /// at PORT+RANK on its node's address (Slurm's NodeAddr), only to a peer
    /// with the job's secret (DIR/job.key). Group jobs that may share a node
    /// need ranges of their own.
    #[arg(long, value_name = "PORT", default_value_t = 7400, requires = "group")]
    control_port: u16,
    /// The guest's first start: `cevm run` arguments (e.g. -- --guest digest --mem 64M).
    #[arg(last = true, required = true, value_name = "RUN ARGS")]
    run: Vec<OsString>,
}

/// The newest checkpoint of `series` that is complete and that `verify`
/// passes, newest first; a damaged one is said, and the one before it tried.
fn newest_restorable(series: &Path, verify: impl Fn(&Path) -> Result<(), String>) -> Option<PathBuf> {
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(series)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("ckpt-")))
        .map(|e| e.path())
        .collect();
    ckpts.sort();
    let mut passed_over = false;
    for ck in ckpts.into_iter().rev() {
        if checkpoint::series::incomplete(&ck).is_some() {
            continue;
        }
        match verify(&ck) {
            Ok(_) if passed_over => {
                tracing::warn!("restoring {}, the newest checkpoint that verifies", ck.display());
                return Some(ck);
            }
            Ok(_) => return Some(ck),
            Err(e) => {
                tracing::error!("{} is damaged and is not restored: {e}", ck.display());
                passed_over = true;
            }
        }
    }
    None
}

/// Where the restored guests' disks go: `DIR/disks`.
const DISKS: &str = "disks";

/// Empties `DIR/disks` at the start of a run: the disks there are those of
/// the run before (restored copies, or what they became), whose VMMs are
/// gone. A checkpoint keeps its own disk file (a CEVM checkpoint's is a hard
/// link to its T), so none is lost.
pub(crate) fn clear_disks(dir: &Path) -> Result<(), String> {
    let d = dir.join(DISKS);
    match std::fs::remove_dir_all(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", d.display())),
    }
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))
}

/// A path for the disk of checkpoint `ck` (of member `member`, if given)
/// restored in this run: `DIR/disks/CKPT[.MEMBER].disk.qcow2`. Each run
/// restores into a disk of its own, so that a checkpoint can be restored
/// again by a later run (the default path beside it must not exist), and a
/// disk nobody runs is not left beside the checkpoints.
pub(crate) fn restored_disk(dir: &Path, ck: &Path, member: Option<&str>) -> PathBuf {
    let name = ck.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match member {
        Some(m) => format!("{name}.{m}.disk.qcow2"),
        None => format!("{name}.disk.qcow2"),
    };
    dir.join(DISKS).join(name)
}

/// The VMM's command for this start: restore `from`, or boot.
fn vmm_command(cevm: &Path, a: &BatchArgs, from: Option<&Path>) -> Command {
    let mut c = Command::new(cevm);
    match from {
        Some(ck) => {
            tracing::info!("restoring {}", ck.display());
            // A guest without a disk has no use for the path.
            c.arg("restore").arg(ck).arg("--overlay").arg(restored_disk(&a.dir, ck, None));
        }
        None => {
            tracing::info!("no checkpoint in {}: the guest boots", a.dir.display());
            c.arg("run").args(&a.run);
        }
    }
    c.arg("--checkpoint-dir").arg(&a.dir).args(["--on-signal", "checkpoint", "--keep", &a.keep.to_string()]);
    if let Some(every) = a.every {
        c.args(["--checkpoint-every", &format!("{}ms", every.as_millis())]);
        c.args(["--checkpoint-strategy", &a.strategy]);
    }
    if let Some(s) = &a.api_sock {
        c.arg("--api-sock").arg(s);
    }
    c
}

/// Runs the job; returns its exit code (the VMM's, or the group's).
pub fn run(a: BatchArgs) -> i32 {
    let cevm = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot find this cevm binary: {e}")),
    };
    if let Some(code) = signals::finished_exit_code(&a.dir) {
        return code;
    }
    // Blocked first thing: a signal while the checkpoints are verified (for a
    // large VM on shared storage, a while) waits for the thread that takes
    // them, instead of ending this process. The VMM inherits the mask and
    // takes them itself; a group's coordinator takes them from a thread.
    if let Err(e) = signals::block() {
        return fail(format!("cannot block signals: {e}"));
    }
    if let Err(e) = std::fs::create_dir_all(&a.dir) {
        return fail(format!("{}: {e}", a.dir.display()));
    }
    if let Ok(n) = std::env::var("SLURM_RESTART_COUNT") {
        tracing::info!("Slurm job {} restarted {n} times", std::env::var("SLURM_JOB_ID").unwrap_or_default());
    }
    if a.group {
        return group::run(&cevm, &a);
    }
    if let Err(e) = clear_disks(&a.dir) {
        return fail(e);
    }
    let from = newest_restorable(&a.dir, |ck| checkpoint::verify(ck).map(drop).map_err(|e| e.to_string()));
    let mut child = match vmm_command(&cevm, &a, from.as_deref()).spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the VMM: {e}")),
    };
    let pid = Arc::new(AtomicI32::new(child.id() as i32));
    let (target, terminated) = (pid.clone(), Arc::new(AtomicBool::new(false)));
    let term = terminated.clone();
    let forwarded = signals::on_each(move |sig| {
        let p = target.load(Ordering::SeqCst);
        if sig == libc::SIGTERM {
            term.store(true, Ordering::SeqCst);
        }
        if p > 0 {
            tracing::info!("passing {} on to the VMM", signals::name(sig));
            // SAFETY: kill(2) of our own child, which we have not reaped yet (pid > 0).
            unsafe { libc::kill(p, sig) };
        }
    });
    if let Err(e) = forwarded {
        tracing::error!("signals will not reach the VMM: {e}");
    }
    let status = child.wait();
    pid.store(0, Ordering::SeqCst);
    let code = match status {
        Ok(s) => s.code().unwrap_or(ERROR),
        Err(e) => return fail(format!("the VMM: {e}")),
    };
    if code == REQUEUE {
        after_last_checkpoint(a.no_requeue, terminated.load(Ordering::SeqCst));
    }
    code
}

/// After the last checkpoint on a signal: a warning (SIGUSR1) asks Slurm
/// to requeue the job (unless `no_requeue`); Slurm's SIGTERM does not, for
/// Slurm ends the job then and decides itself whether it runs again (it
/// requeues it on `scontrol requeue` and on preemption; `scancel` and a time
/// limit end it, and a later job on the same series goes on from the
/// checkpoint).
pub(crate) fn after_last_checkpoint(no_requeue: bool, terminated: bool) {
    if terminated {
        tracing::info!("checkpointed; Slurm ends the job (SIGTERM), and requeues it if it was requeued or preempted");
    } else if !no_requeue {
        requeue("checkpointed");
    }
}

/// Asks Slurm to requeue this job, if it is one; `done` says what was
/// done first (e.g. "checkpointed").
pub(crate) fn requeue(done: &str) {
    let Ok(job) = std::env::var("SLURM_JOB_ID") else {
        tracing::info!("{done}; not a Slurm job, so nobody to requeue it: run the same command again");
        return;
    };
    match Command::new("scontrol").args(["requeue", &job]).output() {
        Ok(o) if o.status.success() => tracing::info!("{done}; Slurm job {job} requeued"),
        // Slurm's own requeue (its SIGTERM) is already under way, or the job is ending.
        Ok(o) => tracing::info!("{done}; scontrol requeue {job}: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => tracing::error!("{done}, but scontrol cannot run: {e}; requeue job {job} by hand"),
    }
}

pub(crate) fn fail(msg: String) -> i32 {
    tracing::error!("{msg}");
    ERROR
}
