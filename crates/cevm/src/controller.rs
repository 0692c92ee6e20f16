//! The VMM's controller: one method per action of the control API, each with a
//! typed result and a typed error ([`ActionError`]); no HTTP here (the API edge,
//! `api::server`, maps errors to status codes). The control loop (`runner`)
//! owns it and calls it for API requests, periodic checkpoints and guest events.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use checkpoint::CheckpointReport;
use serde::Serialize;
use vmm::instance::RunState;
use vmm::{Instance, VmEvent};

use crate::api::{self, Status};
use crate::plan::{CevmPlan, CheckpointPlan, MigrationPlan, Target};

/// What an action asks of the controller.
#[derive(Debug)]
pub enum Action {
    Status,
    Pause,
    Resume,
    Checkpoint(CheckpointPlan),
    Migrate(MigrationPlan),
    Quit,
}

/// What an action answers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Status),
    Checkpoint(CheckpointReport),
    Migration(migrate::Report),
}

/// An action's outcome.
pub type Reply = Result<Answer, ActionError>;

/// Where the guest runs after an action failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestRuns {
    /// In this VMM's instance, as before the action.
    Here,
    /// In the new instance of this VMM (a thread-based CEVM checkpoint after its switch).
    NewInstance,
    /// In another VMM (a process-based CEVM checkpoint after its switch).
    Elsewhere,
    /// Perhaps at a migration's destination (see [`migrate::GuestAt::Undecided`]):
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

/// Why a CEVM or stop-and-save checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The live migration to the new instance failed.
    #[error("live migration: {0}")]
    Migration(migrate::Failure),
    /// The old instance could not start its side of the disk hand-over.
    #[error("disk hand-over: {0}")]
    Handover(migrate::Error),
    /// Writing or committing the checkpoint failed.
    #[error(transparent)]
    Write(#[from] checkpoint::Error),
    /// The writer thread could not be placed on `writer_cpus`.
    #[error("writer_cpus: {0}")]
    WriterPlacement(vmm::Error),
    /// The writer thread could not be started.
    #[error("cannot start the checkpoint writer: {0}")]
    WriterThread(std::io::Error),
}

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The request does not fit this guest (e.g. a CEVM checkpoint of a raw disk).
    #[error("{0}")]
    Unsupported(checkpoint::Error),
    /// Another checkpoint or a disk hand-over is under way.
    #[error("{0}")]
    Busy(&'static str),
    /// The instance could not be paused or resumed.
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// A live migration failed (the failure says where the guest is).
    #[error("migration failed: {0}")]
    Migration(migrate::Failure),
    /// A checkpoint failed; `guest` says where the guest runs now.
    #[error("checkpoint failed ({guest}): {error}")]
    Checkpoint { guest: GuestRuns, error: CheckpointError },
    /// The control loop is gone.
    #[error("the VMM is shutting down")]
    ShuttingDown,
}

impl ActionError {
    /// Where the guest runs, for the errors after which that is worth saying.
    pub fn guest(&self) -> Option<GuestRuns> {
        match self {
            ActionError::Migration(f) => Some(f.guest.into()),
            ActionError::Checkpoint { guest, .. } => Some(*guest),
            _ => None,
        }
    }

    fn checkpoint(guest: GuestRuns, error: impl Into<CheckpointError>) -> Self {
        ActionError::Checkpoint { guest, error: error.into() }
    }
}

/// Answers an action, now or later (a CEVM checkpoint's writer answers when
/// it has written).
pub type Respond = Box<dyn FnOnce(Reply) + Send>;

/// Something the control loop must hear about.
pub enum Control {
    /// An event of the instance of this generation (each thread-based migration
    /// starts a new one; events of older instances are stale).
    Vm(u64, VmEvent),
    /// An action and where its answer goes.
    Act(Action, Respond),
    /// A CEVM checkpoint's writer thread finished.
    CheckpointWritten(Result<CheckpointReport, ActionError>, Respond),
    /// A periodic checkpoint into `dir` ended, committed or not (a failure was
    /// reported where it failed).
    PeriodicDone { dir: PathBuf, committed: bool },
}

/// The progress of the running (or last) migration, which the engine updates and
/// the API thread reads itself (the control loop is busy migrating while asked).
/// An empty `phase`: no migration has run.
pub type SharedProgress = Arc<Mutex<migrate::Progress>>;

/// How the control loop goes on after an action.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// The VMM ends so.
    End(crate::runner::Outcome),
}

/// The thread writing a CEVM checkpoint from the frozen old instance; the VMM
/// waits for it before it ends, so a checkpoint under way is not cut short.
#[derive(Default)]
struct Writer(Option<std::thread::JoinHandle<()>>);

