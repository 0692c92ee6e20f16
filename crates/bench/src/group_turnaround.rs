//! `cevm bench group --turnaround K`: the seed's turnaround of a job of
//! several VMs, measured. The job is a ring of built-in `netring` guests
//! passing a token for a fixed number of hops (each hop a fixed amount of
//! work, every guest waiting for its predecessor's token: a tightly coupled
//! job, stopped as a whole by any member's pause), each guest holding 16 MiB
//! of data in 64 MiB. It runs without checkpoints
//! (`T_comp`), and with K group checkpoints spread evenly over it by each
//! strategy, taken by `cevm group checkpoint` as a batch script would; the
//! runs are interleaved, so the machine's drift touches them alike.
//!
//! Per strategy: `T_run`, from starting the members' VMMs to the last one's
//! end; the per-checkpoint cost to the job `(T_run - T_comp) / K`; `T_o`, how
//! long the last group checkpoint still took to commit after the job ended
//! (0 if it committed before); the turnaround `T_run + T_o`; and, next to it,
//! the seed's prediction `T_comp + K·pause + T_o` from the group pauses the
//! checkpoints reported.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cevm::group::take::GroupReport;
use cevm_testkit::net::Bridge;
use serde::{Deserialize, Serialize};

use crate::group::{spawn_netring, Guest};
use crate::stats::median_min_max;

/// MiB of data each guest hashes its token through (and a checkpoint saves).
const MIB: u64 = 16;
/// Hops of the job (about 15 s here).
const HOPS: u64 = 2500;

/// One run of the job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub members: usize,
    /// `none` (the baseline) or the group checkpoints' strategy.
    pub strategy: String,
    /// Group checkpoints committed during the run.
    pub checkpoints: usize,
    pub t_run_s: f64,
    pub t_o_s: f64,
    /// Each group checkpoint's group pause, as reported.
    pub pauses_ms: Vec<f64>,
}

/// Starts a ring of `n` netring guests of `hops` hops on `bridge`.
fn start(cevm: &Path, dir: &Path, bridge: &mut Bridge, n: usize, hops: u64) -> Result<Vec<Child>, String> {
    (0..n)
        .map(|i| {
            let guest = Guest { id: i, count: n, hops, mib: MIB, mem: "64M" };
            spawn_netring(cevm, guest, &bridge.tap(i), &dir.join(format!("t{i}.sock")))
        })
        .collect()
}

