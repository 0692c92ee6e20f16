//! `cevm-bench`: cevm's benchmarks, measurements, never pass/fail. Every figure
//! printed comes from a measurement of this run; comparisons are ratios taken in
//! the same run. A binary of its own so that the product (`cevm`) links none of
//! this (plots, QEMU drivers); `cevm bench ARGS` runs `cevm-bench ARGS` from
//! beside the `cevm` binary.
//!
//! Modules: the benchmarks themselves (`stop_and_save`, `pause_vs_ram`, `migrate`, `linux`,
//! `compare`, `turnaround`, `net`), the whole run (`all`: orchestration) with its
//! results data (`results`) and their rendering (`report`: markdown and plots),
//! and what they share (`guest`: in-process guests, `host`: this machine's
//! limits, `stats`, `qemu`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::MemoryBackend;

use cevm::size::parse_size;

mod all;
mod compare;
mod group;
mod group_turnaround;
mod guest;
mod host;
mod incremental;
mod lazy;
mod linux;
mod migrate;
mod net;
mod pause_vs_ram;
mod qemu;
mod report;
mod results;
mod stats;
mod stop_and_save;
mod turnaround;

#[derive(Parser)]
#[command(name = "cevm-bench", version, about = "cevm's benchmarks (also `cevm bench`)")]
struct Cli {
    #[command(subcommand)]
    cmd: BenchCmd,
}

/// The benchmarks.
#[derive(Subcommand)]
enum BenchCmd {
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
        /// Guest memory backend: shared (memfd) or private (anonymous, cevm's default).
        #[arg(long, default_value = "private")]
        memory_backend: MemoryBackend,
    },
    /// Pause of a stop-and-save checkpoint of a guest holding little data at
    /// several memory sizes, for one or several `cevm` binaries in the same run
    /// (e.g. main's build against this one): medians and ratios.
    PauseVsRam {
        /// Guest memory sizes, comma-separated.
        #[arg(long, default_value = "4G,64G", value_delimiter = ',', value_parser = parse_size)]
        mem: Vec<u64>,
        /// MiB of memory the guest fills with data (the rest it never touches).
        #[arg(long, default_value_t = 1)]
        data_mib: u64,
        /// Checkpoints per binary and size, after one warm-up (medians are reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// The cevm binaries to measure, comma-separated LABEL=PATH (default: the
        /// cevm beside this program). The first is the baseline of the ratios.
        #[arg(long, value_delimiter = ',', value_parser = pause_vs_ram::parse_binary)]
        cevm: Vec<pause_vs_ram::Binary>,
        /// Directory for checkpoints and sockets (on the checkpoint file system).
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write every sample as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
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
        #[arg(long, default_value = "thread,process", value_delimiter = ',', value_parser = migrate::parse_mode)]
        modes: Vec<checkpoint::Method>,
        /// Migrations per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Switch once the last dirty pages are expected to move in this time.
        #[arg(long, default_value_t = ::migrate::Params::default().max_downtime_ms)]
        max_downtime_ms: f64,
        /// Do not throttle the vCPUs when the guest outruns the copy.
        #[arg(long)]
        no_auto_converge: bool,
        /// Where guest memory lives: shared (a memfd) or private (anonymous,
        /// transparent huge pages: cevm's default).
        #[arg(long = "memory-backend", default_value = "private")]
        backend: MemoryBackend,
        /// Directory for the destinations' sockets.
        #[arg(long, default_value = "bench-work")]
        dir: PathBuf,
        /// Also write every report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Two Linux guests on a bridge of taps (made here: run as root): TCP
    /// throughput and ping round trip over cevm's virtio-net and, with --qemu,
    /// over QEMU's (userspace, and vhost-net when /dev/vhost-net exists) in the
    /// same run; and the downtime of migrations and CEVM checkpoints of a guest
    /// streaming TCP against one without a NIC.
    NetLinux(net::Options),
    /// Group checkpoints (`cevm group checkpoint`) of rings of built-in
    /// netring guests against the number of members, by each strategy, next
    /// to one VM's checkpoint: the group pause, the slowest member's own stop,
    /// the coordination's own cost (run as root: the ring is on taps).
    Group(group::Options),
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
        #[arg(long, default_value = "thread,process", value_delimiter = ',', value_parser = migrate::parse_mode)]
        modes: Vec<checkpoint::Method>,
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
    /// Incremental checkpoints: bytes on disk against the bytes of the pages
    /// each holds, pause and time to commit, after a full one.
    Incremental(incremental::Args),
    /// Lazy restore: the time from a restore's start to the guest's first
    /// instruction, restored whole and lazily, warm and cold page cache, and
    /// how long a lazy restore takes to have all of memory in place.
    Lazy(lazy::Args),
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
        /// Methods, comma-separated: stop-and-save, migrate-thread (or migrate), cevm-thread, cevm-process,
        /// cow (its guest in private memory).
        #[arg(long, default_value = "stop-and-save,migrate,cevm-thread,cevm-process,cow", value_delimiter = ',')]
        strategies: Vec<checkpoint::Method>,
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

/// The `cevm` binary the benchmarks drive: the one beside this `cevm-bench`
/// (cargo builds both into the same directory; the nested harness puts both into
/// L1's /bin).
fn cevm_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let bin = exe.parent().unwrap_or(Path::new(".")).join("cevm");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} is missing: build it with `cargo build --release -p cevm`", bin.display()))
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cevm-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The methods a comparison measures: those asked for, or by default cevm's
/// (and QEMU's, when a QEMU binary is given); QEMU's need that binary.
fn compare_methods(asked: Vec<compare::Method>, have_qemu: bool) -> Result<Vec<compare::Method>, String> {
    let methods = if asked.is_empty() {
        let mut m = compare::Method::CEVM.to_vec();
        if have_qemu {
            m.extend(compare::Method::QEMU);
        }
        m
    } else {
        asked
    };
    if !have_qemu && methods.iter().any(|m| m.is_qemu()) {
        return Err("QEMU methods need --qemu BINARY".into());
    }
    Ok(methods)
}

