//! `cevm bench net-linux`: two Linux guests on a bridge of taps. Two parts:
//!
//! - **Throughput and latency**: guest-to-guest TCP throughput and ping round
//!   trip between a sender and a receiver, each VMM's virtio-net in turn on the
//!   same taps, kernel, initramfs and command line: cevm's (an I/O thread in
//!   the VMM), QEMU's userspace virtio-net (`vhost=off`) and, when the host
//!   has `/dev/vhost-net`, QEMU's vhost-net (the kernel moves the packets).
//!   QEMU runs its `microvm` machine, whose virtio devices are virtio-mmio
//!   described in ACPI as cevm's are, so the guest kernel drives both the same
//!   way. The runs of the VMMs alternate, so noise on a shared machine falls
//!   on all of them alike.
//! - **Downtime under network load** (cevm): a thread-based and a
//!   process-based migration and a CEVM checkpoint of a guest with no NIC, of
//!   one with an idle NIC, and of a sender streaming TCP as fast as it goes,
//!   each VMM's own downtime figure; and for the streaming sender the longest
//!   gap the receiver saw in the stream around each operation (on the
//!   receiver's clock: what a peer of the moved guest lives through).
//!
//! The load is `cevm-stream blast` and `sink` (guest-linux/stream.c: an iperf
//! of our own that computes nothing per byte). The benchmark makes its own
//! bridge and taps (root, iproute2 or busybox's tunctl and brctl) and removes
//! them at the end; where /dev/kvm cannot run Linux (this project's machines)
//! run it in the nested harness: scripts/nested/scenarios/bench-net.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::qemu::{self, Qemu};
use crate::stats::median_min_max;
use cevm::api::{CheckpointRequest, Client, MigrateRequest};
use cevm::child::{spawn_piped, Stamped};

/// What `cevm bench net-linux` measures.
#[derive(clap::Args)]
pub struct Options {
    /// Linux kernel (bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs built by scripts/nested/guest-initrd.sh (it has cevm-stream).
    #[arg(long)]
    pub initrd: PathBuf,
    /// Memory of each guest.
    #[arg(long, default_value = "256M", value_parser = cevm::size::parse_size)]
    pub mem: u64,
    /// QEMU binary to compare with (e.g. qemu-system-x86_64).
    #[arg(long)]
    pub qemu: Option<String>,
    /// Throughput runs per VMM, each on a fresh pair of guests (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// MiB each throughput run streams.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_mib: u64,
    /// Pings per throughput run, 0.2 s apart.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub pings: u32,
    /// Downtime part: operations per method and guest (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub ops: u32,
    /// The VMMs whose throughput is measured, comma-separated (default: cevm,
    /// and with --qemu qemu-userspace and, if /dev/vhost-net exists, qemu-vhost).
    #[arg(long, value_delimiter = ',')]
    pub vmms: Vec<Vmm>,
    /// What to measure, comma-separated: throughput (with the round trip), downtime.
    #[arg(long, default_value = "throughput,downtime", value_delimiter = ',')]
    pub parts: Vec<Part>,
    /// Directory for sockets, checkpoints and the VMMs' messages.
    #[arg(long, default_value = "bench-work")]
    pub dir: PathBuf,
    /// Also write every sample as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The two parts of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Throughput,
    Downtime,
}

/// The bridge and its taps (names unlikely to be a host's own).
const BRIDGE: &str = "cevmbr0";
const RX_TAP: &str = "cevmb0";
const TX_TAPS: [&str; 2] = ["cevmb1", "cevmb2"];
const RX_MAC: &str = "52:54:00:be:00:01";
const TX_MAC: &str = "52:54:00:be:00:02";
const RX_IP: &str = "10.0.99.1";
const TX_IP: &str = "10.0.99.2";
const PORT: u16 = 5001;
/// Booting, pinging and streaming under nested virtualization is slow.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// A VMM's virtio-net.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    Cevm,
    QemuUserspace,
    QemuVhost,
}

impl Vmm {
    fn label(self) -> &'static str {
        match self {
            Vmm::Cevm => "cevm virtio-net (I/O thread)",
            Vmm::QemuUserspace => "QEMU virtio-net, userspace (vhost=off)",
            Vmm::QemuVhost => "QEMU virtio-net, vhost-net (vhost=on)",
        }
    }
}

