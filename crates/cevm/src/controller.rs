//! The VMM's controller: one method per action of the control API, each with a
//! typed result and a typed error ([`ActionError`]); no HTTP here (the API edge,
//! `api::server`, maps errors to status codes). The control loop (`runner`)
//! owns it and calls it for API requests, periodic checkpoints and guest events.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use checkpoint::{CheckpointReport, GuestRuns};
use serde::Serialize;
use vmm::instance::RunState;
use vmm::{Instance, VmEvent};

use checkpoint::cevm::Taken;

use crate::api::{self, Status};
use crate::plan::{CevmPlan, CheckpointPlan, MigrationPlan};
use crate::runner::Outcome;

/// What an action asks of the controller.
#[derive(Debug)]
pub enum Action {
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

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The request does not fit this guest (e.g. a CEVM checkpoint of a raw disk).
    #[error("{0}")]
    Unsupported(checkpoint::Error),
    /// A checkpoint cannot be committed to the requested directory (found
    /// before the guest was paused or moved).
    #[error("bad checkpoint directory: {0}")]
    Out(checkpoint::Error),
    /// Another checkpoint or a disk hand-over is under way.
    #[error("{0}")]
    Busy(&'static str),
    /// The instance could not be paused or resumed.
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// A live migration failed (the failure says where the guest is).
    #[error("migration failed: {0}")]
    Migration(migrate::Failure),
    /// A checkpoint failed (the failure says where the guest runs now).
    #[error(transparent)]
    Checkpoint(checkpoint::Failure),
    /// The control loop is gone.
    #[error("the VMM is shutting down")]
    ShuttingDown,
}

impl ActionError {
    /// Where the guest runs, for the errors after which that is worth saying.
    pub fn guest(&self) -> Option<GuestRuns> {
        match self {
            ActionError::Migration(f) => Some(f.guest.into()),
            ActionError::Checkpoint(f) => Some(f.guest),
            _ => None,
        }
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
    /// A signal `--on-signal` takes arrived (see [`crate::signals`]).
    Signal(i32),
}

/// The progress of the running (or last) migration, which the engine updates and
/// the API thread reads itself (the control loop is busy migrating while asked).
/// An empty `phase`: no migration has run.
pub type SharedProgress = Arc<Mutex<migrate::Progress>>;

/// What the control API answers by itself, never waiting for the control
/// loop (which is busy for a whole migration or stop-and-save checkpoint):
/// the status, and the progress of the running (or last) migration and
/// checkpoint. The controller publishes; the API thread reads.
#[derive(Debug, Default)]
pub struct Published {
    /// `None`: no guest yet (a `cevm run --incoming` waiting for one).
    status: Mutex<Option<Status>>,
    pub migration: SharedProgress,
    pub checkpoint: Arc<checkpoint::Progress>,
    /// The group cut of the running (or last) checkpoint that had one, and
    /// that checkpoint's directory.
    barrier: Mutex<Option<(PathBuf, Arc<migrate::barrier::Barrier>)>>,
}

impl Published {
    /// The last published status.
    pub fn status(&self) -> Option<Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The group cut of the running (or last) checkpoint that had one.
    pub fn barrier(&self) -> Option<(PathBuf, Arc<migrate::barrier::Barrier>)> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_status(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }
}

/// How the control loop goes on after an action.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// The VMM ends so.
    End(Outcome),
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

/// The VMM's state and its actions.
pub struct Controller {
    instance: Instance,
    /// A lazy restore's loader (after `instance`: it serves the vCPUs'
    /// faults until they have stopped, and is dropped after them).
    lazy: Option<checkpoint::LazyMemory>,
    /// The instance's generation: its events carry it.
    generation: u64,
    /// Checkpoints committed by this VMM process.
    checkpoints: u64,
    writer: Writer,
    /// The last checkpoint this instance committed while its written pages
    /// are tracked: the next incremental checkpoint's parent.
    base: Option<checkpoint::Base>,
    published: Arc<Published>,
    /// The long operation under way, if any (`checkpoint`, `migration`).
    operation: Option<&'static str>,
    /// Whether the VMM is ending (`quit`).
    stopping: bool,
    control: Sender<Control>,
    /// The checkpoint the guest was restored from, if it was.
    restored_from: Option<api::RestoredFrom>,
}

impl Controller {
    /// Controls `instance` (generation 0); new instances' events and writers'
    /// answers go to `control`; the status and the progress of migrations and
    /// checkpoints are published in `published`.
    pub fn new(instance: Instance, control: Sender<Control>, published: Arc<Published>) -> Self {
        let c = Controller {
            instance,
            lazy: None,
            generation: 0,
            checkpoints: 0,
            writer: Writer::default(),
            base: None,
            published,
            operation: None,
            stopping: false,
            control,
            restored_from: None,
        };
        c.publish();
        c
    }

