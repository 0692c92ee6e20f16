//! `cevm bench migrate-linux`: live migration of a Linux guest, by cevm
//! (thread- and process-based) and, side by side in the same run, by QEMU over
//! QMP, on the same kernel, initramfs, command line, memory size and workload.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use vmm::{Boot, InstanceConfig, MemoryBackend};

use crate::guest::{start_guest, wait_line};
use crate::migrate::migrate_once;
use crate::qemu::{self, Qemu};
use crate::stats::median_min_max;
use checkpoint::Method;

/// What the Linux guest does while it is migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Booted, memory partly filled, then asleep.
    Idle,
    /// Rewriting a tmpfs file as fast as the vCPU copies.
    Dirty,
}

pub struct Options {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mem: u64,
    pub fill_mib: u64,
    pub dirty_mib: u64,
    pub workloads: Vec<Workload>,
    pub modes: Vec<Method>,
    pub qemu: Option<String>,
    pub runs: usize,
    pub params: migrate::Params,
    pub dir: PathBuf,
    pub json: Option<PathBuf>,
}

/// One row: medians over the runs.
#[derive(Serialize)]
struct Row {
    workload: Workload,
    vmm: String,
    downtime_ms: Vec<f64>,
    total_ms: Vec<f64>,
    bytes_sent: Vec<u64>,
    rounds: Vec<u64>,
    throttle_pct: Vec<u64>,
}

impl Row {
    fn new(workload: Workload, vmm: String) -> Self {
        Row {
            workload,
            vmm,
            downtime_ms: vec![],
            total_ms: vec![],
            bytes_sent: vec![],
            rounds: vec![],
            throttle_pct: vec![],
        }
    }

    fn push(&mut self, downtime_ms: f64, total_ms: f64, bytes_sent: u64, rounds: u64, throttle_pct: u64) {
        self.downtime_ms.push(downtime_ms);
        self.total_ms.push(total_ms);
        self.bytes_sent.push(bytes_sent);
        self.rounds.push(rounds);
        self.throttle_pct.push(throttle_pct);
    }
}

fn cmdline(w: Workload, o: &Options) -> String {
    let test = match w {
        Workload::Idle => "idle".to_string(),
        Workload::Dirty => format!("dirty cevm.dirty={}", o.dirty_mib),
    };
    format!("console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.fill={} cevm.test={test}", o.fill_mib)
}

fn marker(w: Workload) -> &'static str {
    match w {
        Workload::Idle => "cevm-guest: idle",
        Workload::Dirty => "cevm-guest: dirtying",
    }
}