/// One run: the job with `k` group checkpoints by `strategy` at `at` after
/// its start (none for the baseline).
fn job(cevm: &Path, dir: &Path, n: usize, hops: u64, strategy: Option<&str>, at: &[Duration]) -> Result<Run, String> {
    let mut bridge = Bridge::new();
    let t0 = Instant::now();
    let mut vmms = start(cevm, dir, &mut bridge, n, hops)?;
    let series = dir.join("turnaround-series");
    let _ = std::fs::remove_dir_all(&series);
    let socks: Vec<String> = (0..n).map(|i| format!("m{i}={}", dir.join(format!("t{i}.sock")).display())).collect();
    // The checkpoints, from a thread of their own, each at its moment.
    let taker = strategy.map(|s| {
        let (cevm, series, socks, at, s) =
            (cevm.to_path_buf(), series.clone(), socks.clone(), at.to_vec(), s.to_string());
        std::thread::spawn(move || {
            let mut done: Vec<(GroupReport, Instant)> = Vec::new();
            for when in at {
                std::thread::sleep((t0 + when).saturating_duration_since(Instant::now()));
                let mut c = Command::new(&cevm);
                c.args(["group", "checkpoint", "--keep", "1", "--strategy", &s, "--dir"]).arg(&series);
                for m in &socks {
                    c.arg("--member").arg(m);
                }
                let Ok(out) = c.stderr(Stdio::null()).output() else { continue };
                if let (true, Ok(r)) = (out.status.success(), serde_json::from_slice::<GroupReport>(&out.stdout)) {
                    done.push((r, Instant::now()));
                }
            }
            done
        })
    });
    let mut end = t0;
    for i in 0..vmms.len() {
        let failed = match vmms[i].wait() {
            Ok(st) if st.success() => None,
            Ok(st) => Some(format!("a member of the job ended with {st}")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            vmms.iter_mut().for_each(|v| drop(v.kill()));
            return Err(e);
        }
        end = end.max(Instant::now());
    }
    let done = taker.map(|t| t.join().unwrap_or_default()).unwrap_or_default();
    let last_commit = done.last().map_or(end, |(_, at)| *at);
    Ok(Run {
        members: n,
        strategy: strategy.unwrap_or("none").into(),
        checkpoints: done.len(),
        t_run_s: (end - t0).as_secs_f64(),
        t_o_s: last_commit.saturating_duration_since(end).as_secs_f64(),
        pauses_ms: done.iter().map(|(r, _)| r.group_pause_ms).collect(),
    })
}

/// Runs the job `runs` times per strategy (and without checkpoints), with
/// `k` group checkpoints spread over it; prints the table, returns the runs.
pub fn run(
    cevm: &Path,
    dir: &Path,
    n: usize,
    k: usize,
    strategies: &[String],
    runs: usize,
) -> Result<Vec<Run>, String> {
    let hops = HOPS;
    // How long the job takes alone, to spread the checkpoints over it.
    let first = job(cevm, dir, n, hops, None, &[])?;
    let span = Duration::from_secs_f64(first.t_run_s);
    let at: Vec<Duration> = (1..=k).map(|i| span * i as u32 / (k as u32 + 1)).collect();
    eprintln!("turnaround: the job of {n} members alone takes {:.2} s; {k} group checkpoints at {at:?}", first.t_run_s);
    let mut out = vec![first];
    for r in 0..runs {
        if r > 0 {
            out.push(job(cevm, dir, n, hops, None, &[])?);
        }
        for s in strategies {
            let j = job(cevm, dir, n, hops, Some(s), &at)?;
            eprintln!(
                "turnaround, {s}, run {r}: {} checkpoints, T_run {:.2} s, T_o {:.3} s",
                j.checkpoints, j.t_run_s, j.t_o_s
            );
            out.push(j);
        }
    }
    print_table(&out, k, strategies);
    Ok(out)
}

fn print_table(runs: &[Run], k: usize, strategies: &[String]) {
    let med = |v: Vec<f64>| median_min_max(&v);
    let of = |s: &str| runs.iter().filter(|r| r.strategy == s).collect::<Vec<_>>();
    let (t_comp, lo, hi) = med(of("none").iter().map(|r| r.t_run_s).collect());
    let n = runs.first().map_or(0, |r| r.members);
    println!("\nTurnaround of a ring job of {n} members with {k} group checkpoints (medians, min-max):\n");
    println!("| strategy | checkpoints done | T_run s | cost per checkpoint ms | T_o s | turnaround s | T_comp + k x group pause + T_o s |");
    println!("|---|---|---|---|---|---|---|");
    println!("| none | 0 | {t_comp:.2} ({lo:.2}-{hi:.2}) | | | {t_comp:.2} | |");
    for s in strategies {
        let rs = of(s);
        let (t_run, lo, hi) = med(rs.iter().map(|r| r.t_run_s).collect());
        let cost = med(rs.iter().map(|r| (r.t_run_s - t_comp) / r.checkpoints.max(1) as f64 * 1e3).collect()).0;
        let t_o = med(rs.iter().map(|r| r.t_o_s).collect()).0;
        let turn = med(rs.iter().map(|r| r.t_run_s + r.t_o_s).collect()).0;
        let pause = med(rs.iter().flat_map(|r| r.pauses_ms.iter().copied()).collect()).0;
        let done = med(rs.iter().map(|r| r.checkpoints as f64).collect()).0;
        let model = t_comp + done * pause / 1e3 + t_o;
        println!("| {s} | {done:.0} | {t_run:.2} ({lo:.2}-{hi:.2}) | {cost:.1} | {t_o:.3} | {turn:.2} | {model:.2} |");
    }
}
