//! `cevm bench migrate`: live migration of a guest whose whole memory holds data,
//! idle or dirtying at set rates, thread-based and process-based; downtime, total
//! time, bytes and rounds, median of several runs.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use checkpoint::Method;
use serde::Serialize;
use vmm::{Boot, Instance, InstanceConfig, MemoryBackend};

use crate::guest::{start_guest, wait_line};
use crate::stats::median_min_max;

/// How fast the guest dirties its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rate {
    /// Memory filled with data, then the vCPU halts.
    Idle,
    /// This many pages per second, one write per page, across the whole memory.
    PagesPerS(u64),
    /// As fast as the vCPU writes.
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Rate::Idle),
            "max" => Ok(Rate::Max),
            n => n
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .map(Rate::PagesPerS)
                .ok_or_else(|| format!("`{s}`: a rate is idle, max or pages per second (a positive number)")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Idle => write!(f, "idle"),
            Rate::PagesPerS(n) => write!(f, "{n} pages/s"),
            Rate::Max => write!(f, "max"),
        }
    }
}

/// A migration method of `--modes`: `thread` (a new instance in this process)
/// or `process` (a `cevm run --incoming` process, over a unix socket).
pub fn parse_mode(s: &str) -> Result<Method, String> {
    match s {
        "thread" => Ok(Method::MigrateThread),
        "process" => Ok(Method::MigrateProcess),
        _ => Err(format!("`{s}`: modes are thread, process")),
    }
}

/// `thread` or `process`, as `--modes` says it.
pub fn mode_name(m: Method) -> &'static str {
    if m.process_based() {
        "process"
    } else {
        "thread"
    }
}

