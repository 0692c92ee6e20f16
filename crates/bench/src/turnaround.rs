//! `cevm bench turnaround`: the seed's turnaround times, every term measured on
//! one job of fixed size.
//!
//! The job: the dirtier guest writes `work` pages at a set rate (time a pause
//! costs it is not made up, so every pause delays its end), in a working set,
//! after filling more of its memory with data. It runs under `cevm run`, as a
//! user runs it, with `n` checkpoints spread evenly over it, taken through the
//! API; and once without any (the baseline, `T_comp`). Runs of all strategies
//! are interleaved, so the machine's drift touches them alike.
//!
//! Per strategy, with `T_run` the job's own time (from the end of its fill to its
//! last page) and `T_vm` until every VMM process of it ended:
//! - the per-checkpoint cost to the job `(T_run - T_comp) / n`: the seed's
//!   `T_cpt` (stop-and-save), `T_mg` (live migration only), `T_cevm` (CEVM);
//! - `T_o`: how long the last checkpoint was still being written after the job
//!   ended (from the job's last page to the checkpoint's answer, or 0); so the
//!   turnaround `T_comp + n·T_x + T_o` holds by construction;
//! - each checkpoint's guest downtime as the VMM reports it, the job's worst
//!   second (pages written that second / the set rate), and the peak memory
//!   of all its VMM processes and their children (a cow checkpoint's writer)
//!   together (a page shared after a fork counts once).
//!
//! Placements (the seed's "scheduling possibilities"): `same` (everything on
//! CPU 0), `spread` (the guest on CPU 0, migration and writer on CPU 1), `none`
//! (the kernel decides, cevm's default).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stats::median_min_max;
use cevm::api::{CheckpointRequest, Client, MigrateRequest};
use checkpoint::Method;
use vmm::placement::CpuList;

/// Where the threads of a checkpoint run (the seed's "scheduling possibilities").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Everything on CPU 0: vCPU, migration, new instance's vCPU, writer.
    Same,
    /// The guest's vCPU stays on CPU 0 (old and new instance); the migration and
    /// the checkpoint writer run on CPU 1.
    Spread,
    /// Nothing placed: the kernel's scheduler decides (what cevm does unless told).
    None,
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "same" => Ok(Placement::Same),
            "spread" => Ok(Placement::Spread),
            "none" => Ok(Placement::None),
            _ => Err(format!("`{s}`: placements are same, spread, none")),
        }
    }
}

impl Placement {
    /// (vCPUs, migration thread, writer); None: anywhere.
    fn cpus(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Placement::Same => Some(("0", "0", "0")),
            Placement::Spread => Some(("0", "1", "1")),
            Placement::None => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Spread => "spread",
            Placement::None => "none",
        }
    }
}

pub struct Options {
    pub mem: u64,
    pub data_mib: u64,
    pub ws_mib: u64,
    pub rate: u64,
    pub seconds: u64,
    /// Checkpoints per job: one set of jobs per value.
    pub ns: Vec<usize>,
    pub strategies: Vec<Method>,
    pub placements: Vec<Placement>,
    pub runs: usize,
    pub dir: PathBuf,
    pub json: Option<PathBuf>,
    /// Print the tables of the runs saved in this JSON file (from --json) instead of running.
    pub report_from: Option<PathBuf>,
}

/// One run of the job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// None: the baseline.
    pub strategy: Option<Method>,
    pub placement: Placement,
    /// Checkpoints taken (0 for the baseline).
    #[serde(default)]
    pub n: usize,
    /// Which round of runs (each round has its own baseline).
    #[serde(default)]
    pub round: usize,
    /// The job's own time, seconds.
    pub t_run: f64,
    /// Until every VMM process ended, seconds.
    pub t_vm: f64,
    /// From the job's end to the last checkpoint's answer, if later, seconds.
    pub t_o: f64,
    /// Each checkpoint's guest downtime, ms.
    pub downtimes_ms: Vec<f64>,
    /// Each checkpoint's time from request to answer (committed), ms.
    pub request_ms: Vec<f64>,
    /// Pages written in each whole second of the job.
    pub per_second: Vec<u64>,
    /// Peak memory of the job's VMM processes and their children together
    /// (the VMMs' resident sets, and what the children do not share with
    /// them), MiB.
    pub peak_rss_mib: f64,
}