fn sh(script: &str) -> Result<(), String> {
    let out = Command::new("sh").arg("-c").arg(script).output().map_err(|e| format!("cannot run sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A bridge with taps on it, all up, IPv6 off (a quiet link); removed on drop.
struct Bridge {
    made: Vec<String>,
}

impl Bridge {
    fn create() -> Result<Bridge, String> {
        let quiet =
            |dev: &str| format!("{{ echo 1 > /proc/sys/net/ipv6/conf/{dev}/disable_ipv6; }} 2> /dev/null; true");
        sh(&format!("ip link add {BRIDGE} type bridge && ip link set {BRIDGE} up && {}", quiet(BRIDGE)))
            .map_err(|e| format!("cannot make bridge {BRIDGE} (is it left from an earlier run?): {e}"))?;
        let mut b = Bridge { made: vec![BRIDGE.to_string()] };
        for tap in std::iter::once(RX_TAP).chain(TX_TAPS) {
            sh(&format!(
                "if command -v tunctl > /dev/null; then tunctl -t {tap} > /dev/null; else ip tuntap add dev {tap} mode tap; fi"
            ))?;
            b.made.push(tap.to_string());
            sh(&format!(
                "{} && if command -v brctl > /dev/null; then brctl addif {BRIDGE} {tap}; else ip link set {tap} master {BRIDGE}; fi && ip link set {tap} up",
                quiet(tap)
            ))?;
        }
        Ok(b)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for dev in self.made.iter().rev() {
            let _ = sh(&format!("ip link del {dev}"));
        }
    }
}

/// A guest's VMM process: a `cevm run`, or a QEMU.
enum Process {
    Cevm(Child),
    Qemu(Qemu),
}

/// A running guest, its console lines stamped when they arrived.
struct Guest {
    name: &'static str,
    procs: Vec<Process>,
    lines: Receiver<Stamped>,
    tx: Sender<Stamped>,
    seen: Vec<Stamped>,
    log: PathBuf,
}

impl Guest {
    /// Waits for a console line for which `pred` holds.
    fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> Result<Stamped, String> {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l.1) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    let tail: Vec<&str> = self.seen.iter().rev().take(20).rev().map(|l| l.1.as_str()).collect();
                    return Err(format!(
                        "the {} guest did not print {what} within {GUEST_TIMEOUT:?}; its last lines:\n{}\n(its VMM's messages: {})",
                        self.name,
                        tail.join("\n"),
                        self.log.display()
                    ));
                }
            }
        }
    }

    /// Every line that has arrived so far.
    fn drain(&mut self) -> &[Stamped] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for p in self.procs.drain(..) {
            match p {
                Process::Cevm(mut c) => {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                Process::Qemu(q) => q.kill(),
            }
        }
    }
}

fn cmdline(args: &str) -> String {
    format!("console=ttyS0 reboot=acpi panic=-1 pci=off quiet {args}")
}

