//! The HTTP edge of the control API: reads requests, answers what the
//! controller publishes (status, progress) itself, turns the rest into actions
//! (plans validated once, here) for the control loop, and turns typed answers
//! and errors into status codes and JSON. The only place that knows HTTP
//! status codes.
//!
//! One thread serves every connection (`poll(2)` over non-blocking sockets):
//! requests are read with the size limits of [`http`] and a deadline, so a
//! slow or idle client holds only its own connection, and the thread count
//! does not grow with connections. Actions wait for the control loop without
//! holding this thread: the loop's answer comes back over a channel.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{self, Parsed};
use super::socket::{self, ApiSocket, SocketError};
use super::{BarrierView, CheckpointRequest, MigrateRequest, API_VERSION};
use crate::controller::{Action, ActionError, Control, Published, Reply, Respond};
use crate::plan::{CheckpointPlan, MigrationPlan, PlanError};

/// Most connections open at once. A connection beyond it takes the place of
/// the one that has waited longest without sending a complete request (that
/// one is answered 503 and closed); if every open connection has a request
/// being served, the new one is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 128;
/// A request must arrive whole within this time of connecting (else 408).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer must be taken by the client within this time (else the
/// connection is closed).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

impl ServeError {
    /// Whether the command line is at fault (the socket path cannot be used).
    pub fn is_usage(&self) -> bool {
        matches!(self, ServeError::Socket(e) if e.is_usage())
    }
}

/// What an endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Status,
    Pause,
    Resume,
    Quit,
    Checkpoint,
    CheckpointProgress,
    Migrate,
    MigrationProgress,
    /// A group cut's state, and the coordinator's three commands.
    Barrier,
    Cut,
    Go,
    Abort,
}

/// A route: a method on a path.
#[derive(Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    endpoint: Endpoint,
}

const fn route(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route { method, path, endpoint }
}

/// Every route the API serves, and the only table requests are routed by: the
/// OpenAPI description (docs/api/openapi.json) lists exactly these (a test
/// compares them).
pub const ROUTES: [Route; 12] = [
    route("GET", "/v1/status", Endpoint::Status),
    route("PUT", "/v1/pause", Endpoint::Pause),
    route("PUT", "/v1/resume", Endpoint::Resume),
    route("PUT", "/v1/checkpoint", Endpoint::Checkpoint),
    route("GET", "/v1/checkpoint", Endpoint::CheckpointProgress),
    route("GET", "/v1/checkpoint/barrier", Endpoint::Barrier),
    route("PUT", "/v1/checkpoint/cut", Endpoint::Cut),
    route("PUT", "/v1/checkpoint/go", Endpoint::Go),
    route("PUT", "/v1/checkpoint/abort", Endpoint::Abort),
    route("PUT", "/v1/migrate", Endpoint::Migrate),
    route("GET", "/v1/migration", Endpoint::MigrationProgress),
    route("PUT", "/v1/quit", Endpoint::Quit),
];

/// An answer: an HTTP status and a JSON body.
type Http = (u16, Value);

