//! `cevm bench`: measurements, never pass/fail. Every figure printed comes from a
//! measurement of this run; comparisons are ratios taken in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde::Serialize;
use vmm::{Boot, Instance, InstanceConfig, MemoryBackend};

use crate::size::parse_size;

mod all;
mod compare;
mod linux;
mod migrate;
mod qemu;
mod report;
mod turnaround;

/// The benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Everything, in one run: cevm's strategies and QEMU's checkpoint methods
    /// on the same Linux guest, the turnaround of a job with n checkpoints, and
    /// the physical limits; writes bench/results/<date>-<host>.{json,md} and
    /// plots, and the README's headline table.
    All(all::Args),
    /// cevm's checkpoint strategies and QEMU's checkpoint methods side by side on
    /// one Linux guest running the same workload (what `all` runs in the nested
    /// harness on machines whose /dev/kvm cannot run Linux).
    Compare {
        /// Linux kernel (bzImage).
        #[arg(long)]
        kernel: PathBuf,
        /// Initramfs built by scripts/nested/guest-initrd.sh (it has cevm-work).
        #[arg(long)]
        initrd: PathBuf,
        /// QEMU binary to compare with; without it only cevm is measured.
        #[arg(long)]
        qemu: Option<String>,
        /// Guests, comma-separated SIZE:WORKLOAD, the workload idle or a dirty
        /// rate in pages per second.
        #[arg(long, default_value = "512M:idle,512M:10000", value_delimiter = ',')]
        cases: Vec<compare::Case>,
        /// Methods, comma-separated (default: all of cevm's, and QEMU's with --qemu).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<compare::Method>,
        /// Percent of guest memory the guest fills with data.
        #[arg(long, default_value_t = 60)]
        fill_pct: u64,
        /// MiB the dirty workloads keep rewriting.
        #[arg(long, default_value_t = 64)]
        ws_mib: u64,
        /// The guest's heartbeat period, ms.
        #[arg(long, default_value_t = 10)]
        beat_ms: u64,
        /// Checkpoints per method and guest (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Directory for checkpoints and sockets (on the checkpoint file system).
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Write every sample as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Stop-and-save: pause time, checkpoint bytes and write throughput against the
    /// checkpoint file system's own sequential write + fdatasync limit.
    StopAndSave {
        /// Guest memory sizes, comma-separated.
        #[arg(long, default_value = "256M,1G", value_delimiter = ',', value_parser = parse_size)]
        sizes: Vec<u64>,
        /// Checkpoints per size (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Directory on the checkpoint file system to measure (default: ./bench-work).
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write the raw samples as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Guest memory backend: shared (memfd) or private (anonymous).
        #[arg(long, default_value = "shared")]
        memory_backend: MemoryBackend,
    },
    /// Live migration of a guest whose memory all holds data, idle or dirtying at
    /// set rates, thread- and process-based: downtime, total time, bytes, rounds.
    Migrate {
        /// Guest memory sizes, comma-separated.
        #[arg(long, default_value = "256M,1G", value_delimiter = ',', value_parser = parse_size)]
        sizes: Vec<u64>,
        /// Dirty rates, comma-separated: idle, pages per second, or max (as fast as
        /// the vCPU writes).
        #[arg(long, default_value = "idle,10000,50000,max", value_delimiter = ',')]
        rates: Vec<migrate::Rate>,
        /// Where the destination runs: thread (in this process), process (over a
        /// unix socket).
        #[arg(long, default_value = "thread,process", value_delimiter = ',')]
        modes: Vec<migrate::Mode>,
        /// Migrations per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Switch once the last dirty pages are expected to move in this time.
        #[arg(long, default_value_t = ::migrate::Params::default().max_downtime_ms)]
        max_downtime_ms: f64,
        /// Do not throttle the vCPUs when the guest outruns the copy.
        #[arg(long)]
        no_auto_converge: bool,
        /// Directory for the destinations' sockets.
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write every report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Live migration of a Linux guest, idle or dirtying, by cevm (thread- and
    /// process-based) and, with --qemu, by QEMU over QMP in the same run.
    MigrateLinux {
        /// Linux kernel (bzImage).
        #[arg(long)]
        kernel: PathBuf,
        /// Initramfs built by scripts/nested/guest-initrd.sh (its init knows the workloads).
        #[arg(long)]
        initrd: PathBuf,
        /// Guest memory.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        mem: u64,
        /// MiB of guest memory the guest fills with data after boot.
        #[arg(long, default_value_t = 64)]
        fill_mib: u64,
        /// MiB the dirty workload keeps rewriting.
        #[arg(long, default_value_t = 32)]
        dirty_mib: u64,
        /// Workloads, comma-separated: idle, dirty.
        #[arg(long, default_value = "idle,dirty", value_delimiter = ',')]
        workloads: Vec<linux::Workload>,
        /// cevm modes, comma-separated: thread, process.
        #[arg(long, default_value = "thread,process", value_delimiter = ',')]
        modes: Vec<migrate::Mode>,
        /// QEMU binary to compare with (e.g. qemu-system-x86_64).
        #[arg(long)]
        qemu: Option<String>,
        /// Migrations per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Switch once the last dirty pages are expected to move in this time
        /// (QEMU's downtime-limit is set to it, rounded up to whole ms).
        #[arg(long, default_value_t = ::migrate::Params::default().max_downtime_ms)]
        max_downtime_ms: f64,
        /// Directory for sockets and QEMU's console files.
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write every sample as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The seed's turnaround times of one fixed-size job with n checkpoints, per
    /// strategy and placement: T_comp, T_cpt, T_mg, T_cevm, T_o, downtime per
    /// checkpoint, the job's worst second, peak memory.
    Turnaround {
        /// Guest memory.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        mem: u64,
        /// MiB of guest memory holding data (filled before the job starts).
        #[arg(long, default_value_t = 768)]
        data_mib: u64,
        /// MiB the job keeps rewriting.
        #[arg(long, default_value_t = 64)]
        ws_mib: u64,
        /// Pages the job writes per second.
        #[arg(long, default_value_t = 20000)]
        rate: u64,
        /// Length of the job without checkpoints, seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Checkpoints per job, comma-separated: one set of jobs per value.
        #[arg(long, default_value = "3", value_delimiter = ',')]
        n: Vec<usize>,
        /// Strategies, comma-separated: stop-and-save, migrate, cevm-thread, cevm-process.
        #[arg(long, default_value = "stop-and-save,migrate,cevm-thread,cevm-process", value_delimiter = ',')]
        strategies: Vec<turnaround::Strategy>,
        /// Placements, comma-separated: same (all on CPU 0), spread (migration and
        /// writer on CPU 1), none (the kernel decides).
        #[arg(long, default_value = "same,spread,none", value_delimiter = ',')]
        placements: Vec<turnaround::Placement>,
        /// Runs of each case (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for checkpoints, sockets and the VMMs' log.
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write every run as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print the tables of runs saved earlier with --json, without running anything.
        #[arg(long)]
        report_from: Option<PathBuf>,
    },
}

/// Runs one benchmark.
pub fn run(cmd: BenchCmd) -> Result<(), String> {
    match cmd {
        BenchCmd::All(args) => all::run(args),
        BenchCmd::Compare { kernel, initrd, qemu, cases, methods, fill_pct, ws_mib, beat_ms, runs, dir, json } => {
            let methods = if methods.is_empty() {
                let mut m = compare::Method::CEVM.to_vec();
                if qemu.is_some() {
                    m.extend(compare::Method::QEMU);
                }
                m
            } else {
                methods
            };
            if qemu.is_none() && methods.iter().any(|m| m.is_qemu()) {
                return Err("QEMU methods need --qemu BINARY".into());
            }
            if !(1..=95).contains(&fill_pct) || beat_ms == 0 {
                return Err("--fill-pct is 1..95 and --beat-ms more than 0".into());
            }
            let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let o = compare::Options {
                kernel,
                initrd,
                qemu,
                cases,
                methods,
                fill_pct,
                ws_mib,
                beat_ms,
                runs: runs.max(1),
                dir,
                json,
            };
            compare::run(&o).map(drop)
        }
        BenchCmd::StopAndSave { sizes, runs, dir, json, memory_backend } => {
            stop_and_save(&sizes, runs.max(1), &dir, json.as_deref(), memory_backend)
        }
        BenchCmd::Migrate { sizes, rates, modes, runs, max_downtime_ms, no_auto_converge, dir, json } => {
            let params =
                ::migrate::Params { max_downtime_ms, auto_converge: !no_auto_converge, ..::migrate::Params::default() };
            migrate::run(&migrate::Options { sizes, rates, modes, runs: runs.max(1), params, dir, json })
        }
        BenchCmd::Turnaround {
            mem,
            data_mib,
            ws_mib,
            rate,
            seconds,
            n,
            strategies,
            placements,
            runs,
            dir,
            json,
            report_from,
        } => turnaround::run(&turnaround::Options {
            mem,
            data_mib,
            ws_mib,
            rate,
            seconds,
            ns: n.into_iter().map(|n| n.max(1)).collect(),
            strategies,
            placements,
            runs: runs.max(1),
            dir: std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?,
            json,
            report_from,
        }),
        BenchCmd::MigrateLinux {
            kernel,
            initrd,
            mem,
            fill_mib,
            dirty_mib,
            workloads,
            modes,
            qemu,
            runs,
            max_downtime_ms,
            dir,
            json,
        } => {
            let params = ::migrate::Params { max_downtime_ms, ..::migrate::Params::default() };
            linux::run(&linux::Options {
                kernel,
                initrd,
                mem,
                fill_mib,
                dirty_mib,
                workloads,
                modes,
                qemu,
                runs: runs.max(1),
                params,
                dir,
                json,
            })
        }
    }
}

/// A console that hands the guest's output to a channel, line by line.
struct LineSink {
    buf: Vec<u8>,
    tx: Sender<String>,
}

impl Write for LineSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        for &c in b {
            if c == b'\n' {
                let _ = self.tx.send(String::from_utf8_lossy(&self.buf).into_owned());
                self.buf.clear();
            } else {
                self.buf.push(c);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Serialize)]
struct Sample {
    pause_ms: f64,
    memory_write_mib_per_s: f64,
    data_bytes: u64,
    data_pages: u64,
    zero_pages: u64,
    image_allocated_bytes: u64,
    disk_limit_mib_per_s: f64,
}

#[derive(Serialize)]
struct SizeResult {
    mem_size: u64,
    working_set_mib: u64,
    samples: Vec<Sample>,
}

/// Whether `child` (a `what` process) has ended, as a message quoting the end of its log.
fn child_ended(child: &mut std::process::Child, what: &str, log: &Path) -> Option<String> {
    let st = child.try_wait().ok().flatten()?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(5).collect();
    tail.reverse();
    Some(format!("{what} ended ({st}); the end of {}: {tail:?}", log.display()))
}

/// (median, min, max).
pub fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = s.len() / 2;
    let med = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
    (med, s[0], s[s.len() - 1])
}

/// Sequential write of `bytes` bytes in 8 MiB writes, then fdatasync: MiB/s.
fn disk_limit(path: &Path, bytes: u64) -> Result<f64, String> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0xa5u8; 8 << 20];
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off).map_err(|e| format!("{}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_data().map_err(|e| format!("{}: {e}", path.display()))?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(bytes as f64 / (1 << 20) as f64 / secs)
}

/// Allocated bytes of a file, or of every file under a directory.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else { return 0 };
    if m.is_dir() {
        std::fs::read_dir(path).map(|d| d.filter_map(Result::ok).map(|e| allocated_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        m.blocks() * 512
    }
}

/// A line with the instant it was read.
type Stamped = (std::time::Instant, String);

/// Sends every line of `out` to `tx`, stamped when read, from a thread of its own.
fn pipe_lines(out: impl std::io::Read + Send + 'static, tx: Sender<Stamped>) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
}

/// Starts `cmd` with its stdout lines going, stamped, to `tx` and its stderr
/// appended to `log`.
fn spawn_piped(
    mut cmd: std::process::Command,
    tx: &Sender<Stamped>,
    log: &Path,
) -> Result<std::process::Child, String> {
    use std::process::Stdio;
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    pipe_lines(child.stdout.take().ok_or("no stdout pipe")?, tx.clone());
    Ok(child)
}

/// Creates and starts an instance of `config` whose console comes back line by line.
fn start_guest(config: InstanceConfig) -> Result<(Instance, Receiver<String>), String> {
    let (line_tx, lines) = mpsc::channel();
    // The benchmarks end their instances themselves; guest events are not watched.
    let (ev_tx, _events) = mpsc::channel();
    let mut inst =
        Instance::new(config, Box::new(LineSink { buf: Vec::new(), tx: line_tx }), ev_tx).map_err(|e| e.to_string())?;
    inst.start().map_err(|e| e.to_string())?;
    Ok((inst, lines))
}

/// Waits for a console line for which `pred` holds; returns it.
fn wait_line(lines: &Receiver<String>, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).map_err(|_| "the guest did not print what was expected in time")?;
        if pred(&line) {
            return Ok(line);
        }
    }
}

