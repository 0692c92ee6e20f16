//! The VMM's control loop for `cevm run` and `cevm restore`: runs an instance,
//! serves the control API, and ends when the guest does.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use checkpoint::Strategy;
use vmm::instance::RunState;
use vmm::{Instance, VmEvent};

use crate::api::{self, MigrateRequest, Reply, Request, SharedProgress, Status};

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
    MigratedAway(migrate::Report),
    /// The guest crashed or a vCPU failed.
    Failed(String),
}

enum Control {
    /// An event of the instance of this generation (each thread-based migration
    /// starts a new one; events of older instances are stale).
    Vm(u64, VmEvent),
    Api(Request, Sender<Reply>),
    /// A CEVM checkpoint's writer finished (the reply goes to its requester).
    CheckpointWritten(Result<checkpoint::CheckpointReport, String>, Sender<Reply>),
    /// The answer to a periodic checkpoint into this directory.
    PeriodicDone(PathBuf, Reply),
}

/// Periodic checkpoints (`--checkpoint-every`): taken like `PUT /v1/checkpoint`
/// requests, into a [`checkpoint::series::Series`].
pub struct Periodic {
    pub every: std::time::Duration,
    pub series: checkpoint::series::Series,
    pub strategy: Strategy,
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
fn forward_events(events: Receiver<VmEvent>, to: Sender<Control>, gen: u64) -> Result<(), String> {
    std::thread::Builder::new()
        .name("vm-events".into())
        .spawn(move || {
            for ev in events {
                if to.send(Control::Vm(gen, ev)).is_err() {
                    break;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start thread: {e}"))
}

/// Removes the API socket file when the VMM ends.
struct SocketFile(Option<PathBuf>);
impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts `instance` (whose vCPU events arrive on `vm_events`) and serves it until
/// it ends. With `api_sock`, the control API listens there; with `vcpu_cpus`, the
/// vCPU threads are placed on those CPUs (see `Instance::place_vcpus`).
pub fn run(
    mut instance: Instance,
    vm_events: Receiver<VmEvent>,
    api_sock: Option<&Path>,
    vcpu_cpus: Option<&vmm::placement::CpuList>,
    mut periodic: Option<Periodic>,
) -> Result<Outcome, String> {
    let (tx, rx) = mpsc::channel::<Control>();
    forward_events(vm_events, tx.clone(), 0)?;
    let progress: SharedProgress = Arc::new(Mutex::new(migrate::Progress::default()));
    let _socket = SocketFile(api_sock.map(Path::to_path_buf));
    if let Some(path) = api_sock {
        let (req_tx, req_rx) = mpsc::channel::<(Request, Sender<Reply>)>();
        api::serve(path, req_tx, progress.clone()).map_err(|e| e.to_string())?;
        let api_tx = tx.clone();
        std::thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || {
                for (req, reply) in req_rx {
                    if api_tx.send(Control::Api(req, reply)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start thread: {e}"))?;
    }
    if instance.run_state() == RunState::Created {
        instance.start().map_err(|e| e.to_string())?;
    }
    if let Some(c) = vcpu_cpus {
        instance.place_vcpus(&c.0).map_err(|e| e.to_string())?;
    }
    let mut generation = 0u64;

    let mut checkpoints = 0u64;
    let status = |inst: &Instance, checkpoints: u64, state: &str| -> Reply {
        let s =
            Status { api_version: api::API_VERSION, state: state.into(), guest: inst.config().clone(), checkpoints };
        (200, serde_json::to_value(s).unwrap_or_default())
    };
    let state_name = |inst: &Instance| if inst.run_state() == RunState::Paused { "paused" } else { "running" };
    let mut writer = Writer::default();
    let mut due = periodic.as_ref().map(|p| std::time::Instant::now() + p.every);
    loop {
        let msg = match due {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(std::time::Instant::now())) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let p = periodic.as_mut().expect("due only with a policy");
                    // The next one a whole period on; after a late one (a slow
                    // checkpoint held this loop), a period from now, not at once.
                    let now = std::time::Instant::now();
                    due = Some(if at + p.every > now { at + p.every } else { now + p.every });
                    if let Some(why) = busy(&writer, &instance) {
                        eprintln!("cevm: periodic checkpoint skipped: {why}");
                    } else {
                        periodic_checkpoint(p, &tx)?;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("all event sources closed".into()),
            },
            None => rx.recv().map_err(|_| "all event sources closed".to_string())?,
        };
        match msg {
            Control::Vm(gen, _) if gen != generation => {}
            Control::Vm(_, VmEvent::GuestExit { status }) => {
                instance.shutdown();
                return Ok(Outcome::GuestExit(status));
            }
            Control::Vm(_, VmEvent::PowerOff) => {
                instance.shutdown();
                return Ok(Outcome::PowerOff);
            }
            Control::Vm(_, VmEvent::Reboot) => {
                instance.shutdown();
                return Ok(Outcome::Reboot);
            }
            Control::Vm(_, other) => {
                instance.shutdown();
                return Ok(Outcome::Failed(other.to_string()));
            }
            Control::Api(Request::Status, reply) => {
                let _ = reply.send(status(&instance, checkpoints, state_name(&instance)));
            }
            Control::Api(Request::Pause, reply) => {
                let r = match instance.pause() {
                    Ok(()) => status(&instance, checkpoints, "paused"),
                    Err(e) => api::error(500, e),
                };
                let _ = reply.send(r);
            }
            Control::Api(Request::Resume, reply) => {
                let r = match instance.resume() {
                    Ok(()) => status(&instance, checkpoints, "running"),
                    Err(e) => api::error(500, e),
                };
                let _ = reply.send(r);
            }
            Control::Api(Request::Quit, reply) => {
                let _ = reply.send(status(&instance, checkpoints, "stopping"));
                instance.shutdown();
                return Ok(Outcome::Quit);
            }
            Control::Api(Request::Migrate(req), reply) => {
                if let Some(why) = busy(&writer, &instance) {
                    let _ = reply.send(api::error(409, why));
                    continue;
                }
                *progress.lock().unwrap_or_else(|p| p.into_inner()) = migrate::Progress::default();
                match migrate_request(&mut instance, &req, &progress, &tx, generation + 1) {
                    Ok(Migrated { report, new: None, .. }) => {
                        eprintln!(
                            "cevm: guest migrated to {} (downtime {:.2} ms, {} rounds, {} MiB sent); this VMM ends",
                            report.to,
                            report.downtime_ms,
                            report.rounds,
                            report.bytes_sent >> 20
                        );
                        let _ = reply.send((200, serde_json::to_value(&report).unwrap_or_default()));
                        instance.shutdown();
                        return Ok(Outcome::MigratedAway(report));
                    }
                    Ok(Migrated { report, new: Some(new_instance), .. }) => {
                        eprintln!(
                            "cevm: guest migrated to a new instance in this process (downtime {:.2} ms, {} rounds, {} MiB copied)",
                            report.downtime_ms,
                            report.rounds,
                            report.bytes_sent >> 20
                        );
                        // The old instance stays frozen until here; without a use for it
                        // (the CEVM strategy writes its checkpoint from it) it goes
                        // (dropping it ends its vCPU threads).
                        drop(std::mem::replace(&mut instance, new_instance));
                        generation += 1;
                        let _ = reply.send((200, serde_json::to_value(&report).unwrap_or_default()));
                    }
                    Err(e) => {
                        eprintln!("cevm: migration to {} failed, the guest goes on here: {e}", req.to);
                        let _ = reply.send(api::error(500, format!("migration failed: {e}")));
                    }
                }
            }
            Control::PeriodicDone(dir, (code, _)) => {
                // A failed one was reported where it failed; the older ones stay.
                if let (200, Some(p)) = (code, periodic.as_ref()) {
                    match p.series.committed(&dir) {
                        Ok(removed) => {
                            for r in removed {
                                eprintln!("cevm: removed the older checkpoint {}", r.display());
                            }
                        }
                        Err(e) => eprintln!("cevm: periodic checkpoints: {e}"),
                    }
                }
            }
            Control::CheckpointWritten(result, reply) => {
                // Its last act was to send this: wait for it to end, so that the next
                // request does not find it still busy.
                writer = Writer::default();
                checkpoints += u64::from(result.is_ok());
                let _ = reply.send(cevm_written(&result, checkpoints));
            }
            Control::Api(Request::Checkpoint(req), reply) => {
                let strategy: Strategy = match req.strategy.parse() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(api::error(400, e));
                        continue;
                    }
                };
                let cevm_only = req.to.is_some()
                    || req.migration_cpus.is_some()
                    || req.dest_vcpu_cpus.is_some()
                    || req.writer_cpus.is_some();
                if strategy == Strategy::StopAndSave && cevm_only {
                    let e = "to, migration_cpus, dest_vcpu_cpus and writer_cpus are for the cevm strategy";
                    let _ = reply.send(api::error(400, e));
                    continue;
                }
                if let Some(why) = busy(&writer, &instance) {
                    let _ = reply.send(api::error(409, why));
                    continue;
                }
                let result = match strategy {
                    Strategy::StopAndSave => checkpoint::stop_and_save(&mut instance, &req.out, req.stop),
                    Strategy::Cevm => {
                        match cevm_checkpoint(&mut instance, &req, &progress, &tx, generation + 1, reply) {
                            Ok(CevmStarted::Writing(handle)) => {
                                generation += 1;
                                writer = Writer(Some(handle));
                            }
                            Ok(CevmStarted::Replaced) => generation += 1,
                            Ok(CevmStarted::WrittenAway(report)) => {
                                instance.shutdown();
                                return Ok(Outcome::MigratedAway(report));
                            }
                            Err((code, e, reply)) => {
                                eprintln!("cevm: checkpoint to {} failed, the guest goes on: {e}", req.out.display());
                                let _ = reply.send(api::error(code, e));
                            }
                        }
                        continue;
                    }
                };
                match result {
                    Ok(report) => {
                        checkpoints += 1;
                        eprintln!(
                            "cevm: checkpoint {} committed to {} (paused {:.1} ms, {} data pages)",
                            checkpoints,
                            report.dir.display(),
                            report.pause_ms,
                            report.memory.data_pages
                        );
                        let _ = reply.send((200, serde_json::to_value(&report).unwrap_or_default()));
                        if req.stop {
                            instance.shutdown();
                            return Ok(Outcome::StoppedAfterCheckpoint(req.out));
                        }
                    }
                    Err(e) => {
                        eprintln!("cevm: checkpoint to {} failed, the guest goes on: {e}", req.out.display());
                        let _ = reply.send(api::error(500, format!("checkpoint failed (the guest goes on): {e}")));
                    }
                }
            }
        }
    }
}

/// Asks this control loop for the next periodic checkpoint, as an API request
/// would; its answer comes back as `Control::PeriodicDone`.
fn periodic_checkpoint(p: &mut Periodic, control: &Sender<Control>) -> Result<(), String> {
    let out = p.series.next_path();
    let req = api::CheckpointRequest {
        out: out.clone(),
        strategy: p.strategy.name().into(),
        stop: false,
        to: None,
        migration_cpus: None,
        dest_vcpu_cpus: None,
        writer_cpus: None,
    };
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let back = control.clone();
    std::thread::Builder::new()
        .name("periodic-reply".into())
        .spawn(move || {
            if let Ok(r) = reply_rx.recv() {
                let _ = back.send(Control::PeriodicDone(out, r));
            }
        })
        .map_err(|e| format!("cannot start thread: {e}"))?;
    control.send(Control::Api(Request::Checkpoint(req), reply_tx)).map_err(|_| "the control loop is gone".to_string())
}

/// Why a CEVM checkpoint did not start: HTTP status, message, and the reply
/// channel handed back so the caller can answer.
type Refusal = (u16, String, Sender<Reply>);

/// Why the guest cannot be checkpointed or migrated right now, if it cannot.
fn busy(writer: &Writer, instance: &Instance) -> Option<&'static str> {
    if writer.busy() {
        return Some("a CEVM checkpoint is still being written; try again when it is");
    }
    if instance.disk().is_some_and(|d| d.integrating()) {
        return Some("the guest's disk is still being handed over from a CEVM checkpoint; try again when it is");
    }
    None
}

/// A CEVM checkpoint under way.
enum CevmStarted {
    /// Thread-based: the guest runs in the new instance here; this thread
    /// writes the checkpoint and answers the request.
    Writing(std::thread::JoinHandle<()>),
    /// The new instance runs the guest here, but there is no checkpoint (the
    /// request was answered).
    Replaced,
    /// Process-based: the guest runs in another VMM; the checkpoint was written
    /// from the frozen instance here (the request is answered) and this VMM ends.
    WrittenAway(migrate::Report),
}

/// The CEVM strategy: live-migrates `instance` to a new instance and writes the
/// checkpoint from the old one, frozen at the switch, while the guest runs on.
///
/// - Thread-based (`to` absent or `local`): the new instance is made in this
///   process (its events as generation `next_gen`) and replaces `instance`; a
///   thread writes the checkpoint and answers `reply` through `control`.
/// - Process-based (`to` an endpoint of a `cevm run --incoming`): the guest
///   goes there; the checkpoint is written here before this returns.
///
/// A guest's writable disk is handed over meanwhile (`checkpoint::write_frozen`).
/// Returns why nothing was started (the guest goes on as before), if so.
fn cevm_checkpoint(
    instance: &mut Instance,
    req: &api::CheckpointRequest,
    progress: &Mutex<migrate::Progress>,
    control: &Sender<Control>,
    next_gen: u64,
    reply: Sender<Reply>,
) -> Result<CevmStarted, Refusal> {
    let t0 = std::time::Instant::now();
    if req.stop {
        return Err((400, "--stop ends the VM: use the stop-and-save strategy for that".into(), reply));
    }
    if let Err(e) = checkpoint::cevm_supports(instance.config()) {
        return Err((400, e.to_string(), reply));
    }
    let to = req.to.clone().unwrap_or_else(|| "local".into());
    if let Err(e) = api::migration_target(&to) {
        return Err((400, format!("--to: {e}"), reply));
    }
    if req.dest_vcpu_cpus.is_some() && to != "local" {
        let msg = "dest_vcpu_cpus is for a new instance in this VMM; a process-based one places its own vCPUs (cevm run --incoming --vcpu-cpus)";
        return Err((400, msg.into(), reply));
    }
    let m = MigrateRequest {
        to,
        params: migrate::Params { cevm: true, ..Default::default() },
        migration_cpus: req.migration_cpus.clone(),
        dest_vcpu_cpus: req.dest_vcpu_cpus.clone(),
    };
    let writer_cpus = req.writer_cpus.clone().map(|c| c.0);
    // Pins the calling thread (the writer; the disk hand-over thread it starts
    // inherits this) to `writer_cpus`.
    let pin_writer = move || -> Result<(), String> {
        match &writer_cpus {
            Some(c) => {
                vmm::placement::set_affinity(vmm::placement::this_thread(), c).map_err(|e| format!("writer_cpus: {e}"))
            }
            None => Ok(()),
        }
    };
    let Migrated { report, new, link } = match migrate_request(instance, &m, progress, control, next_gen) {
        Ok(r) => r,
        Err(e) => return Err((500, format!("checkpoint failed (the guest goes on): live migration: {e}"), reply)),
    };
    // Without its link the hand-over cannot run: the new instance then completes
    // its disk from T by itself, and there is no checkpoint.
    let handover = match link.map(migrate::handover::old_side_link).transpose() {
        Ok(h) => h.map(|(inbound, outbox)| checkpoint::Handover { inbound, outbox }),
        Err(e) => {
            let e = format!("checkpoint failed (the guest goes on in the new instance): disk hand-over: {e}");
            let _ = reply.send(api::error(500, e));
            return Ok(match new {
                Some(new) => {
                    drop(std::mem::replace(instance, new));
                    CevmStarted::Replaced
                }
                None => CevmStarted::WrittenAway(report),
            });
        }
    };
    let Some(new) = new else {
        // Process-based: nothing runs here any more; write, answer, end.
        let r = match pin_writer() {
            Ok(()) => checkpoint::write_frozen(instance, &req.out, report.downtime_ms, t0, handover),
            Err(e) => Err(checkpoint::Error::Unsupported(e)),
        };
        let _ = reply.send(cevm_written(&r.map_err(|e| e.to_string()), 1));
        return Ok(CevmStarted::WrittenAway(report));
    };
    let mut old = std::mem::replace(instance, new);
    let (control, out, on_error) = (control.clone(), req.out.clone(), reply.clone());
    let writer = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
        let r = pin_writer().and_then(|()| {
            checkpoint::write_frozen(&mut old, &out, report.downtime_ms, t0, handover).map_err(|e| e.to_string())
        });
        // The old instance's work is done: its vCPU threads end here.
        drop(old);
        let _ = control.send(Control::CheckpointWritten(r, reply));
    });
    match writer {
        Ok(h) => Ok(CevmStarted::Writing(h)),
        Err(e) => {
            // The OS refused a thread: the hand-over went with the closure, so the
            // new instance completes its disk from T; the guest runs on there.
            let _ = on_error.send(api::error(500, format!("cannot start the checkpoint writer: {e}")));
            Ok(CevmStarted::Replaced)
        }
    }
}

/// Logs a CEVM checkpoint's outcome (the `n`th checkpoint of this VMM) and
/// makes the API's answer.
fn cevm_written(r: &Result<checkpoint::CheckpointReport, String>, n: u64) -> Reply {
    match r {
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
            (200, serde_json::to_value(report).unwrap_or_default())
        }
        Err(e) => {
            eprintln!("cevm: checkpoint failed, the guest goes on: {e}");
            api::error(500, format!("checkpoint failed (the guest goes on): {e}"))
        }
    }
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

/// Runs one migration of `instance`, the engine publishing its progress in
/// `progress`. Thread-based (`local`): returns the new instance, running in this
/// process, whose events go to `control` as generation `next_gen`. Process-based:
/// returns no instance; the guest runs elsewhere.
fn migrate_request(
    instance: &mut Instance,
    req: &MigrateRequest,
    progress: &Mutex<migrate::Progress>,
    control: &Sender<Control>,
    next_gen: u64,
) -> Result<Migrated, String> {
    let target = api::migration_target(&req.to)?;
    let me = vmm::placement::this_thread();
    let before = vmm::placement::affinity(me);
    if let Some(c) = &req.migration_cpus {
        vmm::placement::set_affinity(me, &c.0).map_err(|e| e.to_string())?;
    }
    // Whatever happens, the control thread goes back to its CPUs afterwards.
    let r = (|| match target {
        None => {
            let (ev_tx, ev_rx) = mpsc::channel();
            let dest_cpus = req.dest_vcpu_cpus.clone().unwrap_or_default().0;
            let console = Box::new(std::io::stdout());
            let done = migrate::migrate_local(instance, &req.params, progress, console, ev_tx, &dest_cpus)
                .map_err(|e| e.to_string())?;
            forward_events(ev_rx, control.clone(), next_gen)?;
            Ok(Migrated { report: done.report, new: Some(done.instance), link: done.handover })
        }
        Some(endpoint) => {
            let mut t = endpoint.connect().map_err(|e| e.to_string())?;
            let report =
                migrate::migrate_out(instance, t.as_mut(), &req.params, progress).map_err(|e| e.to_string())?;
            // A CEVM checkpoint's disk hand-over goes on over the same connection.
            let link = (req.params.cevm && migrate::handover::hands_over_disk(instance.config())).then_some(t);
            Ok(Migrated { report, new: None, link })
        }
    })();
    let _ = vmm::placement::set_affinity(me, &before);
    r
}