    /// Records (and publishes) the checkpoint the guest was restored from.
    pub fn restored_from(&mut self, from: Option<api::RestoredFrom>) {
        self.restored_from = from;
        self.publish();
    }

    /// Keeps a lazy restore's loader while the instance runs.
    pub fn lazy(&mut self, lazy: Option<checkpoint::LazyMemory>) {
        self.lazy = lazy;
        self.publish();
    }

    /// Waits until a lazy restore has put all of memory in place (what a
    /// checkpoint or a migration reads whole), loading the rest at full speed.
    fn memory_in_place(&self) -> Result<(), ActionError> {
        let Some(l) = self.lazy.as_ref().filter(|l| !l.status().done) else { return Ok(()) };
        let st = l.status();
        tracing::info!(
            "waiting for the lazy restore: {} of {} MiB of guest memory in place; the rest is loaded now",
            st.loaded_bytes >> 20,
            st.total_bytes >> 20
        );
        l.finish().map_err(ActionError::Unsupported)
    }

    /// Starts the instance if it has not run yet (a restored or booted guest;
    /// an arrived migration's already runs), paused if `paused`, and places
    /// its vCPU threads.
    pub fn start(&mut self, vcpu_cpus: Option<&vmm::placement::CpuList>, paused: bool) -> Result<(), vmm::Error> {
        if self.instance.run_state() == RunState::Created {
            if paused {
                self.instance.start_paused()?;
            } else {
                self.instance.start()?;
            }
        }
        if let Some(c) = vcpu_cpus {
            self.instance.place_vcpus(&c.0)?;
        }
        self.publish();
        Ok(())
    }

    /// Publishes the status as it is now.
    pub fn publish(&self) {
        self.published.set_status(self.status());
    }

    /// A long operation starts (`Some`) or ends (`None`): published at once.
    fn operation(&mut self, op: Option<&'static str>) {
        self.operation = op;
        self.publish();
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
            operation: self.operation.map(str::to_string),
            nics: self.instance.nics().into_iter().map(Into::into).collect(),
            restored_from: self.restored_from.clone(),
            lazy_restore: self.lazy.as_ref().map(|l| l.status()),
        }
    }

    /// `status`.
    pub fn status(&self) -> Status {
        let state = match self.instance.run_state() {
            _ if self.stopping => "stopping",
            RunState::Paused => "paused",
            _ => "running",
        };
        self.status_as(state)
    }

    /// `pause`. The new status is published before it is answered.
    pub fn pause(&mut self) -> Result<Status, ActionError> {
        let r = self.instance.pause();
        self.publish();
        r?;
        Ok(self.status_as("paused"))
    }

    /// `resume`. The new status is published before it is answered.
    pub fn resume(&mut self) -> Result<Status, ActionError> {
        let r = self.instance.resume();
        self.publish();
        r?;
        Ok(self.status_as("running"))
    }

