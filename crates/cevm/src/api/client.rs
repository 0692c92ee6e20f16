//! The typed API client: one method per endpoint, the answers as their types.
//! Used by the CLI, the benchmarks and the tests; [`call`] is the raw request
//! underneath, for tests of the HTTP edge itself. A VMM is reached at its unix
//! socket, or on another host at its `--control` endpoint with the job's
//! secret ([`super::remote`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::remote::{self, RemoteError, Secret};
use super::{BarrierView, CheckpointRequest, MigrateRequest, Status};

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No VMM listens there.
    #[error("cannot connect to the API {at}: {source}")]
    Connect { at: String, source: std::io::Error },
    /// The connection broke or the answer is not HTTP+JSON.
    #[error("API {at}: {msg}")]
    Protocol { at: String, msg: String },
    /// The remote control endpoint and this side do not share the secret.
    #[error("API {at}: {msg}")]
    Auth { at: String, msg: String },
    /// The VMM answered with an error.
    #[error("{msg} (HTTP {code})")]
    Api { code: u16, msg: String },
}

/// Where a VMM's API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// Its unix socket (`--api-sock`), on this host.
    Unix(PathBuf),
    /// Its remote control endpoint (`--control tcp:HOST:PORT`), HOST:PORT.
    Tcp(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "socket {}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Addr {
    type Err = String;

    /// `tcp:HOST:PORT`, or a unix socket's path.
    fn from_str(s: &str) -> Result<Addr, String> {
        match s.strip_prefix("tcp:") {
            Some(a) => check_host_port(a).map(|()| Addr::Tcp(a.to_string())),
            None if s.is_empty() => Err("give a unix socket's path or tcp:HOST:PORT".into()),
            None => Ok(Addr::Unix(PathBuf::from(s))),
        }
    }
}

/// Checks `HOST:PORT` (a name or an address; IPv6 in brackets).
pub fn check_host_port(a: &str) -> Result<(), String> {
    let bad = || format!("tcp:{a}: give tcp:HOST:PORT (e.g. tcp:node2:7000)");
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// A VMM's API.
#[derive(Clone, Debug)]
pub struct Client {
    addr: Addr,
    /// The job's secret, for an [`Addr::Tcp`].
    secret: Option<Secret>,
    timeout: Duration,
}

impl Client {
    /// The API at the unix socket `sock`; each call waits up to `timeout`
    /// for its answer.
    pub fn new(sock: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client { addr: Addr::Unix(sock.into()), secret: None, timeout }
    }

    /// The API at `addr`, with the job's `secret` if it is remote.
    pub fn at(addr: Addr, secret: Option<Secret>, timeout: Duration) -> Self {
        Client { addr, secret, timeout }
    }

    /// Where it is.
    pub fn addr(&self) -> &Addr {
        &self.addr
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
        let proto = |msg: String| ClientError::Protocol { at: self.addr.to_string(), msg };
        let body = body.map(serde_json::to_value).transpose().map_err(|e| proto(format!("request: {e}")))?;
        let request = request(method, path, body.as_ref());
        let raw = match &self.addr {
            Addr::Unix(sock) => exchange(sock, &request, self.timeout)?,
            Addr::Tcp(a) => {
                let at = self.addr.to_string();
                let Some(secret) = &self.secret else {
                    return Err(ClientError::Auth { at, msg: "no secret given for a remote VMM".into() });
                };
                remote::exchange(a, secret, &request, self.timeout).map_err(|e| match e {
                    RemoteError::Connect(source) => ClientError::Connect { at, source },
                    e @ (RemoteError::Refused | RemoteError::Impostor) => ClientError::Auth { at, msg: e.to_string() },
                    RemoteError::Broken(msg) => ClientError::Protocol { at, msg },
                })?
            }
        };
        let v = answer(&raw, &self.addr.to_string())?;
        serde_json::from_value(v).map_err(|e| proto(format!("answer of {method} {path}: {e}")))
    }
}

/// The bytes of one request.
fn request(method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Sends `request` on the unix socket `sock` and reads the whole answer.
fn exchange(sock: &Path, request: &[u8], timeout: Duration) -> Result<Vec<u8>, ClientError> {
    let at = || format!("socket {}", sock.display());
    let proto = |msg: String| ClientError::Protocol { at: at(), msg };
    let mut s = UnixStream::connect(sock).map_err(|source| ClientError::Connect { at: at(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(|e| proto(e.to_string()))?;
    s.write_all(request).map_err(|e| proto(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| proto(format!("reading the answer: {e}")))?;
    Ok(raw)
}

/// The JSON of a 2xx answer, or the error it says.
fn answer(raw: &[u8], at: &str) -> Result<Value, ClientError> {
    let proto = |msg: String| ClientError::Protocol { at: at.to_string(), msg };
    let text = String::from_utf8_lossy(raw);
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

/// Sends one request to the unix socket `sock` and returns the JSON answer
/// of a 2xx reply.
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
    let raw = exchange(sock, &request(method, path, body), timeout)?;
    answer(&raw, &format!("socket {}", sock.display()))
}
