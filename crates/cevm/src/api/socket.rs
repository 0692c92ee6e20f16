//! The API socket's file: claimed without ever deleting what is not provably
//! ours to delete, and removed at the end only while it is still ours.
//!
//! `cevm run --api-sock PATH` may find PATH:
//! - absent: the socket is created there;
//! - a socket nobody listens on (`connect` refused: its VMM died): stale, it
//!   is replaced;
//! - a socket someone listens on, or one whose state cannot be told, or any
//!   other kind of file: refused, nothing on disk changes.
//!
//! The socket is bound under a temporary name beside PATH (mode 0600 from
//! the start) and then put at PATH in one step: `link` (which never replaces
//! anything) when PATH is absent, `renameat2(RENAME_EXCHANGE)` when it holds
//! the stale socket, whose device and inode are checked once swapped out (a
//! socket another process put there meanwhile is swapped back, not deleted).
//! The device and inode of our socket are recorded, and at the end PATH is
//! removed only if it still is that socket.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the API socket cannot be put at its path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("API socket {0}: its directory does not exist")]
    NoDirectory(PathBuf),
    #[error("API socket {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("API socket {path}: it exists and is {kind}, not a socket; refusing to replace it")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("API socket {path}: a socket is there and cevm cannot tell whether it is stale ({source}); refusing to replace it")]
    CannotTell { path: PathBuf, source: std::io::Error },
    #[error("API socket {path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
}

impl SocketError {
    /// Whether this is the command line's fault (a path that cannot be used)
    /// rather than the system's.
    pub fn is_usage(&self) -> bool {
        !matches!(self, SocketError::Io { .. })
    }
}

/// The API socket at its path, listening; the path is removed when this is
/// dropped, if it still holds this socket.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    /// Device and inode of the socket file bound here.
    id: (u64, u64),
    listener: Option<UnixListener>,
}

impl ApiSocket {
    /// The listener (taken once, by the server).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What a connection attempt says about a socket file.
enum Probe {
    /// Nobody listens: stale.
    Refused,
    /// Someone listens (even with a full backlog).
    Live,
    /// Anything else (e.g. no permission).
    Unknown(std::io::Error),
}

/// Tries to connect to the socket at `path` without blocking (a live VMM
/// whose backlog is full must not hold us up).
fn probe(path: &Path) -> Probe {
    let c = match CString::new(path.as_os_str().as_bytes()) {
        Ok(c) => c,
        Err(e) => return Probe::Unknown(std::io::Error::other(e)),
    };
    // SAFETY: an all-zero sockaddr_un is a valid value; the path is copied into
    // it below only if it fits, leaving a terminating NUL.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = c.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Probe::Unknown(std::io::Error::other("path too long for a unix socket"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Probe::Unknown(std::io::Error::last_os_error());
    }
    // SAFETY: `addr` is an initialized sockaddr_un and its size is passed with it.
    let r = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    if r == 0 {
        return Probe::Live;
    }
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Probe::Refused,
        Some(libc::EAGAIN | libc::EINPROGRESS) => Probe::Live,
        _ => Probe::Unknown(err),
    }
}

/// The kind of a file that is not a socket, for the refusal.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device"
    }
}

/// Binds a listener at `tmp` whose file is never reachable by others.
fn bind_private(tmp: &Path) -> std::io::Result<UnixListener> {
    // The socket is created with the umask applied; tighten the umask around
    // the bind so that the socket is never reachable by others, even for an instant.
    // SAFETY: umask only changes this process's file mode creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(tmp);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary name on every early return.
struct Tmp<'a>(&'a Path);
impl Drop for Tmp<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Claims `path` for the API socket (see the module's doc): refuses, changing
/// nothing, unless it is absent or a provably stale socket.
pub fn bind(path: &Path) -> Result<ApiSocket, SocketError> {
    let io = |op: &'static str| move |source| SocketError::Io { path: path.to_path_buf(), op, source };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.file_name().is_none() || !parent.is_dir() {
        return Err(SocketError::NoDirectory(path.to_path_buf()));
    }
    let stale = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("inspect")(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(SocketError::NotASocket { path: path.to_path_buf(), kind: kind(m.file_type()) })
        }
        Ok(m) => match probe(path) {
            Probe::Refused => Some((m.dev(), m.ino())),
            Probe::Live => return Err(SocketError::InUse(path.to_path_buf())),
            Probe::Unknown(source) => return Err(SocketError::CannotTell { path: path.to_path_buf(), source }),
        },
    };
    let tmp = parent.join(format!(".cevm-api-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let listener = bind_private(&tmp).map_err(io("bind a temporary socket beside it"))?;
    let guard = Tmp(&tmp);
    let m = std::fs::symlink_metadata(&tmp).map_err(io("inspect the new socket"))?;
    let id = (m.dev(), m.ino());
    match stale {
        None => match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SocketError::CannotTell { path: path.to_path_buf(), source: e })
            }
            Err(e) => return Err(io("link")(e)),
        },
        Some(stale_id) => {
            snapshot::exchange(&tmp, path).map_err(io("replace the stale socket"))?;
            // What was at `path` is now at `tmp`: the stale socket, unless another
            // process put its own there since it was probed.
            let swapped = std::fs::symlink_metadata(&tmp).map(|m| (m.dev(), m.ino()));
            if swapped.ok() != Some(stale_id) {
                snapshot::exchange(&tmp, path).map_err(io("put back what was there"))?;
                // `tmp` is ours again: the guard removes it.
                return Err(SocketError::InUse(path.to_path_buf()));
            }
        }
    }
    // `tmp` now names the stale socket, or is a second name of ours: either goes.
    drop(guard);
    Ok(ApiSocket { path: path.to_path_buf(), id, listener: Some(listener) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cevm-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fresh_path_is_claimed_and_removed_at_the_end_leaving_nothing_else() {
        let d = dir("fresh");
        let p = d.join("api.sock");
        let s = bind(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "no temporary name is left");
        drop(s);
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn other_files_and_live_sockets_are_refused_and_kept() {
        let d = dir("refuse");
        let file = d.join("file");
        std::fs::write(&file, b"precious").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket { kind: "a regular file", .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        assert!(matches!(bind(&d), Err(SocketError::NotASocket { kind: "a directory", .. })));
        let link = d.join("link");
        std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
        assert!(matches!(bind(&link), Err(SocketError::NotASocket { kind: "a symbolic link", .. })));
        let live = d.join("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        assert!(matches!(bind(&live), Err(SocketError::InUse(_))));
        assert!(std::fs::symlink_metadata(&live).unwrap().file_type().is_socket());
        assert!(std::os::unix::net::UnixStream::connect(&live).is_ok(), "the live socket still answers");
        assert!(matches!(bind(&d.join("no/such/dir.sock")), Err(SocketError::NoDirectory(_))));
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 3, "nothing added");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_replaced_socket_is_not_removed() {
        let d = dir("stale");
        let p = d.join("api.sock");
        drop(UnixListener::bind(&p).unwrap());
        let s = bind(&p).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok(), "ours listens there now");
        // Another process's socket takes the name: ours must not remove it.
        std::fs::remove_file(&p).unwrap();
        let _other = UnixListener::bind(&p).unwrap();
        drop(s);
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_socket());
        let _ = std::fs::remove_dir_all(&d);
    }
}