/// Runs one benchmark.
fn run(cmd: BenchCmd) -> Result<(), String> {
    match cmd {
        BenchCmd::All(args) => all::run(args),
        BenchCmd::Compare { kernel, initrd, qemu, cases, methods, fill_pct, ws_mib, beat_ms, runs, dir, json } => {
            let methods = compare_methods(methods, qemu.is_some())?;
            if !(1..=95).contains(&fill_pct) || beat_ms == 0 {
                return Err("--fill-pct is 1..95 and --beat-ms more than 0".into());
            }
            let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let runs = runs.max(1);
            let o =
                compare::Options { kernel, initrd, qemu, cases, methods, fill_pct, ws_mib, beat_ms, runs, dir, json };
            compare::run(&o).map(drop)
        }
        BenchCmd::StopAndSave { sizes, runs, dir, json, memory_backend } => {
            stop_and_save::run(&sizes, runs.max(1), &dir, json.as_deref(), memory_backend)
        }
        BenchCmd::PauseVsRam { mem, data_mib, runs, cevm, dir, json } => {
            let binaries = if cevm.is_empty() { vec![pause_vs_ram::Binary::beside(cevm_bin()?)] } else { cevm };
            let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            pause_vs_ram::run(&pause_vs_ram::Options { mems: mem, data_mib, runs: runs.max(1), binaries, dir, json })
        }
        BenchCmd::Migrate { sizes, rates, modes, runs, max_downtime_ms, no_auto_converge, backend, dir, json } => {
            let params =
                ::migrate::Params { max_downtime_ms, auto_converge: !no_auto_converge, ..::migrate::Params::default() };
            migrate::run(&migrate::Options { sizes, rates, modes, runs: runs.max(1), params, backend, dir, json })
        }
        BenchCmd::Incremental(a) => incremental::run(&a),
        BenchCmd::Lazy(a) => lazy::run(&a),
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
        } => {
            if strategies.contains(&checkpoint::Method::MigrateProcess) {
                return Err("turnaround measures stop-and-save, migrate-thread, cevm-thread and cevm-process".into());
            }
            turnaround::run(&turnaround::Options {
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
            })
        }
        BenchCmd::NetLinux(o) => net::run(&o),
        BenchCmd::Group(o) => group::run(&cevm_bin()?, &o),
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