/// Starts a guest under `vmm`; on `nic` (tap, MAC) if given; with an API
/// socket at `api` (cevm only).
fn start(
    vmm: Vmm,
    o: &Options,
    name: &'static str,
    nic: Option<(&str, &str)>,
    api: Option<&Path>,
    args: &str,
) -> Result<Guest, String> {
    let (tx, lines) = mpsc::channel();
    let log = o.dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let cmdline = cmdline(args);
    let proc = match vmm {
        Vmm::Cevm => {
            let mut cmd = Command::new(crate::cevm_bin()?);
            cmd.arg("run").arg("--kernel").arg(&o.kernel).arg("--initrd").arg(&o.initrd);
            cmd.args(["--mem", &format!("{}M", o.mem >> 20), "--vcpus", "1", "--cmdline", &cmdline]);
            if let Some((tap, mac)) = nic {
                cmd.args(["--net", &format!("tap={tap},mac={mac}")]);
            }
            if let Some(sock) = api {
                cmd.arg("--api-sock").arg(sock);
            }
            Process::Cevm(spawn_piped(cmd, &tx, &log)?)
        }
        Vmm::QemuUserspace | Vmm::QemuVhost => {
            let bin = o.qemu.as_deref().ok_or("no QEMU to compare with")?;
            let mut extra: Vec<String> = vec!["-M".into(), "microvm".into()];
            if let Some((tap, mac)) = nic {
                let vhost = if vmm == Vmm::QemuVhost { "on" } else { "off" };
                extra.extend([
                    "-netdev".into(),
                    format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost={vhost}"),
                    "-device".into(),
                    format!("virtio-net-device,netdev=n0,mac={mac}"),
                ]);
            }
            let guest = qemu::Guest {
                kernel: &o.kernel,
                initrd: &o.initrd,
                cmdline: &cmdline,
                mem_mib: o.mem >> 20,
                vcpus: 1,
                extra: &extra,
            };
            Process::Qemu(Qemu::start(bin, &guest, qemu::Console::Lines(tx.clone()), None, &o.dir, &log)?)
        }
    };
    Ok(Guest { name, procs: vec![proc], lines, tx, seen: Vec::new(), log })
}

/// One throughput run.
#[derive(Clone, Debug, Serialize)]
struct Throughput {
    vmm: Vmm,
    mib_per_s: f64,
    rtt_avg_ms: f64,
    rtt_min_ms: f64,
    rtt_max_ms: f64,
    pings_lost: u32,
    /// The receiver's longest wait between two reads.
    longest_stall_ms: f64,
    /// Frames the host kernel dropped at the two taps (both ways) from the
    /// guests' start to the stream's end: e.g. a tap's queue full while its
    /// VMM did not read (TCP resends them, after a wait).
    taps_dropped: u64,
}

/// Frames the host dropped at `tap` so far, both ways (its statistics).
fn tap_drops(tap: &str) -> u64 {
    ["tx_dropped", "rx_dropped"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}")).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// "cevm-guest: sink BYTES bytes in MS ms, X MiB/s, longest stall Y ms" -> (X, Y).
fn parse_sink(line: &str) -> Option<(f64, f64)> {
    let rest = line.split("cevm-guest: sink ").nth(1)?;
    let rate = rest.split(", ").nth(1)?.strip_suffix(" MiB/s")?.parse().ok()?;
    let stall = rest.split("longest stall ").nth(1)?.strip_suffix(" ms")?.parse().ok()?;
    Some((rate, stall))
}

/// busybox ping's summary: "N packets transmitted, M packets received, ...
/// round-trip min/avg/max = a/b/c ms" -> (min, avg, max, lost).
fn parse_rtt(line: &str) -> Option<(f64, f64, f64, u32)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let count = |what: &str| {
        words.windows(3).find(|w| w[1] == "packets" && w[2].starts_with(what)).and_then(|w| w[0].parse::<u32>().ok())
    };
    let (sent, got) = (count("transmitted")?, count("received")?);
    let v: Vec<f64> =
        line.split("= ").nth(1)?.split_whitespace().next()?.split('/').filter_map(|x| x.parse().ok()).collect();
    (v.len() == 3).then(|| (v[0], v[1], v[2], sent.saturating_sub(got)))
}

