//! A real Slurm cluster on this machine for the tests (Debian's `slurm-wlm`
//! and `munge`, installed by `scripts/setup.sh --tests`): munged, slurmctld
//! and one slurmd per node, all as root in a scratch directory, with a
//! generated configuration (after `../shared/SLURM.md`: a requeue waits 6 s,
//! a node is down 3 s after it stops answering). Debian builds Slurm with
//! multiple-slurmd support, so the nodes are slurmds on their own ports of
//! this host; each runs in a PID, mount and UTS namespace of its own (its
//! hostname is its node name), so that [`Cluster::kill_node`] ends a node
//! as a power cut would: slurmd, its job steps and their VMMs at once.
//! Stopped, its jobs cancelled, when dropped; its scratch directory is
//! removed unless the test failed.
//!
//! Slurm has no "any free port": a cluster takes one of a few fixed slots of
//! ports, held by a lock file, so that the tests of one binary can each have
//! a cluster at the same time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Clusters that may run at once on this machine (port slots).
const SLOTS: u16 = 4;

/// A running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    conf: PathBuf,
    /// Each node's `unshare` (its namespace's first process is slurmd); None once killed.
    nodes: Vec<Option<Child>>,
    _lock: std::fs::File,
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e} (is slurm-wlm installed? scripts/setup.sh --tests)"))
}

/// Takes a free slot of ports (waiting for slot 0 if all are taken): the
/// lock that holds it, and the slot.
fn take_slot() -> (std::fs::File, u16) {
    use std::os::fd::AsRawFd;
    let lock = |k: u16| std::fs::File::create(format!("/tmp/cevm-slurm-slot{k}.lock")).unwrap();
    for k in 0..SLOTS {
        let f = lock(k);
        // SAFETY: flock on a file we opened.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return (f, k);
        }
    }
    let f = lock(0);
    // SAFETY: as above; blocks until that cluster is gone.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    (f, 0)
}

