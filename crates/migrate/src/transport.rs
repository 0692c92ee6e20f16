//! Transports behind one trait: an in-process channel (thread-based migration),
//! and any byte stream (a unix socket or a TCP connection, process-based).
//! All carry the frames of [`crate::protocol`].

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use crate::protocol::{check_payload, decode_header, encode_header, FrameKind, HEADER_LEN};
use crate::{Error, Result};

/// A received frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

/// A bidirectional carrier of migration frames.
pub trait Transport: Send {
    /// Sends one frame whose payload is `parts`, in order (stream transports write
    /// the parts with vectored writes, without gathering them first).
    fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()>;
    /// Sends one frame whose whole payload is `payload` (an in-process transport
    /// moves it instead of copying).
    fn send_owned(&mut self, kind: FrameKind, payload: Vec<u8>) -> Result<()> {
        self.send(kind, &[&payload])
    }
    /// Receives the next frame, checked; waits at most `timeout` (`None`: forever).
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame>;
    /// What the peer is, for messages.
    fn peer(&self) -> String;
    /// Whether the peer runs on this host, so that its CLOCK_MONOTONIC is ours.
    fn shares_clock(&self) -> bool;
    /// Two ends of the same connection, one to send on and one to receive on,
    /// for two threads: `(sender, receiver)`. Each fails the other direction as
    /// a closed connection would.
    fn split(self: Box<Self>) -> Result<(Box<dyn Transport>, Box<dyn Transport>)>;
}

/// Tells the peer why this side gives up, in an `Error` frame. Best effort: the
/// peer may already be gone, and the caller reports its own error either way.
pub(crate) fn send_error(t: &mut dyn Transport, why: String) {
    let msg = crate::protocol::ErrorMsg { error: why };
    if let Ok(b) = serde_json::to_vec(&msg) {
        let _ = t.send(FrameKind::Error, &[&b]);
    }
}

/// Frames over a byte stream (unix socket, TCP).
pub struct StreamTransport<S> {
    stream: S,
    peer: String,
}

/// What a stream needs besides Read + Write: a read timeout.
pub trait TimedStream: Read + Write + Send + Sized + 'static {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// A second handle on the same stream.
    fn duplicate(&self) -> std::io::Result<Self>;
    /// A unix socket's peer is on this host; a TCP peer is taken to be elsewhere.
    const SAME_HOST: bool;
}
impl TimedStream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
    fn duplicate(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    const SAME_HOST: bool = true;
}
impl TimedStream for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
    fn duplicate(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    const SAME_HOST: bool = false;
}

impl<S: TimedStream> StreamTransport<S> {
    pub fn new(stream: S, peer: String) -> Self {
        StreamTransport { stream, peer }
    }
}

/// Writes all of `bufs` with vectored writes (no copy into one buffer).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<S: TimedStream> Transport for StreamTransport<S> {
    fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let header = encode_header(kind, parts);
        let io = |e: std::io::Error| Error::Io { peer: self.peer.clone(), what: "sending", source: e };
        // At most IOV_MAX (1024) slices per writev: send in groups.
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len().min(1023) + 1);
        slices.push(IoSlice::new(&header));
        for chunk in parts.chunks(1023) {
            slices.extend(chunk.iter().map(|p| IoSlice::new(p)));
            write_all_vectored(&mut self.stream, &mut slices).map_err(io)?;
            slices.clear();
        }
        if !slices.is_empty() {
            write_all_vectored(&mut self.stream, &mut slices).map_err(io)?;
        }
        Ok(())
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame> {
        let peer = self.peer.clone();
        self.stream.set_timeout(timeout).map_err(|e| Error::Io {
            peer: peer.clone(),
            what: "setting a timeout",
            source: e,
        })?;
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Closed { peer: peer.clone() },
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout { peer: peer.clone() },
            _ => Error::Io { peer: peer.clone(), what: "receiving", source: e },
        };
        let mut h = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut h).map_err(io)?;
        let header = decode_header(&h)?;
        let mut payload = vec![0u8; header.len as usize];
        self.stream.read_exact(&mut payload).map_err(io)?;
        check_payload(&h, &header, &payload)?;
        Ok(Frame { kind: header.kind, payload })
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn shares_clock(&self) -> bool {
        S::SAME_HOST
    }

    fn split(self: Box<Self>) -> Result<(Box<dyn Transport>, Box<dyn Transport>)> {
        let other = self.stream.duplicate().map_err(|e| Error::Io {
            peer: self.peer.clone(),
            what: "duplicating the connection",
            source: e,
        })?;
        let reader = StreamTransport { stream: other, peer: self.peer.clone() };
        Ok((self, Box::new(reader)))
    }
}

