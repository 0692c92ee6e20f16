//! `cevm bench group`: group checkpoints against the number of members, on
//! the direct path.
//!
//! A ring of built-in `netring` guests (each in its own `cevm run`, with a NIC
//! on a tap of one host bridge) passes its token for the whole measurement.
//! For `n` members the ring has `max(n, 2)` guests (a ring needs two) and the
//! group is its first `n`. Per strategy, `runs` group checkpoints are taken
//! with `cevm group checkpoint`, as a user's batch script takes them, and
//! its report read: the group pause (from the first stop asked to the last
//! member running again), each member's own stop (its save, or its switch),
//! the coordination's own cost (the group pause less the slowest member's own
//! stop), and the whole group checkpoint's time. Next to them, a single VM's
//! checkpoint by the same strategy (`PUT /v1/checkpoint` to member m0 alone).
//! The strategies are interleaved, so the machine's drift touches them alike.
//!
//! With `--load idle` the members are idle guests instead (each halted for
//! good after writing its memory once, still with its NIC on the bridge):
//! the coordination's cost without the ring's busy guests competing with
//! it for the host's cores.
//!
//! The seed's turnaround per group: every member of a tightly coupled job
//! waits for the group pause, so a job of `T_comp` with `k` group checkpoints
//! takes `T_comp + k·T_pause + T_o`, `T_o` being what the last one still
//! writes after the job ended (at most its total time less its pause).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cevm::api::{CheckpointRequest, Client};
use cevm::group::take::GroupReport;
use cevm_testkit::net::Bridge;
use serde::{Deserialize, Serialize};

use crate::stats::median_min_max;

/// What `cevm bench group` measures.
#[derive(clap::Args)]
pub struct Options {
    /// Member counts, comma-separated (1 to 8).
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    pub members: Vec<usize>,
    /// Strategies, comma-separated.
    #[arg(long, default_value = "stop-and-save,cevm", value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// Group checkpoints per member count and strategy (medians are reported).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Directory for checkpoints and sockets.
    #[arg(long, default_value = "bench-work/group")]
    pub dir: PathBuf,
    /// Write every sample as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also measure the turnaround of a ring job with this many group
    /// checkpoints spread over it, by each strategy (0: not).
    #[arg(long, default_value_t = 0)]
    pub turnaround: usize,
    /// Members of the turnaround's ring (2 to 8).
    #[arg(long, default_value_t = 2)]
    pub turnaround_members: usize,
    /// Runs of the turnaround's job per strategy.
    #[arg(long, default_value_t = 3)]
    pub turnaround_runs: usize,
    /// What the members do while checkpointed: pass a token around a ring
    /// (busy guests, as a tightly coupled job), or nothing (halted guests).
    #[arg(long, value_enum, default_value_t = Load::Ring)]
    pub load: Load,
}

/// What the members of `cevm bench group` do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// `netring` guests passing their token around the ring.
    #[default]
    Ring,
    /// `dirtier` guests that write their memory once, then halt for good.
    Idle,
}

/// One group checkpoint (or, with `members` 0, one single VM's checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub members: usize,
    /// What the members did (samples written before it was asked: a ring).
    #[serde(default)]
    pub load: Load,
    pub strategy: String,
    pub group_pause_ms: f64,
    pub slowest_member_stop_ms: f64,
    pub coordination_ms: f64,
    pub total_ms: f64,
    /// The single VM's checkpoint of member m0, by the same strategy, taken
    /// right after (its `pause_ms`).
    pub single_pause_ms: f64,
}

/// One `netring` guest of a ring.
pub(crate) struct Guest {
    pub id: usize,
    pub count: usize,
    pub hops: u64,
    /// MiB of data it hashes its token through.
    pub mib: u64,
    /// Its memory (`--mem`).
    pub mem: &'static str,
}

