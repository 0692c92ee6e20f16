//! The VMM's control loop for `cevm run` and `cevm restore`: runs an instance,
//! serves the control API, and ends when the guest does.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};

use checkpoint::Strategy;
use vmm::instance::RunState;
use vmm::{Instance, VmEvent};

use crate::api::{self, Reply, Request, Status};

/// How a VMM run ended.
#[derive(Debug, PartialEq, Eq)]
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
    /// The guest crashed or a vCPU failed.
    Failed(String),
}

enum Control {
    Vm(VmEvent),
    Api(Request, Sender<Reply>),
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
/// it ends. With `api_sock`, the control API listens there.
pub fn run(mut instance: Instance, vm_events: Receiver<VmEvent>, api_sock: Option<&Path>) -> Result<Outcome, String> {
    let (tx, rx) = mpsc::channel::<Control>();
    let vm_tx = tx.clone();
    std::thread::Builder::new()
        .name("vm-events".into())
        .spawn(move || {
            for ev in vm_events {
                if vm_tx.send(Control::Vm(ev)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start thread: {e}"))?;
    let _socket = SocketFile(api_sock.map(Path::to_path_buf));
    if let Some(path) = api_sock {
        let (req_tx, req_rx) = mpsc::channel::<(Request, Sender<Reply>)>();
        api::serve(path, req_tx).map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || {
                for (req, reply) in req_rx {
                    if tx.send(Control::Api(req, reply)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start thread: {e}"))?;
    } else {
        drop(tx);
    }
    instance.start().map_err(|e| e.to_string())?;

    let mut checkpoints = 0u64;
    let status = |inst: &Instance, checkpoints: u64, state: &str| -> Reply {
        let s =
            Status { api_version: api::API_VERSION, state: state.into(), guest: inst.config().clone(), checkpoints };
        (200, serde_json::to_value(s).unwrap_or_default())
    };
    let state_name = |inst: &Instance| if inst.run_state() == RunState::Paused { "paused" } else { "running" };
    loop {
        let Ok(msg) = rx.recv() else {
            return Err("all event sources closed".into());
        };
        match msg {
            Control::Vm(VmEvent::GuestExit { status }) => {
                instance.shutdown();
                return Ok(Outcome::GuestExit(status));
            }
            Control::Vm(VmEvent::PowerOff) => {
                instance.shutdown();
                return Ok(Outcome::PowerOff);
            }
            Control::Vm(VmEvent::Reboot) => {
                instance.shutdown();
                return Ok(Outcome::Reboot);
            }
            Control::Vm(other) => {
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
            Control::Api(Request::Checkpoint(req), reply) => {
                let strategy: Strategy = match req.strategy.parse() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(api::error(400, e));
                        continue;
                    }
                };
                let result = match strategy {
                    Strategy::StopAndSave => checkpoint::stop_and_save(&mut instance, &req.out, req.stop),
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