fn throughput_run(vmm: Vmm, o: &Options) -> Result<Throughput, String> {
    let (rx_sock, tx_sock) = (o.dir.join("rx.sock"), o.dir.join("tx.sock"));
    let cevm = vmm == Vmm::Cevm;
    let drops = || tap_drops(RX_TAP) + tap_drops(TX_TAPS[0]);
    let drops_before = drops();
    let mut rx = start(
        vmm,
        o,
        "receiver",
        Some((RX_TAP, RX_MAC)),
        cevm.then_some(rx_sock.as_path()),
        &format!("cevm.test=net-sink cevm.ip={RX_IP}/24 cevm.port={PORT}"),
    )?;
    let mut tx = start(
        vmm,
        o,
        "sender",
        Some((TX_TAPS[0], TX_MAC)),
        cevm.then_some(tx_sock.as_path()),
        &format!(
            "cevm.test=net-blast cevm.ip={TX_IP}/24 cevm.peer={RX_IP} cevm.port={PORT} cevm.bytes={} cevm.rounds={}",
            o.stream_mib << 20,
            o.pings
        ),
    )?;
    let (_, rtt) = tx.wait("its ping summary", |l| l.contains("cevm-guest: rtt "))?;
    let (min, avg, max, lost) = parse_rtt(&rtt).ok_or_else(|| format!("no round trip in `{rtt}`"))?;
    let (_, sink) = rx.wait("the stream's end", |l| l.contains("cevm-guest: sink ") || l.contains("reset"))?;
    let (mib_per_s, stall) = parse_sink(&sink).ok_or_else(|| format!("the stream did not end well: `{sink}`"))?;
    let taps_dropped = drops().saturating_sub(drops_before);
    // Where in the stream the receiver waited ("stall MS ms at N MiB").
    let stalls: Vec<&str> =
        rx.seen.iter().filter_map(|(_, l)| l.split("cevm-guest: stall ").nth(1)).map(str::trim).collect();
    if !stalls.is_empty() {
        println!("    receiver's waits over 20 ms: {}", stalls.join(", "));
    }
    if vmm == Vmm::Cevm {
        // What each NIC moved and lost, from cevm's status.
        for (who, sock) in [("sender", &tx_sock), ("receiver", &rx_sock)] {
            let nic = Client::new(sock, Duration::from_secs(30)).status().ok().and_then(|s| s.nics.into_iter().next());
            if let Some(c) = nic {
                println!(
                    "    {who}'s NIC: tx {} frames {} MiB, rx {} frames {} MiB, {} dropped",
                    c.tx_frames,
                    c.tx_bytes >> 20,
                    c.rx_frames,
                    c.rx_bytes >> 20,
                    c.dropped
                );
            }
        }
    }
    Ok(Throughput {
        vmm,
        mib_per_s,
        rtt_avg_ms: avg,
        rtt_min_ms: min,
        rtt_max_ms: max,
        pings_lost: lost,
        longest_stall_ms: stall,
        taps_dropped,
    })
}

/// A guest in the downtime part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Case {
    /// No NIC, idle.
    NoNic,
    /// A NIC, idle.
    IdleNic,
    /// A NIC, streaming to a peer as fast as TCP goes.
    Streaming,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::NoNic => "no NIC, idle",
            Case::IdleNic => "NIC, idle",
            Case::Streaming => "NIC, streaming TCP",
        }
    }
}

/// An operation of the downtime part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Op {
    MigrateThread,
    MigrateProcess,
    CevmCheckpoint,
}