/// The HTTP status of a failed action.
fn status_of(e: &ActionError) -> u16 {
    match e {
        ActionError::Unsupported(_) | ActionError::Out(_) => 400,
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

/// What the server serves from: the control loop, once one is attached, and
/// what the controller publishes.
struct Hub {
    control: Mutex<Option<Sender<Control>>>,
    published: Arc<Published>,
}

const NO_GUEST: &str =
    "no guest is under this VMM's control (it is still starting, waits for an incoming migration, or is ending)";

/// The API server: listening from [`Server::start`] on, serving actions once
/// a control loop is [attached](Server::attach). Dropped, it stops (answers
/// already given are still written, for up to a second) and removes its
/// socket file if that is still its own.
pub struct Server {
    hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    waker: Arc<UnixStream>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The remote control endpoint, if served (`--control`).
    relay: Option<super::remote::Relay>,
    _socket: ApiSocket,
}

impl Server {
    /// Claims `path` (see [`socket`]: nothing on disk changes if it is
    /// refused) and serves the API there on a thread of its own.
    pub fn start(path: &Path) -> Result<Server, ServeError> {
        let mut sock = socket::bind(path)?;
        let listener = sock.take_listener().expect("a new socket has its listener");
        let thread_err = |e: std::io::Error| ServeError::Thread(e);
        listener.set_nonblocking(true).map_err(thread_err)?;
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(thread_err)?;
        wake_tx.set_nonblocking(true).map_err(thread_err)?;
        wake_rx.set_nonblocking(true).map_err(thread_err)?;
        let hub = Arc::new(Hub { control: Mutex::new(None), published: Arc::new(Published::default()) });
        let stop = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(wake_tx);
        let (answers_tx, answers) = mpsc::channel();
        let reactor = Reactor {
            listener,
            wake_rx,
            ctx: Ctx { hub: hub.clone(), answers_tx, waker: waker.clone() },
            answers,
            conns: Vec::new(),
            next_id: 0,
            stop: stop.clone(),
            accept_paused_until: None,
        };
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Clients drive this thread: it keeps only its connections'
                // calls (crate sandbox), before it reads a byte of theirs.
                match sandbox::confine(sandbox::Kind::Api) {
                    Ok(()) => reactor.run(),
                    Err(e) => tracing::error!("the API does not serve: {e}"),
                }
            })
            .map_err(thread_err)?;
        Ok(Server { hub, stop, waker, thread: Some(thread), relay: None, _socket: sock })
    }

    /// What the API answers without the control loop: the controller
    /// publishes into it.
    pub fn published(&self) -> Arc<Published> {
        self.hub.published.clone()
    }

    /// Serves this API to other hosts too, at `listen` (HOST:PORT), to peers
    /// that hold `secret` ([`super::remote`]); returns where it listens.
    pub fn serve_remote(
        &mut self,
        listen: &str,
        secret: super::remote::Secret,
    ) -> std::io::Result<std::net::SocketAddr> {
        let relay = super::remote::Relay::start(listen, secret, self._socket.path().to_path_buf())?;
        let addr = relay.addr();
        self.relay = Some(relay);
        Ok(addr)
    }

    /// From now on actions go to `control`.
    pub fn attach(&self, control: Sender<Control>) {
        *self.hub.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(control);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.relay = None;
        *self.hub.control.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&*self.waker).write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a connection is doing.
enum Stage {
    /// Reading its request; `continued`: a `100 Continue` was sent.
    Reading { continued: bool },
    /// Its action is with the control loop.
    Waiting,
    /// Writing its answer, `at` bytes of `out` written.
    Writing { out: Vec<u8>, at: usize },
    /// Done: to be closed.
    Closed,
}

struct Conn {
    id: u64,
    stream: UnixStream,
    buf: Vec<u8>,
    stage: Stage,
    /// When reading or writing must be done by.
    deadline: Instant,
}

impl Conn {
    /// Answers and closes once written.
    fn answer(&mut self, (code, body): Http) {
        let out = http::response(code, &serde_json::to_vec(&body).unwrap_or_default());
        self.stage = Stage::Writing { out, at: 0 };
        self.deadline = Instant::now() + WRITE_TIMEOUT;
        self.write();
    }

    /// Writes what the socket takes of the answer.
    fn write(&mut self) {
        let Stage::Writing { out, at } = &mut self.stage else { return };
        while *at < out.len() {
            match self.stream.write(&out[*at..]) {
                Ok(0) => break,
                Ok(n) => *at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        self.stage = Stage::Closed;
    }

    /// Reads what the client has sent; serves the request once it is whole.
    fn read(&mut self, ctx: &Ctx) {
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        // Never more than a request can be: parse() refuses past its limits.
        while self.buf.len() <= http::MAX_HEAD + http::MAX_BODY {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stage = Stage::Closed;
                    return;
                }
            }
        }
        match http::parse(&self.buf) {
            Ok(Parsed::Complete(req)) => match route_request(&req, &ctx.hub) {
                Routed::Now(answer) => self.answer(answer),
                Routed::Act(action) => self.dispatch(action, ctx),
                Routed::Later(work) => self.later(work, ctx),
            },
            Err(e) => self.answer(error(e.status(), e)),
            // The client went away before its request was whole.
            Ok(_) if eof => self.stage = Stage::Closed,
            Ok(Parsed::NeedBody { expects_continue: true }) => {
                if let Stage::Reading { continued: continued @ false } = &mut self.stage {
                    *continued = true;
                    // A few bytes into an empty send buffer; a client that takes
                    // none of them sends its body anyway after its own wait.
                    let _ = self.stream.write(http::CONTINUE);
                }
            }
            Ok(_) => {}
        }
    }

    /// Runs `work` on a thread of its own; its answer comes back to the
    /// reactor (a request that waits for something other than the control loop).
    fn later(&mut self, work: Box<dyn FnOnce() -> Http + Send>, ctx: &Ctx) {
        self.stage = Stage::Waiting;
        let answerer = Answerer { id: self.id, tx: ctx.answers_tx.clone(), waker: ctx.waker.clone(), sent: false };
        let spawned = std::thread::Builder::new().name("api-wait".into()).spawn(move || answerer.send(work()));
        if let Err(e) = spawned {
            self.answer(error(503, format!("cannot start a thread to wait: {e}")));
        }
    }

    /// Hands `action` to the control loop; its answer comes back to the reactor.
    fn dispatch(&mut self, action: Action, ctx: &Ctx) {
        let control = ctx.hub.control.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(control) = control else { return self.answer(error(503, NO_GUEST)) };
        self.stage = Stage::Waiting;
        let answerer = Answerer { id: self.id, tx: ctx.answers_tx.clone(), waker: ctx.waker.clone(), sent: false };
        let respond: Respond = Box::new(move |r| answerer.send(http(r)));
        // A loop that is gone drops the answerer, which answers 503.
        let _ = control.send(Control::Act(action, respond));
    }
}

/// Brings an action's answer back to its connection; dropped unused (the
/// control loop ended first), it answers 503.
struct Answerer {
    id: u64,
    tx: Sender<(u64, Http)>,
    waker: Arc<UnixStream>,
    sent: bool,
}

impl Answerer {
    fn send(mut self, answer: Http) {
        self.sent = true;
        let _ = self.tx.send((self.id, answer));
        // A full wake-up pipe already holds a wake-up.
        let _ = (&*self.waker).write(&[1]);
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self.tx.send((self.id, http(Err(ActionError::ShuttingDown))));
            let _ = (&*self.waker).write(&[1]);
        }
    }
}

