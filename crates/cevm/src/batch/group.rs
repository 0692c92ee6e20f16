//! `cevm batch --group`: a group of VMs as one restartable Slurm job, one
//! member per task of the job (`sbatch -N 2 --ntasks-per-node=1`).
//!
//! The batch script's process is the job's coordinator. It starts the
//! members with `srun` (`cevm batch-member` on every task: member RANK's VMM,
//! which serves its API only to a peer holding the job's secret), takes the
//! group's periodic checkpoints at one consistent cut over those control
//! connections (`crate::group`), and on a warning signal a last one, then
//! ends the members and asks Slurm to requeue the job. On every start it
//! restores the newest group checkpoint of the series that verifies (a
//! damaged one is said and passed over): the members restore their own
//! checkpoints paused, on whatever nodes Slurm gave the job, and the
//! coordinator checks every one and lets them all run at once (`cevm group
//! restore --at`). A node failure loses what ran since the newest periodic
//! group checkpoint; Slurm requeues the job and it goes on from there.
//!
//! The series directory (on storage every node sees) holds the group
//! checkpoints (`ckpt-N`, `latest`), the job's secret (`job.key`, made on
//! the first start, mode 0600), where each member's VMM is reached this run
//! (`run/mRANK.control`, written by the member), the disks of the members
//! restored this run (`disks/`) and, once every member's guest has ended
//! with status 0, the `finished` marker.
//!
//! A member's VMM does not act on SIGTERM or SIGUSR1 itself (they stay
//! blocked, as `cevm batch-member` leaves them): Slurm sends them to every
//! task of the job, and a checkpoint each member took on its own would not
//! be a consistent cut. The coordinator takes the group's, within Slurm's
//! KillWait.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use clap::{ValueEnum, ValueHint};

use super::{clear_disks, fail, newest_restorable, requeue, restored_disk, BatchArgs};
use crate::api::remote::Secret;
use crate::api::Addr;
use crate::exit_code::{ERROR, OK, REQUEUE, USAGE};
use crate::group::{restore, MemberSpec, Strategy};
use crate::signals::{self, Finished};

/// The job's secret in the series directory.
const KEY: &str = "job.key";
/// Where the members say where their VMMs are reached this run.
const RUN: &str = "run";
/// How long the members' VMMs may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the members may take to end once told to.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// `cevm batch-member`: one member of a group job, started by the job's
/// `srun` (not by hand).
#[derive(clap::Args, Debug)]
pub struct MemberArgs {
    /// The job's series directory.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    dir: PathBuf,
    /// The VMM serves its API at PORT + this task's rank.
    #[arg(long, value_name = "PORT")]
    control_port: u16,
    /// Restore this member's checkpoint of this group checkpoint (paused,
    /// for the coordinator to check and resume), instead of booting.
    #[arg(long, value_name = "GROUP CHECKPOINT", value_hint = ValueHint::DirPath)]
    from: Option<PathBuf>,
    /// The guest's first start: `cevm run` arguments, with {rank} and {size}.
    #[arg(last = true, value_name = "RUN ARGS")]
    run: Vec<String>,
}

/// What the coordinator waits for.
enum Event {
    /// SIGUSR1 or SIGTERM from the batch system.
    Signal(i32),
    /// `srun` ended: every member has; its exit code.
    Ended(i32),
}

/// A Slurm environment variable this task must have.
fn slurm_var(name: &str) -> Result<String, String> {
    std::env::var(name)
        .map_err(|_| format!("${name} is not set: `cevm batch --group` runs inside a Slurm job (sbatch)"))
}

/// A Slurm environment variable that holds a number.
fn slurm_number(name: &str) -> Result<usize, String> {
    let v = slurm_var(name)?;
    v.parse().map_err(|_| format!("${name}={v} is not a number"))
}

/// The name of member `rank`, its directory in every group checkpoint.
fn member_name(rank: usize) -> String {
    format!("m{rank}")
}

/// `RUN ARGS` for member `rank` of `size`.
fn expand(run: &[String], rank: usize, size: usize) -> Vec<String> {
    run.iter().map(|a| a.replace("{rank}", &rank.to_string()).replace("{size}", &size.to_string())).collect()
}

/// The address Slurm reaches node `node` at (its NodeAddr).
fn node_addr(node: &str) -> Result<String, String> {
    let o = Command::new("scontrol")
        .args(["show", "node", "-o", node])
        .output()
        .map_err(|e| format!("scontrol cannot run: {e}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    text.split_whitespace().find_map(|w| w.strip_prefix("NodeAddr=")).map(str::to_string).ok_or_else(|| {
        format!("scontrol show node {node}: no NodeAddr ({})", String::from_utf8_lossy(&o.stderr).trim())
    })
}

