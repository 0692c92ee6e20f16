//! `cevm`: a KVM VMM with live checkpoint/restart. See README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use checkpoint::Method;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, Parser, Subcommand, ValueHint};

use cevm::api::server::{ServeError, Server};
use cevm::api::{CheckpointRequest, Client, ClientError, MigrateRequest};
use cevm::exit_code::{ERROR, GUEST_FAILED, OK, USAGE};
use cevm::plan::{CheckpointPlan, MigrationPlan};
use cevm::runner::{Outcome, RunError};
use cevm::{args, demo, inspect, logging, progress, runner};
use vmm::{Boot, DiskConfig, Instance, InstanceConfig, MemoryBackend};

#[derive(Parser)]
#[command(name = "cevm", version, about = "A KVM VMM with live checkpoint/restart", after_help = exit_status_help())]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The most detailed diagnostics printed on stderr; given, it decides alone,
    /// otherwise RUST_LOG does (e.g. RUST_LOG=warn,checkpoint=debug), otherwise info.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<logging::Level>,
    /// How diagnostics on stderr look: text lines, or JSON lines for a log shipper.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: logging::Format,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a built-in guest or a Linux kernel (the guest console is this process's stdout).
    Run(RunArgs),
    /// Live-migrate a running VM: to a new instance in the same process (`--to
    /// local`, thread-based) or to a `cevm run --incoming` (unix or TCP).
    Migrate(MigrateArgs),
    /// Restore a checkpoint and run it on.
    Restore {
        /// The checkpoint directory.
        #[arg(value_hint = ValueHint::DirPath)]
        dir: PathBuf,
        /// Where the restored guest's disk goes (a copy of the checkpoint's; default
        /// DIR.disk.qcow2 beside the checkpoint). Must not exist.
        #[arg(long, value_hint = ValueHint::FilePath)]
        overlay: Option<PathBuf>,
        /// Serve the control API on this unix socket.
        #[arg(long, value_hint = ValueHint::FilePath)]
        api_sock: Option<PathBuf>,
        #[command(flatten)]
        control: ControlArgs,
        /// Place the vCPU threads: vCPU i on the i-th CPU of this list (e.g. 1,0 or 2-3).
        #[arg(long, value_name = "CPUS")]
        vcpu_cpus: Option<vmm::placement::CpuList>,
        /// Bind the checkpoint's NIC i to the tap of the i-th --net instead of the
        /// one it had (its MAC stays). Repeatable.
        #[arg(long, value_name = "tap=NAME", value_parser = args::parse_net)]
        net: Vec<args::NetArg>,
        /// Restore and verify, then wait paused: the guest runs from the first
        /// `cevm resume` on (as QEMU's -S). Needs --api-sock.
        #[arg(long, requires = "api_sock")]
        paused: bool,
        /// Run the guest before its memory is read: each 2 MiB chunk is read,
        /// checked against its checksum and put in place when the guest first
        /// touches it, the rest in the background. A damaged chunk stops the VM
        /// before the guest can read it.
        #[arg(long)]
        lazy: bool,
        /// With --lazy: read at most this many MiB a second of the checkpoint in
        /// the background (0: none; memory then comes only as the guest touches
        /// it, until a checkpoint or migration needs the rest). Default: as fast
        /// as the disk goes.
        #[arg(long, value_name = "MIB_S", requires = "lazy")]
        lazy_bandwidth: Option<u64>,
        #[command(flatten)]
        periodic: PeriodicArgs,
    },
    /// Checkpoint a running VM.
    Checkpoint(CheckpointArgs),
    /// Jobs of several VMs: checkpoints of a whole group at one consistent cut, and their restore.
    #[command(subcommand)]
    Group(cevm::group::GroupCmd),
    /// Run one VM as a restartable batch job (what a Slurm batch script runs).
    ///
    /// Restores the newest checkpoint of --dir that verifies, else boots the
    /// guest; periodic checkpoints; SIGUSR1 (Slurm's warning): a last
    /// checkpoint, exit 75 and `scontrol requeue`; SIGTERM: a last checkpoint,
    /// exit 75, Slurm decides; ends at once if the job already finished.
    Batch(cevm::batch::BatchArgs),
    /// One member of a `cevm batch --group` job, as the job's srun starts it.
    #[command(hide = true)]
    BatchMember(cevm::batch::group::MemberArgs),
    /// Pause a running VM.
    Pause {
        /// The VM's API socket (`cevm run --api-sock`).
        #[arg(long, value_hint = ValueHint::FilePath)]
        api_sock: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's API socket (`cevm run --api-sock`).
        #[arg(long, value_hint = ValueHint::FilePath)]
        api_sock: PathBuf,
    },
    /// Show a VM's state.
    Status {
        /// The VM's API socket (`cevm run --api-sock`).
        #[arg(long, value_hint = ValueHint::FilePath)]
        api_sock: PathBuf,
    },
    /// Stop a VM and its VMM.
    Quit {
        /// The VM's API socket (`cevm run --api-sock`).
        #[arg(long, value_hint = ValueHint::FilePath)]
        api_sock: PathBuf,
    },
    /// Check a checkpoint completely (every file and checksum).
    Verify {
        /// The checkpoint directory.
        #[arg(value_hint = ValueHint::DirPath)]
        dir: PathBuf,
    },
    /// Show what a checkpoint holds.
    Inspect {
        /// The checkpoint directory.
        #[arg(value_hint = ValueHint::DirPath)]
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot, checkpoint live, SIGKILL, restore, and show the result is right.
    Demo {
        /// Keep the demo's work directory (checkpoint included).
        #[arg(long)]
        keep: bool,
        /// Work directory (default: a new one under $TMPDIR).
        #[arg(long, value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
    },
    /// Benchmarks: runs `cevm-bench ARGS` from beside this binary (the
    /// benchmarks are a program of their own, crate `cevm-bench`; `cevm bench
    /// --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        /// The arguments of `cevm-bench` (`cevm bench --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print a completion script for SHELL (e.g. `cevm completions bash >
    /// /usr/share/bash-completion/completions/cevm`).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Print the man page cevm(1), or write it and a page for each command
    /// (cevm-run(1), ...) into a directory.
    Man {
        /// Write cevm.1 and cevm-COMMAND.1 into this directory (e.g.
        /// /usr/local/share/man/man1) instead of printing cevm.1.
        #[arg(long, value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
    },
}

