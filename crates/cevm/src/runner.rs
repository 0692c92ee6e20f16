//! The VMM's control loop for `cevm run` and `cevm restore`: runs an instance,
//! serves the control API, takes periodic checkpoints, and ends when the guest
//! does. What each action does is the controller's ([`crate::controller`]); this
//! loop only delivers actions and events to it.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::Method;
use vmm::{Instance, VmEvent};

use crate::api;
use crate::controller::{forward_events, Action, Answer, Control, Controller, Flow, Published, Respond};
use crate::plan::CheckpointPlan;
use crate::signals::{self, Finished, OnSignal};

/// How a VMM run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest wrote this status to the exit port.
    GuestExit(u32),
    /// The guest powered off (ACPI).
    PowerOff,
    /// The guest asked for a reset.
    Reboot,
    /// A checkpoint with `stop` was committed; the guest was not resumed.
    StoppedAfterCheckpoint(PathBuf),
    /// `PUT /v1/quit`.
    Quit,
    /// The guest was live-migrated to another process; this VMM has no guest left.
    MigratedAway(Box<migrate::Report>),
    /// The guest crashed or a vCPU failed.
    Failed(String),
    /// A signal `--on-signal` takes ended the VM: after a last checkpoint
    /// committed to this directory (`checkpoint`), or at once (`quit`).
    Signalled { signal: i32, checkpoint: Option<PathBuf> },
}

/// Errors of the control loop itself (the guest's own end is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error("all event sources closed")]
    Closed,
}

/// A VMM's series of checkpoints (`--checkpoint-dir`): periodic ones every
/// `every` (`--checkpoint-every`) taken by `method`, and the last one a
/// signal asks for (`--on-signal checkpoint`).
pub struct Periodic {
    pub every: Option<Duration>,
    pub series: checkpoint::series::Series,
    pub method: Method,
    /// Each checkpoint holds only the pages written since the one before.
    pub incremental: bool,
}

/// How often the status is published again without an action: what moves on
/// by itself (the NICs' counters) is at most this old in `GET /v1/status`.
const REFRESH: Duration = Duration::from_secs(1);

/// How the control loop starts its instance.
#[derive(Debug, Default)]
pub struct Start<'a> {
    /// The vCPU threads placed on these CPUs (see `Instance::place_vcpus`).
    pub vcpu_cpus: Option<&'a vmm::placement::CpuList>,
    /// Paused: the guest runs from the first `resume` on (`cevm restore --paused`).
    pub paused: bool,
    /// The checkpoint the instance was restored from (shown in the status).
    pub restored_from: Option<&'a api::RestoredFrom>,
    /// What `SIGUSR1` and `SIGTERM` do (blocked by the caller before it made
    /// any thread: [`crate::signals::block`]).
    pub on_signal: Option<OnSignal>,
    /// A lazy restore's loader, kept while the guest runs.
    pub lazy: Option<checkpoint::LazyMemory>,
    /// When the restore of this guest began: the time to its first
    /// instruction is logged (`cevm bench lazy` reads it).
    pub began: Option<Instant>,
}