/// Writes `text` to `path` at once (a reader sees all of it or nothing).
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `cevm batch-member`: becomes member RANK's VMM (exec), serving its API at
/// its node's address, and says where in `DIR/run/mRANK.control`. Returns
/// only on an error.
pub fn member(a: MemberArgs) -> i32 {
    use std::os::unix::process::CommandExt;
    let go = || -> Result<Command, String> {
        let (rank, size) = (slurm_number("SLURM_PROCID")?, slurm_number("SLURM_NTASKS")?);
        let node = slurm_var("SLURMD_NODENAME")?;
        let name = member_name(rank);
        let port = a.control_port.checked_add(rank as u16).ok_or("--control-port + rank is past 65535")?;
        let control = format!("{}:{port}", node_addr(&node)?);
        let job = std::env::var("SLURM_JOB_ID").unwrap_or_default();
        let sock = std::env::temp_dir().join(format!("cevm-job{job}-{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut c = Command::new(std::env::current_exe().map_err(|e| format!("cannot find this cevm binary: {e}"))?);
        match &a.from {
            Some(g) => {
                tracing::info!("member {name} on {node}: restoring {}", g.join(&name).display());
                c.arg("restore").arg(g.join(&name)).arg("--paused");
                // A guest without a disk has no use for the path.
                c.arg("--overlay").arg(restored_disk(&a.dir, g, Some(&name)));
            }
            None => {
                tracing::info!("member {name} on {node}: the guest boots");
                c.arg("run").args(expand(&a.run, rank, size));
            }
        }
        c.arg("--api-sock").arg(&sock);
        c.args(["--control", &format!("tcp:{control}"), "--control-secret"]).arg(a.dir.join(KEY));
        let said = a.dir.join(RUN).join(format!("{name}.control"));
        write_whole(&said, &control).map_err(|e| format!("{}: {e}", said.display()))?;
        // The batch system's signals are for the coordinator: blocked here, they
        // stay blocked in the VMM (exec keeps the mask; a VMM without
        // --on-signal never takes them), and Slurm's SIGKILL still ends it.
        signals::block().map_err(|e| format!("cannot block signals: {e}"))?;
        Ok(c)
    };
    match go() {
        Ok(mut c) => fail(format!("cannot start the member's VMM: {}", c.exec())),
        Err(e) => fail(e),
    }
}

/// The newest group checkpoint of `dir` that verifies completely.
fn newest_group(dir: &Path) -> Option<PathBuf> {
    newest_restorable(dir, |g| checkpoint::group::verify(g).map(drop).map_err(|e| e.to_string()))
}

/// The job's secret: `DIR/job.key`, made on the job's first start.
fn secret(dir: &Path) -> Result<Secret, String> {
    let key = dir.join(KEY);
    if !key.exists() {
        Secret::generate(&key).map_err(|e| e.to_string())?;
    }
    Secret::load(&key).map_err(|e| e.to_string())
}

/// Starts the members: `srun` runs `cevm batch-member` on every task. (On
/// Slurm's SIGTERM, srun says "forcing job termination", but its tasks were
/// seen to run on until Slurm's SIGKILL after KillWait (Slurm 22.05 here;
/// the group test's `scontrol requeue` checks it): the members' VMMs do not
/// act on the SIGTERM, and KillWait is the time the coordinator has for the
/// last group checkpoint.)
fn start_members(cevm: &Path, a: &BatchArgs, from: Option<&Path>, to: Sender<Event>) -> Result<(), String> {
    let mut c = Command::new("srun");
    // Each member's lines behind its rank; a member that fails ends the
    // others (the job then ends with its status, instead of running on with a
    // member short until its time limit).
    c.args(["--label", "--kill-on-bad-exit=1"]);
    // srun no longer takes the job's CPUs per task from the environment
    // (Slurm 22.05): each member gets what the job asked for, for its vCPUs.
    if let Ok(n) = std::env::var("SLURM_CPUS_PER_TASK") {
        c.arg(format!("--cpus-per-task={n}"));
    }
    c.arg(cevm).arg("batch-member");
    c.arg("--dir").arg(&a.dir).args(["--control-port", &a.control_port.to_string()]);
    if let Some(g) = from {
        c.arg("--from").arg(g);
    }
    c.arg("--").args(&a.run);
    let mut child: Child = c.spawn().map_err(|e| format!("cannot run srun: {e} (is this a Slurm job?)"))?;
    std::thread::Builder::new()
        .name("srun".into())
        .spawn(move || {
            let code = match child.wait() {
                Ok(s) => s.code().unwrap_or(ERROR),
                Err(_) => ERROR,
            };
            let _ = to.send(Event::Ended(code));
        })
        .map(drop)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// Waits until every member has said where its VMM is reached: the members,
/// with the job's secret. Ends early on an event (the members ended, a signal).
fn members_said(dir: &Path, size: usize, secret: &Secret, events: &Receiver<Event>) -> Result<Vec<MemberSpec>, Event> {
    let t0 = Instant::now();
    loop {
        let read = |rank: usize| std::fs::read_to_string(dir.join(RUN).join(format!("{}.control", member_name(rank))));
        let said: Vec<String> = (0..size).map_while(|r| read(r).ok()).collect();
        if said.len() == size {
            return Ok(said
                .into_iter()
                .enumerate()
                .map(|(rank, at)| MemberSpec {
                    secret: Some(secret.clone()),
                    ..MemberSpec::new(&member_name(rank), Addr::Tcp(at))
                })
                .collect());
        }
        if t0.elapsed() > START_TIMEOUT {
            tracing::error!("the members did not start within {} s", START_TIMEOUT.as_secs());
            return Err(Event::Ended(ERROR));
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => return Err(e),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(Event::Ended(ERROR)),
        }
    }
}

/// Runs a group job; returns its exit code.
pub fn run(cevm: &Path, a: &BatchArgs) -> i32 {
    let strategy = match Strategy::from_str(&a.strategy, true) {
        Ok(s) => s,
        Err(_) => {
            tracing::error!("--strategy {}: a group checkpoints by cevm or stop-and-save", a.strategy);
            return USAGE;
        }
    };
    // The job's tasks; a job given only nodes (`-N 2`) has none set, and
    // srun then runs one task per node.
    let size = match slurm_number("SLURM_NTASKS").or_else(|_| slurm_number("SLURM_JOB_NUM_NODES")) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let secret = match secret(&a.dir) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Err(e) = clear_disks(&a.dir) {
        return fail(e);
    }
    let run_dir = a.dir.join(RUN);
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        return fail(format!("{}: {e}", run_dir.display()));
    }
    let from = newest_group(&a.dir).map(|g| g.canonicalize().unwrap_or(g));
    if let Some(g) = &from {
        let n = checkpoint::group::open(g).map(|m| m.members.len()).unwrap_or(0);
        if n != size {
            return fail(format!(
                "{} holds a group of {n} members, and this job has {size} tasks: give the job {n} (sbatch -n {n})",
                g.display()
            ));
        }
        tracing::info!("restoring the group checkpoint {}", g.display());
    } else {
        tracing::info!("no group checkpoint in {}: the {size} guests boot", a.dir.display());
    }
    // Signals are blocked already (`super::run`).
    let (tx, events) = channel();
    let to = tx.clone();
    if let Err(e) = signals::on_each(move |sig| {
        let _ = to.send(Event::Signal(sig));
    }) {
        return fail(format!("cannot take signals: {e}"));
    }
    if let Err(e) = start_members(cevm, a, from.as_deref(), tx) {
        return fail(e);
    }
    let members = match members_said(&a.dir, size, &secret, &events) {
        Ok(m) => m,
        Err(e) => return end(e, a, &[], &events),
    };
    if let Some(g) = from {
        if let Err(e) = restore_members(cevm, g, &members, secret, &events) {
            return end(e, a, &members, &events);
        }
    }
    serve(a, strategy, &members, &events)
}

/// The members restore their checkpoints of group checkpoint `g` on their
/// nodes; once every one is checked, all are let run (`cevm group restore
/// --at`). Ends early on an event: the members ended (one could not
/// restore: srun ends them all), or a signal.
fn restore_members(
    cevm: &Path,
    g: PathBuf,
    members: &[MemberSpec],
    secret: Secret,
    events: &Receiver<Event>,
) -> Result<(), Event> {
    let at: Vec<(String, String)> = members
        .iter()
        .filter_map(|m| match &m.api {
            Addr::Tcp(at) => Some((m.name.clone(), at.clone())),
            Addr::Unix(_) => None,
        })
        .collect();
    let (done, restored) = channel();
    let cevm = cevm.to_path_buf();
    // On a thread of its own, so that the members' end or a signal is seen
    // while it waits for them (it is left behind then; this process ends soon).
    std::thread::Builder::new()
        .name("group-restore".into())
        .spawn(move || {
            let o =
                restore::Options { dir: &g, taps: &[], sock_dir: None, disk_dir: None, at: &at, secret: Some(secret) };
            let _ = done.send(restore::start(&cevm, &o).map(drop));
        })
        .map_err(|e| {
            tracing::error!("cannot start a thread: {e}");
            Event::Ended(ERROR)
        })?;
    loop {
        match restored.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                tracing::error!("{e}");
                return Err(Event::Ended(ERROR));
            }
            Err(_) => {}
        }
        if let Ok(e) = events.try_recv() {
            return Err(e);
        }
    }
}