/// Starts `guest` in a `cevm run` of its own on `tap`, serving its API at
/// `sock` (a stale socket there is removed first), its console discarded.
pub(crate) fn spawn_netring(cevm: &Path, guest: Guest, tap: &str, sock: &Path) -> Result<std::process::Child, String> {
    let Guest { id, count, hops, mib, mem } = guest;
    let args = format!("id={id} count={count} hops={hops} mib={mib} work=100");
    spawn_member(cevm, ["netring", mem, &args], id, tap, sock)
}

/// Starts an idle member: a `dirtier` guest that writes its MiB once and
/// halts, in a `cevm run` of its own with a NIC on `tap`, serving its API at `sock`.
fn spawn_idle(cevm: &Path, id: usize, tap: &str, sock: &Path) -> Result<std::process::Child, String> {
    spawn_member(cevm, ["dirtier", "32M", "mib=1 fill=1 idle=1"], id, tap, sock)
}

/// Starts built-in guest `[name, mem, guest args]` as member `id`: a `cevm
/// run` of its own with a NIC on `tap` (MAC 52:54:00:ce:00:ID), serving its
/// API at `sock` (a stale socket there is removed first), its console discarded.
fn spawn_member(
    cevm: &Path,
    [guest, mem, args]: [&str; 3],
    id: usize,
    tap: &str,
    sock: &Path,
) -> Result<std::process::Child, String> {
    let _ = std::fs::remove_file(sock);
    Command::new(cevm)
        .args(["run", "--guest", guest, "--mem", mem, "--guest-args", args])
        .args(["--net", &format!("tap={tap},mac=52:54:00:ce:00:{id:02x}")])
        .arg("--api-sock")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cevm.display()))
}

/// A running ring of guests (`netring`, or idle ones) and its bridge.
struct Ring {
    vmms: Vec<std::process::Child>,
    socks: Vec<PathBuf>,
    /// Removed when dropped, after the VMMs (fields drop in order).
    bridge: Bridge,
}

