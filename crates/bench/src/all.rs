//! `cevm bench all`: every benchmark in one run, one results file, one report.
//!
//! - The Linux-guest comparison (`compare`): cevm's strategies and QEMU's
//!   checkpoint methods on the same guest and workload: downtime against memory
//!   size and dirty rate, checkpoint time and size, restore time, the guest's
//!   progress around a checkpoint. On a host whose /dev/kvm cannot run Linux
//!   (PVM, as on the project's machines) it runs in the nested harness
//!   (`scripts/nested/run.sh`: QEMU TCG with an emulated SVM, both VMMs inside
//!   on the same nested /dev/kvm); on hardware KVM directly.
//! - The seed's turnaround with n checkpoints (`turnaround`), on this host's
//!   /dev/kvm with the built-in dirtier guest.
//! - The physical limits of this host (memcpy, write + fdatasync on the
//!   checkpoint file system); the comparison measures its own where it runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cevm::host::hardware_kvm;

use crate::host::Limits;
use crate::results::{AllResults, LinuxPart, LinuxPath, Machine, TurnaroundPart, Versions};
use crate::{compare, report, turnaround};

#[derive(clap::Args)]
pub struct Args {
    /// A smaller plan that finishes in under 5 minutes on the project's machines
    /// (fewer guests and runs; the report says so). The full plan takes 2 to 3.5 hours
    /// there (see the README), and each L1 lockup costs one VMM's share of one guest again;
    /// the results and report are written after every share, so a stopped run keeps them.
    #[arg(long)]
    quick: bool,
    /// The cevm source tree: its scripts (nested harness, guest kernel) run,
    /// and its README and bench/results are the defaults below (default: the
    /// tree this program was built from).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Results go to OUT/<date>-<host>.json, .md, and OUT/<date>-<host>/ (plots)
    /// (default: SOURCE/bench/results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Working directory for the host's checkpoints (on the checkpoint file system).
    #[arg(long, default_value = "bench-work")]
    dir: PathBuf,
    /// Where the Linux-guest comparison runs (default: direct on hardware KVM,
    /// nested when /proc/cpuinfo shows neither vmx nor svm).
    #[arg(long)]
    linux: Option<LinuxPath>,
    /// QEMU binary for the comparison.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Linux kernel for --linux direct (default: scripts/guest-kernel.sh's).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs for --linux direct (default: scripts/nested/guest-initrd.sh's).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The README whose headline table (between its `bench:headline` markers) is
    /// replaced by this run's (full runs only; default: SOURCE/README.md).
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Leave the README alone.
    #[arg(long)]
    no_readme: bool,
    /// Write the report, plots and headline again from a results file; run nothing.
    #[arg(long)]
    report_from: Option<PathBuf>,
}

/// The plan of a full or quick run.
struct Plan {
    cases: Vec<&'static str>,
    /// A fresh L1 of the nested harness for each guest and VMM.
    l1_per_case: bool,
    compare_runs: usize,
    t_mem: u64,
    t_data: u64,
    t_ws: u64,
    t_rate: u64,
    t_seconds: u64,
    t_ns: Vec<usize>,
    t_runs: usize,
}