/// `cevm run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Built-in guest to boot (--guest-args lists what each takes).
    #[arg(long, required_unless_present_any = ["kernel", "incoming"], conflicts_with = "kernel", value_parser = guest_names())]
    guest: Option<String>,
    /// The built-in guest's arguments, e.g. "mib=2 rounds=8".
    #[arg(long, default_value = "", conflicts_with = "kernel", long_help = guest_args_help())]
    guest_args: String,
    /// Linux kernel (bzImage) to boot.
    #[arg(long, value_hint = ValueHint::FilePath)]
    kernel: Option<PathBuf>,
    /// Initramfs for the Linux kernel.
    #[arg(long, requires = "kernel", value_hint = ValueHint::FilePath)]
    initrd: Option<PathBuf>,
    /// Linux kernel command line.
    #[arg(long, requires = "kernel", default_value = vmm::linux::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory, e.g. 64M, 1G: at least 8M, a multiple of 2M, at most the
    /// host's RAM and swap (see --overcommit). A built-in guest needs 4M of its
    /// own plus what its arguments fill (digest: mib=, dirtier: the larger of
    /// mib= and data=).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = args::parse_mem)]
    mem: u64,
    /// Start a guest with more --mem than the host's RAM and swap (or its
    /// commit limit): for a guest that touches little of its memory; one that
    /// touches more than the host has is killed by the kernel.
    #[arg(long)]
    overcommit: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(vmm::layout::MAX_VCPUS)))]
    vcpus: u32,
    /// Disk image of the guest's virtio-blk device (raw or qcow2); with
    /// --overlay, the base image, which is then only read.
    #[arg(long, value_hint = ValueHint::FilePath)]
    disk: Option<PathBuf>,
    /// qcow2 overlay over --disk that the guest writes (created if it does not exist).
    #[arg(long, requires = "disk", value_hint = ValueHint::FilePath)]
    overlay: Option<PathBuf>,
    /// Offer the disk to the guest read-only.
    #[arg(long, requires = "disk")]
    disk_read_only: bool,
    /// A NIC (virtio-net) on the existing host tap NAME, with address MAC (default:
    /// one made from the tap's name). Repeatable. With --incoming: bind the
    /// arriving guest's NIC i to the i-th tap instead of the one it had.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = args::parse_net)]
    net: Vec<args::NetArg>,
    /// Where guest memory lives.
    #[arg(long, default_value = "private", value_parser = memory_backends())]
    memory_backend: MemoryBackend,
    /// Serve the control API on this unix socket.
    #[arg(long, value_hint = ValueHint::FilePath)]
    api_sock: Option<PathBuf>,
    #[command(flatten)]
    control: ControlArgs,
    /// Boot nothing: wait for a live migration at unix:PATH or tcp:HOST:PORT and
    /// run the guest that arrives (its configuration comes with it).
    #[arg(long, value_name = "ENDPOINT", conflicts_with_all = ["guest", "kernel", "disk"])]
    incoming: Option<migrate::Endpoint>,
    /// Place the vCPU threads: vCPU i on the i-th CPU of this list (e.g. 1,0 or 2-3).
    #[arg(long, value_name = "CPUS")]
    vcpu_cpus: Option<vmm::placement::CpuList>,
    #[command(flatten)]
    periodic: PeriodicArgs,
}

/// `cevm checkpoint`.
#[derive(clap::Args)]
struct CheckpointArgs {
    /// The VM's API socket (`cevm run --api-sock`).
    #[arg(long, value_hint = ValueHint::FilePath)]
    api_sock: PathBuf,
    /// Directory to commit the checkpoint to (replaced atomically if it exists).
    #[arg(long, value_hint = ValueHint::DirPath)]
    out: PathBuf,
    /// How the checkpoint is taken.
    #[arg(long, default_value = "stop-and-save", value_parser = strategies())]
    strategy: String,
    /// Leave the VM stopped after the checkpoint (its VMM exits; stop-and-save only).
    #[arg(long)]
    stop: bool,
    /// cevm strategy: where the new instance runs: `local` (thread-based, in
    /// the same VMM) or `unix:PATH` / `tcp:HOST:PORT` of a `cevm run
    /// --incoming` (process-based; the old VMM ends once it wrote the checkpoint).
    #[arg(long, value_name = "local|unix:PATH|tcp:HOST:PORT")]
    to: Option<String>,
    /// cevm strategy: CPUs for the thread that runs the live migration (e.g. 0).
    #[arg(long, value_name = "CPUS")]
    migration_cpus: Option<vmm::placement::CpuList>,
    /// cevm and cow strategies: CPUs for what writes the checkpoint (cevm: the
    /// old instance's writer thread; cow: the forked writer process) and the
    /// disk hand-over it starts (e.g. 1).
    #[arg(long, value_name = "CPUS")]
    writer_cpus: Option<vmm::placement::CpuList>,
    /// cevm strategy, `--to local`: CPUs for the new instance's vCPU threads,
    /// vCPU i on the i-th.
    #[arg(long, value_name = "CPUS")]
    dest_vcpu_cpus: Option<vmm::placement::CpuList>,
    /// stop-and-save and cow strategies: hold only the pages written since
    /// this VMM's previous checkpoint, which becomes its parent (`cevm
    /// restore` and `cevm verify` follow the chain). The first one (and the
    /// first after a migration) holds all of memory and starts tracking.
    #[arg(long)]
    incremental: bool,
}