impl Writer {
    fn busy(&self) -> bool {
        self.0.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Forwards the events of instance generation `gen` into the control loop.
pub fn forward_events(events: Receiver<VmEvent>, to: Sender<Control>, gen: u64) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vm-events".into())
        .spawn(move || {
            for ev in events {
                if to.send(Control::Vm(gen, ev)).is_err() {
                    break;
                }
            }
        })
        .map(drop)
}

/// A finished migration.
struct Migrated {
    report: migrate::Report,
    /// Thread-based: the new instance, running the guest here.
    new: Option<Instance>,
    /// A CEVM checkpoint's migration of a guest with a disk: the old side's end
    /// of the disk hand-over.
    link: Option<Box<dyn migrate::Transport>>,
}

/// The VMM's state and its actions.
pub struct Controller {
    instance: Instance,
    /// The instance's generation: its events carry it.
    generation: u64,
    /// Checkpoints committed by this VMM process.
    checkpoints: u64,
    writer: Writer,
    progress: SharedProgress,
    control: Sender<Control>,
}

impl Controller {
    /// Controls `instance` (generation 0); new instances' events and writers'
    /// answers go to `control`; migrations publish their progress in `progress`.
    pub fn new(instance: Instance, control: Sender<Control>, progress: SharedProgress) -> Self {
        Controller { instance, generation: 0, checkpoints: 0, writer: Writer::default(), progress, control }
    }

    /// The instance the guest runs in.
    pub fn instance_mut(&mut self) -> &mut Instance {
        &mut self.instance
    }

    /// Whether `gen` is the running instance's generation.
    pub fn current(&self, gen: u64) -> bool {
        gen == self.generation
    }

    fn status_as(&self, state: &str) -> Status {
        Status {
            api_version: api::API_VERSION,
            state: state.into(),
            guest: self.instance.config().clone(),
            checkpoints: self.checkpoints,
        }
    }

    /// `status`.
    pub fn status(&self) -> Status {
        self.status_as(if self.instance.run_state() == RunState::Paused { "paused" } else { "running" })
    }

    /// `pause`.
    pub fn pause(&mut self) -> Result<Status, ActionError> {
        self.instance.pause()?;
        Ok(self.status_as("paused"))
    }

    /// `resume`.
    pub fn resume(&mut self) -> Result<Status, ActionError> {
        self.instance.resume()?;
        Ok(self.status_as("running"))
    }

    /// `quit`: the guest stops; the VMM ends once the answer is out.
    pub fn quit(&mut self) -> Status {
        let s = self.status_as("stopping");
        self.instance.shutdown();
        s
    }

    /// Ends the guest (the VMM is about to end).
    pub fn shutdown(&mut self) {
        self.instance.shutdown();
    }

    /// Why the guest cannot be checkpointed or migrated right now, if it cannot.
    pub fn busy(&self) -> Option<&'static str> {
        if self.writer.busy() {
            return Some("a CEVM checkpoint is still being written; try again when it is");
        }
        if self.instance.disk().is_some_and(|d| d.integrating()) {
            return Some("the guest's disk is still being handed over from a CEVM checkpoint; try again when it is");
        }
        None
    }

    /// `migrate`: live-migrates the guest by `plan`. Thread-based, the guest
    /// goes on in a new instance here; process-based, in another VMM, and this
    /// one ends ([`Flow::End`]).
    pub fn migrate(&mut self, plan: &MigrationPlan) -> Result<(migrate::Report, Flow), ActionError> {
        if let Some(why) = self.busy() {
            return Err(ActionError::Busy(why));
        }
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = migrate::Progress::default();
        let Migrated { report, new, .. } = self.run_migration(plan).map_err(ActionError::Migration)?;
        match new {
            None => {
                eprintln!(
                    "cevm: guest migrated to {} (downtime {:.2} ms, {} rounds, {} MiB sent); this VMM ends",
                    report.to,
                    report.downtime_ms,
                    report.rounds,
                    report.bytes_sent >> 20
                );
                self.instance.shutdown();
                let end = Flow::End(crate::runner::Outcome::MigratedAway(Box::new(report.clone())));
                Ok((report, end))
            }
            Some(new) => {
                eprintln!(
                    "cevm: guest migrated to a new instance in this process (downtime {:.2} ms, {} rounds, {} MiB copied)",
                    report.downtime_ms,
                    report.rounds,
                    report.bytes_sent >> 20
                );
                // The old instance stays frozen until here; without a use for it
                // (a CEVM checkpoint writes from it) it goes, ending its vCPU threads.
                drop(std::mem::replace(&mut self.instance, new));
                self.generation += 1;
                Ok((report, Flow::Continue))
            }
        }
    }

