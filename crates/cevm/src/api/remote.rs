//! Control of a VMM from another host: `cevm run|restore ... --control
//! tcp:ADDR:PORT --control-secret FILE` serves the same API as the VMM's unix
//! socket over TCP, but only to a peer that proves it holds the job's secret.
//! A group coordinator on another host (`cevm group checkpoint|restore
//! --secret FILE`) is such a peer. There is never an unauthenticated remote
//! endpoint: `--control` without a secret is refused.
//!
//! # The exchange (one request per connection, as on the unix socket)
//!
//! K is the secret; every tag is HMAC-SHA256.
//! 1. server: `CEVMCTL1` and a fresh 32-byte nonce Ns.
//! 2. client: a fresh 32-byte nonce Nc and HMAC(K, "cevm-control client" Ns Nc).
//! 3. server: if that tag is right, byte 0 and HMAC(K, "cevm-control server"
//!    Ns Nc): the server proves it holds K too, so a coordinator never takes a
//!    checkpoint's report from an impostor; else byte 1, and it closes.
//! 4. client: the request (the very bytes of an HTTP request on the unix
//!    socket) framed as length (u32, big-endian), bytes, HMAC(S, "request"
//!    length bytes), with the session key S = HMAC(K, "cevm-control session"
//!    Ns Nc).
//! 5. server: after checking that tag, it hands the request to the VMM's own
//!    API socket and sends its answer framed the same way, tagged "answer".
//!
//! The secret never crosses the network; a recorded exchange replays nowhere
//! (each side's nonce is fresh, so are S and every tag); a request or answer
//! changed on the way is refused. The exchange is not encrypted: the control
//! messages hold no secret (paths, states, timings), and the guest's memory
//! never passes here. Written by hand on the `hmac`/`sha2` crates rather than
//! with TLS: a TLS stack with pre-shared keys would bring a certificate-less
//! mode few crates support and far more code than these few frames.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type Tag = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"CEVMCTL1";
const NONCE: usize = 32;
const TAG: usize = 32;
/// A secret shorter than this is refused (`cevm group secret` makes 64 hex digits).
pub const MIN_SECRET: usize = 16;
/// The longest request: what the unix socket's parser takes.
const MAX_REQUEST: usize = super::http::MAX_HEAD + super::http::MAX_BODY;
/// The longest answer taken.
const MAX_ANSWER: usize = 16 << 20;
/// A peer must have authenticated and sent its request within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay waits for the VMM's answer (a checkpoint is answered
/// once committed).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1800);
/// Most peers served at once; one more is closed at once.
pub const MAX_PEERS: usize = 32;

/// A job's secret, read from a file only its owner may read.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("secret file {path}: it is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("secret file {path}: mode {mode:04o} lets others read it; it must be readable by its owner only (chmod 600 {path})")]
    Open { path: PathBuf, mode: u32 },
    #[error("secret file {path}: it belongs to uid {owner}, not to this user (uid {me})")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("secret file {path}: it holds {len} bytes; a secret has at least {MIN_SECRET} (`cevm group secret FILE` makes one)")]
    Short { path: PathBuf, len: usize },
}