/// What `cevm bench migrate` measures.
pub struct Options {
    pub sizes: Vec<u64>,
    pub rates: Vec<Rate>,
    pub modes: Vec<Method>,
    pub runs: usize,
    pub params: migrate::Params,
    /// Where guest memory lives (the destination's memory too).
    pub backend: MemoryBackend,
    pub dir: PathBuf,
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Case {
    mem_size: u64,
    rate: Rate,
    mode: Method,
    /// What the dirtier reported in the second before the first migration.
    measured_pages_per_s: u64,
    reports: Vec<migrate::Report>,
}

/// Migrates `inst` once to a fresh destination of `mode`, then drops the
/// destination and lets `inst` run on, so that every run starts from the same
/// running guest.
pub(super) fn migrate_once(
    inst: &mut Instance,
    mode: Method,
    params: &migrate::Params,
    dir: &Path,
    n: usize,
) -> Result<migrate::Report, String> {
    let progress = Mutex::new(migrate::Progress::default());
    let report = match mode {
        Method::MigrateThread => {
            let (ev_tx, _events) = mpsc::channel();
            let console = Box::new(std::io::sink());
            let done = migrate::migrate_local(inst, params, &progress, console, ev_tx, &[])
                .map_err(|e| format!("thread-based migration: {e}"))?;
            drop(done.instance);
            done.report
        }
        _ => {
            let sock = dir.join(format!("dst-{}-{n}.sock", std::process::id()));
            let to = format!("unix:{}", sock.display());
            let exe = crate::cevm_bin()?;
            let mut child = std::process::Command::new(exe)
                .args(["run", "--incoming", &to])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start the destination process: {e}"))?;
            let r = (|| {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !sock.exists() {
                    if Instant::now() > deadline {
                        return Err("the destination process did not listen within 30 s".to_string());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let endpoint: migrate::Endpoint = to.parse()?;
                let mut t = endpoint.connect().map_err(|e| e.to_string())?;
                migrate::migrate_out(inst, t.as_mut(), params, &progress).map_err(|e| format!("migration to {to}: {e}"))
            })();
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&sock);
            r?
        }
    };
    // The benchmark's own choice: the source, frozen at the switch, runs on (the
    // destination's copy is gone), so the next run migrates the same guest.
    inst.resume().map_err(|e| e.to_string())?;
    Ok(report)
}

pub fn run(o: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    println!(
        "migration benchmark: {} runs per case, max downtime {} ms (pages), auto-converge {}",
        o.runs,
        o.params.max_downtime_ms,
        if o.params.auto_converge { "on" } else { "off" }
    );
    println!(
        "guest: the dirtier on 1 vCPU; every page of memory but the guest's own 8 MiB written before the first run"
    );
    let mut cases = Vec::new();
    for &mem in &o.sizes {
        let ws_mib = (mem >> 20).saturating_sub(8);
        for &rate in &o.rates {
            let args = match rate {
                Rate::Idle => format!("mib={ws_mib} idle=1"),
                Rate::PagesPerS(r) => format!("mib={ws_mib} fill=1 rate={r} seconds=0"),
                Rate::Max => format!("mib={ws_mib} fill=1 rate=0 seconds=0"),
            };
            let config = InstanceConfig {
                boot: Boot::Builtin { guest: "dirtier".into(), args },
                mem_size: mem,
                vcpus: 1,
                memory_backend: o.backend,
                disk: None,
                nics: vec![],
            };
            let (mut inst, lines) = start_guest(config)?;
            wait_line(&lines, Duration::from_secs(600), |l| l.starts_with("dirtier: filled"))?;
            let mut measured = 0;
            if rate != Rate::Idle {
                // A whole second at the set rate, to migrate a guest in its steady state.
                let l = wait_line(&lines, Duration::from_secs(30), |l| l.starts_with("dirtier: t="))?;
                let l = wait_line(&lines, Duration::from_secs(30), |l| l.starts_with("dirtier: t=")).unwrap_or(l);
                measured = l.split("pages/s=").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap_or(0);
            }
            for &mode in &o.modes {
                let mut reports = Vec::new();
                for n in 0..o.runs {
                    std::thread::sleep(Duration::from_millis(300));
                    let r = migrate_once(&mut inst, mode, &o.params, &o.dir, n)?;
                    println!(
                        "  {:>5} MiB {:>13} {:>7} run {}: downtime {:.2} ms, round trip {:.2} (pause {:.2}, last pages {:.2}, state {:.2}, destination decode {:.2} + restore {:.2}), total {:.0} ms, {:.0} MiB, {} rounds, throttle {} %",
                        mem >> 20,
                        rate.to_string(),
                        mode_name(mode),
                        n + 1,
                        r.downtime_ms,
                        r.switch_round_trip_ms,
                        r.switch.pause_ms,
                        r.switch.last_pages_ms,
                        r.switch.state_ms,
                        r.dest_state_decode_ms,
                        r.dest_restore_ms,
                        r.total_ms,
                        r.bytes_sent as f64 / (1 << 20) as f64,
                        r.rounds,
                        r.max_throttle_pct
                    );
                    reports.push(r);
                }
                cases.push(Case { mem_size: mem, rate, mode, measured_pages_per_s: measured, reports });
            }
            inst.shutdown();
            // Whatever the guest printed meanwhile is of no more use.
            while lines.try_recv().is_ok() {}
        }
    }

    print_table(&cases, o.runs);
    // The copy's speed against this host's own memcpy, measured now.
    let memcpy = memcpy_mib_s();
    for c in cases.iter().filter(|c| c.rate == Rate::Idle) {
        let v: Vec<f64> =
            c.reports.iter().map(|r| r.bytes_sent as f64 / (1 << 20) as f64 / (r.total_ms / 1e3).max(1e-9)).collect();
        let (m, a, b) = median_min_max(&v);
        println!(
            "{} MiB idle {} ({:?} memory): the pre-copy moved {m:.0} MiB/s ({a:.0}-{b:.0}), {:.1} % of this host's memcpy ({memcpy:.0} MiB/s, prefaulted, median of 5)",
            c.mem_size >> 20,
            mode_name(c.mode),
            o.backend,
            m / memcpy * 100.0
        );
    }
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&cases).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// This host's memcpy between two prefaulted 256 MiB buffers, MiB/s (median of 5).
fn memcpy_mib_s() -> f64 {
    let n = 256 << 20;
    let a = vec![1u8; n];
    let mut b = vec![2u8; n];
    let v: Vec<f64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            b.copy_from_slice(&a);
            std::hint::black_box(&b);
            256.0 / t.elapsed().as_secs_f64()
        })
        .collect();
    median_min_max(&v).0
}

/// Prints the results as a Markdown table: per case, medians of its `runs`
/// runs with min-max of the downtime and the total time.
fn print_table(cases: &[Case], runs: usize) {
    println!();
    println!("| guest | dirty rate (measured pages/s) | mode | downtime ms | switch round trip ms | of it, destination restore ms | total ms | MiB sent | rounds | max throttle % |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for c in cases {
        let f = |get: fn(&migrate::Report) -> f64| {
            let v: Vec<f64> = c.reports.iter().map(get).collect();
            median_min_max(&v)
        };
        let (d, dmin, dmax) = f(|r| r.downtime_ms);
        let (t, tmin, tmax) = f(|r| r.total_ms);
        println!(
            "| {} MiB | {} ({}) | {} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.2} | {:.0} ({:.0}-{:.0}) | {:.0} | {:.0} | {:.0} |",
            c.mem_size >> 20,
            c.rate,
            c.measured_pages_per_s,
            mode_name(c.mode),
            d,
            dmin,
            dmax,
            f(|r| r.switch_round_trip_ms).0,
            f(|r| r.dest_restore_ms).0,
            t,
            tmin,
            tmax,
            f(|r| r.bytes_sent as f64 / (1 << 20) as f64).0,
            f(|r| r.rounds as f64).0,
            f(|r| r.max_throttle_pct as f64).0,
        );
    }
    println!(
        "(medians of {} runs, min-max in parentheses; downtime: from pausing the source's vCPUs to the destination starting its own, on this host's monotonic clock; round trip: until the source hears so)",
        runs
    );
}