fn plan(quick: bool) -> Plan {
    if quick {
        Plan {
            // Both workloads, one run each: a smoke check of every method and
            // plot (two runs took 5 min 15 s here, over the 5 minutes promised).
            cases: vec!["256M:idle", "256M:10000"],
            l1_per_case: false,
            compare_runs: 1,
            t_mem: 256 << 20,
            t_data: 192,
            t_ws: 32,
            t_rate: 20000,
            // Two checkpoints answer in up to 0.85 s each here; a 3 s job
            // sometimes ended during the second.
            t_seconds: 5,
            t_ns: vec![2],
            t_runs: 1,
        }
    } else {
        Plan {
            // The headline's guests first (512 MiB and 1 GiB, idle and
            // dirtying), then the rate sweep at 256 MiB: a run stopped early
            // has measured what the README shows.
            cases: vec!["512M:idle", "512M:10000", "1G:idle", "1G:10000", "256M:idle", "256M:10000", "256M:40000"],
            l1_per_case: true,
            compare_runs: 5,
            // n checkpoints must fit in the job with room to spare: a CEVM
            // checkpoint of this guest answers in 1.1 to 2.4 s here (1 GiB: 4 s,
            // so an 8 s job with n = 2 ended during its second checkpoint).
            t_mem: 512 << 20,
            t_data: 384,
            t_ws: 64,
            t_rate: 20000,
            t_seconds: 16,
            t_ns: vec![1, 3],
            t_runs: 5,
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_string()))
        .unwrap_or_default();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let kvm = if hardware_kvm() {
        "hardware KVM (vmx/svm in /proc/cpuinfo)".to_string()
    } else if read("/proc/cmdline").contains("pvm") {
        "PVM (paravirtual KVM, no vmx/svm)".to_string()
    } else {
        "KVM without vmx/svm in /proc/cpuinfo".to_string()
    };
    Machine {
        host: read("/proc/sys/kernel/hostname").trim().to_string(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        mem_gib: mem_kib / 1048576.0,
        kvm,
    }
}

fn versions(qemu: Option<String>) -> Versions {
    let mut git = output("git", &["rev-parse", "--short=12", "HEAD"]);
    if git.is_empty() {
        git = "unknown (not run in a git checkout)".into();
    } else if !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        git.push_str(" (with uncommitted changes)");
    }
    Versions { cevm: env!("CARGO_PKG_VERSION").to_string(), git, rustc: output("rustc", &["--version"]), qemu }
}

/// UTC date and time now: ("YYYY-MM-DD", "YYYY-MM-DDTHH:MM:SSZ").
fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    let date = format!("{y:04}-{m:02}-{d:02}");
    let time = format!("{date}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60);
    (date, time)
}

/// Days since 1970-01-01 to a civil (proleptic Gregorian) date, by Howard
/// Hinnant's published algorithm; written out rather than pulling in a date
/// crate for one date in a file name.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Runs a script of the source tree, returns its last line of output.
impl Args {
    /// The cevm source tree the run uses.
    fn source(&self) -> PathBuf {
        self.source.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
    }

    fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| self.source().join("bench/results"))
    }
}

/// Runs the source tree's `script` (which prints a path, relative to the tree
/// or absolute, on its last line) and returns that path.
fn script(src: &Path, script: &str) -> Result<PathBuf, String> {
    let path = src.join(script);
    let out = Command::new(&path)
        .current_dir(src)
        .output()
        .map_err(|e| format!("{}: {e} (is --source a cevm source tree?)", path.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(src.join(text.lines().last().unwrap_or_default().trim()))
}

/// Of the guest's memory, what the workload fills with data: what a 256 MiB
/// Debian guest has room for beside its kernel.
const FILL_PCT: u64 = 60;

/// `compare`'s arguments for `cases` and `methods` under plan `p`.
fn compare_args(p: &Plan, cases: &[&str], methods: &[compare::Method]) -> Vec<String> {
    let methods: Vec<String> = methods.iter().map(|m| m.name()).collect();
    vec![
        "--cases".into(),
        cases.join(","),
        "--methods".into(),
        methods.join(","),
        "--runs".into(),
        p.compare_runs.to_string(),
        "--fill-pct".into(),
        FILL_PCT.to_string(),
        "--ws-mib".into(),
        "64".into(),
        "--beat-ms".into(),
        "10".into(),
    ]
}

/// L1's memory in the nested harness: the guest, the new instance of a
/// thread-based migration, a checkpoint in L1's tmpfs and a restored guest at once.
const L1_MIB: u64 = 8192;

/// One L1 of the nested harness running `compare` on `g`; its results.
fn nested_compare(
    src: &Path,
    p: &Plan,
    g: &Group<'_>,
    work: &Path,
    timeout_s: u64,
) -> Result<compare::Results, String> {
    let exe = crate::cevm_bin()?;
    let bench = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let scenario = work.join("bench-all-scenario.sh");
    let args = compare_args(p, &g.cases, &g.methods);
    let args = args.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(" ");
    std::fs::write(
        &scenario,
        format!(
            "# Written by cevm-bench all: the comparison, inside L1.\nmkdir -p /tmp/bench\n\
             cevm-bench compare --kernel \"$GUEST_KERNEL\" --initrd \"$GUEST_INITRD\" \
             --qemu /usr/bin/qemu-system-x86_64 --dir /tmp/bench --json \"$OUT/compare.json\" {args}\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", scenario.display()))?;
    let out = work.join("nested-out");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("bash")
        .arg(src.join("scripts/nested/run.sh"))
        .arg(&scenario)
        .arg("--cevm")
        .arg(&exe)
        .arg("--bin")
        .arg(&bench)
        .args(["--npt", "0", "--with-qemu", "--mem", &L1_MIB.to_string(), "--timeout", &timeout_s.to_string()])
        // A locked-up L1 panics, and so ends at once instead of at the timeout.
        .args(["--append", "softlockup_panic=1"])
        .arg("--out")
        .arg(&out)
        .status()
        .map_err(|e| format!("cannot run the nested harness: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the nested harness ended with {status} (124: its {timeout_s} s timeout); its output is above"
        ));
    }
    let file = out.join("compare.json");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
}

/// What one L1 of the nested harness measures.
struct Group<'a> {
    name: String,
    cases: Vec<&'a str>,
    methods: Vec<compare::Method>,
}

