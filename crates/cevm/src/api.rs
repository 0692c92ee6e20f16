//! The control API: HTTP/1.1 with JSON bodies on a unix socket (mode 0600), like
//! Firecracker's, so `curl --unix-socket PATH http://localhost/v1/status` works.
//!
//! | method | path            | body                                        | answer                      |
//! |--------|-----------------|---------------------------------------------|-----------------------------|
//! | GET    | /v1/status      |                                             | [`Status`]                  |
//! | PUT    | /v1/pause       |                                             | [`Status`]                  |
//! | PUT    | /v1/resume      |                                             | [`Status`]                  |
//! | PUT    | /v1/checkpoint  | [`CheckpointRequest`]                       | `checkpoint::CheckpointReport` |
//! | PUT    | /v1/migrate     | [`MigrateRequest`]                          | `migrate::Report`           |
//! | GET    | /v1/migration   |                                             | `migrate::Progress` of the running (or last) migration |
//! | PUT    | /v1/quit        |                                             | [`Status`], then the VMM exits |
//!
//! Errors answer 4xx/5xx with `{"error": "..."}`. The version is in the path; a
//! request for another version gets 404 naming the supported one.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the API, the `v1` of every path.
pub const API_VERSION: u32 = 1;

/// Body of `PUT /v1/checkpoint`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Directory the checkpoint is committed to (absolute; replaced atomically if it exists).
    pub out: PathBuf,
    /// Strategy name (default `stop-and-save`).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Leave the VM stopped after the checkpoint (the VMM then exits).
    #[serde(default)]
    pub stop: bool,
    /// The cevm strategy's new instance: `local` (default; thread-based, in this
    /// VMM) or `unix:PATH` / `tcp:HOST:PORT`, a `cevm run --incoming` there
    /// (process-based: the guest goes on there, this VMM writes the checkpoint
    /// and ends).
    #[serde(default)]
    pub to: Option<String>,
    /// cevm strategy, placement (seed: "scheduling possibilities"): CPUs for the
    /// thread that runs the live migration.
    #[serde(default)]
    pub migration_cpus: Option<vmm::placement::CpuList>,
    /// cevm strategy, thread-based: CPUs for the new instance's vCPU threads.
    #[serde(default)]
    pub dest_vcpu_cpus: Option<vmm::placement::CpuList>,
    /// cevm strategy: CPUs for the thread that writes the checkpoint from the
    /// old instance (and the disk hand-over it starts).
    #[serde(default)]
    pub writer_cpus: Option<vmm::placement::CpuList>,
}

/// Body of `PUT /v1/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `local` (thread-based: a new instance in this process), `unix:PATH` or
    /// `tcp:HOST:PORT` (process-based: a `cevm run --incoming` there).
    pub to: String,
    /// Convergence policy; defaults as `migrate::Params::default()`.
    #[serde(default)]
    pub params: migrate::Params,
    /// CPUs for the thread that runs the migration (e.g. `1`; default: anywhere).
    #[serde(default)]
    pub migration_cpus: Option<vmm::placement::CpuList>,
    /// CPUs for the new instance's vCPU threads, thread-based only (a process-based
    /// destination places its own with `cevm run --incoming --vcpu-cpus`).
    #[serde(default)]
    pub dest_vcpu_cpus: Option<vmm::placement::CpuList>,
}

/// The progress of the running (or last) migration, which the engine updates and
/// the API thread reads itself (the control loop is busy migrating while asked).
/// An empty `phase`: no migration has run.
pub type SharedProgress = std::sync::Arc<std::sync::Mutex<migrate::Progress>>;

/// Where a migration goes: `None` for `local` (thread-based), else the endpoint.
pub fn migration_target(to: &str) -> Result<Option<migrate::Endpoint>, String> {
    if to == "local" {
        return Ok(None);
    }
    to.parse().map(Some).map_err(|e| format!("{e} (or `local`)"))
}

fn default_strategy() -> String {
    "stop-and-save".into()
}

/// Answer of status, pause, resume and quit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub api_version: u32,
    /// `running`, `paused` or `stopping`.
    pub state: String,
    pub guest: vmm::InstanceConfig,
    /// Checkpoints committed by this VMM process.
    pub checkpoints: u64,
}