/// What each connection's work needs.
struct Ctx {
    hub: Arc<Hub>,
    answers_tx: Sender<(u64, Http)>,
    waker: Arc<UnixStream>,
}

/// The API thread: every connection, driven by `poll(2)`.
struct Reactor {
    listener: UnixListener,
    wake_rx: UnixStream,
    ctx: Ctx,
    answers: Receiver<(u64, Http)>,
    conns: Vec<Conn>,
    next_id: u64,
    stop: Arc<AtomicBool>,
    /// Out of file descriptors: accepting waits until then.
    accept_paused_until: Option<Instant>,
}

fn pollfd(fd: &impl AsRawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }
}

/// Answers `code` with `msg` on a connection that is then closed at once
/// (best effort: a fresh connection's send buffer takes the few bytes).
fn refuse(mut stream: &UnixStream, code: u16, msg: &str) {
    let body = serde_json::to_vec(&json!({ "error": msg })).unwrap_or_default();
    let _ = stream.write(&http::response(code, &body));
}

impl Reactor {
    fn run(mut self) {
        let mut stopping: Option<Instant> = None;
        loop {
            while let Ok((id, answer)) = self.answers.try_recv() {
                if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
                    c.answer(answer);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                let since = *stopping.get_or_insert_with(Instant::now);
                self.conns.retain(|c| matches!(c.stage, Stage::Writing { .. }));
                if self.conns.is_empty() || since.elapsed() > Duration::from_secs(1) {
                    return;
                }
            }
            self.expire();
            self.conns.retain(|c| !matches!(c.stage, Stage::Closed));
            let now = Instant::now();
            let listening = stopping.is_none() && self.accept_paused_until.is_none_or(|t| t <= now);
            let mut fds = vec![pollfd(&self.wake_rx, libc::POLLIN)];
            if listening {
                fds.push(pollfd(&self.listener, libc::POLLIN));
            }
            let first_conn = fds.len();
            for c in &self.conns {
                fds.push(match c.stage {
                    Stage::Reading { .. } => pollfd(&c.stream, libc::POLLIN),
                    Stage::Writing { .. } => pollfd(&c.stream, libc::POLLOUT),
                    // Left out (poll skips a negative descriptor): a client that
                    // hangs up while its action runs would otherwise wake
                    // poll at once, again and again, with POLLHUP.
                    Stage::Waiting | Stage::Closed => libc::pollfd { fd: -1, events: 0, revents: 0 },
                });
            }
            let next = self.conns.iter().filter(|c| !matches!(c.stage, Stage::Waiting)).map(|c| c.deadline).min();
            let wait = next.map_or(1000, |d| d.saturating_duration_since(now).as_millis().min(1000) as i32 + 1);
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures
            // whose descriptors stay open for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
            if n <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let mut sink = [0u8; 256];
                while matches!((&self.wake_rx).read(&mut sink), Ok(k) if k > 0) {}
            }
            for (c, fd) in self.conns.iter_mut().zip(&fds[first_conn..]) {
                if fd.revents == 0 {
                    continue;
                }
                match c.stage {
                    Stage::Reading { .. } => c.read(&self.ctx),
                    Stage::Writing { .. } => c.write(),
                    Stage::Waiting | Stage::Closed => {}
                }
            }
            self.conns.retain(|c| !matches!(c.stage, Stage::Closed));
            if listening && fds[1].revents != 0 {
                self.accept();
            }
        }
    }

    /// Ends the connections past their deadline: a request not whole in
    /// time is answered 408; an answer not taken in time is dropped.
    fn expire(&mut self) {
        let now = Instant::now();
        for c in &mut self.conns {
            if c.deadline > now {
                continue;
            }
            match c.stage {
                Stage::Reading { .. } => c.answer(error(
                    408,
                    format!("the request did not arrive whole within {} s", REQUEST_TIMEOUT.as_secs()),
                )),
                Stage::Writing { .. } => c.stage = Stage::Closed,
                Stage::Waiting | Stage::Closed => {}
            }
        }
    }

    /// Takes every pending connection, keeping at most [`MAX_CONNECTIONS`].
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(_) => return,
            };
            self.accept_paused_until = None;
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                let reading = |c: &&Conn| matches!(c.stage, Stage::Reading { .. });
                // The deadlines of reading connections follow their arrival.
                match self.conns.iter().filter(reading).min_by_key(|c| c.deadline).map(|c| c.id) {
                    Some(id) => {
                        let i = self.conns.iter().position(|c| c.id == id).expect("just found");
                        let old = self.conns.swap_remove(i);
                        refuse(&old.stream, 503, "too many connections: this one sent no whole request in time");
                    }
                    None => {
                        refuse(&stream, 503, "too many connections, each with a request being served");
                        continue;
                    }
                }
            }
            self.next_id += 1;
            self.conns.push(Conn {
                id: self.next_id,
                stream,
                buf: Vec::new(),
                stage: Stage::Reading { continued: false },
                deadline: Instant::now() + REQUEST_TIMEOUT,
            });
        }
    }
}