/// A `cevm` process of the job, its console lines going to one channel.
struct Vmm {
    child: Child,
}

fn spawn(args: &[String], lines: &Sender<(Instant, String)>, log: &Path) -> Result<Vmm, String> {
    let exe = crate::cevm_bin()?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    Ok(Vmm { child: cevm::child::spawn_piped(cmd, lines, log)? })
}

/// Samples the memory of `pids` and of their children (a cow checkpoint's
/// writer) together every 20 ms; keeps the peak (KiB). A VMM counts its
/// resident set (`VmRSS`, cheap to read); a child only what it does not share
/// with its VMM (`Private_*` of its smaps_rollup: after a fork the pages both
/// map are counted once, in the VMM). Reading a VMM's own smaps_rollup would
/// walk its page tables 50 times a second, which costs a CEVM checkpoint's
/// two instances of 4 KiB-mapped memory enough CPU to slow the job measured.
fn rss_sampler(pids: Arc<Mutex<Vec<u32>>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    fn field(text: &str, name: &str) -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
    std::thread::spawn(move || {
        let mut peak = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let vmms: Vec<u32> = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let own: u64 = vmms
                .iter()
                .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                .map(|s| field(&s, "VmRSS:"))
                .sum();
            let kids: u64 = vmms
                .iter()
                .flat_map(|&pid| children(pid))
                .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
                .map(|s| field(&s, "Private_Clean:") + field(&s, "Private_Dirty:"))
                .sum();
            peak = peak.max(own + kids);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// The child processes of `pid` (of any of its threads).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

const T: Duration = Duration::from_secs(600);

/// Waits for a console line for which `pred` holds; returns when it was read.
fn wait_for(
    lines: &Receiver<(Instant, String)>,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> Result<Instant, String> {
    loop {
        let (at, l) = lines.recv_timeout(T).map_err(|_| "the guest did not print what was expected in time")?;
        let hit = pred(&l);
        seen.push(l);
        if hit {
            return Ok(at);
        }
    }
}

/// Takes every line printed so far into `seen`, without waiting.
fn drain(lines: &Receiver<(Instant, String)>, seen: &mut Vec<String>) {
    while let Ok((_, l)) = lines.try_recv() {
        seen.push(l);
    }
}

/// One run of the job: its VMM processes (the first runs the guest, each
/// `cevm-process` checkpoint adds the one it moves to) and what starting and
/// driving them needs.
struct Job<'a> {
    o: &'a Options,
    tag: &'a str,
    /// Where the VMM processes' output goes.
    log: PathBuf,
    /// The console lines of every VMM process of the job.
    lines_tx: Sender<(Instant, String)>,
    /// The CLI's flag placing the vCPUs (empty: anywhere).
    vcpu_flag: Vec<String>,
    /// The API's CPU lists for the vCPUs, the migration thread and the
    /// checkpoint writer (None: anywhere).
    vcpu_cpus: Option<CpuList>,
    migration_cpus: Option<CpuList>,
    writer_cpus: Option<CpuList>,
    vmms: Vec<Vmm>,
    /// The VMM processes' ids, for the resident-memory sampler.
    pids: Arc<Mutex<Vec<u32>>>,
}

impl Job<'_> {
    /// The API socket of the `k`-th VMM process (0: the first).
    fn sock(&self, k: usize) -> PathBuf {
        self.o.dir.join(format!("api-{}-{k}.sock", self.tag))
    }

    /// Starts a VMM process of the job with `args`.
    fn spawn(&mut self, args: &[String]) -> Result<(), String> {
        let v = spawn(args, &self.lines_tx, &self.log)?;
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).push(v.child.id());
        self.vmms.push(v);
        Ok(())
    }

    /// The request that takes checkpoint `k` by method `s`, a checkpoint or a
    /// migration; for `cevm-process`, after starting the process it moves to.
    fn request(&mut self, s: Method, k: usize) -> Result<(Option<CheckpointRequest>, Option<MigrateRequest>), String> {
        let out = self.o.dir.join(format!("ckpt-{}", self.tag));
        Ok(match s {
            Method::MigrateThread => (
                None,
                Some(MigrateRequest {
                    migration_cpus: self.migration_cpus.clone(),
                    dest_vcpu_cpus: self.vcpu_cpus.clone(),
                    ..MigrateRequest::new("local")
                }),
            ),
            Method::CevmThread => (
                Some(CheckpointRequest {
                    migration_cpus: self.migration_cpus.clone(),
                    dest_vcpu_cpus: self.vcpu_cpus.clone(),
                    writer_cpus: self.writer_cpus.clone(),
                    ..CheckpointRequest::new(out, "cevm")
                }),
                None,
            ),
            Method::CevmProcess => {
                let inc = self.o.dir.join(format!("in-{}-{k}.sock", self.tag));
                let to = format!("unix:{}", inc.display());
                let a: Vec<String> = ["run", "--incoming", &to, "--api-sock"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([self.sock(k).to_string_lossy().into_owned()])
                    .chain(self.vcpu_flag.iter().cloned())
                    .collect();
                self.spawn(&a)?;
                let deadline = Instant::now() + T;
                while !inc.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let req = CheckpointRequest {
                    to: Some(to),
                    migration_cpus: self.migration_cpus.clone(),
                    writer_cpus: self.writer_cpus.clone(),
                    ..CheckpointRequest::new(out, "cevm")
                };
                (Some(req), None)
            }
            Method::Cow => (
                Some(CheckpointRequest { writer_cpus: self.writer_cpus.clone(), ..CheckpointRequest::new(out, "cow") }),
                None,
            ),
            _ => (CheckpointRequest::of_method(s, out, None), MigrateRequest::of_method(s, "local")),
        })
    }

    /// Takes checkpoint `k` of `n` by method `s` through the API at `api_sock`;
    /// returns the guest's pause: the checkpoint's, or the migration's downtime.
    fn checkpoint(
        &mut self,
        (s, k, n): (Method, usize, usize),
        api_sock: &Path,
        lines: &Receiver<(Instant, String)>,
        seen: &mut Vec<String>,
    ) -> Result<f64, String> {
        let (ckpt, migration) = self.request(s, k)?;
        let api = Client::new(api_sock, T);
        let downtime = match (ckpt, migration) {
            (Some(c), _) => api.checkpoint(&c).map(|r| r.pause_ms),
            (None, Some(m)) => api.migrate(&m).map(|r| r.downtime_ms),
            (None, None) => unreachable!("a method writes a checkpoint or migrates"),
        };
        downtime.map_err(|e| {
            drain(lines, seen);
            // A job that ends during a checkpoint is a plan that does
            // not fit, not a failing VMM: say which.
            let ended = seen.iter().any(|l| l.starts_with("dirtier: done"));
            format!(
                "{s} checkpoint {k}: {e}{}",
                if ended {
                    format!(
                        " (the {} s job ended during this checkpoint: {n} checkpoints do not fit in it; \
                         give it more --seconds or a smaller --n)",
                        self.o.seconds
                    )
                } else {
                    String::new()
                }
            )
        })
    }

    /// Waits for the guest to fill its memory, takes `n` checkpoints of
    /// `strategy` spread evenly over the job, waits for the job's end and for
    /// every VMM process to exit, and returns the run's times (its peak
    /// resident memory is the caller's to add).
    fn measure(
        &mut self,
        (strategy, n): (Option<Method>, usize),
        placement: Placement,
        lines: &Receiver<(Instant, String)>,
        seen: &mut Vec<String>,
    ) -> Result<Run, String> {
        let o = self.o;
        let t_fill = wait_for(lines, seen, |l| l.starts_with("dirtier: filled"))?;
        let (mut downtimes, mut request_ms) = (Vec::new(), Vec::new());
        let mut last_answer = t_fill;
        let mut api_sock = self.sock(0);
        if let Some(s) = strategy {
            let period = Duration::from_secs_f64(o.seconds as f64 / (n + 1) as f64);
            for k in 1..=n {
                let due = t_fill + period * k as u32;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let t = Instant::now();
                let downtime = self.checkpoint((s, k, n), &api_sock, lines, seen)?;
                last_answer = Instant::now();
                request_ms.push((last_answer - t).as_secs_f64() * 1e3);
                downtimes.push(downtime);
                if s == Method::CevmProcess {
                    api_sock = self.sock(k);
                }
            }
        }
        let t_done = wait_for(lines, seen, |l| l.starts_with("dirtier: done"))?;
        for v in &mut self.vmms {
            let st = v.child.wait().map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("a cevm process of the job ended with {st}; see {}", self.log.display()));
            }
        }
        let t_end = Instant::now();
        drain(lines, seen);
        let per_second = seen
            .iter()
            .filter_map(|l| l.strip_prefix("dirtier: t=")?.split("pages/s=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        Ok(Run {
            strategy,
            placement,
            n: if strategy.is_some() { n } else { 0 },
            round: 0,
            t_run: (t_done - t_fill).as_secs_f64(),
            t_vm: (t_end - t_fill).as_secs_f64(),
            t_o: last_answer.saturating_duration_since(t_done).as_secs_f64(),
            downtimes_ms: downtimes,
            request_ms,
            per_second,
            peak_rss_mib: 0.0,
        })
    }
}