    /// `checkpoint`: takes the checkpoint of `plan` and answers through
    /// `respond`, now or, for a thread-based CEVM checkpoint, from its writer
    /// thread once written.
    pub fn checkpoint(&mut self, plan: CheckpointPlan, respond: Respond) -> Flow {
        if let Some(why) = self.busy() {
            respond(Err(ActionError::Busy(why)));
            return Flow::Continue;
        }
        match plan {
            CheckpointPlan::StopAndSave { out, stop } => self.stop_and_save(out, stop, respond),
            CheckpointPlan::Cevm(plan) => self.cevm(plan, respond),
        }
    }

    fn stop_and_save(&mut self, out: PathBuf, stop: bool, respond: Respond) -> Flow {
        match checkpoint::stop_and_save(&mut self.instance, &out, stop) {
            Ok(report) => {
                self.checkpoints += 1;
                eprintln!(
                    "cevm: checkpoint {} committed to {} (paused {:.1} ms, {} data pages)",
                    self.checkpoints,
                    report.dir.display(),
                    report.pause_ms,
                    report.memory.data_pages
                );
                respond(Ok(Answer::Checkpoint(report)));
                if stop {
                    self.instance.shutdown();
                    return Flow::End(crate::runner::Outcome::StoppedAfterCheckpoint(out));
                }
            }
            Err(e) => {
                eprintln!("cevm: checkpoint to {} failed, the guest goes on: {e}", out.display());
                respond(Err(ActionError::checkpoint(GuestRuns::Here, e)));
            }
        }
        Flow::Continue
    }

    /// A writer has finished (its answer is `result`).
    pub fn written(&mut self, result: Result<CheckpointReport, ActionError>, respond: Respond) {
        // Its last act was to send this: wait for it to end, so that the next
        // request does not find it still busy.
        self.writer = Writer::default();
        self.checkpoints += u64::from(result.is_ok());
        respond(logged(result, self.checkpoints));
    }