fn cevm_rows(w: Workload, o: &Options, rows: &mut Vec<Row>) -> Result<(), String> {
    let config = InstanceConfig {
        boot: Boot::Linux { kernel: o.kernel.clone(), initrd: Some(o.initrd.clone()), cmdline: cmdline(w, o) },
        mem_size: o.mem,
        vcpus: 1,
        memory_backend: MemoryBackend::Private,
        disk: None,
        nics: vec![],
    };
    let (mut inst, lines) = start_guest(config)?;
    wait_line(&lines, Duration::from_secs(900), |l| l.contains(marker(w)))?;
    std::thread::sleep(Duration::from_secs(1));
    for &mode in &o.modes {
        let vmm = format!("cevm {}", crate::migrate::mode_name(mode));
        let mut row = Row::new(w, vmm.clone());
        for n in 0..o.runs {
            std::thread::sleep(Duration::from_millis(500));
            let r = migrate_once(&mut inst, mode, &o.params, &o.dir, n)?;
            println!(
                "  {w:?} {vmm} run {}: downtime {:.2} ms (pause {:.2}, last pages {:.2}, state {:.2}, destination decode {:.2} + restore {:.2}), total {:.0} ms, {:.0} MiB, {} rounds, throttle {} %",
                n + 1,
                r.downtime_ms,
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
            row.push(r.downtime_ms, r.total_ms, r.bytes_sent, u64::from(r.rounds), u64::from(r.max_throttle_pct));
        }
        rows.push(row);
    }
    inst.shutdown();
    Ok(())
}

fn qemu_row(bin: &str, w: Workload, o: &Options, rows: &mut Vec<Row>) -> Result<(), String> {
    let cmdline = cmdline(w, o);
    let guest = qemu::Guest {
        kernel: &o.kernel,
        initrd: &o.initrd,
        cmdline: &cmdline,
        mem_mib: o.mem >> 20,
        vcpus: 1,
        extra: &[],
    };
    let console = o.dir.join("qemu-src.txt");
    let _ = std::fs::remove_file(&console);
    let log = o.dir.join("qemu.log");
    let mut src = Qemu::start(bin, &guest, qemu::Console::File(&console), None, &o.dir, &log)?;
    let r = (|| {
        qemu::wait_for_marker(&console, marker(w), Duration::from_secs(900))?;
        std::thread::sleep(Duration::from_secs(1));
        // QEMU's downtime limit is in whole milliseconds; cevm's page budget, rounded up.
        let limit = o.params.max_downtime_ms.ceil().max(1.0) as u64;
        let mut row = Row::new(w, format!("QEMU (downtime-limit {limit} ms)"));
        for n in 0..o.runs {
            std::thread::sleep(Duration::from_millis(500));
            let sock = o.dir.join(format!("qemu-mig-{}-{n}.sock", std::process::id()));
            let uri = format!("unix:{}", sock.display());
            let dst_console = o.dir.join("qemu-dst.txt");
            let dst = Qemu::start(bin, &guest, qemu::Console::File(&dst_console), Some(&uri), &o.dir, &log)?;
            let m = qemu::migrate(&mut src, &uri, limit, o.params.auto_converge);
            dst.kill();
            let _ = std::fs::remove_file(&sock);
            let m = m?;
            // As for cevm: the source, stopped at the switch, runs on for the next run.
            src.execute("cont", serde_json::json!({}))?;
            println!(
                "  {w:?} QEMU run {}: downtime {:.0} ms, total {:.0} ms, {:.0} MiB, {} rounds, throttle {} %",
                n + 1,
                m.downtime_ms,
                m.total_ms,
                m.bytes_sent as f64 / (1 << 20) as f64,
                m.rounds,
                m.throttle_pct
            );
            row.push(m.downtime_ms, m.total_ms, m.bytes_sent, m.rounds, m.throttle_pct);
        }
        rows.push(row);
        Ok(())
    })();
    src.kill();
    r
}

pub fn run(o: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    println!(
        "Linux guest migration: {} MiB, 1 vCPU, {} MiB filled; dirty workload rewrites {} MiB; {} runs each; page budget {} ms, auto-converge {}",
        o.mem >> 20,
        o.fill_mib,
        o.dirty_mib,
        o.runs,
        o.params.max_downtime_ms,
        if o.params.auto_converge { "on" } else { "off" }
    );
    let mut rows = Vec::new();
    for &w in &o.workloads {
        cevm_rows(w, o, &mut rows)?;
        if let Some(bin) = &o.qemu {
            qemu_row(bin, w, o, &mut rows)?;
        }
    }
    println!();
    println!("| workload | VMM | downtime ms | total ms | MiB sent | rounds | max throttle % |");
    println!("|---|---|---|---|---|---|---|");
    let med = |v: &[f64]| median_min_max(v);
    let f = |v: &[u64]| med(&v.iter().map(|&x| x as f64).collect::<Vec<_>>()).0;
    for r in &rows {
        let (d, dmin, dmax) = med(&r.downtime_ms);
        let (t, tmin, tmax) = med(&r.total_ms);
        println!(
            "| {:?} | {} | {d:.2} ({dmin:.2}-{dmax:.2}) | {t:.0} ({tmin:.0}-{tmax:.0}) | {:.0} | {:.0} | {:.0} |",
            r.workload,
            r.vmm,
            f(&r.bytes_sent) / (1 << 20) as f64,
            f(&r.rounds),
            f(&r.throttle_pct)
        );
    }
    for &w in &o.workloads {
        let Some(q) = rows.iter().find(|r| r.workload == w && r.vmm.starts_with("QEMU")) else { continue };
        let qd = med(&q.downtime_ms).0;
        for r in rows.iter().filter(|r| r.workload == w && r.vmm.starts_with("cevm")) {
            println!("{w:?}: {} downtime / QEMU downtime = {:.2}", r.vmm, med(&r.downtime_ms).0 / qd.max(1e-9));
        }
    }
    println!(
        "(medians of {} runs, min-max in parentheses; QEMU's downtime is its own `query-migrate` figure, in whole ms)",
        o.runs
    );
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
