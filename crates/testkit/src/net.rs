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

/// "Hosts" on this machine: each a network namespace of its own with a
/// bridge holding a tap for a guest (`t0`) and one end of a veth, whose other
/// end is on a bridge of the test's namespace. One Ethernet joins the guests
/// of every host, as a cluster's network does; each host has an address on
/// it (its bridge's), and the test's namespace has `.254`, from which a
/// coordinator reaches them. Removed when dropped.
pub struct Hosts {
    pub hosts: Vec<Host>,
    /// The test namespace's side: removed after the hosts.
    _bridge: Bridge,
}

/// One of [`Hosts`].
pub struct Host {
    /// Its network namespace (`ip netns exec NS ...` runs a command there).
    pub ns: String,
    /// Its address on the hosts' network.
    pub addr: String,
}

impl Hosts {
    /// `count` hosts on a subnet of their own (10.X.Y.0/24, X.Y from this
    /// process and a counter, so that tests running at once never share one).
    pub fn new(count: usize) -> Hosts {
        static N: AtomicU32 = AtomicU32::new(0);
        let bridge = Bridge::new();
        let n = std::process::id() * 4 + N.fetch_add(1, Ordering::SeqCst) % 4;
        let net = format!("10.{}.{}", 100 + (n >> 8) % 150, n % 256);
        ip(&["addr", "add", &format!("{net}.254/24"), "dev", &bridge.name]);
        let hosts = (0..count)
            .map(|i| {
                let ns = format!("{}h{i}", bridge.name);
                let (outer, inner) = (format!("{ns}v"), "v0".to_string());
                ip(&["netns", "add", &ns]);
                ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns]);
                quiet(&outer);
                ip(&["link", "set", &outer, "master", &bridge.name, "up"]);
                let inside = |args: &[&str]| ip(&[&["-n", ns.as_str()], args].concat());
                inside(&["link", "set", "lo", "up"]);
                inside(&["link", "add", "b0", "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
                inside(&["link", "set", &inner, "master", "b0", "up"]);
                inside(&["tuntap", "add", "dev", "t0", "mode", "tap"]);
                inside(&["link", "set", "t0", "master", "b0", "up"]);
                let addr = format!("{net}.{}", i + 1);
                inside(&["addr", "add", &format!("{addr}/24"), "dev", "b0"]);
                inside(&["link", "set", "b0", "up"]);
                for dev in ["b0", "t0", inner.as_str()] {
                    let _ = Command::new("ip")
                        .args(["netns", "exec", &ns, "sysctl", "-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")])
                        .output();
                }
                Host { ns, addr }
            })
            .collect();
        Hosts { hosts, _bridge: bridge }
    }
}

impl Host {
    /// A command that runs `program` in this host's namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // A namespace's interfaces go with it, the veth's outer end too.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
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