/// A request the API thread hands to the VMM's control loop.
#[derive(Debug)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Checkpoint(CheckpointRequest),
    Migrate(MigrateRequest),
    Quit,
}

/// The control loop's answer: an HTTP status and a JSON body.
pub type Reply = (u16, Value);

/// Builds an error answer.
pub fn error(code: u16, msg: impl std::fmt::Display) -> Reply {
    (code, serde_json::json!({ "error": msg.to_string() }))
}

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("API socket {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("API socket {path}: {msg}")]
    Bind { path: PathBuf, msg: String },
}

/// Listens on `path` and hands each request to `deliver` with a channel for its
/// reply. Returns once listening; requests are served on a thread of their own.
pub fn serve(
    path: &Path,
    deliver: Sender<(Request, Sender<Reply>)>,
    progress: SharedProgress,
) -> Result<(), ServeError> {
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
                let reply = route(&mut req, &deliver, &progress);
                let body = serde_json::to_vec(&reply.1).unwrap_or_default();
                let resp = tiny_http::Response::from_data(body).with_status_code(reply.0).with_header(
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .expect("static header is valid"),
                );
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| ServeError::Bind { path: path.into(), msg: format!("API thread: {e}") })?;
    Ok(())
}

fn route(req: &mut tiny_http::Request, deliver: &Sender<(Request, Sender<Reply>)>, progress: &SharedProgress) -> Reply {
    use tiny_http::Method::{Get, Put};
    let mut body = String::new();
    if req.as_reader().take(1 << 20).read_to_string(&mut body).is_err() {
        return error(400, "request body is not UTF-8");
    }
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let request = match (req.method(), path.as_str()) {
        (Get, "/v1/status") => Request::Status,
        (Put, "/v1/pause") => Request::Pause,
        (Put, "/v1/resume") => Request::Resume,
        (Put, "/v1/quit") => Request::Quit,
        (Put, "/v1/checkpoint") => match serde_json::from_str::<CheckpointRequest>(&body) {
            Ok(c) if c.out.is_absolute() => Request::Checkpoint(c),
            Ok(c) => return error(400, format!("`out` must be an absolute path, not {}", c.out.display())),
            Err(e) => return error(400, format!("bad checkpoint request: {e}")),
        },
        (Put, "/v1/migrate") => match serde_json::from_str::<MigrateRequest>(&body) {
            Ok(m) => match migration_target(&m.to) {
                Ok(_) => Request::Migrate(m),
                Err(why) => return error(400, format!("bad migration target: {why}")),
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
    if deliver.send((request, tx)).is_err() {
        return error(503, "the VMM is shutting down");
    }
    rx.recv().unwrap_or_else(|_| error(503, "the VMM is shutting down"))
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No VMM listens at the socket.
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    /// The connection broke or the answer is not HTTP+JSON.
    #[error("API socket {path}: {msg}")]
    Protocol { path: PathBuf, msg: String },
    /// The VMM answered with an error.
    #[error("{msg} (HTTP {code})")]
    Api { code: u16, msg: String },
}

/// Sends one request and returns the JSON answer of a 2xx reply.
///
/// Written by hand (about 30 lines) rather than with an HTTP client crate: the
/// blocking clients on crates.io do not speak over unix sockets, and the async
/// ones would bring a whole runtime into the VMM for one request.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let proto = |msg: String| ClientError::Protocol { path: sock.to_path_buf(), msg };
    let mut s =
        UnixStream::connect(sock).map_err(|source| ClientError::Connect { path: sock.to_path_buf(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(|e| proto(e.to_string()))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).map_err(|e| proto(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| proto(format!("reading the answer: {e}")))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| proto("truncated HTTP answer".into()))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| proto(format!("bad status line `{}`", head.lines().next().unwrap_or(""))))?;
    let value: Value = serde_json::from_str(body).map_err(|e| proto(format!("answer is not JSON: {e}")))?;
    if (200..300).contains(&code) {
        Ok(value)
    } else {
        let msg = value.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_string();
        Err(ClientError::Api { code, msg })
    }
}