/// What a request leads to.
enum Routed {
    /// An answer at once (the API thread's own, or a refusal).
    Now(Http),
    /// An action for the control loop.
    Act(Action),
    /// An answer that waits for something else (a switch), on a thread.
    Later(Box<dyn FnOnce() -> Http + Send>),
}

/// A group cut's endpoints, served without the control loop: it is inside
/// the checkpoint's migration, which waits for these very commands. A cut is
/// answered once the switch is over (`switched`; or `aborted`, 409), so
/// that the coordinator learns it without asking again and again.
fn barrier(endpoint: Endpoint, published: &Published) -> Routed {
    let Some((out, b)) = published.barrier() else {
        return Routed::Now(error(
            404,
            "no checkpoint of this VMM waits for a group cut (PUT /v1/checkpoint with group_cut)",
        ));
    };
    let view = move |b: &migrate::barrier::Barrier| {
        (200, serde_json::to_value(BarrierView { out, state: b.state() }).unwrap_or_default())
    };
    let done = match endpoint {
        Endpoint::Cut => b.cut(),
        Endpoint::Go => b.go(),
        Endpoint::Abort => b.abort("PUT /v1/checkpoint/abort"),
        _ => Ok(()),
    };
    match (done, endpoint) {
        (Ok(()), Endpoint::Cut) => Routed::Later(Box::new(move || {
            b.wait_switched(SWITCH_WAIT);
            match b.state() {
                migrate::barrier::State::Aborted(why) => error(409, format!("the switch failed here: {why}")),
                _ => view(&b),
            }
        })),
        (Ok(()), _) => Routed::Now(view(&b)),
        (Err(refused), _) => Routed::Now(error(409, refused)),
    }
}