/// Waits for the dirtier's per-second line showing at least `pages` pages written.
fn wait_dirtied(lines: &Receiver<String>, pages: u64, timeout: Duration) -> Result<(), String> {
    let covered =
        |l: &str| l.split("total=").nth(1).and_then(|t| t.trim().parse::<u64>().ok()).is_some_and(|t| t >= pages);
    wait_line(lines, timeout, covered)
        .map(drop)
        .map_err(|_| "the dirtier guest did not cover its working set in time".to_string())
}

fn stop_and_save(
    sizes: &[u64],
    runs: usize,
    dir: &Path,
    json: Option<&Path>,
    memory_backend: MemoryBackend,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("stop-and-save benchmark: {runs} checkpoints per size, checkpoint file system at {}", dir.display());
    println!("guest: the dirtier, working set = guest memory - 8 MiB, one write per page, fully covered before the first checkpoint");
    let mut results = Vec::new();
    for &mem in sizes {
        let ws_mib = (mem >> 20).saturating_sub(8);
        let config = InstanceConfig {
            boot: Boot::Builtin { guest: "dirtier".into(), args: format!("mib={ws_mib} rate=0 seconds=0") },
            mem_size: mem,
            vcpus: 1,
            memory_backend,
            disk: None,
        };
        let (mut inst, lines) = start_guest(config)?;
        wait_dirtied(&lines, ws_mib * 256, Duration::from_secs(600))?;
        let mut samples = Vec::new();
        let ckpt = dir.join(format!("ckpt-{}", mem >> 20));
        let limit_file = dir.join("limit.bin");
        // Warm-up: the first write into never-written blocks of a thin-provisioned
        // virtual disk runs several times slower than any later one. Give both
        // measurements blocks that have been written before, then alternate their
        // order so neither always gets the other's freshly freed blocks.
        disk_limit(&limit_file, 2 * mem)?;
        for i in 0..runs {
            let mut limit = 0.0;
            if i % 2 == 1 {
                limit = disk_limit(&limit_file, mem)?;
            }
            let r = checkpoint::stop_and_save(&mut inst, &ckpt, false).map_err(|e| e.to_string())?;
            let alloc = allocated_bytes(&ckpt.join(snapshot::MEMORY_FILE));
            let _ = std::fs::remove_dir_all(&ckpt);
            if i % 2 == 0 {
                limit = disk_limit(&limit_file, r.memory.data_bytes)?;
            }
            println!(
                "  {:>5} MiB run {}: pause {:.1} ms, {:.0} MiB data, memory write {:.0} MiB/s, disk limit {:.0} MiB/s",
                mem >> 20,
                i + 1,
                r.pause_ms,
                r.memory.data_bytes as f64 / (1 << 20) as f64,
                r.write_mib_per_s,
                limit
            );
            samples.push(Sample {
                pause_ms: r.pause_ms,
                memory_write_mib_per_s: r.write_mib_per_s,
                data_bytes: r.memory.data_bytes,
                data_pages: r.memory.data_pages,
                zero_pages: r.memory.zero_pages,
                image_allocated_bytes: alloc,
                disk_limit_mib_per_s: limit,
            });
        }
        inst.shutdown();
        results.push(SizeResult { mem_size: mem, working_set_mib: ws_mib, samples });
    }

    println!();
    println!("| guest | pause ms (median, min-max) | data written | zero pages (holes) | image allocated | effective MiB/s | disk limit MiB/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        let pause: Vec<f64> = r.samples.iter().map(|s| s.pause_ms).collect();
        let eff: Vec<f64> =
            r.samples.iter().map(|s| s.data_bytes as f64 / (1 << 20) as f64 / (s.pause_ms / 1e3)).collect();
        let lim: Vec<f64> = r.samples.iter().map(|s| s.disk_limit_mib_per_s).collect();
        let ratio: Vec<f64> = eff.iter().zip(&lim).map(|(e, l)| e / l).collect();
        let (pm, pmin, pmax) = median_min_max(&pause);
        let s0 = &r.samples[0];
        println!(
            "| {} MiB | {:.0} ({:.0}-{:.0}) | {:.0} MiB | {} | {:.0} MiB | {:.0} | {:.0} | {:.2} |",
            r.mem_size >> 20,
            pm,
            pmin,
            pmax,
            s0.data_bytes as f64 / (1 << 20) as f64,
            s0.zero_pages,
            s0.image_allocated_bytes as f64 / (1 << 20) as f64,
            median_min_max(&eff).0,
            median_min_max(&lim).0,
            median_min_max(&ratio).0
        );
    }
    println!("(effective = data bytes / whole guest pause; ratio = effective / disk limit, medians, same run)");
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// The physical limits a checkpoint runs against, measured in the same run:
/// memory copy bandwidth, and sequential write + fdatasync on the checkpoint
/// file system.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Limits {
    /// The checkpoint file system: its type and the directory measured.
    pub fs: String,
    /// Bytes per measurement.
    pub bytes: u64,
    /// One sample per run, MiB/s.
    pub memcpy_mib_s: Vec<f64>,
    pub write_fdatasync_mib_s: Vec<f64>,
}