/// One end of an in-process channel pair (thread-based migration). Frames are
/// moved, not encoded: the payload parts are gathered into one buffer once.
pub struct ChannelTransport {
    tx: SyncSender<Frame>,
    rx: Receiver<Frame>,
    name: &'static str,
}

/// Two connected in-process ends: (source side, destination side). Up to
/// `depth` frames are in flight each way.
pub fn channel_pair(depth: usize) -> (ChannelTransport, ChannelTransport) {
    let (a_tx, a_rx) = mpsc::sync_channel(depth);
    let (b_tx, b_rx) = mpsc::sync_channel(depth);
    (
        ChannelTransport { tx: a_tx, rx: b_rx, name: "the in-process destination" },
        ChannelTransport { tx: b_tx, rx: a_rx, name: "the in-process source" },
    )
}

impl Transport for ChannelTransport {
    fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let payload = parts.concat();
        self.tx.send(Frame { kind, payload }).map_err(|_| Error::Closed { peer: self.name.into() })
    }

    fn send_owned(&mut self, kind: FrameKind, payload: Vec<u8>) -> Result<()> {
        self.tx.send(Frame { kind, payload }).map_err(|_| Error::Closed { peer: self.name.into() })
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame> {
        match timeout {
            None => self.rx.recv().map_err(|_| Error::Closed { peer: self.name.into() }),
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => Error::Timeout { peer: self.name.into() },
                RecvTimeoutError::Disconnected => Error::Closed { peer: self.name.into() },
            }),
        }
    }

    fn peer(&self) -> String {
        self.name.into()
    }

    fn shares_clock(&self) -> bool {
        true
    }

    fn split(self: Box<Self>) -> Result<(Box<dyn Transport>, Box<dyn Transport>)> {
        // Each half gets a dead channel for the direction it does not use.
        let (dead_tx, _) = mpsc::sync_channel(0);
        let (_, dead_rx) = mpsc::sync_channel(0);
        let ChannelTransport { tx, rx, name } = *self;
        Ok((Box::new(ChannelTransport { tx, rx: dead_rx, name }), Box::new(ChannelTransport { tx: dead_tx, rx, name })))
    }
}

/// Where a process-based migration goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `tcp:HOST:PORT`
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("`unix:` needs a socket path, e.g. unix:/tmp/dst.sock".into());
            }
            Ok(Endpoint::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Endpoint::Tcp(a.into())),
                _ => Err(format!("`{s}`: expected tcp:HOST:PORT, e.g. tcp:10.0.0.2:4444")),
            }
        } else {
            Err(format!("`{s}`: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Endpoint {
    /// Connects to a destination waiting at this endpoint.
    pub fn connect(&self) -> Result<Box<dyn Transport>> {
        let peer = self.to_string();
        let err = |e| Error::Io { peer: peer.clone(), what: "connecting", source: e };
        Ok(match self {
            Endpoint::Unix(p) => Box::new(StreamTransport::new(UnixStream::connect(p).map_err(err)?, peer.clone())),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(err)?;
                // Frames are written whole; waiting to coalesce them only adds latency.
                let _ = s.set_nodelay(true);
                Box::new(StreamTransport::new(s, peer.clone()))
            }
        })
    }

    /// Listens at this endpoint (a stale unix socket file is replaced).
    pub fn listen(&self) -> Result<Listener> {
        let err = |e| Error::Io { peer: self.to_string(), what: "listening", source: e };
        Ok(match self {
            Endpoint::Unix(p) => {
                if p.exists() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                Listener::Unix(bind_listening(p).map_err(err)?, p.clone())
            }
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(err)?),
        })
    }
}

/// A unix listener that appears at `p` only once it listens. Bound at `p`
/// itself, the file would exist an instant before `listen`, and a source that
/// waits for the file and connects at once would be refused (the nested
/// benchmark met that: "connecting: Connection refused"). So it is bound
/// under a temporary name beside `p` and given its name by a hard link,
/// which, as a bind at `p` would, fails if something is there already (a
/// rename would replace another destination's live socket); where the
/// temporary name would be too long for a socket address, it is bound at `p`
/// directly.
fn bind_listening(p: &Path) -> std::io::Result<UnixListener> {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    // sun_path holds 108 bytes, the terminating NUL included.
    if tmp.as_os_str().len() >= 108 {
        return UnixListener::bind(p);
    }
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let linked = std::fs::hard_link(&tmp, p);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(l),
        // The error a bind at `p` gives.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE))
        }
        Err(e) => Err(e),
    }
}