impl Ring {
    fn start(cevm: &Path, dir: &Path, count: usize, load: Load) -> Result<Ring, String> {
        let mut ring = Ring { vmms: Vec::new(), socks: Vec::new(), bridge: Bridge::new() };
        for i in 0..count {
            let tap = ring.bridge.tap(i);
            let sock = dir.join(format!("m{i}.sock"));
            // Hops enough for the whole measurement; it is stopped before its end.
            let child = match load {
                Load::Ring => {
                    spawn_netring(cevm, Guest { id: i, count, hops: 100_000_000, mib: 1, mem: "32M" }, &tap, &sock)?
                }
                Load::Idle => spawn_idle(cevm, i, &tap, &sock)?,
            };
            ring.vmms.push(child);
            ring.socks.push(sock);
        }
        // Until every member runs, and the ring has passed its token a while.
        let t0 = Instant::now();
        for s in &ring.socks {
            while !Client::new(s, Duration::from_secs(5)).status().is_ok_and(|st| st.state == "running") {
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err(format!("{} never ran", s.display()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok(ring)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for c in &mut self.vmms {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `cevm group checkpoint` of the first `n` members of `ring` into `series`.
fn group_checkpoint(cevm: &Path, ring: &Ring, n: usize, strategy: &str, series: &Path) -> Result<GroupReport, String> {
    let mut c = Command::new(cevm);
    c.args(["group", "checkpoint", "--keep", "1", "--strategy", strategy, "--dir"]).arg(series);
    for (i, s) in ring.socks.iter().take(n).enumerate() {
        c.arg("--member").arg(format!("m{i}={}", s.display()));
    }
    let out = c.output().map_err(|e| format!("cannot run cevm group checkpoint: {e}"))?;
    if !out.status.success() {
        return Err(format!("cevm group checkpoint: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cevm group checkpoint's report: {e}"))
}

/// Runs the benchmark and prints its table (and writes the samples as JSON).
pub fn run(cevm: &Path, o: &Options) -> Result<(), String> {
    if o.members.iter().any(|n| !(1..=8).contains(n)) {
        return Err("--members: a ring has 1 to 8 members".into());
    }
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let dir = std::path::absolute(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let o = &Options { dir, members: o.members.clone(), strategies: o.strategies.clone(), json: o.json.clone(), ..*o };
    if o.turnaround > 0 && !(2..=8).contains(&o.turnaround_members) {
        return Err("--turnaround-members: a ring has 2 to 8 members".into());
    }
    let mut samples = Vec::new();
    for &n in o.members.iter().filter(|_| o.runs > 0) {
        let ring = Ring::start(cevm, &o.dir, n.max(2), o.load)?;
        for run in 0..o.runs {
            for strategy in &o.strategies {
                let series = o.dir.join(format!("group-{n}-{strategy}"));
                let g = group_checkpoint(cevm, &ring, n, strategy, &series)?;
                let single = Client::new(&ring.socks[0], Duration::from_secs(600))
                    .checkpoint(&CheckpointRequest::new(o.dir.join(format!("single-{strategy}")), strategy))
                    .map_err(|e| format!("single checkpoint of m0: {e}"))?;
                let slowest = g.member_stop_ms.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
                eprintln!(
                    "{n} members, {strategy}, run {run}: group pause {:.2} ms (slowest member {slowest:.2}, coordination {:.2}), total {:.0} ms; one VM alone {:.2} ms",
                    g.group_pause_ms, g.coordination_ms, g.total_ms, single.pause_ms
                );
                samples.push(Sample {
                    members: n,
                    load: o.load,
                    strategy: strategy.clone(),
                    group_pause_ms: g.group_pause_ms,
                    slowest_member_stop_ms: slowest,
                    coordination_ms: g.coordination_ms,
                    total_ms: g.total_ms,
                    single_pause_ms: single.pause_ms,
                });
            }
        }
        drop(ring);
    }
    if o.runs > 0 {
        print_table(o, &samples);
    }
    let turnaround = match o.turnaround {
        0 => Vec::new(),
        k => crate::group_turnaround::run(cevm, &o.dir, o.turnaround_members, k, &o.strategies, o.turnaround_runs)?,
    };
    let _ = std::fs::remove_dir_all(&o.dir);
    if let Some(p) = &o.json {
        let all = serde_json::json!({ "checkpoints": samples, "turnaround": turnaround });
        let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn cell(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = median_min_max(v);
    format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})")
}

fn print_table(o: &Options, samples: &[Sample]) {
    println!("| members | strategy | group pause ms | slowest member's own stop ms | coordination ms | group checkpoint total ms | one VM alone, pause ms |");
    println!("|---|---|---|---|---|---|---|");
    for &n in &o.members {
        for s in &o.strategies {
            let of = |f: fn(&Sample) -> f64| -> Vec<f64> {
                samples.iter().filter(|x| x.members == n && &x.strategy == s).map(f).collect()
            };
            println!(
                "| {n} | {s} | {} | {} | {} | {} | {} |",
                cell(&of(|x| x.group_pause_ms), 2),
                cell(&of(|x| x.slowest_member_stop_ms), 2),
                cell(&of(|x| x.coordination_ms), 2),
                cell(&of(|x| x.total_ms), 0),
                cell(&of(|x| x.single_pause_ms), 2),
            );
        }
    }
    let med = |n: usize, s: &str| {
        let v: Vec<f64> =
            samples.iter().filter(|x| x.members == n && x.strategy == s).map(|x| x.group_pause_ms).collect();
        median_min_max(&v).0
    };
    if o.members.contains(&2) && o.members.contains(&8) {
        for s in &o.strategies {
            println!("{s}: the group pause grows {:+.1} % from 2 to 8 members", (med(8, s) / med(2, s) - 1.0) * 100.0);
        }
    }
    println!(
        "(medians of {} runs, min-max in parentheses; built-in guests of 32 MiB, {}, on the direct path; coordination = group pause - the slowest member's own stop; turnaround of a job with k group checkpoints: T_comp + k x group pause + T_o)",
        o.runs,
        match o.load {
            Load::Ring => "netring passing its token around the ring",
            Load::Idle => "idle (halted after writing 1 MiB)",
        }
    );
}