/// `cevm migrate`.
#[derive(clap::Args)]
struct MigrateArgs {
    /// The VM's API socket (`cevm run --api-sock`).
    #[arg(long, value_hint = ValueHint::FilePath)]
    api_sock: PathBuf,
    /// Where the guest goes: `local` (a new instance in the same VMM), or the
    /// unix:PATH or tcp:HOST:PORT of a `cevm run --incoming`.
    #[arg(long, value_name = "local|unix:PATH|tcp:HOST:PORT")]
    to: String,
    /// Switch once the rest is expected to move within this many milliseconds.
    #[arg(long, default_value_t = migrate::Params::default().max_downtime_ms)]
    max_downtime_ms: f64,
    /// Give up (the guest stays here) after this many pre-copy rounds.
    #[arg(long, default_value_t = migrate::Params::default().max_rounds)]
    max_rounds: u32,
    /// Never throttle the vCPUs when the guest dirties memory faster than the link.
    #[arg(long)]
    no_auto_converge: bool,
    /// Cap the migration stream at this many MiB/s (0: no cap).
    #[arg(long, default_value_t = 0.0)]
    max_bandwidth_mib_s: f64,
    /// CPUs for the thread that runs the migration.
    #[arg(long, value_name = "CPUS")]
    migration_cpus: Option<vmm::placement::CpuList>,
    /// CPUs for the new instance's vCPU threads (with --to local), vCPU i on the i-th.
    #[arg(long, value_name = "CPUS")]
    dest_vcpu_cpus: Option<vmm::placement::CpuList>,
}

/// Remote control of `cevm run` and `cevm restore` (see `cevm::api::remote`).
#[derive(clap::Args, Debug)]
struct ControlArgs {
    /// Serve the API to other hosts too, at tcp:HOST:PORT, to peers that hold
    /// the job's secret (--control-secret): a group coordinator elsewhere.
    /// Needs --api-sock.
    #[arg(long, value_name = "tcp:HOST:PORT", requires_all = ["api_sock", "control_secret"], value_parser = args::parse_control)]
    control: Option<String>,
    /// The job's secret for --control: a file only its owner may read (mode
    /// 0600), of at least 16 bytes (`cevm group secret FILE` makes one).
    #[arg(long, value_name = "FILE", requires = "control", value_hint = ValueHint::FilePath)]
    control_secret: Option<PathBuf>,
}

/// The checkpoint series of `cevm run` and `cevm restore`: periodic
/// checkpoints, and what a batch system's signals do.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("series_use").args(["checkpoint_every", "on_signal"]).multiple(true))]
struct PeriodicArgs {
    /// Take a checkpoint every DURATION (e.g. 90s, 10m, 1h) into --checkpoint-dir.
    #[arg(long, value_name = "DURATION", requires = "checkpoint_dir", value_parser = args::parse_period)]
    checkpoint_every: Option<std::time::Duration>,
    /// Where periodic checkpoints go: DIR/ckpt-000001, ... and DIR/latest, a
    /// link to the newest committed one (`cevm restore DIR/latest`). With
    /// --on-signal, a guest that ends by itself leaves DIR/finished, and a
    /// later `cevm run` or `cevm restore` with --on-signal and this series
    /// runs nothing and exits with the guest's status (a requeued batch job).
    #[arg(long, value_name = "DIR", requires = "series_use", value_hint = ValueHint::DirPath, value_parser = args::parse_checkpoint_dir)]
    checkpoint_dir: Option<PathBuf>,
    /// How many periodic checkpoints to keep (at least 1); older ones are
    /// removed only once a newer one is committed.
    #[arg(long, value_name = "N", default_value_t = 2, requires = "checkpoint_dir", value_parser = args::parse_keep)]
    keep: usize,
    /// Strategy of the periodic checkpoints.
    #[arg(long, value_name = "STRATEGY", default_value = "cevm", requires = "checkpoint_every", value_parser = strategies().try_map(|s| Method::of_strategy(&s, false)))]
    checkpoint_strategy: Method,
    /// Each periodic checkpoint holds only the pages written since the one
    /// before it, its parent (stop-and-save and cow strategies); retention
    /// merges a parent into its child before the parent goes, so --keep
    /// checkpoints stay restorable.
    #[arg(long, requires = "checkpoint_every")]
    checkpoint_incremental: bool,
    /// What SIGUSR1 and SIGTERM do (a batch system's warning, and its kill):
    /// `checkpoint`: a last checkpoint into --checkpoint-dir, then exit 75
    /// (requeue me); `quit`: stop the guest, exit 128 + the signal. Unset,
    /// they end the process as they would any program.
    #[arg(long, value_name = "ACTION", value_enum, requires_if("checkpoint", "checkpoint_dir"))]
    on_signal: Option<cevm::signals::OnSignal>,
}

/// The built-in guests, each with what it does.
fn guest_names() -> PossibleValuesParser {
    PossibleValuesParser::new(guests::GUESTS.iter().map(|g| PossibleValue::new(g.name).help(g.about)))
}