impl Op {
    const ALL: [Op; 3] = [Op::MigrateThread, Op::MigrateProcess, Op::CevmCheckpoint];
    fn label(self) -> &'static str {
        match self {
            Op::MigrateThread => "migration (thread)",
            Op::MigrateProcess => "migration (process, onto another tap)",
            Op::CevmCheckpoint => "CEVM checkpoint (thread)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Downtime {
    case: Case,
    op: Op,
    /// cevm's own figure: the migration's downtime, the checkpoint's pause.
    downtime_ms: f64,
    /// Migrations: the source's part of the switch after the vCPUs stopped
    /// (last pages, state, releasing the taps) and the destination's restore
    /// (devices made and loaded, taps bound, vCPUs started).
    source_switch_ms: Option<f64>,
    dest_restore_ms: Option<f64>,
    /// Streaming only: the receiver's longest wait for the stream from the
    /// operation's start to 2 s after its end.
    stream_gap_ms: Option<f64>,
}

/// "cevm-guest: stall MS ms at N MiB" -> MS.
fn parse_stall(line: &str) -> Option<f64> {
    line.split("cevm-guest: stall ").nth(1)?.split(" ms").next()?.parse().ok()
}

/// The moved guest of the downtime part: where it runs now.
struct Moved {
    guest: Guest,
    sock: PathBuf,
    tap: usize,
    moves: usize,
}

/// The downtime, and for a migration the source's switch and the destination's restore.
type OpTimes = (f64, Option<f64>, Option<f64>);

fn of_migration(r: &migrate::Report) -> OpTimes {
    (r.downtime_ms, Some(r.switch.last_pages_ms + r.switch.state_ms), Some(r.dest_restore_ms))
}

fn one_op(o: &Options, case: Case, op: Op, m: &mut Moved) -> Result<OpTimes, String> {
    let client = Client::new(&m.sock, Duration::from_secs(900));
    match op {
        Op::MigrateThread => {
            let r = client.migrate(&MigrateRequest::new("local")).map_err(|e| format!("migration: {e}"))?;
            Ok(of_migration(&r))
        }
        Op::MigrateProcess => {
            m.moves += 1;
            let dst = o.dir.join(format!("dst-{}.sock", m.moves));
            let api = o.dir.join(format!("api-{}.sock", m.moves));
            let _ = std::fs::remove_file(&dst);
            let mut cmd = Command::new(crate::cevm_bin()?);
            cmd.arg("run").arg("--incoming").arg(format!("unix:{}", dst.display())).arg("--api-sock").arg(&api);
            let other = 1 - m.tap;
            if case != Case::NoNic {
                cmd.args(["--net", &format!("tap={}", TX_TAPS[other])]);
            }
            let child = spawn_piped(cmd, &m.guest.tx, &m.guest.log)?;
            m.guest.procs.push(Process::Cevm(child));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !dst.exists() {
                if Instant::now() > deadline {
                    return Err(format!("the destination did not listen at {} within 60 s", dst.display()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let r = client
                .migrate(&MigrateRequest::new(&format!("unix:{}", dst.display())))
                .map_err(|e| format!("process-based migration: {e}"))?;
            m.sock = api;
            m.tap = other;
            Ok(of_migration(&r))
        }
        Op::CevmCheckpoint => {
            let out = o.dir.join("ckpt");
            let r = client
                .checkpoint(&CheckpointRequest::new(out.clone(), "cevm"))
                .map_err(|e| format!("CEVM checkpoint: {e}"))?;
            let _ = std::fs::remove_dir_all(&out);
            Ok((r.pause_ms, None, None))
        }
    }
}

fn downtime_case(o: &Options, case: Case, rows: &mut Vec<Downtime>) -> Result<(), String> {
    let sock = o.dir.join("api-0.sock");
    let _ = std::fs::remove_file(&sock);
    let (mut rx, guest) = match case {
        Case::NoNic => (None, start(Vmm::Cevm, o, "moved", None, Some(&sock), "cevm.test=idle")?),
        Case::IdleNic => (
            None,
            start(
                Vmm::Cevm,
                o,
                "moved",
                Some((TX_TAPS[0], TX_MAC)),
                Some(&sock),
                &format!("cevm.test=idle cevm.ip={TX_IP}/24"),
            )?,
        ),
        Case::Streaming => {
            let rx = start(
                Vmm::Cevm,
                o,
                "receiver",
                Some((RX_TAP, RX_MAC)),
                None,
                &format!("cevm.test=net-sink cevm.ip={RX_IP}/24 cevm.port={PORT}"),
            )?;
            let tx = start(
                Vmm::Cevm,
                o,
                "moved",
                Some((TX_TAPS[0], TX_MAC)),
                Some(&sock),
                &format!(
                "cevm.test=net-blast cevm.ip={TX_IP}/24 cevm.peer={RX_IP} cevm.port={PORT} cevm.bytes=0 cevm.rounds=1"
            ),
            )?;
            (Some(rx), tx)
        }
    };
    let mut m = Moved { guest, sock, tap: 0, moves: 0 };
    match rx.as_mut() {
        Some(rx) => drop(rx.wait("the stream's start", |l| l.contains("connection from"))?),
        None => drop(m.guest.wait("its idle line", |l| l.contains("cevm-guest: idle"))?),
    }
    std::thread::sleep(Duration::from_secs(2));
    for op in Op::ALL {
        for n in 0..o.ops {
            std::thread::sleep(Duration::from_millis(1500));
            let t0 = Instant::now();
            let (downtime_ms, source_switch_ms, dest_restore_ms) = one_op(o, case, op, &mut m)?;
            let gap = match rx.as_mut() {
                Some(rx) => {
                    let until = Instant::now() + Duration::from_secs(2);
                    std::thread::sleep(Duration::from_secs(2));
                    let stalls = rx.drain().iter().filter(|(t, _)| *t >= t0 && *t <= until);
                    Some(stalls.filter_map(|(_, l)| parse_stall(l)).fold(0.0, f64::max))
                }
                None => None,
            };
            println!(
                "  {} / {} {}: downtime {downtime_ms:.2} ms{}{}",
                case.label(),
                op.label(),
                n + 1,
                match (source_switch_ms, dest_restore_ms) {
                    (Some(s), Some(d)) => format!(" (source's switch {s:.2}, destination's restore {d:.2})"),
                    _ => String::new(),
                },
                gap.map(|g| format!(", receiver's longest wait for the stream {g:.0} ms")).unwrap_or_default()
            );
            rows.push(Downtime { case, op, downtime_ms, source_switch_ms, dest_restore_ms, stream_gap_ms: gap });
        }
    }
    if let Some(rx) = rx.as_mut() {
        if let Some((_, l)) = rx.drain().iter().find(|(_, l)| l.contains("reset") || l.contains("net-sink exit")) {
            return Err(format!("the stream broke during the operations: `{l}`"));
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct Results {
    mem_mib: u64,
    stream_mib: u64,
    pings: u32,
    qemu: Option<String>,
    vhost_net: bool,
    throughput: Vec<Throughput>,
    downtime: Vec<Downtime>,
}

pub fn run(o: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let _bridge = Bridge::create()?;
    let vhost = Path::new("/dev/vhost-net").exists();
    let mut vmms = o.vmms.clone();
    if let Some(bin) = &o.qemu {
        println!("QEMU: {}", qemu::version(bin)?);
    }
    if vmms.is_empty() {
        vmms.push(Vmm::Cevm);
        if o.qemu.is_some() {
            vmms.push(Vmm::QemuUserspace);
            if vhost {
                vmms.push(Vmm::QemuVhost);
            } else {
                println!("vhost-net: not measured (this host has no /dev/vhost-net: load vhost_net)");
            }
        }
    }
    if vmms.iter().any(|&v| v != Vmm::Cevm) && o.qemu.is_none() {
        return Err("QEMU's virtio-net is measured with --qemu BIN".into());
    }
    if vmms.contains(&Vmm::QemuVhost) && !vhost {
        return Err("qemu-vhost needs /dev/vhost-net (load vhost_net)".into());
    }
    println!(
        "Two Linux guests on a bridge of taps, {} MiB, 1 vCPU each; {} runs per VMM of {} pings and a {} MiB TCP stream",
        o.mem >> 20,
        o.runs,
        o.pings,
        o.stream_mib
    );
    let mut r = Results {
        mem_mib: o.mem >> 20,
        stream_mib: o.stream_mib,
        pings: o.pings,
        qemu: o.qemu.as_deref().map(qemu::version).transpose()?,
        vhost_net: vmms.contains(&Vmm::QemuVhost),
        throughput: vec![],
        downtime: vec![],
    };
    let throughput_runs = if o.parts.contains(&Part::Throughput) { o.runs } else { 0 };
    for n in 0..throughput_runs {
        for &vmm in &vmms {
            let t = throughput_run(vmm, o)?;
            println!(
                "  run {} {}: {:.2} MiB/s, ping {:.3} ms ({:.3}-{:.3}, {} lost), receiver's longest stall {:.0} ms, {} frames dropped at the taps",
                n + 1,
                vmm.label(),
                t.mib_per_s,
                t.rtt_avg_ms,
                t.rtt_min_ms,
                t.rtt_max_ms,
                t.pings_lost,
                t.longest_stall_ms,
                t.taps_dropped
            );
            r.throughput.push(t);
        }
    }
    if o.parts.contains(&Part::Downtime) {
        println!("Downtime under network load (cevm): {} operations per method and case", o.ops);
        for case in [Case::NoNic, Case::IdleNic, Case::Streaming] {
            downtime_case(o, case, &mut r.downtime)?;
        }
    }
    print_tables(&r, &vmms);
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn print_tables(r: &Results, vmms: &[Vmm]) {
    if !r.throughput.is_empty() {
        throughput_table(r, vmms);
    }
    if !r.downtime.is_empty() {
        downtime_table(r);
    }
    println!("(medians, min-max in parentheses)");
}

fn throughput_table(r: &Results, vmms: &[Vmm]) {
    let of = |vmm: Vmm, f: fn(&Throughput) -> f64| -> Vec<f64> {
        r.throughput.iter().filter(|t| t.vmm == vmm).map(f).collect()
    };
    println!();
    println!("| VMM | TCP throughput MiB/s | ping round trip ms (avg) | receiver's longest stall ms |");
    println!("|---|---|---|---|");
    for &vmm in vmms {
        let (t, tmin, tmax) = median_min_max(&of(vmm, |t| t.mib_per_s));
        let (p, pmin, pmax) = median_min_max(&of(vmm, |t| t.rtt_avg_ms));
        let (s, _, _) = median_min_max(&of(vmm, |t| t.longest_stall_ms));
        println!("| {} | {t:.1} ({tmin:.1}-{tmax:.1}) | {p:.3} ({pmin:.3}-{pmax:.3}) | {s:.0} |", vmm.label());
    }
    if !vmms.contains(&Vmm::Cevm) {
        return;
    }
    let cevm_t = median_min_max(&of(Vmm::Cevm, |t| t.mib_per_s)).0;
    let cevm_p = median_min_max(&of(Vmm::Cevm, |t| t.rtt_avg_ms)).0;
    for &vmm in vmms.iter().filter(|&&v| v != Vmm::Cevm) {
        println!(
            "cevm / {}: throughput {:.2}x, round trip {:.2}x",
            vmm.label(),
            cevm_t / median_min_max(&of(vmm, |t| t.mib_per_s)).0.max(1e-9),
            cevm_p / median_min_max(&of(vmm, |t| t.rtt_avg_ms)).0.max(1e-9)
        );
    }
}

fn downtime_table(r: &Results) {
    println!();
    println!("| guest | operation | cevm's downtime ms | receiver's longest wait for the stream ms |");
    println!("|---|---|---|---|");
    let rows = |case: Case, op: Op| r.downtime.iter().filter(move |d| d.case == case && d.op == op);
    for case in [Case::NoNic, Case::IdleNic, Case::Streaming] {
        for op in Op::ALL {
            let d: Vec<f64> = rows(case, op).map(|d| d.downtime_ms).collect();
            let g: Vec<f64> = rows(case, op).filter_map(|d| d.stream_gap_ms).collect();
            let (dm, dmin, dmax) = median_min_max(&d);
            let gap = if g.is_empty() {
                "-".to_string()
            } else {
                let (gm, gmin, gmax) = median_min_max(&g);
                format!("{gm:.0} ({gmin:.0}-{gmax:.0})")
            };
            println!("| {} | {} | {dm:.2} ({dmin:.2}-{dmax:.2}) | {gap} |", case.label(), op.label());
        }
    }
    for op in Op::ALL {
        let med = |case| median_min_max(&rows(case, op).map(|d| d.downtime_ms).collect::<Vec<_>>()).0;
        let base = med(Case::NoNic).max(1e-9);
        println!(
            "{}: downtime with an idle NIC / without a NIC {:.2}x, streaming / without a NIC {:.2}x",
            op.label(),
            med(Case::IdleNic) / base,
            med(Case::Streaming) / base
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guests_summaries() {
        let rtt = "cevm-guest: rtt 20 packets transmitted, 19 packets received, 5% packet loss round-trip min/avg/max = 0.412/0.733/2.105 ms ";
        assert_eq!(parse_rtt(rtt), Some((0.412, 0.733, 2.105, 1)));
        let sink = "cevm-guest: sink 67108864 bytes in 5320 ms, 12.03 MiB/s, longest stall 41 ms";
        assert_eq!(parse_sink(sink), Some((12.03, 41.0)));
        assert_eq!(parse_stall("cevm-guest: stall 87 ms at 113 MiB"), Some(87.0));
        assert_eq!(parse_sink("cevm-guest: sink reset after 5 bytes (x)"), None);
    }
}
