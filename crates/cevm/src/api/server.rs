//! The HTTP edge of the control API: parses requests into actions (plans
//! validated once, here), hands them to the control loop, and turns typed
//! answers and errors into status codes and JSON. The only place that knows
//! HTTP status codes.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use serde_json::{json, Value};

use super::{CheckpointRequest, MigrateRequest, API_VERSION};
use crate::controller::{Action, ActionError, Control, Reply, SharedProgress};
use crate::plan::{CheckpointPlan, MigrationPlan, PlanError};

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("API socket {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("API socket {path}: {msg}")]
    Bind { path: PathBuf, msg: String },
}

/// An answer: an HTTP status and a JSON body.
type Http = (u16, Value);

/// The HTTP status of a failed action.
fn status_of(e: &ActionError) -> u16 {
    match e {
        ActionError::Unsupported(_) => 400,
        ActionError::Busy(_) => 409,
        ActionError::ShuttingDown => 503,
        ActionError::Vmm(_) | ActionError::Migration(_) | ActionError::Checkpoint { .. } => 500,
    }
}

fn error(code: u16, msg: impl std::fmt::Display) -> Http {
    (code, json!({ "error": msg.to_string() }))
}

fn plan_error(e: PlanError) -> Http {
    error(400, e)
}

/// An action's outcome as HTTP.
fn http(reply: Reply) -> Http {
    match reply {
        Ok(answer) => (200, serde_json::to_value(answer).unwrap_or_default()),
        Err(e) => {
            let mut body = json!({ "error": e.to_string() });
            if let Some(g) = e.guest() {
                body["guest"] = json!(g);
            }
            (status_of(&e), body)
        }
    }
}

/// Listens on `path` and hands each request to the control loop through
/// `control`. Returns once listening; requests are served on a thread of their own.
pub fn serve(path: &Path, control: Sender<Control>, progress: SharedProgress) -> Result<(), ServeError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        // A socket file left by a VMM that died: nobody listens, it can go.
        std::fs::remove_file(path).map_err(|e| ServeError::Bind { path: path.into(), msg: e.to_string() })?;
    }
    // The socket is created with the umask applied; tighten the umask around the bind
    // so that the socket is never reachable by others, even for an instant.
    // SAFETY: umask only changes this process's file mode creation mask.
    let old = unsafe { libc::umask(0o177) };
    let server = tiny_http::Server::http_unix(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let server = server.map_err(|e| ServeError::Bind { path: path.into(), msg: e.to_string() })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServeError::Bind { path: path.into(), msg: e.to_string() })?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut req in server.incoming_requests() {
                let (code, body) = route(&mut req, &control, &progress);
                let body = serde_json::to_vec(&body).unwrap_or_default();
                let resp = tiny_http::Response::from_data(body).with_status_code(code).with_header(
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .expect("static header is valid"),
                );
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| ServeError::Bind { path: path.into(), msg: format!("API thread: {e}") })?;
    Ok(())
}

fn route(req: &mut tiny_http::Request, control: &Sender<Control>, progress: &SharedProgress) -> Http {
    use tiny_http::Method::{Get, Put};
    let mut body = String::new();
    if req.as_reader().take(1 << 20).read_to_string(&mut body).is_err() {
        return error(400, "request body is not UTF-8");
    }
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let action = match (req.method(), path.as_str()) {
        (Get, "/v1/status") => Action::Status,
        (Put, "/v1/pause") => Action::Pause,
        (Put, "/v1/resume") => Action::Resume,
        (Put, "/v1/quit") => Action::Quit,
        (Put, "/v1/checkpoint") => match serde_json::from_str::<CheckpointRequest>(&body) {
            Ok(c) => match CheckpointPlan::try_from(c) {
                Ok(plan) => Action::Checkpoint(plan),
                Err(e) => return plan_error(e),
            },
            Err(e) => return error(400, format!("bad checkpoint request: {e}")),
        },
        (Put, "/v1/migrate") => match serde_json::from_str::<MigrateRequest>(&body) {
            Ok(m) => match MigrationPlan::try_from(m) {
                Ok(plan) => Action::Migrate(plan),
                Err(e) => return error(400, format!("bad migration target: {e}")),
            },
            Err(e) => return error(400, format!("bad migration request: {e}")),
        },
        (Get, "/v1/migration") => {
            let p = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return if p.phase.is_empty() {
                error(404, "no migration has run in this VMM")
            } else {
                (200, serde_json::to_value(p).unwrap_or_default())
            };
        }
        (
            _,
            "/v1/status" | "/v1/pause" | "/v1/resume" | "/v1/quit" | "/v1/checkpoint" | "/v1/migrate" | "/v1/migration",
        ) => return error(405, format!("{} is not allowed on {path}", req.method())),
        _ => {
            return error(404, format!("no such endpoint {path} (this cevm speaks API version {API_VERSION}: /v1/...)"))
        }
    };
    let (tx, rx) = mpsc::channel();
    let respond = Box::new(move |r: Reply| {
        let _ = tx.send(r);
    });
    if control.send(Control::Act(action, respond)).is_err() {
        return http(Err(ActionError::ShuttingDown));
    }
    http(rx.recv().unwrap_or(Err(ActionError::ShuttingDown)))
}