/// `--guest-args` described guest by guest, argument by argument.
fn guest_args_help() -> String {
    let mut s = String::from(
        "The built-in guest's arguments: key=value words (decimal values) separated by spaces, e.g. \
         \"mib=2 rounds=8\". Each guest takes:",
    );
    for g in guests::GUESTS {
        s.push_str(&format!("\n\n{}: {}", g.name, g.about));
        for a in g.args {
            s.push_str(&format!("\n  {}=N  {} (default {})", a.key, a.help, a.default));
        }
    }
    s
}

/// The checkpoint strategies.
fn strategies() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("stop-and-save").help("pause the guest, write the checkpoint, resume it"),
        PossibleValue::new("cevm")
            .help("live-migrate the guest to a new instance; the old one writes the checkpoint meanwhile"),
        PossibleValue::new("cow").help(
            "pause, fork the VMM, resume at once; the fork writes the frozen memory (needs --memory-backend private)",
        ),
    ])
}

/// Where guest memory can live.
fn memory_backends() -> impl TypedValueParser<Value = MemoryBackend> {
    PossibleValuesParser::new([
        PossibleValue::new("shared").help("a memfd mapped shared (the same pages can be mapped by another process)"),
        PossibleValue::new("private").help("private anonymous memory (a fork of the VMM gets a copy-on-write view)"),
    ])
    .try_map(|s| s.parse::<MemoryBackend>())
}

/// The exit codes, as `--help` ends.
fn exit_status_help() -> String {
    let mut s = String::from("Exit status:");
    for (code, meaning) in cevm::exit_code::MEANINGS {
        s.push_str(&format!("\n  {code}  {meaning}"));
    }
    s
}

impl PeriodicArgs {
    /// The policy for a guest of `config`, checked before anything runs.
    fn policy(self, config: &InstanceConfig) -> Result<Option<runner::Periodic>, String> {
        let Some(dir) = self.checkpoint_dir else { return Ok(None) };
        let every = self.checkpoint_every;
        if every.is_some() && self.checkpoint_strategy == Method::CevmThread {
            checkpoint::cevm::supports(config).map_err(|e| format!("--checkpoint-strategy cevm: {e}"))?;
        }
        if every.is_some() && self.checkpoint_strategy == Method::Cow {
            checkpoint::cow::supports(config).map_err(|e| format!("--checkpoint-strategy cow: {e}"))?;
        }
        if self.checkpoint_incremental && !matches!(self.checkpoint_strategy, Method::StopAndSave | Method::Cow) {
            return Err("--checkpoint-incremental: incremental checkpoints are taken by the stop-and-save and cow \
                        strategies (--checkpoint-strategy)"
                .into());
        }
        let series = open_series(&absolute(&dir)?, self.keep)?;
        Ok(Some(runner::Periodic {
            every,
            series,
            method: self.checkpoint_strategy,
            incremental: self.checkpoint_incremental,
        }))
    }
}

/// Opens the series of periodic checkpoints in `dir`, which puts right what a
/// killed VMM left there (see `checkpoint::series`), and says what it did.
fn open_series(dir: &Path, keep: usize) -> Result<checkpoint::series::Series, String> {
    let series = checkpoint::series::Series::open(dir, keep).map_err(|e| e.to_string())?;
    for r in series.repairs() {
        tracing::warn!("checkpoint series {}: {r}", dir.display());
    }
    Ok(series)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    ExitCode::from(run(cli.cmd).clamp(0, 255) as u8)
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    tracing::error!("{msg}");
    ERROR
}

/// Runs a VMM command confined by its seccomp filters (see crate `sandbox`):
/// installed before the VMM makes any thread, so that every thread has one.
fn sandboxed(vmm: impl FnOnce() -> i32) -> i32 {
    match sandbox::enable() {
        Ok(()) => vmm(),
        Err(e) => fail(e),
    }
}

fn run(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Run(a) => sandboxed(|| run_vm(a)),
        Cmd::Restore { dir, overlay, api_sock, control, vcpu_cpus, net, paused, lazy, lazy_bandwidth, periodic } => {
            let taps = match args::tap_overrides(&net) {
                Ok(t) => t,
                Err(e) => return usage(e),
            };
            // Absolute: the restored guest's disk path is stored in its configuration.
            let (dir, overlay) = match (absolute(&dir), overlay.as_deref().map(anchored).transpose()) {
                (Ok(d), Ok(o)) => (d, o),
                (Err(e), _) | (_, Err(e)) => return fail(e),
            };
            let how = Restore {
                overlay: overlay.as_deref(),
                api_sock: api_sock.as_deref(),
                control: &control,
                vcpu_cpus: vcpu_cpus.as_ref(),
                taps,
                paused,
                lazy: lazy
                    .then(|| checkpoint::LazyOptions { bandwidth: lazy_bandwidth.map(|m| m.saturating_mul(1 << 20)) }),
            };
            sandboxed(|| restore(&dir, how, periodic))
        }
        Cmd::Checkpoint(a) => checkpoint_vm(a),
        Cmd::Group(g) => cevm::group::run(g),
        Cmd::Batch(a) => cevm::batch::run(a),
        Cmd::BatchMember(a) => cevm::batch::group::member(a),
        Cmd::Migrate(a) => migrate_vm(a),
        Cmd::Pause { api_sock } => client(&api_sock, Client::pause),
        Cmd::Resume { api_sock } => client(&api_sock, Client::resume),
        Cmd::Status { api_sock } => client(&api_sock, Client::status),
        Cmd::Quit { api_sock } => client(&api_sock, Client::quit),
        Cmd::Verify { dir } => verify(&dir),
        Cmd::Inspect { dir, json } => match inspect::describe(&dir, json) {
            Ok(s) if json => out(format!("{s}\n").as_bytes()),
            Ok(s) => out(s.as_bytes()),
            Err(e) => fail(format!("cannot inspect: {e}")),
        },
        Cmd::Demo { keep, dir } => {
            let bin = match std::env::current_exe() {
                Ok(b) => b,
                Err(e) => return fail(format!("cannot find the cevm binary: {e}")),
            };
            match demo::run(&bin, &dir.unwrap_or_else(demo::default_workdir), keep) {
                Ok(true) => OK,
                Ok(false) => ERROR,
                Err(e) => fail(format!("demo: {e}")),
            }
        }
        Cmd::Bench { args } => bench(&args),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cevm", &mut script);
            out(&script)
        }
        Cmd::Man { dir } => man(dir.as_deref()),
    }
}