/// Starts `instance` (whose vCPU events arrive on `vm_events`) as `start`
/// says and serves it until it ends. With `api`, the control API (already
/// listening) serves it.
pub fn run(
    instance: Instance,
    vm_events: Receiver<VmEvent>,
    api: Option<&api::server::Server>,
    start: Start<'_>,
    mut periodic: Option<Periodic>,
) -> Result<Outcome, RunError> {
    let (tx, rx) = mpsc::channel::<Control>();
    forward_events(vm_events, tx.clone(), 0).map_err(|e| RunError::Thread("vm-events", e))?;
    let published = api.map_or_else(|| Arc::new(Published::default()), |s| s.published());
    let mut vmm = Controller::new(instance, tx.clone(), published);
    vmm.restored_from(start.restored_from.cloned());
    vmm.lazy(start.lazy);
    // The API takes actions for this guest before it runs: a client that sees
    // the guest's first output and calls at once must find the VMM attached
    // (its call waits in the channel until the loop below takes it).
    if let Some(s) = api {
        s.attach(tx.clone());
    }
    vmm.start(start.vcpu_cpus, start.paused)?;
    if let Some(t) = start.began.filter(|_| !start.paused) {
        tracing::info!("the guest runs {:.2} ms after its restore began", t.elapsed().as_secs_f64() * 1e3);
    }
    if start.on_signal.is_some() {
        signals::forward(tx.clone()).map_err(|e| RunError::Thread("signals", e))?;
    }
    let mut signalled = None;
    let mut due = periodic.as_ref().and_then(|p| p.every).map(|every| Instant::now() + every);
    let mut refresh = Instant::now() + REFRESH;
    loop {
        let wake = due.map_or(refresh, |at| at.min(refresh));
        let msg = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if now >= refresh {
                    // What changes without an action (the NICs' counters).
                    vmm.publish();
                    refresh = now + REFRESH;
                }
                if let Some(at) = due.filter(|&at| now >= at) {
                    let p = periodic.as_mut().expect("due only with a policy");
                    let every = p.every.expect("due only with a period");
                    // The next one a whole period on; after a late one (a slow
                    // checkpoint held this loop), a period from now, not at once.
                    due = Some(if at + every > now { at + every } else { now + every });
                    match vmm.busy() {
                        Some(why) => tracing::warn!("periodic checkpoint skipped: {why}"),
                        None => periodic_checkpoint(p, &tx),
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(RunError::Closed),
        };
        let flow = match msg {
            Control::Signal(sig) => {
                signalled = signalled.or(Some(sig));
                Flow::Continue
            }
            msg => handle(&mut vmm, msg, periodic.as_ref()),
        };
        vmm.publish();
        if let Flow::End(outcome) = flow {
            if start.on_signal.is_some() {
                mark_finished(&outcome, periodic.as_ref());
            }
            return Ok(outcome);
        }
        // A signal waits for a CEVM checkpoint still being written.
        if let (Some(sig), Some(how)) = (signalled, start.on_signal) {
            if vmm.busy().is_none() {
                return Ok(on_signal(&mut vmm, sig, how, periodic.as_mut()));
            }
        }
    }
}

/// Ends the VM for signal `sig` as `how` says.
fn on_signal(vmm: &mut Controller, sig: i32, how: OnSignal, periodic: Option<&mut Periodic>) -> Outcome {
    let (OnSignal::Checkpoint, Some(p)) = (how, periodic) else {
        vmm.quit();
        return Outcome::Signalled { signal: sig, checkpoint: None };
    };
    let dir = p.series.next_path();
    tracing::info!("{}: a last checkpoint to {}", signals::name(sig), dir.display());
    let failed = Arc::new(std::sync::Mutex::new(None));
    let f = failed.clone();
    let respond: Respond = Box::new(move |r| {
        if let Err(e) = r {
            *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    });
    match vmm.checkpoint(CheckpointPlan::StopAndSave { out: dir.clone(), stop: true, incremental: false }, respond) {
        Flow::End(Outcome::StoppedAfterCheckpoint(dir)) => {
            match p.series.committed(&dir) {
                Ok(removed) => {
                    removed.iter().for_each(|r| tracing::info!("removed the older checkpoint {}", r.display()))
                }
                Err(e) => tracing::error!("checkpoint series: {e}"),
            }
            Outcome::Signalled { signal: sig, checkpoint: Some(dir) }
        }
        Flow::End(other) => other,
        Flow::Continue => {
            vmm.quit();
            let why = failed.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
            Outcome::Failed(format!(
                "{}: the last checkpoint failed ({why}); the VM stopped, the previous checkpoint stays the newest",
                signals::name(sig)
            ))
        }
    }
}

/// A batch job's guest that ended by itself leaves its series the
/// [`Finished`] marker.
fn mark_finished(outcome: &Outcome, periodic: Option<&Periodic>) {
    let (exit_code, how) = match outcome {
        Outcome::GuestExit(0) => (crate::exit_code::OK, "the guest exited with status 0".to_string()),
        Outcome::GuestExit(s) => (crate::exit_code::GUEST_FAILED, format!("the guest exited with status {s}")),
        Outcome::PowerOff => (crate::exit_code::OK, "the guest powered off".to_string()),
        _ => return,
    };
    let Some(p) = periodic else { return };
    let unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let f = Finished { exit_code, how, unix_ms };
    match signals::mark_finished(p.series.dir(), &f) {
        Ok(()) => tracing::info!("the job is finished: {}", signals::marker(p.series.dir()).display()),
        Err(e) => tracing::error!("cannot mark the checkpoint series finished: {e}"),
    }
}

/// Hands one message to the controller.
fn handle(vmm: &mut Controller, msg: Control, periodic: Option<&Periodic>) -> Flow {
    match msg {
        Control::Vm(gen, _) if !vmm.current(gen) => Flow::Continue,
        Control::Vm(_, ev) => {
            vmm.shutdown();
            Flow::End(match ev {
                VmEvent::GuestExit { status } => Outcome::GuestExit(status),
                VmEvent::PowerOff => Outcome::PowerOff,
                VmEvent::Reboot => Outcome::Reboot,
                other => Outcome::Failed(other.to_string()),
            })
        }
        Control::Act(action, respond) => act(vmm, action, respond),
        Control::CheckpointWritten(result, respond) => {
            vmm.written(result, respond);
            Flow::Continue
        }
        // Taken by the loop itself.
        Control::Signal(_) => Flow::Continue,
        Control::PeriodicDone { dir, committed } => {
            // A failed one was reported where it failed; the older ones stay.
            if let (true, Some(p)) = (committed, periodic) {
                match p.series.committed(&dir) {
                    Ok(removed) => {
                        for r in removed {
                            tracing::info!("removed the older checkpoint {}", r.display());
                        }
                    }
                    Err(e) => tracing::error!("periodic checkpoints: {e}"),
                }
            }
            Flow::Continue
        }
    }
}

/// Runs one action and answers it.
fn act(vmm: &mut Controller, action: Action, respond: Respond) -> Flow {
    match action {
        Action::Pause => respond(vmm.pause().map(Answer::Status)),
        Action::Resume => respond(vmm.resume().map(Answer::Status)),
        Action::Quit => {
            respond(Ok(Answer::Status(vmm.quit())));
            return Flow::End(Outcome::Quit);
        }
        Action::Checkpoint(plan) => return vmm.checkpoint(plan, respond),
        Action::Migrate(plan) => match vmm.migrate(&plan) {
            Ok((report, flow)) => {
                respond(Ok(Answer::Migration(report)));
                return flow;
            }
            Err(e) => {
                tracing::error!("migration to {} failed: {e}", plan.to.name());
                respond(Err(e));
            }
        },
    }
    Flow::Continue
}

/// Asks the control loop for the next periodic checkpoint, as an API request
/// would; whether it committed comes back as `Control::PeriodicDone`.
fn periodic_checkpoint(p: &mut Periodic, control: &Sender<Control>) {
    let dir = p.series.next_path();
    let plan = CheckpointPlan::periodic(p.method, dir.clone(), p.incremental);
    let back = control.clone();
    let respond = Box::new(move |r: crate::controller::Reply| {
        let _ = back.send(Control::PeriodicDone { dir, committed: r.is_ok() });
    });
    let _ = control.send(Control::Act(Action::Checkpoint(plan), respond));
}