    /// The CEVM strategy: live-migrates the guest to a new instance and writes
    /// the checkpoint from the old one, frozen at the switch, while the guest
    /// runs on. Thread-based, the new instance replaces this one and a writer
    /// thread writes and answers; process-based, the guest goes on in another
    /// VMM, the checkpoint is written here, and this VMM ends.
    fn cevm(&mut self, plan: CevmPlan, respond: Respond) -> Flow {
        let t0 = Instant::now();
        if let Err(e) = checkpoint::cevm_supports(self.instance.config()) {
            respond(Err(ActionError::Unsupported(e)));
            return Flow::Continue;
        }
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = migrate::Progress::default();
        let mplan = MigrationPlan {
            to: plan.to.clone(),
            params: migrate::Params { cevm: true, ..Default::default() },
            migration_cpus: plan.migration_cpus.clone(),
        };
        let Migrated { report, new, link } = match self.run_migration(&mplan) {
            Ok(m) => m,
            Err(f) => {
                let e = ActionError::checkpoint(f.guest.into(), CheckpointError::Migration(f));
                eprintln!("cevm: checkpoint to {} failed: {e}", plan.out.display());
                respond(Err(e));
                return Flow::Continue;
            }
        };
        let method = plan.method();
        let after = if new.is_some() { GuestRuns::NewInstance } else { GuestRuns::Elsewhere };
        // Without its link the hand-over cannot run: the new instance then
        // completes its disk from T by itself, and there is no checkpoint.
        let handover = match link.map(migrate::handover::old_side_link).transpose() {
            Ok(h) => h.map(|(inbound, outbox)| checkpoint::Handover { inbound, outbox }),
            Err(e) => {
                respond(Err(ActionError::checkpoint(after, CheckpointError::Handover(e))));
                return self.replaced_by(new, report);
            }
        };
        let writer_cpus = plan.writer_cpus.clone().map(|c| c.0);
        let write = move |old: &mut Instance| -> Result<CheckpointReport, ActionError> {
            if let Some(c) = &writer_cpus {
                // The disk hand-over thread the writer starts inherits this.
                vmm::placement::set_affinity(vmm::placement::this_thread(), c)
                    .map_err(|e| ActionError::checkpoint(after, CheckpointError::WriterPlacement(e)))?;
            }
            checkpoint::write_frozen(old, method, &plan.out, report.downtime_ms, t0, handover)
                .map_err(|e| ActionError::checkpoint(after, e))
        };
        let Some(new) = new else {
            // Process-based: nothing runs here any more; write, answer, end.
            respond(logged(write(&mut self.instance), 1));
            self.instance.shutdown();
            return Flow::End(crate::runner::Outcome::MigratedAway(Box::new(report)));
        };
        let mut old = std::mem::replace(&mut self.instance, new);
        self.generation += 1;
        let control = self.control.clone();
        let (respond_tx, respond_rx) = mpsc::channel::<Respond>();
        let started = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            let r = write(&mut old);
            // The old instance's work is done: its vCPU threads end here.
            drop(old);
            if let Ok(respond) = respond_rx.recv() {
                let _ = control.send(Control::CheckpointWritten(r, respond));
            }
        });
        match started {
            Ok(h) => {
                let _ = respond_tx.send(respond);
                self.writer = Writer(Some(h));
            }
            // The OS refused a thread: the hand-over went with the closure, so
            // the new instance completes its disk from T; the guest runs on there.
            Err(e) => respond(Err(ActionError::checkpoint(GuestRuns::NewInstance, CheckpointError::WriterThread(e)))),
        }
        Flow::Continue
    }

    /// After a CEVM checkpoint that will not be written: the guest goes on in
    /// `new` (thread-based) or in the other VMM (this one then ends).
    fn replaced_by(&mut self, new: Option<Instance>, report: migrate::Report) -> Flow {
        match new {
            Some(new) => {
                drop(std::mem::replace(&mut self.instance, new));
                self.generation += 1;
                Flow::Continue
            }
            None => {
                self.instance.shutdown();
                Flow::End(crate::runner::Outcome::MigratedAway(Box::new(report)))
            }
        }
    }

    /// Runs one migration of the instance by `plan`, the engine publishing its
    /// progress. Thread-based: returns the new instance, running in this
    /// process, whose events go to the control loop as the next generation.
    /// Process-based: returns no instance; the guest runs elsewhere.
    fn run_migration(&mut self, plan: &MigrationPlan) -> Result<Migrated, migrate::Failure> {
        let me = vmm::placement::this_thread();
        let before = vmm::placement::affinity(me);
        let connect =
            |error| migrate::Failure { phase: migrate::Phase::Connect, guest: migrate::GuestAt::Source, error };
        if let Some(c) = &plan.migration_cpus {
            vmm::placement::set_affinity(me, &c.0).map_err(|e| connect(e.into()))?;
        }
        // Whatever happens, the control thread goes back to its CPUs afterwards.
        let r = self.migrate_placed(plan, connect);
        let _ = vmm::placement::set_affinity(me, &before);
        r
    }

    fn migrate_placed(
        &mut self,
        plan: &MigrationPlan,
        connect: impl Fn(migrate::Error) -> migrate::Failure,
    ) -> Result<Migrated, migrate::Failure> {
        let progress = &*self.progress;
        match &plan.to {
            Target::Local { vcpu_cpus } => {
                let (ev_tx, ev_rx) = mpsc::channel();
                let dest_cpus = vcpu_cpus.clone().unwrap_or_default().0;
                let console = Box::new(std::io::stdout());
                let done =
                    migrate::migrate_local(&mut self.instance, &plan.params, progress, console, ev_tx, &dest_cpus)?;
                if let Some(e) = &done.handover_error {
                    eprintln!("cevm: disk hand-over, new instance: {e}");
                }
                // The new instance runs the guest: without its events forwarded
                // its end would go unheard, so the thread must start.
                let next = self.generation + 1;
                if let Err(e) = forward_events(ev_rx, self.control.clone(), next) {
                    eprintln!("cevm: cannot watch the new instance's events: {e}");
                }
                Ok(Migrated { report: done.report, new: Some(done.instance), link: done.handover })
            }
            Target::Remote(endpoint) => {
                let mut t = endpoint.connect().map_err(connect)?;
                let report = migrate::migrate_out(&mut self.instance, t.as_mut(), &plan.params, progress)?;
                // A CEVM checkpoint's disk hand-over goes on over the same connection.
                let link =
                    (plan.params.cevm && migrate::handover::hands_over_disk(self.instance.config())).then_some(t);
                Ok(Migrated { report, new: None, link })
            }
        }
    }
}

/// Logs a CEVM checkpoint's outcome (the `n`th checkpoint of this VMM) and
/// makes the answer.
fn logged(r: Result<CheckpointReport, ActionError>, n: u64) -> Reply {
    match &r {
        Ok(report) => {
            eprintln!(
                "cevm: checkpoint {n} committed to {} (cevm: guest paused {:.2} ms for the switch, {} data pages written meanwhile in {:.0} ms)",
                report.dir.display(),
                report.pause_ms,
                report.memory.data_pages,
                report.total_ms
            );
            if let Some(e) = report.disk_handover.as_ref().and_then(|d| d.error.as_ref()) {
                eprintln!(
                    "cevm: the disk hand-over did not end normally ({e}); the checkpoint holds the disk of the switch"
                );
            }
        }
        Err(e) => eprintln!("cevm: {e}"),
    }
    r.map(Answer::Checkpoint)
}