/// Attempts per L1 before its guests are reported as not measured.
const ATTEMPTS: usize = 3;

/// The L1s of plan `p`. The full plan boots a fresh L1 for each guest and VMM,
/// with a timeout and retries: L1 (QEMU 7.2's TCG emulating SVM) locks up now
/// and then (soft lockups in L1's KVM delivering an interrupt, after 3 to 20
/// minutes of nested guests; once a silent hang), and a lockup then costs one
/// VMM's share of one guest, not the run's. cevm's and QEMU's methods never ran
/// interleaved (each VMM boots its own guest), so the split changes no ratio's
/// footing: both are measured on fresh L1s of the same host in the same run.
fn groups(p: &Plan) -> Vec<Group<'_>> {
    let cevm = compare::Method::CEVM.to_vec();
    let qemu = compare::Method::QEMU.to_vec();
    if !p.l1_per_case {
        let methods = cevm.into_iter().chain(qemu).collect();
        return vec![Group { name: p.cases.join(","), cases: p.cases.clone(), methods }];
    }
    p.cases
        .iter()
        .flat_map(|&c| {
            [
                Group { name: format!("{c} (cevm's methods)"), cases: vec![c], methods: cevm.clone() },
                Group { name: format!("{c} (QEMU's methods)"), cases: vec![c], methods: qemu.clone() },
            ]
        })
        .collect()
}

/// Where the nested harness runs the comparison, and on which guest kernel
/// (asked once per run, not for every report written along the way).
fn nested_environment(src: &Path, p: &Plan) -> (String, String) {
    let kernel = script(src, "scripts/guest-kernel.sh").map(|k| k.display().to_string()).unwrap_or_default();
    (
        format!(
            "nested: L1 is {} with TCG, -cpu max (emulated AMD SVM), -smp 2, -m {L1_MIB}, on this host{}; L1 runs the guest kernel with kvm_amd npt=0 (shadow paging: dirty tracking loses writes with nested paging in this harness); cevm and QEMU run inside L1 on its /dev/kvm, one at a time; checkpoints go to L1's tmpfs",
            output("qemu-system-x86_64", &["--version"]).lines().next().unwrap_or("qemu-system-x86_64"),
            if p.l1_per_case { ", a fresh L1 for each guest and VMM (cevm's methods, then QEMU's)" } else { "" }
        ),
        format!("{kernel} (Debian's cloud kernel, also L1's)"),
    )
}