/// `cevm verify DIR`, with a bar of the bytes checked on a terminal.
fn verify(dir: &Path) -> i32 {
    let bar = progress::Bytes::new("verifying");
    let verified = checkpoint::verify_with(dir, &mut |done, total| bar.update(done, total));
    drop(bar);
    match verified {
        Ok(r) => {
            let mut s = format!("{}: OK\n", dir.display());
            if let Some(p) = &r.manifest.parent {
                s.push_str(&format!(
                    "  incremental on {} (id {}): every checkpoint behind it verified too\n",
                    p.dir, p.id
                ));
            }
            for f in &r.files {
                s.push_str(&format!("  {:<14} {:>14} bytes  crc32 {}  ok\n", f.name, f.size, f.crc32));
            }
            out(s.as_bytes())
        }
        Err(e) => fail(format!("verify failed: {e}")),
    }
}

/// Writes `bytes` to stdout. A reader that went away (`cevm inspect DIR |
/// head -1`) is no error: cevm ends quietly, with the status of the work done.
/// (Rust ignores SIGPIPE, so the write fails with EPIPE instead of ending the
/// process as it ends coreutils; `print!` would panic on it.)
fn out(bytes: &[u8]) -> i32 {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
        Err(e) => fail(format!("cannot write to stdout: {e}")),
    }
}

/// A bad command line found after parsing (exit 2).
fn usage(msg: impl std::fmt::Display) -> i32 {
    tracing::error!("{msg}");
    USAGE
}

/// `cevm checkpoint`: asks the VMM for a checkpoint.
fn checkpoint_vm(a: CheckpointArgs) -> i32 {
    let (sock, req) = match checkpoint_request(a) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // The VMM checks it too; a combination it cannot serve is this command line's mistake.
    if let Err(e) = CheckpointPlan::try_from(req.clone()) {
        return usage(e);
    }
    client(&sock, |c| {
        let _bar = progress::checkpoint(sock.clone());
        c.checkpoint(&req)
    })
}

/// The API socket and the request of `cevm checkpoint` (`--out` made absolute).
fn checkpoint_request(a: CheckpointArgs) -> Result<(PathBuf, CheckpointRequest), String> {
    let CheckpointArgs { api_sock, out, strategy, stop, to, migration_cpus, writer_cpus, dest_vcpu_cpus, incremental } =
        a;
    let out = absolute(&out)?;
    let req = CheckpointRequest {
        stop,
        to,
        migration_cpus,
        writer_cpus,
        dest_vcpu_cpus,
        incremental,
        ..CheckpointRequest::new(out, &strategy)
    };
    Ok((api_sock, req))
}

/// `cevm man`: cevm(1) on stdout, or it and cevm-COMMAND(1) for each command into `dir`.
fn man(dir: Option<&Path>) -> i32 {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let Some(dir) = dir else {
        return match man_page(&cli) {
            Ok(page) => out(&page),
            Err(e) => fail(format!("cannot render the man page: {e}")),
        };
    };
    let pages = std::iter::once(&cli).chain(cli.get_subcommands());
    for cmd in pages {
        let name = cmd.get_display_name().unwrap_or(cmd.get_name());
        let path = dir.join(format!("{name}.1"));
        if let Err(e) = man_page(cmd).and_then(|page| std::fs::write(&path, page)) {
            return fail(format!("{}: {e}", path.display()));
        }
        tracing::info!("wrote {}", path.display());
    }
    OK
}

