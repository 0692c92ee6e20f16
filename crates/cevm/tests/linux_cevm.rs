//! CEVM checkpoints of a running Linux guest with a disk (2 vCPUs, writing files
//! on its virtio-blk qcow2 overlay step after step): one thread-based, then one
//! process-based to another cevm over a unix socket. The running guest keeps
//! every write across both (its result is an undisturbed run's); each
//! checkpoint restores to the disk and memory of its switch instant, and the
//! restored guest goes on from there to the same result; every disk left behind
//! checks clean (`qemu-img check`, `e2fsck -n`), and no overlay is left over.

use cevm_testkit::linux::{
    base_image, compute_steps, files_result, logged_steps, run_scenario_with_files, said, sh, start_linux_vm,
};

const STEPS: u32 = 60;

#[test]
fn a_linux_guest_writing_files_keeps_them_through_cevm_checkpoints_and_each_restores_right() {
    let scenario = format!(
        r#"{}
wait_for "step 8/" /tmp/src.txt
$CEVM checkpoint --api-sock /tmp/api.sock --strategy cevm --out /tmp/ck1 > /tmp/ck1.json 2> /tmp/ck1.err
echo "cevm-scenario: thread-based checkpoint exit=$?"
sed 's/^/ck1: /' /tmp/ck1.json
sed 's/^/ck1-stderr: /' /tmp/ck1.err
$CEVM run --incoming unix:/tmp/dst.sock > /tmp/dst.txt 2> /tmp/dst.err &
dst=$!
# Two steps after the first checkpoint was committed (the guest ran on meanwhile).
n=$(($(grep -o "step [0-9]*/" /tmp/src.txt | tail -1 | tr -dc 0-9) + 2))
wait_for "step $n/" /tmp/src.txt
echo "cevm-scenario: second checkpoint after step $n"
$CEVM checkpoint --api-sock /tmp/api.sock --strategy cevm --to unix:/tmp/dst.sock --out /tmp/ck2 > /tmp/ck2.json 2> /tmp/ck2.err
echo "cevm-scenario: process-based checkpoint exit=$?"
sed 's/^/ck2: /' /tmp/ck2.json
sed 's/^/ck2-stderr: /' /tmp/ck2.err
wait_vm $src src
echo "cevm-scenario: source exit=$?"
wait_vm $dst dst
echo "cevm-scenario: destination exit=$?"
sed 's/^/src: /' /tmp/src.txt /tmp/src.err
sed 's/^/dst: /' /tmp/dst.txt /tmp/dst.err
ls /tmp/*.cevm-next 2>/dev/null && echo "cevm-scenario: an overlay was left over"
$CEVM verify /tmp/ck1 > /dev/null && echo "cevm-scenario: ck1 verified"
$CEVM verify /tmp/ck2 > /dev/null && echo "cevm-scenario: ck2 verified"
cp /tmp/run.qcow2 "$OUT/run.qcow2"
cp /tmp/ck1/disk.qcow2 "$OUT/ck1.qcow2"
cp /tmp/ck2/disk.qcow2 "$OUT/ck2.qcow2"
$CEVM restore /tmp/ck1 --overlay "$OUT/r1.qcow2" > /tmp/r1.txt 2> /tmp/r1.err
echo "cevm-scenario: restore ck1 exit=$?"
$CEVM restore /tmp/ck2 --overlay "$OUT/r2.qcow2" > /tmp/r2.txt 2> /tmp/r2.err
echo "cevm-scenario: restore ck2 exit=$?"
sed 's/^/r1: /' /tmp/r1.txt /tmp/r1.err
sed 's/^/r2: /' /tmp/r2.txt /tmp/r2.err
"#,
        start_linux_vm("src", &format!("cevm.test=files cevm.steps={STEPS}"))
    );
    let dir = cevm_testkit::workdir("cevm-linux");
    let base = base_image(&dir);
    // npt=0, as for every live migration in the nested harness (see linux_migration.rs).
    let (status, out, work) = run_scenario_with_files("cevm", &scenario, 0, std::slice::from_ref(&base));
    assert_eq!(status, 0, "{out}");
    for line in [
        "cevm-scenario: thread-based checkpoint exit=0",
        "cevm-scenario: process-based checkpoint exit=0",
        "cevm-scenario: source exit=0",
        "cevm-scenario: destination exit=0",
        "cevm-scenario: ck1 verified",
        "cevm-scenario: ck2 verified",
        "cevm-scenario: restore ck1 exit=0",
        "cevm-scenario: restore ck2 exit=0",
    ] {
        assert!(out.contains(line), "missing `{line}`: {out}");
    }
    assert!(said(&out, "dst: ", "INFO cevm: guest powered off"), "{out}");
    assert!(!out.contains("left over"), "{out}");
    assert!(!out.contains("did not end normally"), "{out}");
    // Both checkpoints handed a disk over: T's clusters went to the new instance.
    for ck in ["ck1: ", "ck2: "] {
        let json: String = out.lines().filter_map(|l| l.strip_prefix(ck)).collect::<Vec<_>>().join("\n");
        let report: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{ck}{e}: {out}"));
        assert_eq!(report["strategy"], "cevm", "{report}");
        let h = &report["disk_handover"];
        assert!(h["clusters"].as_u64().unwrap_or(0) > 0 && h.get("error").is_none(), "{report}");
    }

    // The running guest: every step once, in order, across the three instances,
    // with the result of an undisturbed run.
    let expected = files_result(STEPS);
    let result = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix)?.strip_prefix("cevm-guest: result "))
            .unwrap_or_else(|| panic!("no result from {prefix}: {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(result("dst: "), expected);
    let (before, after) = (compute_steps(&out, "src: "), compute_steps(&out, "dst: "));
    let all: Vec<u32> = before.iter().chain(&after).map(|s| s.0).collect();
    assert_eq!(all, (1..=STEPS).collect::<Vec<_>>(), "{out}");

    // Each restored checkpoint goes on from its switch instant, to the same result.
    let second: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("cevm-scenario: second checkpoint after step "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(before.last().unwrap().0 >= second && second < STEPS, "{out}");
    for (r, after_step) in [("r1: ", 8), ("r2: ", second)] {
        assert_eq!(result(r), expected, "{r}");
        let steps = compute_steps(&out, r);
        let first = steps.first().unwrap_or_else(|| panic!("no steps after restoring ({r}): {out}")).0;
        assert!(first > after_step && first < STEPS, "{r} went on from step {first}: {out}");
        assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), (first..=STEPS).collect::<Vec<_>>(), "{r}");
    }

    // The disks: all check clean; the running guest's and both restored guests'
    // hold every step exactly once and a clean file system.
    let out_dir = work.join("out");
    for name in ["run", "ck1", "ck2", "r1", "r2"] {
        let d = out_dir.join(format!("{name}.qcow2"));
        assert!(d.exists(), "{name}.qcow2 did not come back: {out}");
        let (b, d) = (base.display(), d.display());
        sh(&format!("qemu-img rebase -u -b {b} -F qcow2 {d} && qemu-img check -q {d}"), &dir);
        if name != "ck1" && name != "ck2" {
            sh(&format!("qemu-img convert -O raw {d} {name}.raw && e2fsck -n -f {name}.raw"), &dir);
            assert_eq!(logged_steps(&format!("{name}.raw"), &dir), (1..=STEPS).collect::<Vec<_>>(), "{name}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&dir);
}
