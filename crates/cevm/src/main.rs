//! `cevm`: a KVM VMM with live checkpoint/restart. See README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use checkpoint::Method;
use clap::{Parser, Subcommand};

use cevm::api::{CheckpointRequest, Client, ClientError, MigrateRequest};
use cevm::exit_code::{ERROR, GUEST_FAILED, OK, USAGE};
use cevm::plan::MigrationPlan;
use cevm::runner::{Outcome, RunError};
use cevm::{demo, inspect, runner, size};
use vmm::{Boot, DiskConfig, Instance, InstanceConfig, MemoryBackend};

#[derive(Parser)]
#[command(name = "cevm", version, about = "A KVM VMM with live checkpoint/restart")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
        dir: PathBuf,
        /// Where the restored guest's disk goes (a copy of the checkpoint's; default
        /// DIR.disk.qcow2 beside the checkpoint). Must not exist.
        #[arg(long)]
        overlay: Option<PathBuf>,
        /// Serve the control API on this unix socket.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// Place the vCPU threads: vCPU i on the i-th CPU of this list.
        #[arg(long)]
        vcpu_cpus: Option<vmm::placement::CpuList>,
        #[command(flatten)]
        periodic: PeriodicArgs,
    },
    /// Checkpoint a running VM.
    Checkpoint {
        /// The VM's API socket.
        #[arg(long)]
        api_sock: PathBuf,
        /// Directory to commit the checkpoint to (replaced atomically if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Strategy: stop-and-save (pause, write, resume) or cevm (live-migrate
        /// to a new instance, the old one writes the checkpoint meanwhile).
        #[arg(long, default_value = "stop-and-save")]
        strategy: String,
        /// Leave the VM stopped after the checkpoint (its VMM exits).
        #[arg(long)]
        stop: bool,
        /// cevm strategy: where the new instance runs: `local` (thread-based, in
        /// the same VMM) or `unix:PATH` / `tcp:HOST:PORT` of a `cevm run
        /// --incoming` (process-based; the old VMM ends once it wrote the checkpoint).
        #[arg(long)]
        to: Option<String>,
    },
    /// Pause a running VM.
    Pause {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Show a VM's state.
    Status {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Stop a VM and its VMM.
    Quit {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Check a checkpoint completely (every file and checksum).
    Verify { dir: PathBuf },
    /// Show what a checkpoint holds.
    Inspect {
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
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Benchmarks: runs `cevm-bench ARGS` from beside this binary (the
    /// benchmarks are a program of their own, crate `cevm-bench`; `cevm bench
    /// --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `cevm run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Built-in guest: digest, dirtier or hello.
    #[arg(long, required_unless_present_any = ["kernel", "incoming"], conflicts_with = "kernel")]
    guest: Option<String>,
    /// The built-in guest's arguments, e.g. "mib=2 rounds=8".
    #[arg(long, default_value = "", conflicts_with = "kernel")]
    guest_args: String,
    /// Linux kernel (bzImage) to boot.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs for the Linux kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Linux kernel command line.
    #[arg(long, requires = "kernel", default_value = vmm::linux::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory, e.g. 64M, 1G.
    #[arg(long, default_value = "64M", value_parser = size::parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// Disk image of the guest's virtio-blk device (raw or qcow2); with
    /// --overlay, the base image, which is then only read.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// qcow2 overlay over --disk that the guest writes (created if it does not exist).
    #[arg(long, requires = "disk")]
    overlay: Option<PathBuf>,
    /// Offer the disk to the guest read-only.
    #[arg(long, requires = "disk")]
    disk_read_only: bool,
    /// Where guest memory lives: shared (memfd) or private (anonymous).
    #[arg(long, default_value = "shared")]
    memory_backend: MemoryBackend,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Boot nothing: wait for a live migration at unix:PATH or tcp:HOST:PORT and
    /// run the guest that arrives (its configuration comes with it).
    #[arg(long, conflicts_with_all = ["guest", "kernel", "disk"])]
    incoming: Option<migrate::Endpoint>,
    /// Place the vCPU threads: vCPU i on the i-th CPU of this list (e.g. 0,1 or 2-3).
    #[arg(long)]
    vcpu_cpus: Option<vmm::placement::CpuList>,
    #[command(flatten)]
    periodic: PeriodicArgs,
}

/// `cevm migrate`.
#[derive(clap::Args)]
struct MigrateArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// `local`, unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
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
    #[arg(long)]
    migration_cpus: Option<vmm::placement::CpuList>,
    /// CPUs for the new instance's vCPU threads (with --to local).
    #[arg(long)]
    dest_vcpu_cpus: Option<vmm::placement::CpuList>,
}

/// Periodic checkpoints of `cevm run` and `cevm restore`.
#[derive(clap::Args, Debug)]
struct PeriodicArgs {
    /// Take a checkpoint every DURATION (e.g. 90s, 10m, 1h) into --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir", value_parser = size::parse_duration)]
    checkpoint_every: Option<std::time::Duration>,
    /// Where periodic checkpoints go: DIR/ckpt-000001, ... and DIR/latest, a
    /// link to the newest committed one (`cevm restore DIR/latest`).
    #[arg(long, requires = "checkpoint_every")]
    checkpoint_dir: Option<PathBuf>,
    /// How many periodic checkpoints to keep; older ones are removed only once a
    /// newer one is committed.
    #[arg(long, default_value_t = 2, requires = "checkpoint_every")]
    keep: usize,
    /// Strategy of the periodic checkpoints: cevm or stop-and-save.
    #[arg(long, default_value = "cevm", requires = "checkpoint_every", value_parser = |s: &str| Method::of_strategy(s, false))]
    checkpoint_strategy: Method,
}

impl PeriodicArgs {
    /// The policy for a guest of `config`, checked before anything runs.
    fn policy(self, config: &InstanceConfig) -> Result<Option<runner::Periodic>, String> {
        let (Some(every), Some(dir)) = (self.checkpoint_every, self.checkpoint_dir) else { return Ok(None) };
        if every.is_zero() {
            return Err("--checkpoint-every must be longer than zero".into());
        }
        if self.checkpoint_strategy == Method::CevmThread {
            checkpoint::cevm::supports(config).map_err(|e| format!("--checkpoint-strategy cevm: {e}"))?;
        }
        let series = open_series(&absolute(&dir)?, self.keep)?;
        Ok(Some(runner::Periodic { every, series, method: self.checkpoint_strategy }))
    }
}

/// Opens the series of periodic checkpoints in `dir`, which puts right what a
/// killed VMM left there (see `checkpoint::series`), and says what it did.
fn open_series(dir: &Path, keep: usize) -> Result<checkpoint::series::Series, String> {
    let series = checkpoint::series::Series::open(dir, keep).map_err(|e| e.to_string())?;
    for r in series.repairs() {
        eprintln!("cevm: checkpoint series {}: {r}", dir.display());
    }
    Ok(series)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(run(cli.cmd).clamp(0, 255) as u8)
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("cevm: error: {msg}");
    ERROR
}

fn run(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Run(a) => run_vm(a),
        Cmd::Restore { dir, overlay, api_sock, vcpu_cpus, periodic } => {
            restore(&dir, overlay.as_deref(), api_sock.as_deref(), vcpu_cpus.as_ref(), periodic)
        }
        Cmd::Checkpoint { api_sock, out, strategy, stop, to } => {
            let out = match absolute(&out) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let req = CheckpointRequest { stop, to, ..CheckpointRequest::new(out, &strategy) };
            client(&api_sock, |c| c.checkpoint(&req))
        }
        Cmd::Migrate(a) => migrate_vm(a),
        Cmd::Pause { api_sock } => client(&api_sock, Client::pause),
        Cmd::Resume { api_sock } => client(&api_sock, Client::resume),
        Cmd::Status { api_sock } => client(&api_sock, Client::status),
        Cmd::Quit { api_sock } => client(&api_sock, Client::quit),
        Cmd::Verify { dir } => match checkpoint::verify(&dir) {
            Ok(r) => {
                println!("{}: OK", dir.display());
                for f in &r.files {
                    println!("  {:<14} {:>14} bytes  crc32 {}  ok", f.name, f.size, f.crc32);
                }
                OK
            }
            Err(e) => fail(format!("verify failed: {e}")),
        },
        Cmd::Inspect { dir, json } => match inspect::describe(&dir, json) {
            Ok(s) => {
                print!("{s}");
                if json {
                    println!();
                }
                OK
            }
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
    }
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
        vcpus,
        disk,
        overlay,
        disk_read_only,
        memory_backend,
        api_sock,
        incoming,
        vcpu_cpus,
        periodic,
    } = a;
    if let Some(endpoint) = incoming {
        return run_incoming(&endpoint, api_sock.as_deref(), vcpu_cpus.as_ref());
    }
    let disk = match disk_config(disk, overlay, disk_read_only) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let boot = match (guest, kernel) {
        (Some(guest), _) => Boot::Builtin { guest, args: guest_args },
        (None, Some(kernel)) => Boot::Linux { kernel, initrd, cmdline },
        (None, None) => return fail("give --guest or --kernel"),
    };
    let config = InstanceConfig { boot, mem_size: mem, vcpus, memory_backend, disk };
    let periodic = match periodic.policy(&config) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (tx, rx) = mpsc::channel();
    match new_instance(config, tx) {
        Ok(inst) => finish(runner::run(inst, rx, api_sock.as_deref(), vcpu_cpus.as_ref(), periodic)),
        Err(e) => fail(e),
    }
}

/// `cevm restore`: verifies and loads a checkpoint and serves the guest.
fn restore(
    dir: &Path,
    overlay: Option<&Path>,
    api_sock: Option<&Path>,
    vcpu_cpus: Option<&vmm::placement::CpuList>,
    periodic: PeriodicArgs,
) -> i32 {
    // Restoring DIR/latest after a VMM was killed: the series is put right
    // first, so `latest` is there and names the newest complete checkpoint
    // (nothing removed yet: the checkpoint to restore may be one beyond --keep).
    if let Some(series) = &periodic.checkpoint_dir {
        if let Err(e) = absolute(series).and_then(|d| open_series(&d, usize::MAX)) {
            return fail(e);
        }
    }
    let (tx, rx) = mpsc::channel();
    match checkpoint::restore(dir, overlay, Box::new(std::io::stdout()), tx) {
        Ok((inst, disk)) => {
            eprintln!("cevm: restored {} (every checksum verified)", dir.display());
            if let Some(d) = disk {
                eprintln!("cevm: the restored guest's disk is {}", d.display());
            }
            let periodic = match periodic.policy(inst.config()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            finish(runner::run(inst, rx, api_sock, vcpu_cpus, periodic))
        }
        Err(e) => fail(format!("cannot restore: {e}")),
    }
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
        eprintln!("cevm: error: {e}");
        return USAGE;
    }
    let bar = progress_bar(api_sock.clone());
    let code = client(&api_sock, |c| c.migrate(&req));
    bar.store(true, std::sync::atomic::Ordering::Relaxed);
    code
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
fn run_incoming(
    endpoint: &migrate::Endpoint,
    api_sock: Option<&Path>,
    vcpu_cpus: Option<&vmm::placement::CpuList>,
) -> i32 {
    let listener = match endpoint.listen() {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    eprintln!("cevm: waiting for a migration at {endpoint}");
    let t = match listener.accept() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    drop(listener);
    let (tx, rx) = mpsc::channel();
    let cpus = vcpu_cpus.map(|c| c.0.clone()).unwrap_or_default();
    // A CEVM checkpoint's guest: its disk comes over in the background (the
    // disk hand-over) while the source writes the checkpoint.
    match migrate::accept_guest(t, Box::new(std::io::stdout()), tx, &cpus) {
        Ok(arrived) => {
            eprintln!("cevm: guest arrived from {} ({}), running", arrived.peer, arrived.hello.config.boot);
            if let Some(e) = &arrived.disk_link_error {
                eprintln!("cevm: disk hand-over: {e}");
            }
            finish(runner::run(arrived.instance, rx, api_sock, None, None))
        }
        Err(e) => fail(format!("incoming migration failed, nothing runs: {e}")),
    }
}

/// While a migration runs, shows its progress on stderr (when stderr is a
/// terminal) from `GET /v1/migration`. Set the returned flag to stop it.
fn progress_bar(sock: PathBuf) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::io::IsTerminal;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !std::io::stderr().is_terminal() {
        return done;
    }
    let d = done.clone();
    std::thread::spawn(move || {
        let api = Client::new(sock, Duration::from_secs(2));
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(p) = api.migration() {
                let pct = (p.pages_sent as f64 / p.pages_total.max(1) as f64 * 100.0).min(100.0);
                let filled = (pct / 5.0) as usize;
                eprint!(
                    "\r[{}{}] {:>3.0}% {} round {} dirty {:.0} p/s {:.0} MiB/s expect {:.1} ms throttle {}%   ",
                    "#".repeat(filled),
                    " ".repeat(20 - filled.min(20)),
                    pct,
                    p.phase,
                    p.round,
                    p.dirty_pages_per_s,
                    p.mib_per_s,
                    p.expected_downtime_ms,
                    p.throttle_pct
                );
            }
        }
        eprintln!();
    });
    done
}

/// Turns the end of a VMM run into a message and an exit code.
fn finish(r: Result<Outcome, RunError>) -> i32 {
    match r {
        Ok(Outcome::GuestExit(0)) => OK,
        Ok(Outcome::GuestExit(s)) => {
            eprintln!("cevm: guest exited with status {s}");
            GUEST_FAILED
        }
        Ok(Outcome::PowerOff) => {
            eprintln!("cevm: guest powered off");
            OK
        }
        Ok(Outcome::Reboot) => {
            eprintln!("cevm: guest asked for a reboot; cevm ends the VM instead (run it again to restart)");
            OK
        }
        Ok(Outcome::StoppedAfterCheckpoint(dir)) => {
            eprintln!("cevm: VM stopped after its checkpoint to {}", dir.display());
            OK
        }
        Ok(Outcome::Quit) => {
            eprintln!("cevm: VM stopped by the API");
            OK
        }
        // The runner already said where the guest went.
        Ok(Outcome::MigratedAway(_)) => OK,
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
/// with the base recorded by its absolute path so the overlay can move).
fn disk_config(disk: Option<PathBuf>, overlay: Option<PathBuf>, read_only: bool) -> Result<Option<DiskConfig>, String> {
    let Some(disk) = disk else { return Ok(None) };
    let path = match overlay {
        Some(top) => {
            if !top.exists() {
                let base = absolute(&disk)?;
                disk::Disk::create_overlay(&top, &base).map_err(|e| e.to_string())?;
                eprintln!("cevm: created overlay {} over {}", top.display(), base.display());
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

/// One API call; prints the answer as JSON. A missing socket is a usage error (2).
fn client<T: serde::Serialize>(sock: &Path, call: impl FnOnce(&Client) -> Result<T, ClientError>) -> i32 {
    match call(&Client::new(sock, Duration::from_secs(3600))) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            OK
        }
        Err(e @ ClientError::Connect { .. }) => {
            eprintln!("cevm: error: {e} (is a `cevm run --api-sock` running there?)");
            USAGE
        }
        Err(e) => fail(e),
    }
}