/// How long `PUT /v1/checkpoint/cut` waits for the switch before it answers
/// with the state it is in.
const SWITCH_WAIT: Duration = Duration::from_secs(30);

/// Routes a whole request by [`ROUTES`].
fn route_request(req: &http::Request, hub: &Hub) -> Routed {
    let path = req.path.as_str();
    let Some(r) = ROUTES.iter().find(|r| r.path == path && r.method == req.method) else {
        return Routed::Now(if ROUTES.iter().any(|r| r.path == path) {
            error(405, format!("{} is not allowed on {path}", req.method))
        } else {
            error(404, format!("no such endpoint {path} (this cevm speaks API version {API_VERSION}: /v1/...)"))
        });
    };
    let body = String::from_utf8_lossy(&req.body);
    let published = &hub.published;
    Routed::Act(match r.endpoint {
        Endpoint::Status => {
            return Routed::Now(match published.status() {
                Some(s) => (200, serde_json::to_value(s).unwrap_or_default()),
                None => error(503, NO_GUEST),
            })
        }
        Endpoint::MigrationProgress => {
            let p = published.migration.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Routed::Now(if p.phase.is_empty() {
                error(404, "no migration has run in this VMM")
            } else {
                (200, serde_json::to_value(p).unwrap_or_default())
            });
        }
        Endpoint::CheckpointProgress => {
            let p = published.checkpoint.view();
            return Routed::Now(if p.phase.is_empty() {
                error(404, "no checkpoint has been taken by this VMM")
            } else {
                (200, serde_json::to_value(p).unwrap_or_default())
            });
        }
        Endpoint::Barrier | Endpoint::Cut | Endpoint::Go | Endpoint::Abort => return barrier(r.endpoint, published),
        Endpoint::Pause => Action::Pause,
        Endpoint::Resume => Action::Resume,
        Endpoint::Quit => Action::Quit,
        Endpoint::Checkpoint => match serde_json::from_str::<CheckpointRequest>(&body) {
            Ok(c) => match CheckpointPlan::try_from(c) {
                Ok(plan) => Action::Checkpoint(plan),
                Err(e) => return Routed::Now(plan_error(e)),
            },
            Err(e) => return Routed::Now(error(400, format!("bad checkpoint request: {e}"))),
        },
        Endpoint::Migrate => match serde_json::from_str::<MigrateRequest>(&body) {
            Ok(m) => match MigrationPlan::try_from(m) {
                Ok(plan) => Action::Migrate(plan),
                Err(e) => return Routed::Now(error(400, format!("bad migration target: {e}"))),
            },
            Err(e) => return Routed::Now(error(400, format!("bad migration request: {e}"))),
        },
    })
}