/// The job runs: periodic group checkpoints until every member has ended or
/// a signal came.
fn serve(a: &BatchArgs, strategy: Strategy, members: &[MemberSpec], events: &Receiver<Event>) -> i32 {
    let mut series = match checkpoint::series::Series::open(&a.dir, a.keep) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let mut next = a.every.map(|e| Instant::now() + e);
    loop {
        let wait = next.map_or(Duration::from_secs(3600), |n| n.saturating_duration_since(Instant::now()));
        match events.recv_timeout(wait) {
            Ok(e) => return end(e, a, members, events),
            Err(RecvTimeoutError::Disconnected) => return fail("the members' srun is gone".into()),
            Err(RecvTimeoutError::Timeout) => {}
        }
        let Some(n) = next.as_mut() else { continue };
        *n += a.every.unwrap_or_default();
        match strategy.take(members, &mut series) {
            Ok(r) => crate::group::report(&r),
            Err(e) => tracing::error!("group checkpoint aborted (the previous one stays the newest): {e}"),
        }
    }
}

/// The job ends: the members ended by themselves (the job is finished if
/// every guest ended with 0), or a signal came (a last group checkpoint, the
/// members told to quit, the job requeued), or the start failed.
fn end(e: Event, a: &BatchArgs, members: &[MemberSpec], events: &Receiver<Event>) -> i32 {
    match e {
        Event::Ended(0) if !members.is_empty() => {
            let f =
                Finished { exit_code: OK, how: "every member's guest ended with status 0".into(), unix_ms: now_ms() };
            match signals::mark_finished(&a.dir, &f) {
                Ok(()) => tracing::info!("the group job is finished: {}", signals::marker(&a.dir).display()),
                Err(e) => tracing::error!("the group job is finished, but its marker cannot be written: {e}"),
            }
            OK
        }
        Event::Ended(code) => {
            tracing::error!("the members ended with {code}");
            if code == 0 {
                ERROR
            } else {
                code
            }
        }
        Event::Signal(sig) if members.is_empty() => {
            // Before the members said where they are: nothing to checkpoint or
            // tell; Slurm ends them with the job.
            tracing::info!("{}: the members have not started yet", signals::name(sig));
            if sig != libc::SIGTERM && !a.no_requeue {
                requeue("nothing ran yet");
            }
            REQUEUE
        }
        Event::Signal(sig) => {
            let done = if last_checkpoint(sig, a, members) {
                "checkpointed"
            } else {
                "the newest group checkpoint before stays"
            };
            crate::group::take::each(members, |_, _, c| c.quit().map(drop));
            let deadline = Instant::now() + END_TIMEOUT;
            loop {
                match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Event::Ended(_)) => break,
                    // Slurm's SIGTERM after its warning, say: already under way.
                    Ok(Event::Signal(_)) => {}
                    Err(_) => {
                        tracing::warn!("the members did not all end within {} s", END_TIMEOUT.as_secs());
                        break;
                    }
                }
            }
            if sig == libc::SIGTERM {
                tracing::info!("{done}; Slurm ends the job (SIGTERM), and requeues it if it was requeued or preempted");
            } else if !a.no_requeue {
                requeue(done);
            }
            REQUEUE
        }
    }
}