/// A listening endpoint, waiting for one migration.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for the source to connect.
    pub fn accept(&self) -> Result<Box<dyn Transport>> {
        let err = |e| Error::Io { peer: "the listening socket".into(), what: "accepting", source: e };
        Ok(match self {
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().map_err(err)?;
                Box::new(StreamTransport::new(s, format!("the source on unix:{}", p.display())))
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().map_err(err)?;
                let _ = s.set_nodelay(true);
                Box::new(StreamTransport::new(s, format!("the source at tcp:{addr}")))
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("unix:/tmp/a".parse::<Endpoint>().unwrap(), Endpoint::Unix("/tmp/a".into()));
        assert_eq!("tcp:10.0.0.2:4444".parse::<Endpoint>().unwrap(), Endpoint::Tcp("10.0.0.2:4444".into()));
        assert!("tcp:host".parse::<Endpoint>().unwrap_err().contains("tcp:HOST:PORT"));
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("/tmp/x".parse::<Endpoint>().unwrap_err().contains("unix:PATH"));
    }

    #[test]
    fn frames_cross_a_unix_socket_and_a_flipped_byte_is_caught() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = StreamTransport::new(a, "a".into());
        let mut rx = StreamTransport::new(b.try_clone().unwrap(), "b".into());
        let page = vec![7u8; 4096];
        tx.send(FrameKind::Pages, &[b"table", &page, &page]).unwrap();
        let f = rx.recv(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(f.kind, FrameKind::Pages);
        assert_eq!(f.payload.len(), 5 + 8192);
        // Corrupt one payload byte in transit: write a good header with a bad payload.
        let mut raw = Vec::new();
        raw.extend_from_slice(&encode_header(FrameKind::State, &[b"hello"]));
        raw.extend_from_slice(b"hellp");
        let (mut c, d) = UnixStream::pair().unwrap();
        c.write_all(&raw).unwrap();
        let mut rx2 = StreamTransport::new(d, "d".into());
        let e = rx2.recv(Some(Duration::from_secs(5))).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // A peer that closes mid-stream, and one that says nothing.
        drop(c);
        assert!(matches!(rx2.recv(Some(Duration::from_secs(5))), Err(Error::Closed { .. })));
        let (_e, f) = UnixStream::pair().unwrap();
        let mut rx3 = StreamTransport::new(f, "f".into());
        assert!(matches!(rx3.recv(Some(Duration::from_millis(50))), Err(Error::Timeout { .. })));
    }

    #[test]
    fn a_unix_endpoint_is_there_only_once_it_listens() {
        let dir = std::env::temp_dir().join(format!("cevm-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("in.sock");
        let ep = Endpoint::Unix(p.clone());
        // A source that connects the moment the file is there, as the
        // benchmark and scripts do, is never refused.
        for round in 0..3000 {
            let q = p.clone();
            let source = std::thread::spawn(move || loop {
                if q.exists() {
                    return UnixStream::connect(&q).map(drop);
                }
                std::hint::spin_loop();
            });
            let l = ep.listen().unwrap();
            let connected = source.join().unwrap();
            assert!(connected.is_ok(), "round {round}: refused: {connected:?}");
            drop(l);
            assert!(!p.exists(), "the socket file outlived its listener");
        }
        // Nothing but the socket was ever left beside it, and a stale one is replaced.
        drop(UnixListener::bind(&p).unwrap());
        let l = ep.listen().unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("in.sock")]);
        // A live one is not taken over: the second destination is refused, as
        // a bind there refuses it, and the first still gets the source.
        let e = ep.listen().err().expect("a second listener at a live socket");
        assert!(e.to_string().contains("Address already in use"), "{e}");
        let source = UnixStream::connect(&p).unwrap();
        let Listener::Unix(first, _) = &l else { unreachable!() };
        first.set_nonblocking(true).unwrap();
        assert!(first.accept().is_ok(), "the first listener lost its socket file");
        drop(source);
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_channel_pair_moves_frames_both_ways() {
        let (mut s, mut d) = channel_pair(4);
        s.send(FrameKind::Hello, &[b"a", b"b"]).unwrap();
        let f = d.recv(None).unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (FrameKind::Hello, &b"ab"[..]));
        d.send(FrameKind::Ready, &[]).unwrap();
        assert_eq!(s.recv(Some(Duration::from_secs(1))).unwrap().kind, FrameKind::Ready);
        drop(d);
        assert!(matches!(s.recv(Some(Duration::from_secs(1))), Err(Error::Closed { .. })));
    }
}