impl Secret {
    /// Reads the secret in `path`: a regular file of this user's, mode 0600
    /// or stricter, of at least [`MIN_SECRET`] bytes (a final newline is not
    /// part of it).
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(SecretError::NotAFile { path: path.into() });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(SecretError::Open { path: path.into(), mode: meta.mode() & 0o7777 });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(SecretError::NotOwned { path: path.into(), owner: meta.uid(), me });
        }
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET {
            return Err(SecretError::Short { path: path.into(), len: bytes.len() });
        }
        Ok(Secret(Arc::new(bytes)))
    }

    /// Writes a new secret (32 random bytes as 64 hex digits) to `path`,
    /// which must not exist, mode 0600.
    pub fn generate(path: &Path) -> Result<(), SecretError> {
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        let mut raw = [0u8; 32];
        random(&mut raw).map_err(io)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        f.write_all(format!("{hex}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io)
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> Tag {
        let mut m = Tag::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }
}

/// Fills `buf` from the kernel's random source.
fn random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: writes at most `buf.len() - at` bytes into `buf` from `at` on.
        let n = unsafe { libc::getrandom(buf[at..].as_mut_ptr().cast(), buf.len() - at, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            at += n as usize;
        }
    }
    Ok(())
}

/// The keys of one connection.
struct Session {
    key: Secret,
    ns: [u8; NONCE],
    nc: [u8; NONCE],
}

impl Session {
    fn client_tag(&self) -> Tag {
        self.key.tag(b"cevm-control client", &[&self.ns, &self.nc])
    }

    fn server_tag(&self) -> Tag {
        self.key.tag(b"cevm-control server", &[&self.ns, &self.nc])
    }

    /// The session key S.
    fn session(&self) -> Secret {
        let s = self.key.tag(b"cevm-control session", &[&self.ns, &self.nc]).finalize().into_bytes();
        Secret(Arc::new(s.to_vec()))
    }
}

/// Writes `bytes` framed and tagged with `label` under `key`.
fn send_frame(s: &mut TcpStream, key: &Secret, label: &[u8], bytes: &[u8]) -> std::io::Result<()> {
    let len = (bytes.len() as u32).to_be_bytes();
    let tag = key.tag(label, &[&len, bytes]).finalize().into_bytes();
    let mut out = Vec::with_capacity(4 + bytes.len() + TAG);
    out.extend_from_slice(&len);
    out.extend_from_slice(bytes);
    out.extend_from_slice(&tag);
    s.write_all(&out)
}

/// Reads a frame of at most `max` bytes tagged with `label` under `key`.
fn read_frame(s: &mut TcpStream, key: &Secret, label: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| format!("reading a frame: {e}"))?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(format!("a frame of {n} bytes (at most {max})"));
    }
    let mut bytes = vec![0u8; n + TAG];
    s.read_exact(&mut bytes).map_err(|e| format!("reading a frame: {e}"))?;
    let tag = bytes.split_off(n);
    key.tag(label, &[&len, &bytes])
        .verify_slice(&tag)
        .map_err(|_| "a frame whose tag is wrong (changed on the way?)")?;
    Ok(bytes)
}

/// Why a remote exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("it refused this secret (not the job's)")]
    Refused,
    #[error("it does not hold the job's secret (not the VMM it should be)")]
    Impostor,
    #[error("{0}")]
    Broken(String),
}

/// Sends one request to the relay at `addr` (HOST:PORT) with `secret` and
/// returns the VMM's answer (raw HTTP bytes); waits up to `timeout` for it.
pub fn exchange(addr: &str, secret: &Secret, request: &[u8], timeout: Duration) -> Result<Vec<u8>, RemoteError> {
    let broken = |e: std::io::Error| RemoteError::Broken(e.to_string());
    let target = addr.to_socket_addrs().map_err(RemoteError::Connect)?.next();
    let target = target.ok_or_else(|| RemoteError::Connect(std::io::Error::other("no address")))?;
    let mut s = TcpStream::connect_timeout(&target, HANDSHAKE_TIMEOUT).map_err(RemoteError::Connect)?;
    s.set_nodelay(true).map_err(broken)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(broken)?;
    let mut hello = [0u8; 8 + NONCE];
    s.read_exact(&mut hello).map_err(broken)?;
    if &hello[..8] != MAGIC {
        return Err(RemoteError::Broken("not a cevm control endpoint".into()));
    }
    let mut sess = Session { key: secret.clone(), ns: [0; NONCE], nc: [0; NONCE] };
    sess.ns.copy_from_slice(&hello[8..]);
    random(&mut sess.nc).map_err(broken)?;
    let mut proof = sess.nc.to_vec();
    proof.extend_from_slice(&sess.client_tag().finalize().into_bytes());
    s.write_all(&proof).map_err(broken)?;
    let mut verdict = [0u8; 1];
    // A refusing peer closes after its one byte; one that closes without it refused too.
    if s.read_exact(&mut verdict).is_err() || verdict[0] != 0 {
        return Err(RemoteError::Refused);
    }
    let mut their = [0u8; TAG];
    s.read_exact(&mut their).map_err(broken)?;
    sess.server_tag().verify_slice(&their).map_err(|_| RemoteError::Impostor)?;
    let key = sess.session();
    send_frame(&mut s, &key, b"request", request).map_err(broken)?;
    s.set_read_timeout(Some(timeout)).map_err(broken)?;
    read_frame(&mut s, &key, b"answer", MAX_ANSWER).map_err(RemoteError::Broken)
}