/// The comparison in the nested harness, one L1 per group of `p`; after each
/// group, `progress` gets the part so far (none while nothing was measured)
/// and the group's name.
fn linux_nested(
    src: &Path,
    p: &Plan,
    work: &Path,
    progress: &mut dyn FnMut(Option<LinuxPart>, &str),
) -> Result<LinuxPart, String> {
    if !src.join("scripts/nested/run.sh").exists() {
        return Err(format!(
            "the nested harness (scripts/nested/run.sh) is not in {}: give --source, or --linux direct|off",
            src.display()
        ));
    }
    println!("bench all: the Linux-guest comparison, in the nested harness (this /dev/kvm cannot run Linux)");
    let (environment, guest_kernel) = nested_environment(src, p);
    // The comparison's part of the results: what the nested harness measured so far.
    let part = |results: &compare::Results, failed: &[String]| LinuxPart {
        path: LinuxPath::Nested,
        environment: environment.clone(),
        guest_kernel: guest_kernel.clone(),
        results: results.clone(),
        failed: failed.to_vec(),
    };
    let mut results: Option<compare::Results> = None;
    let mut failed = Vec::new();
    for g in groups(p) {
        let mem: u64 = g.cases.iter().filter_map(|c| c.parse::<compare::Case>().ok()).map(|c| c.mem).max().unwrap_or(0);
        // Generous, as only a silent stall of L1 runs into it (a soft lockup
        // panics L1 at once): one VMM's share of a guest took 6 minutes at
        // 256 MiB on a slow day here and 8 to 10 at 1 GiB on a fast one.
        let vmms = [false, true].iter().filter(|&&q| g.methods.iter().any(|m| m.is_qemu() == q)).count() as u64;
        let timeout = 300 + 2 * (mem >> 20) * g.cases.len() as u64 * vmms;
        let mut got = None;
        for attempt in 1..=ATTEMPTS {
            match nested_compare(src, p, &g, work, timeout) {
                Ok(r) => {
                    got = Some(r);
                    break;
                }
                Err(e) => {
                    eprintln!("bench all: {} (attempt {attempt} of {ATTEMPTS}): {e}", g.name);
                    if attempt == ATTEMPTS {
                        failed.push(format!("{}: {e}", g.name));
                    }
                }
            }
        }
        if let Some(r) = got {
            match &mut results {
                None => results = Some(r),
                Some(all) => {
                    all.samples.extend(r.samples);
                    all.limits.memcpy_mib_s.extend(r.limits.memcpy_mib_s);
                    all.limits.write_fdatasync_mib_s.extend(r.limits.write_fdatasync_mib_s);
                    all.limits.bytes = all.limits.bytes.max(r.limits.bytes);
                    all.qemu_version = all.qemu_version.take().or(r.qemu_version);
                }
            }
        }
        progress(results.as_ref().map(|r| part(r, &failed)), &g.name);
    }
    let results = results.ok_or_else(|| format!("no guest of the comparison could be measured: {failed:?}"))?;
    Ok(part(&results, &failed))
}

fn linux_direct(a: &Args, p: &Plan, work: &Path) -> Result<LinuxPart, String> {
    let kernel = match &a.kernel {
        Some(k) => k.clone(),
        None => script(&a.source(), "scripts/guest-kernel.sh")?.join("vmlinuz"),
    };
    let initrd = match &a.initrd {
        Some(i) => i.clone(),
        None => script(&a.source(), "scripts/nested/guest-initrd.sh")?,
    };
    let cases = p.cases.iter().map(|c| c.parse()).collect::<Result<Vec<_>, _>>()?;
    let mut methods = compare::Method::CEVM.to_vec();
    methods.extend(compare::Method::QEMU);
    let o = compare::Options {
        kernel: kernel.clone(),
        initrd,
        qemu: Some(a.qemu.clone()),
        cases,
        methods,
        fill_pct: FILL_PCT,
        ws_mib: 64,
        beat_ms: 10,
        runs: p.compare_runs,
        dir: work.join("compare"),
        json: None,
    };
    Ok(LinuxPart {
        path: LinuxPath::Direct,
        environment: "direct: cevm and QEMU on this host's /dev/kvm, one at a time".into(),
        guest_kernel: kernel.display().to_string(),
        results: compare::run(&o)?,
        failed: Vec::new(),
    })
}