/// Whether process `pid` is gone (or a zombie nobody reaps).
fn gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes (n1, n2, ...; 2 CPUs each) and waits
    /// until every node is idle.
    pub fn start(nodes: usize) -> Cluster {
        let (lock, slot) = take_slot();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/cevm-slurm-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["state", "spool", "run", "log", "munge"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let conf = dir.join("slurm.conf");
        std::fs::write(&conf, config(&dir, nodes, 16817 + 100 * slot)).unwrap();
        let mut c = Cluster { dir, conf, nodes: Vec::new(), _lock: lock };
        c.start_munge();
        let ctl = run(Command::new("slurmctld").env("SLURM_CONF", &c.conf));
        assert!(ctl.status.success(), "slurmctld: {}", String::from_utf8_lossy(&ctl.stderr));
        for i in 1..=nodes {
            // The node's namespaces die with their first process, slurmd, which
            // dies with this unshare (--kill-child).
            let node = Command::new("unshare")
                .args(["--pid", "--mount-proc", "--uts", "--kill-child", "--", "sh", "-c"])
                .arg(format!("hostname n{i} && exec slurmd -D -N n{i}"))
                .env("SLURM_CONF", &c.conf)
                .stdin(std::process::Stdio::null())
                // It logs to its log file as well.
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("unshare (util-linux): {e}"));
            c.nodes.push(Some(node));
        }
        let t0 = Instant::now();
        while c.idle_nodes() < nodes {
            assert!(t0.elapsed() < Duration::from_secs(60), "nodes not idle: {}", c.sinfo());
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Kills node `i` (1-based) as a failure would: slurmd, the job steps on
    /// it and their processes, all at once (SIGKILL), then tells Slurm the
    /// node is down, as an administrator or a health check does.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i - 1].take() {
            kill_namespace(&mut node);
        }
        self.scontrol(&["update", &format!("nodename=n{i}"), "state=down", "reason=killed by the test"]);
    }

    fn start_munge(&self) {
        use std::os::unix::fs::PermissionsExt;
        let m = self.dir.join("munge");
        let mut key = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key)).unwrap();
        let keyfile = m.join("munge.key");
        std::fs::write(&keyfile, &key).unwrap();
        std::fs::set_permissions(&keyfile, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = run(Command::new("munged")
            .arg(format!("--key-file={}", keyfile.display()))
            .arg(format!("--socket={}", m.join("munge.sock").display()))
            .arg(format!("--pid-file={}", m.join("munged.pid").display()))
            .arg(format!("--log-file={}", m.join("munged.log").display()))
            .arg(format!("--seed-file={}", m.join("munged.seed").display())));
        assert!(o.status.success(), "munged: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// A command for a Slurm client (`sbatch`, `scontrol`, ...) of this cluster.
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn sinfo(&self) -> String {
        String::from_utf8_lossy(&run(self.client("sinfo").args(["-h", "-N", "-o", "%N %t"])).stdout).into_owned()
    }

    fn idle_nodes(&self) -> usize {
        self.sinfo().lines().filter(|l| l.ends_with(" idle")).count()
    }

    /// `sbatch --parsable ARGS`: the job's id.
    pub fn sbatch(&self, args: &[&str]) -> String {
        let o = run(self.client("sbatch").arg("--parsable").args(args));
        assert!(o.status.success(), "sbatch: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().split(';').next().unwrap().to_string()
    }

    /// `scontrol ARGS`, which must succeed.
    pub fn scontrol(&self, args: &[&str]) {
        let o = run(self.client("scontrol").args(args));
        assert!(o.status.success(), "scontrol {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    }

    /// A field of `scontrol show job` (e.g. `JobState`, `Restarts`).
    pub fn job(&self, job: &str, field: &str) -> String {
        let o = run(self.client("scontrol").args(["show", "job", "-o", job]));
        let text = String::from_utf8_lossy(&o.stdout);
        let key = format!("{field}=");
        text.split_whitespace().find_map(|w| w.strip_prefix(key.as_str())).unwrap_or("").to_string()
    }

    /// Waits up to `timeout` until the job's state is one of `states`.
    pub fn wait_state(&self, job: &str, states: &[&str], timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.job(job, "JobState");
            if states.contains(&s.as_str()) {
                return s;
            }
            assert!(t0.elapsed() < timeout, "job {job} is {s}, not {states:?}, after {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ends the daemon of `pid_file` (SIGTERM, then SIGKILL after 10 s) and
    /// waits until it is gone: the next cluster in this slot takes its ports.
    fn stop_daemon(pid_file: &Path) {
        let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            return;
        };
        // SAFETY: kill(2) of a daemon this cluster started (its pid file).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while !gone(pid as u32) {
            if t0.elapsed() > Duration::from_secs(10) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// SIGKILLs a node's `unshare` and waits until the namespace's first process
/// (slurmd; its death ends every process of the namespace) is gone.
fn kill_namespace(node: &mut Child) {
    let first = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", node.id())).unwrap_or_default();
    let first: Option<u32> = first.split_whitespace().next().and_then(|p| p.parse().ok());
    let _ = node.kill();
    let _ = node.wait();
    if let Some(pid) = first {
        let t0 = Instant::now();
        while !gone(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.client("scancel").args(["--full", "--user", "root"]).output();
        std::thread::sleep(Duration::from_secs(1));
        for node in self.nodes.iter_mut().flatten() {
            kill_namespace(node);
        }
        Self::stop_daemon(&self.dir.join("run/slurmctld.pid"));
        Self::stop_daemon(&self.dir.join("munge/munged.pid"));
        // Kept for a look at the logs when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn config(d: &Path, nodes: usize, port: u16) -> String {
    let d = d.display();
    let (slurmd, first) = (port + 1, port + 4);
    format!(
        "ClusterName=cevmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock,cred_expire=5
SlurmctldPort={port}
SlurmdPort={slurmd}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
JobRequeue=1
ReturnToService=2
SlurmdTimeout=3
MessageTimeout=5
MinJobAge=300
KillWait=5
NodeName=n[1-{nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{first}-{}] CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=p Nodes=n[1-{nodes}] Default=YES MaxTime=INFINITE State=UP
",
        first as usize + nodes - 1
    )
}