/// The relay: serves `--control` until dropped.
pub struct Relay {
    listener: Arc<TcpListener>,
    addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens at `listen` (HOST:PORT) and relays every authenticated
    /// request to the API socket `api`.
    pub fn start(listen: &str, secret: Secret, api: PathBuf) -> std::io::Result<Relay> {
        let listener = Arc::new(TcpListener::bind(listen)?);
        let addr = listener.local_addr()?;
        let l = listener.clone();
        let thread = std::thread::Builder::new().name("control".into()).spawn(move || {
            // The network drives these threads: they keep their own calls
            // (crate sandbox), inherited by each peer's thread.
            match sandbox::confine(sandbox::Kind::Control) {
                Ok(()) => accept(&l, &secret, &api),
                Err(e) => tracing::error!("the remote control does not serve: {e}"),
            }
        })?;
        Ok(Relay { listener, addr, thread: Some(thread) })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Wakes the accepting thread (its accept fails) and ends it; peers
        // being served end on their own (the API socket goes too).
        // SAFETY: shuts down a listening socket this relay owns; no memory involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept(listener: &TcpListener, secret: &Secret, api: &Path) {
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            return;
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_PEERS {
            busy.fetch_sub(1, Ordering::SeqCst);
            drop(conn);
            continue;
        }
        let (secret, api, busy) = (secret.clone(), api.to_path_buf(), busy.clone());
        let spawned = std::thread::Builder::new().name("control-peer".into()).spawn(move || {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = serve(conn, &secret, &api) {
                tracing::warn!("remote control: peer {peer}: {e}");
            }
            busy.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            tracing::warn!("remote control: cannot start a thread for a peer");
        }
    }
}

/// One peer: authenticated, its request relayed, the answer sent back.
fn serve(mut s: TcpStream, secret: &Secret, api: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    let mut sess = Session { key: secret.clone(), ns: [0; NONCE], nc: [0; NONCE] };
    random(&mut sess.ns).map_err(io)?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&sess.ns);
    s.write_all(&hello).map_err(io)?;
    let mut proof = [0u8; NONCE + TAG];
    s.read_exact(&mut proof).map_err(|e| format!("no proof of the secret: {e}"))?;
    sess.nc.copy_from_slice(&proof[..NONCE]);
    if sess.client_tag().verify_slice(&proof[NONCE..]).is_err() {
        let _ = s.write_all(&[1]);
        let _ = s.shutdown(Shutdown::Both);
        return Err("refused: it does not hold the job's secret".into());
    }
    let mut ok = vec![0u8];
    ok.extend_from_slice(&sess.server_tag().finalize().into_bytes());
    s.write_all(&ok).map_err(io)?;
    let key = sess.session();
    let request = read_frame(&mut s, &key, b"request", MAX_REQUEST)?;
    let mut api_conn = UnixStream::connect(api).map_err(|e| format!("the VMM's API socket {}: {e}", api.display()))?;
    api_conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    api_conn.write_all(&request).map_err(io)?;
    let mut answer = Vec::new();
    api_conn.take(MAX_ANSWER as u64).read_to_end(&mut answer).map_err(io)?;
    send_frame(&mut s, &key, b"answer", &answer).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_secret_must_be_private_and_long_enough() {
        let d = tempfile::tempdir().unwrap();
        let good = secret_file(d.path(), "good", "0123456789abcdef0123\n", 0o600);
        assert_eq!(Secret::load(&good).unwrap().0.len(), 20);
        let open = secret_file(d.path(), "open", "0123456789abcdef0123", 0o644);
        assert!(matches!(Secret::load(&open), Err(SecretError::Open { mode: 0o644, .. })));
        let short = secret_file(d.path(), "short", "abc\n", 0o600);
        assert!(matches!(Secret::load(&short), Err(SecretError::Short { len: 3, .. })));
        assert!(matches!(Secret::load(&d.path().join("none")), Err(SecretError::Io { .. })));
        let made = d.path().join("made");
        Secret::generate(&made).unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().mode() & 0o777, 0o600);
        assert_eq!(Secret::load(&made).unwrap().0.len(), 64);
        assert!(Secret::generate(&made).is_err(), "an existing secret is never replaced");
    }

    /// A relay in front of a fake API socket that answers `pong` to anything.
    fn relay(secret: &Secret, dir: &Path) -> Relay {
        let api = dir.join("api.sock");
        let l = std::os::unix::net::UnixListener::bind(&api).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                let mut buf = [0u8; 64];
                let n = c.read(&mut buf).unwrap();
                c.write_all(b"pong:").unwrap();
                c.write_all(&buf[..n]).unwrap();
            }
        });
        // Not confined: the test process is no VMM.
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        let addr = listener.local_addr().unwrap();
        let (l, s) = (listener.clone(), secret.clone());
        let thread = std::thread::spawn(move || accept(&l, &s, &api));
        Relay { listener, addr, thread: Some(thread) }
    }

    #[test]
    fn only_a_peer_with_the_secret_is_served() {
        let d = tempfile::tempdir().unwrap();
        let key = Secret(Arc::new(b"the job's secret, long enough".to_vec()));
        let r = relay(&key, d.path());
        let addr = r.addr().to_string();
        let t = Duration::from_secs(5);
        assert_eq!(exchange(&addr, &key, b"ping", t).unwrap(), b"pong:ping");
        let wrong = Secret(Arc::new(b"another job's secret, long".to_vec()));
        assert!(matches!(exchange(&addr, &wrong, b"ping", t), Err(RemoteError::Refused)));
        // A raw peer that sends a request without the handshake gets nothing relayed.
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(&[b'G'; NONCE + TAG]).unwrap();
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        assert_eq!(got.len(), 8 + NONCE + 1, "hello and a refusal only");
        assert_eq!(got[8 + NONCE], 1);
        drop(r);
    }

    #[test]
    fn a_changed_frame_is_refused() {
        let key = Secret(Arc::new(b"0123456789abcdef".to_vec()));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        send_frame(&mut tx, &key, b"request", b"PUT /v1/quit").unwrap();
        let mut frame = vec![0u8; 4 + 12 + TAG];
        rx.read_exact(&mut frame).unwrap();
        tx.write_all(&frame).unwrap();
        assert_eq!(read_frame(&mut rx, &key, b"request", 100).unwrap(), b"PUT /v1/quit");
        // One bit changed on the way.
        frame[6] ^= 1;
        tx.write_all(&frame).unwrap();
        assert!(read_frame(&mut rx, &key, b"request", 100).unwrap_err().contains("tag is wrong"));
        // Nor does a request pass as an answer, or a frame past the limit.
        send_frame(&mut tx, &key, b"request", b"x").unwrap();
        assert!(read_frame(&mut rx, &key, b"answer", 100).is_err());
        let mut tx2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx2, _) = l.accept().unwrap();
        send_frame(&mut tx2, &key, b"request", &[0u8; 101]).unwrap();
        assert!(read_frame(&mut rx2, &key, b"request", 100).unwrap_err().contains("at most 100"));
    }
}