impl Limits {
    /// Measures both limits `runs` times (at least 3) with `bytes` bytes each
    /// (the memory copy at most 512 MiB).
    pub fn measure(dir: &Path, bytes: u64, runs: usize) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let runs = runs.max(3);
        let file = dir.join("limit.bin");
        // Warm-up: the first write into never-written blocks of a thin-provisioned
        // virtual disk runs several times slower than any later one.
        disk_limit(&file, bytes)?;
        let mut write = Vec::new();
        for _ in 0..runs {
            write.push(disk_limit(&file, bytes)?);
        }
        let n = (bytes.min(512 << 20) / 8) as usize;
        let src = vec![0x5a5a_5a5a_5a5a_5a5au64; n];
        let mut dst = vec![1u64; n];
        let mut memcpy = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            memcpy.push((n * 8) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
        }
        Ok(Limits {
            fs: format!("{} at {}", fs_type(dir), dir.display()),
            bytes,
            memcpy_mib_s: memcpy,
            write_fdatasync_mib_s: write,
        })
    }

    pub fn memcpy(&self) -> f64 {
        median_min_max(&self.memcpy_mib_s).0
    }

    pub fn write(&self) -> f64 {
        median_min_max(&self.write_fdatasync_mib_s).0
    }
}

/// The file system type of `dir`, by statfs(2)'s magic number.
fn fs_type(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return "unknown".into() };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x0102_1997 => "9p".into(),
        t => format!("fs 0x{t:x}"),
    }
}