/// Runs the job once, with `n` checkpoints of `strategy` (None: none).
fn run_once(
    o: &Options,
    (strategy, n): (Option<Method>, usize),
    placement: Placement,
    tag: &str,
) -> Result<Run, String> {
    let cpus = placement.cpus();
    // The API takes CPU lists (none: anywhere); the CLI a flag.
    let cpu = |pick: fn((&'static str, &'static str, &'static str)) -> &'static str| {
        cpus.map(|c| pick(c).parse::<CpuList>().expect("a placement names CPUs"))
    };
    let (tx, lines) = mpsc::channel();
    let mut job = Job {
        o,
        tag,
        log: o.dir.join("turnaround-vmm.log"),
        lines_tx: tx,
        vcpu_flag: cpus.map(|c| vec!["--vcpu-cpus".to_string(), c.0.to_string()]).unwrap_or_default(),
        vcpu_cpus: cpu(|c| c.0),
        migration_cpus: cpu(|c| c.1),
        writer_cpus: cpu(|c| c.2),
        vmms: Vec::new(),
        pids: Arc::new(Mutex::new(Vec::new())),
    };
    let work = o.rate * o.seconds;
    let args: Vec<String> = [
        "run",
        "--guest",
        "dirtier",
        "--guest-args",
        &format!("mib={} rate={} work={work} data={}", o.ws_mib, o.rate, o.data_mib),
        "--mem",
        &format!("{}M", o.mem >> 20),
        "--api-sock",
        &job.sock(0).to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(job.vcpu_flag.iter().cloned())
    .collect();
    job.spawn(&args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(job.pids.clone(), stop.clone());
    let mut seen = Vec::new();
    let result = job.measure((strategy, n), placement, &lines, &mut seen);
    stop.store(true, Ordering::Relaxed);
    let peak_kib = sampler.join().unwrap_or(0);
    for v in &mut job.vmms {
        let _ = v.child.kill();
        let _ = v.child.wait();
    }
    let _ = std::fs::remove_dir_all(o.dir.join(format!("ckpt-{tag}")));
    let mut run = result?;
    run.peak_rss_mib = peak_kib as f64 / 1024.0;
    Ok(run)
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

pub fn run(o: &Options) -> Result<(), String> {
    if let Some(p) = &o.report_from {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let runs: Vec<Run> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        return report(o, &runs);
    }
    let runs = measure(o)?;
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&runs).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    report(o, &runs)
}

/// Runs every case `o.runs` times, interleaved: per round, the baseline, then
/// every n, placement and strategy.
pub fn measure(o: &Options) -> Result<Vec<Run>, String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let work = o.rate * o.seconds;
    println!(
        "turnaround benchmark: the dirtier, {} MiB guest, {} MiB of data, writing {} pages/s over a {} MiB working set, {work} pages ({} s) per job; n = {:?} checkpoints spread evenly; {} runs of each case, interleaved",
        o.mem >> 20,
        o.data_mib,
        o.rate,
        o.ws_mib,
        o.seconds,
        o.ns,
        o.runs
    );
    let mut runs: Vec<Run> = Vec::new();
    for r in 0..o.runs {
        let mut b = run_once(o, (None, 0), Placement::Same, &format!("base-{r}"))?;
        b.round = r;
        println!("  run {}: baseline: job {:.3} s", r + 1, b.t_run);
        runs.push(b);
        for &n in &o.ns {
            for &p in &o.placements {
                for &s in &o.strategies {
                    let mut x = run_once(o, (Some(s), n), p, &format!("{s}-{}-{n}-{r}", p.name()))?;
                    x.round = r;
                    println!(
                        "  run {}: {s} ({}), n={n}: job {:.3} s, VMMs ended {:.3} s, downtimes {:?} ms, requests {:?} ms, peak memory {:.0} MiB",
                        r + 1,
                        p.name(),
                        x.t_run,
                        x.t_vm,
                        x.downtimes_ms.iter().map(|d| (d * 100.0).round() / 100.0).collect::<Vec<_>>(),
                        x.request_ms.iter().map(|d| d.round()).collect::<Vec<_>>(),
                        x.peak_rss_mib
                    );
                    runs.push(x);
                }
            }
        }
    }
    Ok(runs)
}

/// The tables: per run index, each strategy against that run's own baseline.
fn report(o: &Options, runs: &[Run]) -> Result<(), String> {
    let base: Vec<&Run> = runs.iter().filter(|r| r.strategy.is_none()).collect();
    let t_comp: Vec<f64> = base.iter().map(|r| r.t_run).collect();
    let (tc, tc_min, tc_max) = median_min_max(&t_comp);
    println!();
    println!(
        "T_comp (no checkpoint): {tc:.3} s ({tc_min:.3}-{tc_max:.3}); the job alone: {:.3} s at the set rate",
        o.seconds
    );
    println!();
    println!("| strategy | placement | n | per-checkpoint cost to the job, ms (T_cpt / T_mg / T_cevm) | T_o ms | cost + T_o/n ms | guest downtime per checkpoint ms | request to answer ms | worst second, % of rate | peak memory MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut ns: Vec<usize> = runs.iter().filter(|r| r.strategy.is_some()).map(|r| r.n).collect();
    ns.sort_unstable();
    ns.dedup();
    // Per case, medians: cost + T_o/n, cost, request to answer, downtime.
    let mut summary: Vec<(Method, Placement, usize, [f64; 4])> = Vec::new();
    for &nn in &ns {
        let n = nn as f64;
        for &p in &o.placements {
            for &s in &o.strategies {
                let mine: Vec<(usize, &Run)> = runs
                    .iter()
                    .filter(|r| r.strategy == Some(s) && r.placement == p && r.n == nn)
                    .map(|r| (r.round, r))
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let cost: Vec<f64> = mine
                    .iter()
                    .map(|(i, r)| ms(r.t_run - base.iter().find(|b| b.round == *i).unwrap_or(&base[0]).t_run) / n)
                    .collect();
                let t_o: Vec<f64> = mine.iter().map(|(_, r)| ms(r.t_o)).collect();
                let total: Vec<f64> = cost.iter().zip(&t_o).map(|(c, t)| c + t / n).collect();
                let downs: Vec<f64> = mine.iter().flat_map(|(_, r)| r.downtimes_ms.clone()).collect();
                let reqs: Vec<f64> = mine.iter().flat_map(|(_, r)| r.request_ms.clone()).collect();
                let worst: Vec<f64> = mine
                    .iter()
                    .map(|(_, r)| r.per_second.iter().copied().min().unwrap_or(0) as f64 / o.rate as f64 * 100.0)
                    .collect();
                let rss: Vec<f64> = mine.iter().map(|(_, r)| r.peak_rss_mib).collect();
                let f = |v: &[f64], prec: usize| {
                    let (m, a, b) = median_min_max(v);
                    format!("{m:.prec$} ({a:.prec$}-{b:.prec$})")
                };
                println!(
                    "| {s} | {} | {nn} | {} | {} | {} | {} | {} | {} | {} |",
                    p.name(),
                    f(&cost, 1),
                    f(&t_o, 1),
                    f(&total, 1),
                    f(&downs, 2),
                    f(&reqs, 0),
                    f(&worst, 1),
                    f(&rss, 0)
                );
                let med = |v: &[f64]| median_min_max(v).0;
                summary.push((s, p, nn, [med(&total), med(&cost), med(&reqs), med(&downs)]));
            }
        }
    }
    println!("(medians over {} runs, min-max in parentheses; cost = (job time - that run's T_comp) / n; T_o = how long the last checkpoint was still being written after the job ended; downtime as each VMM reports it; stop-and-save runs in the VMM's control thread, so placement does not apply to it; the job's pacing absorbs a pause shorter than 1 ms, so costs below about 1 ms per checkpoint read as 0: compare those by their downtime)", o.runs);
    for &nn in &ns {
        for &p in &o.placements {
            let case = |s: Method| summary.iter().find(|x| x.0 == s && x.1 == p && x.2 == nn).map(|x| x.3);
            let get = |s: Method| case(s).map(|m| m[0]);
            if let Some([_, cost, req, down]) = case(Method::Cow) {
                // While the writer writes (request to answer, less the pause),
                // the job loses `cost` of its time.
                let writing = (req - down).max(1e-9);
                let kept = (1.0 - (cost - down).max(0.0) / writing) * 100.0;
                let vs = case(Method::StopAndSave).map_or("n/a (no stop-and-save runs)".into(), |m| {
                    format!("{:.2}x stop-and-save's {:.0} ms", req / m[2], m[2])
                });
                println!(
                    "{}, n={nn}: cow: pause {down:.2} ms ({:.2} ms per GiB of guest); the guest kept {kept:.0} % of its progress while the checkpoint was written ({:.0} ms); durable after {req:.0} ms, {vs}",
                    p.name(),
                    down / (o.mem as f64 / (1u64 << 30) as f64),
                    req - down
                );
            }
            if let (Some(mg), Some(cpt)) = (get(Method::MigrateThread), get(Method::StopAndSave)) {
                for s in [Method::CevmThread, Method::CevmProcess] {
                    if let Some(c) = get(s) {
                        let holds = mg <= c && c <= cpt;
                        let ratio = if mg > 0.0 { format!("{:.2}", c / mg) } else { "n/a (T_mg <= 0)".into() };
                        println!(
                        "{}, n={nn}: T_mg {mg:.1} <= T_cevm + T_o/n {c:.1} ({s}) <= T_cpt {cpt:.1} ms: {}; (T_cevm + T_o/n) / T_mg = {ratio}; T_cevm + T_o/n - T_mg = {:.1} ms",
                        p.name(),
                        if holds { "holds" } else { "does not hold" },
                        c - mg
                    );
                    }
                }
            }
        }
    }
    Ok(())
}