    /// `quit`: the guest stops; the VMM ends once the answer is out.
    pub fn quit(&mut self) -> Status {
        self.stopping = true;
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
        self.memory_in_place()?;
        self.reset_progress();
        self.operation(Some("migration"));
        let (events, new_events) = mpsc::channel();
        let to_new = migrate::NewInstance { console: Box::new(std::io::stdout()), events };
        let moved = migrate::migrate_to(
            &mut self.instance,
            &plan.to,
            &plan.params,
            &self.published.migration,
            plan.migration_cpus.as_ref(),
            to_new,
        );
        self.operation(None);
        let moved = moved.map_err(ActionError::Migration)?;
        let migrate::Moved { report, new, .. } = moved;
        match new {
            None => {
                tracing::info!(
                    "guest migrated to {} (downtime {:.2} ms, {} rounds, {} MiB sent); this VMM ends",
                    report.to,
                    report.downtime_ms,
                    report.rounds,
                    report.bytes_sent >> 20
                );
                self.instance.shutdown();
                let end = Flow::End(Outcome::MigratedAway(Box::new(report.clone())));
                Ok((report, end))
            }
            Some(new) => {
                tracing::info!(
                    "guest migrated to a new instance in this process (downtime {:.2} ms, {} rounds, {} MiB copied)",
                    report.downtime_ms,
                    report.rounds,
                    report.bytes_sent >> 20
                );
                // The old instance stays frozen until here; without a use for it
                // (a CEVM checkpoint writes from it) it goes, ending its vCPU threads.
                drop(std::mem::replace(&mut self.instance, new));
                self.watch_new_instance(new_events);
                // The new instance's status, published before the answer goes out.
                self.publish();
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
        // A directory that cannot take the checkpoint is refused before the
        // guest is paused or moved for it.
        if let Err(e) = checkpoint::check_out(plan.out()) {
            tracing::warn!("checkpoint to {} refused: {e}", plan.out().display());
            respond(Err(ActionError::Out(e)));
            return Flow::Continue;
        }
        if let Err(e) = self.memory_in_place() {
            respond(Err(e));
            return Flow::Continue;
        }
        match plan {
            CheckpointPlan::StopAndSave { out, stop, incremental } => {
                self.stop_and_save(out, stop, incremental, respond)
            }
            CheckpointPlan::Cevm(plan) => self.cevm(plan, respond),
            CheckpointPlan::Cow { out, writer_cpus, incremental } => self.cow(out, writer_cpus, incremental, respond),
        }
    }

    /// The copy-on-write strategy ([`checkpoint::cow::take`]): the guest goes
    /// on here at once; a writer thread answers once the forked writer wrote.
    fn cow(
        &mut self,
        out: PathBuf,
        writer_cpus: Option<vmm::placement::CpuList>,
        incremental: bool,
        respond: Respond,
    ) -> Flow {
        self.operation(Some("checkpoint"));
        let base = self.base.clone();
        let req = checkpoint::cow::Request {
            out: &out,
            writer_cpus: writer_cpus.as_ref(),
            progress: &self.published.checkpoint,
            pages: pages(&base, incremental),
        };
        let (respond_tx, respond_rx) = mpsc::channel::<Respond>();
        let control = self.control.clone();
        let on_written: checkpoint::cevm::OnWritten = Box::new(move |r| {
            if let Ok(respond) = respond_rx.recv() {
                let _ = control.send(Control::CheckpointWritten(r.map_err(ActionError::Checkpoint), respond));
            }
        });
        match checkpoint::cow::take(&mut self.instance, &req, on_written) {
            Ok(writer) => {
                let _ = respond_tx.send(respond);
                self.writer = Writer(Some(writer));
            }
            Err(f) => {
                let e = match f.error {
                    checkpoint::FailureKind::Write(e @ checkpoint::Error::Unsupported(_)) => {
                        ActionError::Unsupported(e)
                    }
                    _ => ActionError::Checkpoint(f),
                };
                tracing::error!("checkpoint to {} failed: {e}", out.display());
                respond(Err(e));
                self.operation(None);
            }
        }
        Flow::Continue
    }

    /// A checkpoint committed: if it tracked written pages, the instance
    /// forgets those it holds, and it is the next incremental one's base.
    fn settle(&mut self, report: &checkpoint::CheckpointReport) {
        let Some(t) = &report.tracked else {
            // Any other checkpoint over one the base needs ends the chain.
            if self.base.as_ref().is_some_and(|b| b.needs(&report.dir)) {
                self.base = None;
            }
            return;
        };
        if let Some(p) = &t.pages {
            self.instance.forget_dirty_pages(p);
        }
        let parent = self.base.as_ref().filter(|_| report.parent.is_some());
        self.base = Some(checkpoint::Base::after(&report.dir, &report.id, t.epoch, parent));
    }

    fn stop_and_save(&mut self, out: PathBuf, stop: bool, incremental: bool, respond: Respond) -> Flow {
        self.operation(Some("checkpoint"));
        let base = self.base.clone();
        let r = checkpoint::stop_and_save(
            &mut self.instance,
            &out,
            stop,
            pages(&base, incremental),
            &self.published.checkpoint,
        );
        if let Ok(report) = &r {
            self.settle(report);
        }
        // Published before the answer goes out: a client that asks for the
        // status right after it sees this checkpoint counted.
        self.checkpoints += u64::from(r.is_ok());
        self.operation(None);
        match r {
            Ok(report) => {
                tracing::info!(
                    "checkpoint {} committed to {} (paused {:.1} ms, {} data pages)",
                    self.checkpoints,
                    report.dir.display(),
                    report.pause_ms,
                    report.memory.data_pages
                );
                respond(Ok(Answer::Checkpoint(report)));
                if stop {
                    self.instance.shutdown();
                    return Flow::End(Outcome::StoppedAfterCheckpoint(out));
                }
            }
            Err(e) => {
                tracing::warn!("checkpoint to {} failed, the guest goes on: {e}", out.display());
                respond(Err(ActionError::Checkpoint(checkpoint::Failure::new(GuestRuns::Here, e))));
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
        if let Ok(report) = &result {
            self.settle(report);
        }
        self.operation(None);
        respond(logged(result, self.checkpoints));
    }

    /// The CEVM strategy ([`checkpoint::cevm::take`]): the guest goes on in a
    /// new instance here (thread-based: a writer thread writes the old one and
    /// answers) or in another VMM (process-based: written here, then this VMM
    /// ends).
    fn cevm(&mut self, plan: CevmPlan, respond: Respond) -> Flow {
        self.reset_progress();
        // Until the writer has written (thread-based), or this VMM ends.
        self.operation(Some("checkpoint"));
        let barrier = plan.group_cut.then(|| Arc::new(migrate::barrier::Barrier::new(Default::default())));
        if let Some(b) = &barrier {
            *self.published.barrier.lock().unwrap_or_else(|p| p.into_inner()) = Some((plan.out.clone(), b.clone()));
        }
        let req = checkpoint::cevm::Request {
            out: &plan.out,
            to: &plan.to,
            migration_cpus: plan.migration_cpus.as_ref(),
            writer_cpus: plan.writer_cpus.as_ref(),
            progress: &self.published.checkpoint,
            barrier,
        };
        let (events, new_events) = mpsc::channel();
        let to_new = migrate::NewInstance { console: Box::new(std::io::stdout()), events };
        // The writer's answer goes through the control loop, which waits for it.
        let (respond_tx, respond_rx) = mpsc::channel::<Respond>();
        let control = self.control.clone();
        let on_written: checkpoint::cevm::OnWritten = Box::new(move |r| {
            if let Ok(respond) = respond_rx.recv() {
                let _ = control.send(Control::CheckpointWritten(r.map_err(ActionError::Checkpoint), respond));
            }
        });
        let published = self.published.clone();
        match checkpoint::cevm::take(&mut self.instance, &req, &published.migration, to_new, on_written) {
            Err(f) => {
                let e = match f.error {
                    checkpoint::FailureKind::Write(e @ checkpoint::Error::Unsupported(_)) => {
                        ActionError::Unsupported(e)
                    }
                    _ => ActionError::Checkpoint(f),
                };
                tracing::error!("checkpoint to {} failed: {e}", plan.out.display());
                respond(Err(e));
                self.operation(None);
                Flow::Continue
            }
            Ok(Taken::Writing { writer, .. }) => {
                let _ = respond_tx.send(respond);
                self.writer = Writer(Some(writer));
                self.watch_new_instance(new_events);
                Flow::Continue
            }
            Ok(Taken::WrittenAway { written, migration }) => {
                respond(logged(written.map_err(ActionError::Checkpoint), 1));
                self.instance.shutdown();
                Flow::End(Outcome::MigratedAway(Box::new(migration)))
            }
            Ok(Taken::NotWritten { migration, why }) => {
                let away = why.guest == GuestRuns::Elsewhere;
                respond(logged(Err(ActionError::Checkpoint(why)), 0));
                if away {
                    self.instance.shutdown();
                    return Flow::End(Outcome::MigratedAway(Box::new(migration)));
                }
                self.operation(None);
                self.watch_new_instance(new_events);
                Flow::Continue
            }
        }
    }

    /// A new migration starts: `GET /v1/migration` shows it from its beginning.
    fn reset_progress(&self) {
        *self.published.migration.lock().unwrap_or_else(|p| p.into_inner()) = migrate::Progress::default();
    }

    /// The instance was replaced by a new one whose events arrive on `events`:
    /// they go to the control loop as the next generation's (the old
    /// instance's are stale from now on).
    fn watch_new_instance(&mut self, events: Receiver<VmEvent>) {
        self.generation += 1;
        // Without its events forwarded the guest's end would go unheard.
        if let Err(e) = forward_events(events, self.control.clone(), self.generation) {
            tracing::warn!("cannot watch the new instance's events: {e}");
        }
    }
}

/// Which pages a checkpoint holds: all, or those written since `base`, the
/// instance's last checkpoint (`incremental`).
fn pages(base: &Option<checkpoint::Base>, incremental: bool) -> checkpoint::Pages<'_> {
    if incremental {
        checkpoint::Pages::SinceBase(base.as_ref())
    } else {
        checkpoint::Pages::All
    }
}

/// Logs a CEVM or cow checkpoint's outcome (the `n`th checkpoint of this VMM) and
/// makes the answer.
fn logged(r: Result<CheckpointReport, ActionError>, n: u64) -> Reply {
    match &r {
        Ok(report) => {
            let pause = if report.method == checkpoint::Method::Cow { "the fork" } else { "the switch" };
            tracing::info!(
                "checkpoint {n} committed to {} ({}: guest paused {:.2} ms for {pause}, {} data pages written meanwhile in {:.0} ms)",
                report.dir.display(),
                report.strategy,
                report.pause_ms,
                report.memory.data_pages,
                report.total_ms
            );
            if let Some(e) = report.disk_handover.as_ref().and_then(|d| d.error.as_ref()) {
                tracing::warn!(
                    "the disk hand-over did not end normally ({e}); the checkpoint holds the disk of the switch"
                );
            }
        }
        Err(e) => tracing::error!("{e}"),
    }
    r.map(Answer::Checkpoint)
}
