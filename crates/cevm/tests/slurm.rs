//! cevm jobs under a real Slurm (see `cevm_testkit::slurm`): the batch script
//! `scripts/slurm/cevm-job.sh` runs the digest guest through `cevm batch`.
//! Preempted twice, by `scontrol requeue` (Slurm's SIGTERM) and by `scancel
//! --signal=USR1 --batch` (the job then requeues itself), it finishes with
//! the exact digest of an undisturbed run, Slurm counting two restarts; so it
//! does when it reaches its time limit (warned by `--signal=B:USR1@...`),
//! and when its newest checkpoint is damaged on the shared storage.

use std::path::Path;
use std::time::{Duration, Instant};

use cevm_testkit::net::{netring_digest, Bridge};
use cevm_testkit::slurm::Cluster;
use cevm_testkit::*;

/// The guest of the preemption tests (about 20 s here), and its digest.
const ARGS: &str = "mib=1 rounds=16";
const ROUNDS: u64 = 16;

/// The digest an undisturbed run of the digest guest with `mib=1 rounds=R` prints.
fn want(rounds: u64) -> String {
    format!("{:016x}", guests::digest(1, rounds))
}

/// The job's console and log so far.
fn output(dir: &Path) -> String {
    let out = std::fs::read_to_string(dir.join("job.out")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.join("job.err")).unwrap_or_default();
    format!("{out}\n{err}")
}

