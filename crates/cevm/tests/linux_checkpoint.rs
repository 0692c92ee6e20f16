//! Copy-on-write checkpoint of a running Linux guest (2 vCPUs, busy with a hash
//! chain whose every step it appends to a file on its virtio-blk qcow2 overlay,
//! in private memory), SIGKILL of its VMM, restore: the guest goes on from the
//! checkpoint, its console keeps working, its clock runs on from where it was,
//! its result is the one an undisturbed run computes, and its disk, handed over
//! to a fresh overlay at the checkpoint while the guest kept writing, holds
//! every step exactly once and checks clean (`e2fsck -n`). (Stop-and-save
//! checkpoints of Linux guests are restored in linux_network.rs.)

use cevm_testkit::linux::{
    base_image, checked_disk_steps, compute_steps, hash_chain_result, run_scenario_with_files, said,
    start_linux_vm_with,
};

const STEPS: u32 = 20;

#[test]
fn a_cow_checkpointed_killed_and_restored_linux_guest_finishes_right() {
    let scenario = format!(
        r#"{}
wait_for "step 8/" /tmp/run1.txt
$CEVM checkpoint --api-sock /tmp/api.sock --strategy cow --out /tmp/ckpt > /tmp/ck.json
echo "cevm-scenario: checkpoint exit=$?"
grep -E "strategy|pause_ms|data_pages|linked" /tmp/ck.json
sleep 1
kill -9 $run1
wait $run1
echo "cevm-scenario: killed"
sed 's/^/run1: /' /tmp/run1.txt /tmp/run1.err
$CEVM verify /tmp/ckpt > /dev/null && echo "cevm-scenario: verified"
$CEVM restore /tmp/ckpt --overlay "$OUT/restored.qcow2" > /tmp/run2.txt 2> /tmp/run2.err
echo "cevm-scenario: restore exit=$?"
sed 's/^/run2: /' /tmp/run2.txt /tmp/run2.err
"#,
        start_linux_vm_with(
            "run1",
            &format!("cevm.test=compute cevm.disk=1 cevm.steps={STEPS}"),
            "--memory-backend private"
        )
    );
    let dir = cevm_testkit::workdir("ckpt-host");
    let base = base_image(&dir);
    let (status, out, work) = run_scenario_with_files("checkpoint", &scenario, 1, std::slice::from_ref(&base));
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("cevm-scenario: checkpoint exit=0"), "{out}");
    assert!(out.contains(r#""strategy": "cow""#) && out.contains(r#""linked": true"#), "{out}");
    assert!(out.contains("cevm-scenario: verified"), "{out}");
    assert!(out.contains("cevm-scenario: restore exit=0"), "{out}");
    // The killed run never finished; the restored one did, with the right result.
    assert!(!out.contains("run1: cevm-guest: result"), "{out}");
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("run2: cevm-guest: result "))
        .unwrap_or_else(|| panic!("the restored guest printed no result: {out}"));
    assert_eq!(result.trim(), hash_chain_result(STEPS));
    assert!(said(&out, "run2: ", "INFO cevm: guest powered off"), "{out}");

    // The restored guest continues after the checkpoint (no step is redone from
    // scratch) and its clock runs on from where it was: uptimes keep increasing.
    let before = compute_steps(&out, "run1: ");
    let after = compute_steps(&out, "run2: ");
    assert!(before.iter().any(|s| s.0 == 8), "{out}");
    let first_after = after.first().unwrap_or_else(|| panic!("no steps after restore: {out}"));
    assert!(first_after.0 > 8 && first_after.0 <= before.last().unwrap().0 + 1, "{before:?} {after:?}");
    assert_eq!(after.last().unwrap().0, STEPS);
    let at_checkpoint = before.iter().find(|s| s.0 == first_after.0 - 1).map(|s| s.1).unwrap();
    assert!(first_after.1 >= at_checkpoint, "the guest clock went back: {before:?} {after:?}");
    assert!(after.windows(2).all(|w| w[1].1 > w[0].1), "uptime not increasing after restore: {after:?}");

    // The restored disk: every step logged exactly once, in order (the steps the
    // killed VMM logged after the checkpoint are not there: they were never part
    // of the restored guest's past), and the file system is clean.
    let disk = work.join("out/restored.qcow2");
    assert!(disk.exists(), "the restored disk did not come back: {out}");
    assert_eq!(checked_disk_steps(&base, &disk, &dir), (1..=STEPS).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&dir);
}