/// The name of the turnaround part in `AllResults::not_reached`.
const TURNAROUND: &str = "the turnaround benchmark";
/// The name of the comparison in `AllResults::not_reached` when it runs as one part.
const COMPARISON: &str = "the Linux-guest comparison";

fn linux_guest(group: &str) -> String {
    format!("the Linux guest {group}")
}

/// The README to put the headline table in: that of a finished full run only.
fn readme_for(a: &Args, r: &AllResults) -> Option<PathBuf> {
    (!a.no_readme && !r.quick && r.not_reached.is_empty())
        .then(|| a.readme.clone().unwrap_or_else(|| a.source().join("README.md")))
}

/// Writes the results so far to STEM.json (whole or not at all: through a
/// temporary file) and their report, and the headline into `readme` if given.
fn save(r: &mut AllResults, t0: Instant, stem: &Path, readme: Option<&Path>) -> Result<(), String> {
    r.duration_s = t0.elapsed().as_secs_f64();
    let json = PathBuf::from(format!("{}.json", stem.display()));
    let tmp = PathBuf::from(format!("{}.json.tmp", stem.display()));
    let text = serde_json::to_string(&*r).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &json).map_err(|e| format!("{}: {e}", json.display()))?;
    println!("bench all: results in {}", json.display());
    report::write(r, stem, readme)
}