/// On a signal: one last group checkpoint (stop-and-save: the members are
/// stopped anyway), its guests paused first and left so (a stop-and-save
/// group checkpoint resumes only members that ran), so that none runs past
/// it before it is told to quit; whether it was committed.
fn last_checkpoint(sig: i32, a: &BatchArgs, members: &[MemberSpec]) -> bool {
    tracing::info!("{}: a last group checkpoint to {}", signals::name(sig), a.dir.display());
    crate::group::take::each(members, |_, _, c| c.pause().map(drop));
    let taken = checkpoint::series::Series::open(&a.dir, a.keep)
        .map_err(|e| e.to_string())
        .and_then(|mut s| Strategy::StopAndSave.take(members, &mut s).map_err(|e| e.to_string()));
    match taken {
        Ok(r) => {
            crate::group::report(&r);
            true
        }
        Err(e) => {
            tracing::error!("the last group checkpoint failed (the newest one before it stays): {e}");
            false
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_args_get_each_members_rank_and_the_groups_size() {
        let run: Vec<String> =
            ["--guest-args", "id={rank} count={size}", "--net", "tap=t{rank},mac=52:54:00:00:00:0{rank}"]
                .map(String::from)
                .into();
        assert_eq!(expand(&run, 1, 2), ["--guest-args", "id=1 count=2", "--net", "tap=t1,mac=52:54:00:00:00:01"]);
    }
}