/// Waits until the job's output holds `n` lines that `pred` accepts.
fn wait_output(dir: &Path, n: usize, what: &str, pred: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    while output(dir).lines().filter(|l| pred(l)).count() < n {
        assert!(t0.elapsed() < T, "no {n} x {what} in the job's output:\n{}", output(dir));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Submits `scripts/slurm/cevm-job.sh` with `sbatch` options `sbatch` for
/// the digest guest with `args`, the series `dir/series` and `cevm batch`
/// options `batch`; the job's console and log go to `dir/job.out` and
/// `dir/job.err`. Returns the job's id.
fn submit(cluster: &Cluster, dir: &Path, sbatch: &[&str], batch: &[&str], args: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/cevm-job.sh");
    let (out, err, series) = (dir.join("job.out"), dir.join("job.err"), dir.join("series"));
    let export = format!("ALL,CEVM={}", bin().display());
    let paths = [out.to_str().unwrap(), err.to_str().unwrap(), script.to_str().unwrap(), series.to_str().unwrap()];
    let head = ["--export", &export, "-o", paths[0], "-e", paths[1], paths[2], paths[3]];
    let run = ["--", "--guest", "digest", "--guest-args", args, "--mem", "32M"];
    let job = cluster.sbatch(&[sbatch, &head[..], batch, &run].concat());
    eprintln!("job {job}");
    job
}

fn rounds(dir: &Path) -> usize {
    output(dir).lines().filter(|l| l.starts_with("round ")).count()
}

#[test]
fn a_job_preempted_twice_by_requeue_and_by_usr1_finishes_with_the_exact_digest() {
    let dir = workdir("slurm-preempt");
    let cluster = Cluster::start(2);
    let series = dir.join("series");
    let job = submit(&cluster, &dir, &[], &[], ARGS);
    wait_output(&dir, 2, "round", |l| l.starts_with("round "));

    // Preempted by Slurm: SIGTERM, a last checkpoint, requeued, restored.
    cluster.scontrol(&["requeue", &job]);
    wait_output(&dir, 1, "restore", |l| l.contains("INFO cevm: restoring "));
    let before = rounds(&dir);
    wait_output(&dir, before + 1, "round after the restore", |l| l.starts_with("round "));

    // Warned: USR1 to the batch script only; the job requeues itself.
    let o = cluster.client("scancel").args(["--signal=USR1", "--batch", &job]).output().unwrap();
    assert!(o.status.success(), "scancel: {}", String::from_utf8_lossy(&o.stderr));
    wait_output(&dir, 2, "restore", |l| l.contains("INFO cevm: restoring "));

    cluster.wait_state(&job, &["COMPLETED"], Duration::from_secs(240));
    let text = output(&dir);
    let digests: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("digest=")).collect();
    assert_eq!(digests, [want(ROUNDS).as_str()], "one digest, the undisturbed run's:\n{text}");
    assert_eq!(cluster.job(&job, "Restarts"), "2", "two restarts:\n{text}");
    for said in ["SIGTERM: a last checkpoint", "SIGUSR1: a last checkpoint", "requeued"] {
        assert!(text.contains(said), "the job's log says {said:?}:\n{text}");
    }
    assert!(series.join("finished").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flips a byte in the middle of the largest file of checkpoint `ck` (its memory).
fn damage(ck: &Path) {
    let (path, len) = std::fs::read_dir(ck)
        .unwrap()
        .flatten()
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .max_by_key(|(_, len)| *len)
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(len / 2) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_for_the_one_before_and_said() {
    let dir = workdir("slurm-damaged");
    let cluster = Cluster::start(2);
    let series = dir.join("series");
    let job = submit(&cluster, &dir, &[], &["--every", "1s", "--keep", "3"], ARGS);
    // Two periodic checkpoints at least, then the job is preempted: its last
    // one is the newest, and it is damaged before the job starts again.
    wait_output(&dir, 2, "periodic checkpoint", |l| l.contains("checkpoint") && l.contains("committed to"));
    cluster.scontrol(&["requeue", &job]);
    cluster.wait_state(&job, &["PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"], Duration::from_secs(60));
    let newest = std::fs::read_link(series.join("latest")).unwrap();
    damage(&series.join(&newest));
    cluster.wait_state(&job, &["COMPLETED"], Duration::from_secs(240));
    let text = output(&dir);
    assert!(
        text.contains(&format!("{} is damaged and is not restored", series.join(&newest).display())),
        "the damaged checkpoint is named:\n{text}"
    );
    assert!(text.contains("the newest checkpoint that verifies"), "{text}");
    let digests: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("digest=")).collect();
    assert_eq!(digests, [want(ROUNDS).as_str()], "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_warned_before_its_time_limit_checkpoints_is_requeued_and_finishes_right() {
    let dir = workdir("slurm-timelimit");
    let cluster = Cluster::start(2);
    // A limit of 1 min (Slurm's least) with the warning 5 s before: Slurm
    // checks limits every 30 s and warns up to 30 s early, so between 25 and
    // 55 s into each run. The guest needs longer than that (about 60 s
    // here), so the first run is warned before the guest ends; each later
    // run gets at least 25 s more, so a few runs finish it.
    let rounds = 48;
    let args = format!("mib=1 rounds={rounds}");
    let job = submit(&cluster, &dir, &["--time=1", "--signal=B:USR1@5"], &[], &args);
    cluster.wait_state(&job, &["COMPLETED"], Duration::from_secs(400));
    let text = output(&dir);
    let digests: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("digest=")).collect();
    assert_eq!(digests, [want(rounds).as_str()], "one digest, the undisturbed run's:\n{text}");
    let restarts: u32 = cluster.job(&job, "Restarts").parse().unwrap();
    assert!(restarts >= 1, "requeued at least once:\n{text}");
    assert!(text.contains("SIGUSR1: a last checkpoint"), "{text}");
    assert!(!text.contains("DUE TO TIME LIMIT"), "never killed at the limit:\n{text}");
    assert!(dir.join("series/finished").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The node a member's VMM ran on at its `n`-th start (from the member's
/// own line, `member mR on NODE: ...`).
fn member_node(text: &str, rank: usize, n: usize) -> Option<String> {
    let said = format!("member m{rank} on ");
    let line = text.lines().filter(|l| l.contains(&said)).nth(n)?;
    let rest = &line[line.find(&said)? + said.len()..];
    Some(rest.split(':').next()?.to_string())
}

#[test]
fn a_group_job_on_two_nodes_goes_on_from_its_newest_group_checkpoint_after_a_node_is_lost() {
    const HOPS: u64 = 5000;
    let dir = workdir("slurm-group");
    let mut cluster = Cluster::start(3);
    let mut bridge = Bridge::new();
    let taps = [bridge.tap(0), bridge.tap(1)];
    let tap = taps[0].strip_suffix('0').unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/cevm-job.sh");
    let (out, err, series) = (dir.join("job.out"), dir.join("job.err"), dir.join("series"));
    let export = format!("ALL,CEVM={}", bin().display());
    let guest = format!("id={{rank}} count={{size}} hops={HOPS} mib=1 work=100 strict=1");
    let net = format!("tap={tap}{{rank}},mac=52:54:00:ce:00:0{{rank}}");
    let job = cluster.sbatch(
        &[
            &["-N", "2", "--ntasks-per-node=1", "--export", &export][..],
            &["-o", out.to_str().unwrap(), "-e", err.to_str().unwrap(), script.to_str().unwrap()],
            &[series.to_str().unwrap(), "--group", "--every", "2s", "--control-port", "17400"],
            &["--", "--guest", "netring", "--guest-args", &guest, "--mem", "32M", "--net", &net],
        ]
        .concat(),
    );
    eprintln!("job {job}");
    let committed = |l: &str| l.contains("group checkpoint committed to");
    let restores = |l: &str| l.contains("restoring the group checkpoint");
    // Warned (SIGUSR1 to the batch script), then preempted (Slurm's SIGTERM
    // to every process of the job): each time a last group checkpoint, the
    // members ended, the job requeued; it goes on from that checkpoint.
    for (n, (signal, how)) in
        [("SIGUSR1", &["scancel", "--signal=USR1", "--batch"][..]), ("SIGTERM", &["scontrol", "requeue"])]
            .into_iter()
            .enumerate()
    {
        let before = output(&dir).lines().filter(|l| committed(l)).count();
        wait_output(&dir, before + 1, "group checkpoint", committed);
        let o = cluster.client(how[0]).args(&how[1..]).arg(&job).output().unwrap();
        assert!(o.status.success(), "{}: {}", how.join(" "), String::from_utf8_lossy(&o.stderr));
        wait_output(&dir, n + 1, "group restore", restores);
        let text = output(&dir);
        let said = format!("{signal}: a last group checkpoint");
        let lines: Vec<&str> = text.lines().skip_while(|l| !l.contains(&said)).collect();
        assert!(!lines.is_empty(), "{said}:\n{text}");
        // The line after the attempt: its commit, before the job's next start.
        let last = lines.iter().find(|l| committed(l) || restores(l) || l.contains("last group checkpoint failed"));
        let last = last.and_then(|l| l.split("committed to ").nth(1)?.split(' ').next());
        let last = last.unwrap_or_else(|| panic!("the last group checkpoint on {signal} is committed:\n{text}"));
        let restored = lines.iter().find(|l| restores(l)).unwrap();
        assert!(restored.ends_with(&format!("restoring the group checkpoint {last}")), "restores {last}:\n{text}");
    }

    // A group checkpoint of the third run, then the node of member m1 is lost.
    let text = output(&dir);
    let before = text.lines().filter(|l| committed(l)).count();
    wait_output(&dir, before + 1, "group checkpoint of the third run", committed);
    let text = output(&dir);
    let newest = text.lines().rfind(|l| committed(l)).unwrap();
    let newest = newest.split("committed to ").nth(1).unwrap().split(' ').next().unwrap().to_string();
    let node = member_node(&text, 1, 2).unwrap_or_else(|| panic!("where m1 runs:\n{text}"));
    let i: usize = node.strip_prefix('n').unwrap().parse().unwrap();
    eprintln!("killing node {node}");
    cluster.kill_node(i);

    cluster.wait_state(&job, &["COMPLETED"], Duration::from_secs(240));
    let text = output(&dir);
    // Restored from the newest periodic group checkpoint (or one after it),
    // on the nodes left.
    let third = text.lines().filter(|l| restores(l)).nth(2).unwrap_or_else(|| panic!("a third restore:\n{text}"));
    let from = third.rsplit(' ').next().unwrap();
    assert!(from >= newest.as_str(), "restores {from}, not older than {newest}:\n{text}");
    for rank in 0..2 {
        let again = member_node(&text, rank, 3).unwrap_or_else(|| panic!("m{rank} started a fourth time:\n{text}"));
        assert_ne!(again, node, "m{rank} is restored on a node that is left:\n{text}");
        let line = text.lines().filter(|l| l.contains(&format!("member m{rank} on "))).nth(3).unwrap();
        assert!(line.contains(&format!("restoring {from}/m{rank}")), "{line}");
    }
    let want = format!("{:016x}", guests::netring_digest(2, HOPS, 1, 100));
    let digests: Vec<&str> = text.lines().filter_map(netring_digest).collect();
    assert_eq!(digests, [want.as_str(), want.as_str()], "each member's digest, the undisturbed ring's:\n{text}");
    assert_eq!(cluster.job(&job, "Restarts"), "3", "Slurm requeued it three times:\n{text}");
    assert!(series.join("finished").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cancelled_job_stays_cancelled_and_a_new_job_on_its_series_goes_on_from_its_last_checkpoint() {
    let dir = workdir("slurm-cancel");
    let cluster = Cluster::start(1);
    let job = submit(&cluster, &dir, &[], &[], ARGS);
    wait_output(&dir, 2, "round", |l| l.starts_with("round "));
    // scancel: Slurm's SIGTERM, a last checkpoint, and the job ends; it is not
    // requeued (a requeue would start it again within 6 s here).
    let o = cluster.client("scancel").arg(&job).output().unwrap();
    assert!(o.status.success(), "scancel: {}", String::from_utf8_lossy(&o.stderr));
    cluster.wait_state(&job, &["CANCELLED"], Duration::from_secs(60));
    wait_output(&dir, 1, "last checkpoint", |l| l.contains("SIGTERM: the VM stopped after its last checkpoint"));
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(cluster.job(&job, "JobState"), "CANCELLED", "{}", output(&dir));
    assert_eq!(cluster.job(&job, "Restarts"), "0", "{}", output(&dir));
    let before = rounds(&dir);

    // A new job on the same series goes on from that checkpoint.
    let again = submit(&cluster, &dir, &[], &[], ARGS);
    cluster.wait_state(&again, &["COMPLETED"], Duration::from_secs(240));
    let text = output(&dir);
    assert!(text.contains("INFO cevm: restoring "), "{text}");
    assert!(rounds(&dir) < before + ROUNDS as usize, "it went on, not from the start:\n{text}");
    let digests: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("digest=")).collect();
    assert_eq!(digests, [want(ROUNDS).as_str()], "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