pub fn run(a: Args) -> Result<(), String> {
    if let Some(from) = &a.report_from {
        let text = std::fs::read_to_string(from).map_err(|e| format!("{}: {e}", from.display()))?;
        let r: AllResults = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", from.display()))?;
        let stem = from.with_extension("");
        return report::write(&r, &stem, readme_for(&a, &r).as_deref());
    }
    let t0 = Instant::now();
    let (date, started) = utc_now();
    let p = plan(a.quick);
    let work = std::path::absolute(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let out = a.out();
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let m = machine();
    let path = a.linux.unwrap_or(if hardware_kvm() { LinuxPath::Direct } else { LinuxPath::Nested });
    let qemu = match path {
        LinuxPath::Off => None,
        _ => Some(crate::qemu::version(&a.qemu)?),
    };
    println!(
        "bench all ({} plan) on {} ({}, {} CPUs, {})",
        if a.quick { "quick" } else { "full" },
        m.host,
        m.cpu,
        m.cpus,
        m.kvm
    );
    let stem = out.join(format!(
        "{date}-{}{}",
        if m.host.is_empty() { "host" } else { &m.host },
        if a.quick { "-quick" } else { "" }
    ));
    let mut r = start_results(a.quick, &p, &work, path, started, m, qemu)?;
    // What a run stopped now would leave: a report of nothing measured yet, saying so.
    save(&mut r, t0, &stem, None)?;
    measure_linux(&a, path, &p, &work, &mut r, t0, &stem);
    r.not_reached.retain(|n| n == TURNAROUND);
    save(&mut r, t0, &stem, None)?;
    r.turnaround = measure_turnaround(&p, &work, &mut r.not_measured);
    r.not_reached.clear();
    // The README shows the latest finished full report; a quick run leaves it alone.
    let readme = readme_for(&a, &r);
    save(&mut r, t0, &stem, readme.as_deref())?;
    // Whatever was not measured, a whole part or one guest of the comparison,
    // makes the run fail once the report says so.
    let mut missing = r.not_measured.clone();
    if let Some(l) = &r.linux {
        missing.extend(l.failed.iter().map(|f| linux_guest(f)));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not measured (the report says so too): {}", missing.join("; ")))
    }
}

/// The results of a run about to measure: this host's limits (measured here,
/// and printed), nothing else yet, every part to come listed as not reached.
fn start_results(
    quick: bool,
    p: &Plan,
    work: &Path,
    path: LinuxPath,
    started: String,
    machine: Machine,
    qemu: Option<String>,
) -> Result<AllResults, String> {
    let host_limits = Limits::measure(work, p.t_mem, 5)?;
    println!(
        "bench all: this host: memcpy {:.0} MiB/s, write + fdatasync {:.0} MiB/s on {}",
        host_limits.memcpy(),
        host_limits.write(),
        host_limits.fs
    );
    let mut not_reached: Vec<String> = match path {
        LinuxPath::Nested => groups(p).iter().map(|g| linux_guest(&g.name)).collect(),
        LinuxPath::Direct => vec![COMPARISON.into()],
        LinuxPath::Off => Vec::new(),
    };
    not_reached.push(TURNAROUND.into());
    Ok(AllResults {
        schema: 1,
        started,
        duration_s: 0.0,
        quick,
        machine,
        versions: versions(qemu),
        placement:
            "none: no thread pinned (cevm's default); the kernel's scheduler places vCPU, migration and writer threads"
                .into(),
        host_limits,
        linux: None,
        turnaround: None,
        not_measured: Vec::new(),
        not_reached,
    })
}

/// The Linux-guest comparison, by `path`, into `r.linux`; in the nested harness
/// each guest's results are saved as they come. A comparison that fails is
/// recorded as not measured.
fn measure_linux(a: &Args, path: LinuxPath, p: &Plan, work: &Path, r: &mut AllResults, t0: Instant, stem: &Path) {
    let linux = match path {
        LinuxPath::Nested => linux_nested(&a.source(), p, work, &mut |part, group| {
            r.linux = part;
            r.not_reached.retain(|n| *n != linux_guest(group));
            if let Err(e) = save(r, t0, stem, None) {
                eprintln!("bench all: could not write the results so far: {e}");
            }
        })
        .map(Some),
        LinuxPath::Direct => linux_direct(a, p, work).map(Some),
        LinuxPath::Off => Ok(None),
    };
    r.linux = linux.unwrap_or_else(|e| {
        eprintln!("bench all: the Linux-guest comparison failed: {e}");
        r.not_measured.push(format!("{COMPARISON}: {e}"));
        None
    });
}

/// The turnaround benchmark of the plan; a failure is added to `not_measured`.
fn measure_turnaround(p: &Plan, work: &Path, not_measured: &mut Vec<String>) -> Option<TurnaroundPart> {
    let t = turnaround::Options {
        mem: p.t_mem,
        data_mib: p.t_data,
        ws_mib: p.t_ws,
        rate: p.t_rate,
        seconds: p.t_seconds,
        ns: p.t_ns.clone(),
        strategies: vec![
            checkpoint::Method::StopAndSave,
            checkpoint::Method::MigrateThread,
            checkpoint::Method::CevmThread,
            checkpoint::Method::CevmProcess,
        ],
        placements: vec![turnaround::Placement::None],
        runs: p.t_runs,
        dir: work.join("turnaround"),
        json: None,
        report_from: None,
    };
    match turnaround::measure(&t) {
        Ok(runs) => Some(TurnaroundPart {
            mem_mib: p.t_mem >> 20,
            data_mib: p.t_data,
            ws_mib: p.t_ws,
            rate: p.t_rate,
            seconds: p.t_seconds,
            runs,
        }),
        Err(e) => {
            eprintln!("bench all: the turnaround benchmark failed: {e}");
            not_measured.push(format!("{TURNAROUND}: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        civil_from_days, compare, compare_args, groups, plan, readme_for, save, AllResults, Args, Limits, Machine,
        Versions, TURNAROUND,
    };
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    fn nothing_measured(quick: bool, not_reached: Vec<String>) -> AllResults {
        AllResults {
            schema: 1,
            started: "2026-12-02T08:00:00Z".into(),
            duration_s: 0.0,
            quick,
            machine: Machine {
                host: "h".into(),
                kernel: "k".into(),
                cpu: "c".into(),
                cpus: 2,
                mem_gib: 24.0,
                kvm: "PVM".into(),
            },
            versions: Versions { cevm: "0".into(), git: "g".into(), rustc: "r".into(), qemu: None },
            placement: "none".into(),
            host_limits: Limits {
                fs: "tmpfs".into(),
                bytes: 1 << 20,
                memcpy_mib_s: vec![1000.0],
                write_fdatasync_mib_s: vec![100.0],
            },
            linux: None,
            turnaround: None,
            not_measured: Vec::new(),
            not_reached,
        }
    }

    #[test]
    fn a_run_stopped_midway_leaves_its_results_and_a_report_that_says_so() {
        let dir = std::env::temp_dir().join(format!("cevm-bench-stopped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stem = dir.join("2026-12-02-h");
        let mut r = nothing_measured(false, vec!["the Linux guest 1G:idle (QEMU's methods)".into(), TURNAROUND.into()]);
        save(&mut r, std::time::Instant::now(), &stem, None).unwrap();
        let back: AllResults =
            serde_json::from_str(&std::fs::read_to_string(dir.join("2026-12-02-h.json")).unwrap()).unwrap();
        assert_eq!(back.not_reached, r.not_reached);
        assert!(!dir.join("2026-12-02-h.json.tmp").exists());
        let md = std::fs::read_to_string(dir.join("2026-12-02-h.md")).unwrap();
        assert!(
            md.contains("**Not finished**: when this report was written, the run had not reached the Linux guest 1G:idle (QEMU's methods), the turnaround benchmark"),
            "{md}"
        );
        // A finished run says nothing of the kind.
        r.not_reached.clear();
        save(&mut r, std::time::Instant::now(), &stem, None).unwrap();
        assert!(!std::fs::read_to_string(dir.join("2026-12-02-h.md")).unwrap().contains("Not finished"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_finished_full_run_rewrites_the_readme() {
        let cli = Cli::parse_from(["bench"]);
        assert!(readme_for(&cli.a, &nothing_measured(false, Vec::new())).is_some());
        assert!(readme_for(&cli.a, &nothing_measured(false, vec![TURNAROUND.into()])).is_none());
        assert!(readme_for(&cli.a, &nothing_measured(true, Vec::new())).is_none());
        let cli = Cli::parse_from(["bench", "--no-readme"]);
        assert!(readme_for(&cli.a, &nothing_measured(false, Vec::new())).is_none());
    }

    #[test]
    fn full_plan_boots_one_l1_per_guest_and_vmm() {
        let p = plan(false);
        let g = groups(&p);
        assert_eq!(g.len(), 2 * p.cases.len());
        for (pair, case) in g.chunks(2).zip(&p.cases) {
            assert_eq!(pair[0].cases, vec![*case]);
            assert_eq!(pair[1].cases, vec![*case]);
            assert_eq!(pair[0].methods, compare::Method::CEVM.to_vec());
            assert_eq!(pair[1].methods, compare::Method::QEMU.to_vec());
            assert!(pair[1].name.contains("QEMU"), "{}", pair[1].name);
        }
        // The quick plan: every guest and method in one L1.
        let q = plan(true);
        let g = groups(&q);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].cases, q.cases);
        assert_eq!(g[0].methods.len(), compare::Method::CEVM.len() + compare::Method::QEMU.len());
    }

    #[test]
    fn compare_args_name_the_methods_as_compare_parses_them() {
        let p = plan(false);
        let methods = compare::Method::QEMU.to_vec();
        let args = compare_args(&p, &["1G:10000"], &methods);
        let at = |flag: &str| args[args.iter().position(|a| a == flag).expect(flag) + 1].clone();
        assert_eq!(at("--cases"), "1G:10000");
        let parsed: Vec<compare::Method> =
            at("--methods").split(',').map(|m| m.parse::<compare::Method>().expect(m)).collect();
        assert_eq!(parsed, methods);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        assert_eq!(civil_from_days(20782), (2026, 11, 25));
        assert_eq!(civil_from_days(47541), (2100, 3, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
