//! Host networks for the tests: a Linux bridge with taps on it, made with
//! `ip` (the tests run as root, as CI does) and removed when dropped. Names are
//! short (an interface name has at most 15 characters) and unique per test
//! process and network, so tests running at once never share a bridge.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A bridge and its taps.
pub struct Bridge {
    pub name: String,
    taps: Vec<String>,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("`ip` (package iproute2)");
    assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

/// Turns off IPv6 on an interface, so that the host sends no router
/// solicitations or neighbour discovery onto the test network.
fn quiet(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
}

impl Bridge {
    /// A new bridge, up, with no taps yet.
    pub fn new() -> Bridge {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("cvb{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::SeqCst));
        ip(&["link", "add", &name, "type", "bridge"]);
        quiet(&name);
        // Forward frames at once (no STP learning delay) and never age entries out mid-test.
        ip(&["link", "set", &name, "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
        ip(&["link", "set", &name, "up"]);
        Bridge { name, taps: Vec::new() }
    }

    /// Adds tap number `i` (named after the bridge) to the bridge, up, and returns its name.
    pub fn tap(&mut self, i: usize) -> String {
        let tap = format!("{}t{i}", self.name);
        assert!(tap.len() < 16, "tap name {tap} too long");
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        quiet(&tap);
        ip(&["link", "set", &tap, "master", &self.name]);
        ip(&["link", "set", &tap, "up"]);
        self.taps.push(tap.clone());
        tap
    }
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge::new()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for t in &self.taps {
            let _ = Command::new("ip").args(["link", "del", t]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.name]).output();
    }
}

/// The process that serves the unix socket `sock` (its listener's creator, by
/// `SO_PEERCRED`): how a test finds a VMM it did not start itself (one a
/// `cevm group restore` started) to SIGKILL it.
pub fn server_pid(sock: &std::path::Path) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one `ucred` into `cred`, whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// The hop `netring: hop J/H` of a console line names (behind any prefix,
/// such as a group restore's `NAME: `).
pub fn netring_hop(line: &str) -> Option<u64> {
    let rest = &line[line.find("netring: hop ")? + "netring: hop ".len()..];
    rest.split('/').next()?.parse().ok()
}

/// The digest `netring: digest=D` of a console line names (behind any prefix).
pub fn netring_digest(line: &str) -> Option<&str> {
    Some(line[line.find("netring: digest=")? + "netring: digest=".len()..].trim())
}
