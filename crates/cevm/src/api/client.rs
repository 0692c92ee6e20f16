//! The typed API client: one method per endpoint, the answers as their types.
//! Used by the CLI, the benchmarks and the tests; [`call`] is the raw request
//! underneath, for tests of the HTTP edge itself.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{BarrierView, CheckpointRequest, MigrateRequest, Status};

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

/// A VMM's API at a unix socket.
#[derive(Clone, Debug)]
pub struct Client {
    sock: PathBuf,
    timeout: Duration,
}

impl Client {
    /// The API at `sock`; each call waits up to `timeout` for its answer.
    pub fn new(sock: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client { sock: sock.into(), timeout }
    }

    /// The socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.typed("GET", "/v1/status", None::<&()>)
    }

    /// `PUT /v1/pause`.
    pub fn pause(&self) -> Result<Status, ClientError> {
        self.typed("PUT", "/v1/pause", None::<&()>)
    }

    /// `PUT /v1/resume`.
    pub fn resume(&self) -> Result<Status, ClientError> {
        self.typed("PUT", "/v1/resume", None::<&()>)
    }

    /// `PUT /v1/quit`: the VMM answers, then ends.
    pub fn quit(&self) -> Result<Status, ClientError> {
        self.typed("PUT", "/v1/quit", None::<&()>)
    }

    /// `PUT /v1/checkpoint`.
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<checkpoint::CheckpointReport, ClientError> {
        self.typed("PUT", "/v1/checkpoint", Some(req))
    }

    /// `PUT /v1/migrate`.
    pub fn migrate(&self, req: &MigrateRequest) -> Result<migrate::Report, ClientError> {
        self.typed("PUT", "/v1/migrate", Some(req))
    }

    /// `GET /v1/migration`: the running (or last) migration's progress.
    pub fn migration(&self) -> Result<migrate::Progress, ClientError> {
        self.typed("GET", "/v1/migration", None::<&()>)
    }

    /// `GET /v1/checkpoint`: the running (or last) checkpoint's progress.
    pub fn checkpoint_progress(&self) -> Result<checkpoint::ProgressView, ClientError> {
        self.typed("GET", "/v1/checkpoint", None::<&()>)
    }

    /// `GET /v1/checkpoint/barrier`: where a group-cut checkpoint is.
    pub fn barrier(&self) -> Result<BarrierView, ClientError> {
        self.typed("GET", "/v1/checkpoint/barrier", None::<&()>)
    }

    /// `PUT /v1/checkpoint/cut`, `/go` or `/abort` (`command`).
    pub fn barrier_command(&self, command: &str) -> Result<BarrierView, ClientError> {
        self.typed("PUT", &format!("/v1/checkpoint/{command}"), None::<&()>)
    }

    fn typed<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let proto = |msg: String| ClientError::Protocol { path: self.sock.clone(), msg };
        let body = body.map(serde_json::to_value).transpose().map_err(|e| proto(format!("request: {e}")))?;
        let v = call(&self.sock, method, path, body.as_ref(), self.timeout)?;
        serde_json::from_value(v).map_err(|e| proto(format!("answer of {method} {path}: {e}")))
    }
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