/// The man page of `cmd` (built), with the exit codes in an EXIT STATUS section.
fn man_page(cmd: &clap::Command) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut page)?;
    }
    // Plain words only (no leading dot or backslash): valid roff as they are.
    page.extend_from_slice(b".SH \"EXIT STATUS\"\n");
    for (code, meaning) in cevm::exit_code::MEANINGS {
        page.extend_from_slice(format!(".TP\n{code}\n{meaning}\n").as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    Ok(page)
}

/// `cevm run`: boots the guest (or waits for one with `--incoming`) and serves it.
fn run_vm(a: RunArgs) -> i32 {
    let RunArgs {
        guest,
        guest_args,
        kernel,
        initrd,
        cmdline,
        mem,
        overcommit,
        vcpus,
        disk,
        overlay,
        disk_read_only,
        net,
        memory_backend,
        api_sock,
        control,
        incoming,
        vcpu_cpus,
        periodic,
    } = a;
    if let Some(code) = finished_series(periodic.on_signal, periodic.checkpoint_dir.as_deref()) {
        return code;
    }
    if let Err(code) = block_signals(periodic.on_signal) {
        return code;
    }
    let on_signal = periodic.on_signal;
    // The NICs' taps are checked before anything is made: a new guest's must
    // open; an arriving guest's must exist (its source on this host may still
    // hold it).
    let (nics, taps) = match incoming {
        Some(_) => (Ok(Vec::new()), args::tap_overrides(&net)),
        None => (args::nics(&net), Ok(Vec::new())),
    };
    let (nics, taps) = match (nics, taps) {
        (Ok(n), Ok(t)) => (n, t),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    let usable = nics
        .iter()
        .try_for_each(|n| devices::virtio::net::Tap::open(&n.tap).map(drop))
        .and_then(|()| taps.iter().try_for_each(|t| devices::virtio::net::tap::check_exists(t)));
    if let Err(e) = usable {
        return usage(e);
    }
    // First of all: a refused socket path leaves nothing behind (no overlay).
    let api = match start_api(api_sock.as_deref(), &control) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(endpoint) = incoming {
        let host = migrate::HostBinding { vcpu_cpus: vcpu_cpus.map(|c| c.0).unwrap_or_default(), taps };
        return run_incoming(&endpoint, api.as_ref(), &host);
    }
    if !overcommit {
        if let Err(e) = args::check_host_mem(mem, cevm::host::memory_limit()) {
            return usage(e);
        }
    }
    let boot = match (guest, kernel) {
        (Some(guest), _) => match args::check_guest(&guest, &guest_args, mem) {
            Ok(()) => Boot::Builtin { guest, args: guest_args },
            Err(e) => return usage(e),
        },
        // Absolute: the configuration holding them travels in checkpoints and migrations.
        (None, Some(kernel)) => match (anchored(&kernel), initrd.as_deref().map(anchored).transpose()) {
            (Ok(kernel), Ok(initrd)) => Boot::Linux { kernel, initrd, cmdline },
            (Err(e), _) | (_, Err(e)) => return fail(e),
        },
        (None, None) => return usage("give --guest or --kernel"),
    };
    let disk = match disk_config(disk, overlay, disk_read_only) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let config = InstanceConfig { boot, mem_size: mem, vcpus, memory_backend, disk, nics };
    let periodic = match periodic.policy(&config) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (tx, rx) = mpsc::channel();
    match new_instance(config, tx) {
        Ok(inst) => {
            let start = runner::Start { vcpu_cpus: vcpu_cpus.as_ref(), on_signal, ..Default::default() };
            finish(runner::run(inst, rx, api.as_ref(), start, periodic))
        }
        Err(e) => fail(e),
    }
}

/// How `cevm restore` runs the guest it restores.
struct Restore<'a> {
    overlay: Option<&'a Path>,
    api_sock: Option<&'a Path>,
    control: &'a ControlArgs,
    vcpu_cpus: Option<&'a vmm::placement::CpuList>,
    /// NIC i binds `taps[i]` instead of the tap it had.
    taps: Vec<String>,
    /// Restored, verified and ready, the guest waits for `resume`.
    paused: bool,
    /// Memory loaded lazily (`--lazy`).
    lazy: Option<checkpoint::LazyOptions>,
}

/// `cevm restore`: verifies and loads a checkpoint and serves the guest.
fn restore(dir: &Path, how: Restore<'_>, periodic: PeriodicArgs) -> i32 {
    let Restore { overlay, api_sock, control, vcpu_cpus, taps, paused, lazy } = how;
    // A finished batch job is not run again from its series (a checkpoint of
    // it restored alone, without the series, still is: to look at it).
    if let Some(code) = finished_series(periodic.on_signal, periodic.checkpoint_dir.as_deref()) {
        return code;
    }
    if let Err(code) = block_signals(periodic.on_signal) {
        return code;
    }
    let on_signal = periodic.on_signal;
    // Before the restore creates the guest's disk: a refusal leaves nothing.
    let api = match start_api(api_sock, control) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // Restoring DIR/latest after a VMM was killed: the series is put right
    // first, so `latest` is there and names the newest complete checkpoint
    // (nothing removed yet: the checkpoint to restore may be one beyond --keep).
    if let Some(series) = &periodic.checkpoint_dir {
        if let Err(e) = absolute(series).and_then(|d| open_series(&d, usize::MAX)) {
            return fail(e);
        }
    }
    let (tx, rx) = mpsc::channel();
    let t0 = std::time::Instant::now();
    let bar = progress::Bytes::new("restoring");
    let mut show = |d, t| bar.update(d, t);
    let memory = match lazy {
        None => checkpoint::Memory::Load(&mut show),
        Some(options) => checkpoint::Memory::Lazy(options, Box::new(lazy_failed)),
    };
    let restored = checkpoint::restore(dir, overlay, Box::new(std::io::stdout()), tx, &taps, memory);
    drop(bar);
    match restored {
        Ok(checkpoint::Restored { instance: inst, disk, lazy }) => {
            if lazy.is_some() {
                tracing::info!(
                    "restored {} lazily in {:.1} ms (state and files verified; memory is checked chunk by chunk as it \
                     comes)",
                    dir.display(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
            } else {
                tracing::info!("restored {} (every checksum verified)", dir.display());
            }
            if let Some(d) = disk {
                tracing::info!("the restored guest's disk is {}", d.display());
            }
            let periodic = match periodic.policy(inst.config()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            if paused {
                tracing::info!("the guest waits paused: it runs from the first `resume` on");
            }
            let from = checkpoint::group::member_manifest_crc(dir)
                .map(|manifest_crc32| cevm::api::RestoredFrom { dir: dir.to_path_buf(), manifest_crc32 })
                .ok();
            let start =
                runner::Start { vcpu_cpus, paused, restored_from: from.as_ref(), on_signal, lazy, began: Some(t0) };
            finish(runner::run(inst, rx, api.as_ref(), start, periodic))
        }
        Err(e) => fail(format!("cannot restore: {e}")),
    }
}

/// A lazy restore met a damaged chunk: the VM stops at once. Its vCPUs may
/// wait on that memory, and must never get it, so the VMM ends here rather
/// than stopping them in order.
fn lazy_failed(e: String) {
    tracing::error!("{e}");
    std::process::exit(cevm::exit_code::ERROR);
}

/// `cevm migrate`: asks the VMM for a live migration, showing its progress.
fn migrate_vm(a: MigrateArgs) -> i32 {
    let MigrateArgs {
        api_sock,
        to,
        max_downtime_ms,
        max_rounds,
        no_auto_converge,
        max_bandwidth_mib_s,
        migration_cpus,
        dest_vcpu_cpus,
    } = a;
    let params = migrate::Params {
        max_downtime_ms,
        max_rounds,
        auto_converge: !no_auto_converge,
        max_bandwidth_mib_s,
        ..Default::default()
    };
    let req = MigrateRequest { to, params, migration_cpus, dest_vcpu_cpus };
    // The VMM checks it too; a bad target is this command line's mistake.
    if let Err(e) = MigrationPlan::try_from(req.clone()) {
        return usage(e);
    }
    // The bar ends before the answer or an error is printed.
    client(&api_sock, |c| {
        let _bar = progress::migration(api_sock.clone());
        c.migrate(&req)
    })
}

/// `cevm bench ARGS`: replaces this process with `cevm-bench ARGS`, the
/// benchmark program built beside `cevm` (`cargo build --release` builds both).
fn bench(args: &[std::ffi::OsString]) -> i32 {
    use std::os::unix::process::CommandExt;
    let here = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let Some(bin) = here.map(|d| d.join("cevm-bench")).filter(|b| b.is_file()) else {
        return fail("cevm-bench is not beside this cevm binary: build it with `cargo build --release -p cevm-bench`");
    };
    let e = std::process::Command::new(&bin).args(args).exec();
    fail(format!("cannot run {}: {e}", bin.display()))
}

/// `cevm run --incoming`: waits for one migration, then runs the guest that came.
fn run_incoming(endpoint: &migrate::Endpoint, api: Option<&Server>, host: &migrate::HostBinding) -> i32 {
    let listener = match endpoint.listen() {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    tracing::info!("waiting for a migration at {endpoint}");
    let t = match listener.accept() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    drop(listener);
    let (tx, rx) = mpsc::channel();
    // A CEVM checkpoint's guest: its disk comes over in the background (the
    // disk hand-over) while the source writes the checkpoint.
    match migrate::accept_guest(t, Box::new(std::io::stdout()), tx, host) {
        Ok(arrived) => {
            tracing::info!("guest arrived from {} ({}), running", arrived.peer, arrived.hello.config.boot);
            if let Some(e) = &arrived.disk_link_error {
                tracing::warn!("disk hand-over: {e}");
            }
            finish(runner::run(arrived.instance, rx, api, runner::Start::default(), None))
        }
        Err(e) => fail(format!("incoming migration failed, nothing runs: {e}")),
    }
}

/// Serves the control API at `path`, if given, and to other hosts as
/// `control` says; a path, secret or address that cannot be used is refused
/// (exit code 2) with nothing changed on disk.
fn start_api(path: Option<&Path>, control: &ControlArgs) -> Result<Option<Server>, i32> {
    // The secret first: a refusal leaves no socket behind.
    let secret = match &control.control_secret {
        Some(f) => match cevm::api::remote::Secret::load(f) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("{e}");
                return Err(USAGE);
            }
        },
        None => None,
    };
    let mut server = path.map(Server::start).transpose().map_err(|e: ServeError| {
        tracing::error!("{e}");
        if e.is_usage() {
            USAGE
        } else {
            ERROR
        }
    })?;
    if let (Some(s), Some(listen), Some(secret)) = (server.as_mut(), &control.control, secret) {
        match s.serve_remote(listen, secret) {
            Ok(at) => tracing::info!("remote control at tcp:{at} (peers with the job's secret only)"),
            Err(e) => {
                tracing::error!("--control tcp:{listen}: cannot listen there: {e}");
                return Err(USAGE);
            }
        }
    }
    Ok(server)
}

/// With `--on-signal` (a batch job), the exit code of a job whose series
/// `dir` says it finished (said in the log; nothing runs), or `None`.
fn finished_series(on: Option<cevm::signals::OnSignal>, dir: Option<&Path>) -> Option<i32> {
    on?;
    cevm::signals::finished_exit_code(dir?)
}

/// With `--on-signal`, its signals are blocked in every thread from now on
/// and taken by the control loop (see `cevm::signals`).
fn block_signals(on: Option<cevm::signals::OnSignal>) -> Result<(), i32> {
    match on.map(|_| cevm::signals::block()) {
        Some(Err(e)) => Err(fail(format!("--on-signal: {e}"))),
        _ => Ok(()),
    }
}

/// Turns the end of a VMM run into a message and an exit code.
fn finish(r: Result<Outcome, RunError>) -> i32 {
    match r {
        Ok(Outcome::GuestExit(0)) => OK,
        Ok(Outcome::GuestExit(s)) => {
            tracing::info!("guest exited with status {s}");
            GUEST_FAILED
        }
        Ok(Outcome::PowerOff) => {
            tracing::info!("guest powered off");
            OK
        }
        Ok(Outcome::Reboot) => {
            tracing::info!("guest asked for a reboot; cevm ends the VM instead (run it again to restart)");
            OK
        }
        Ok(Outcome::StoppedAfterCheckpoint(dir)) => {
            tracing::info!("VM stopped after its checkpoint to {}", dir.display());
            OK
        }
        Ok(Outcome::Quit) => {
            tracing::info!("VM stopped by the API");
            OK
        }
        // The runner already said where the guest went.
        Ok(Outcome::MigratedAway(_)) => OK,
        Ok(Outcome::Signalled { signal, checkpoint: Some(dir) }) => {
            let name = cevm::signals::name(signal);
            tracing::info!(
                "{name}: the VM stopped after its last checkpoint to {}; run it again from there",
                dir.display()
            );
            cevm::exit_code::REQUEUE
        }
        Ok(Outcome::Signalled { signal, checkpoint: None }) => {
            tracing::info!("{}: the VM stopped", cevm::signals::name(signal));
            128 + signal
        }
        Ok(Outcome::Failed(msg)) => fail(msg),
        Err(e) => fail(e),
    }
}

/// A new instance of `config` whose console is stdout. The image of a built-in
/// guest is looked up here, in crate `guests`: the VMM takes it from its caller.
fn new_instance(config: InstanceConfig, events: mpsc::Sender<vmm::VmEvent>) -> Result<Instance, String> {
    let image = match &config.boot {
        Boot::Builtin { guest, .. } => Some(guests::find(guest).map_err(|e| format!("invalid configuration: {e}"))?),
        Boot::Linux { .. } => None,
    };
    Instance::new(config, image, Box::new(std::io::stdout()), events).map_err(|e| e.to_string())
}

/// The guest's disk: the image itself, or an overlay over it (created when missing,
/// with the base recorded by its absolute path so the overlay can move). Both
/// paths are made absolute: the configuration holding them travels to a
/// migration's destination or a restore, which may run in another directory.
fn disk_config(disk: Option<PathBuf>, overlay: Option<PathBuf>, read_only: bool) -> Result<Option<DiskConfig>, String> {
    let Some(disk) = disk else { return Ok(None) };
    let disk = anchored(&disk)?;
    let path = match overlay {
        Some(top) => {
            let top = anchored(&top)?;
            if !top.exists() {
                disk::Disk::create_overlay(&top, &disk).map_err(|e| e.to_string())?;
                tracing::info!("created overlay {} over {}", top.display(), disk.display());
            }
            top
        }
        None => disk,
    };
    Ok(Some(DiskConfig { path, read_only }))
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// [`args::anchored`], its error naming `p`.
fn anchored(p: &Path) -> Result<PathBuf, String> {
    args::anchored(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// One API call; prints the answer as JSON. A missing socket is a usage error (2).
fn client<T: serde::Serialize>(sock: &Path, call: impl FnOnce(&Client) -> Result<T, ClientError>) -> i32 {
    match call(&Client::new(sock, Duration::from_secs(3600))) {
        Ok(v) => out(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()).as_bytes()),
        Err(e @ ClientError::Connect { .. }) => {
            tracing::error!("{e} (is a `cevm run --api-sock` running there?)");
            USAGE
        }
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command, and every argument of every command, says what it is.
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        walk(&cli, "cevm", &mut missing);
        assert!(missing.is_empty(), "without a help text: {missing:?}");
    }

    /// Options that take one of a fixed set of words list them (in `--help`,
    /// the man page and the completions).
    #[test]
    fn options_with_a_fixed_set_of_values_list_them() {
        let cli = Cli::command();
        let arg = |sub: &str, id: &str| {
            let cmd = cli.find_subcommand(sub).unwrap_or_else(|| panic!("no `{sub}`"));
            let a = cmd.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no {sub} {id}"));
            a.get_possible_values().iter().map(|v| v.get_name().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(arg("run", "guest"), guests::names().collect::<Vec<_>>());
        assert_eq!(arg("run", "memory_backend"), ["shared", "private"]);
        for sub in ["run", "restore"] {
            assert_eq!(arg(sub, "checkpoint_strategy"), ["stop-and-save", "cevm", "cow"]);
        }
        assert_eq!(arg("checkpoint", "strategy"), ["stop-and-save", "cevm", "cow"]);
        assert!(arg("completions", "shell").contains(&"bash".to_string()));
        // What each strategy value maps to.
        let m = |s: &str| {
            Cli::try_parse_from([
                "cevm",
                "run",
                "--guest",
                "hello",
                "--checkpoint-every",
                "1m",
                "--checkpoint-dir",
                "/tmp/x",
                "--checkpoint-strategy",
                s,
            ])
        };
        let Ok(Cli { cmd: Cmd::Run(r), .. }) = m("stop-and-save") else { panic!("stop-and-save refused") };
        assert_eq!(r.periodic.checkpoint_strategy, Method::StopAndSave);
    }

    #[test]
    fn checkpoint_placement_flags_go_into_the_api_request() {
        #[rustfmt::skip]
        let argv = [
            "cevm", "checkpoint", "--api-sock", "/run/vm.sock", "--out", "ckpt", "--strategy", "cevm",
            "--writer-cpus", "1", "--migration-cpus", "0", "--dest-vcpu-cpus", "1,0",
        ];
        let Ok(Cli { cmd: Cmd::Checkpoint(a), .. }) = Cli::try_parse_from(argv) else { panic!("refused") };
        let (sock, req) = checkpoint_request(a).unwrap();
        assert_eq!(sock, Path::new("/run/vm.sock"));
        assert!(req.out.is_absolute() && req.out.ends_with("ckpt"), "{}", req.out.display());
        let body = serde_json::to_value(&req).unwrap();
        assert_eq!(body["strategy"], "cevm");
        assert_eq!(body["writer_cpus"], serde_json::json!([1]));
        assert_eq!(body["migration_cpus"], serde_json::json!([0]));
        assert_eq!(body["dest_vcpu_cpus"], serde_json::json!([1, 0]));
        assert!(CheckpointPlan::try_from(req).is_ok());
    }
}
