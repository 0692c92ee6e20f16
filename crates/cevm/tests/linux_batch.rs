//! `cevm batch` with a Linux guest that logs every step of a hash chain to
//! its virtio-blk disk: warned (SIGUSR1), it takes a last checkpoint and
//! exits 75; the next run restores it and is lost (its VMM and `cevm batch`
//! SIGKILLed, as on a node failure); the run after restores the same
//! checkpoint again, each run into a disk of its own, and finishes with the
//! undisturbed result, its disk holding every step once, in order, and
//! checking clean.

use cevm_testkit::linux::{
    base_image, checked_disk_steps, hash_chain_result, run_scenario_with_files, said, SCENARIO_FUNCTIONS,
};

const STEPS: u32 = 40;

#[test]
fn a_batch_jobs_checkpoint_is_restored_again_after_the_run_that_restored_it_is_lost() {
    let scenario = format!(
        r#"cd /tmp
cp "$DATA/base.qcow2" /tmp/base.qcow2
{SCENARIO_FUNCTIONS}
batch() {{
    exec $CEVM batch --dir /tmp/series -- --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --vcpus 2 \
        --disk /tmp/base.qcow2 --overlay /tmp/run.qcow2 \
        --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.test=compute cevm.disk=1 cevm.steps={STEPS}"
}}
batch > /tmp/b1.txt 2> /tmp/b1.err &
b=$!
wait_for "step 8/" /tmp/b1.txt
kill -USR1 $b
wait $b
echo "cevm-scenario: run 1 exit=$?"
batch > /tmp/b2.txt 2> /tmp/b2.err &
b=$!
wait_for "step 14/" /tmp/b2.txt
for p in $(cat /proc/$b/task/$b/children); do kill -9 $p; done
kill -9 $b
wait $b
echo "cevm-scenario: run 2 lost"
(batch) > /tmp/b3.txt 2> /tmp/b3.err
echo "cevm-scenario: run 3 exit=$?"
for i in 1 2 3; do sed "s/^/run$i: /" /tmp/b$i.txt /tmp/b$i.err; done
ls /tmp/series /tmp/series/disks
cp /tmp/series/disks/ckpt-000001.disk.qcow2 "$OUT/final.qcow2"
"#
    );
    let dir = cevm_testkit::workdir("batch-host");
    let base = base_image(&dir);
    let (status, out, work) = run_scenario_with_files("batch", &scenario, 1, std::slice::from_ref(&base));
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("cevm-scenario: run 1 exit=75"), "warned: checkpointed, requeue me:\n{out}");
    assert!(out.contains("cevm-scenario: run 3 exit=0"), "{out}");
    for run in ["run2: ", "run3: "] {
        assert!(said(&out, run, "INFO cevm: restoring /tmp/series/ckpt-000001"), "{run} restores it:\n{out}");
    }
    assert!(!out.contains("run2: cevm-guest: result"), "{out}");
    let result = out.lines().find_map(|l| l.strip_prefix("run3: cevm-guest: result "));
    assert_eq!(result.map(str::trim), Some(hash_chain_result(STEPS).as_str()), "{out}");

    // The last run's disk: every step once, in order (what the lost run wrote
    // after the checkpoint is not in it), and clean.
    let disk = work.join("out/final.qcow2");
    assert!(disk.exists(), "the restored disk did not come back: {out}");
    assert_eq!(checked_disk_steps(&base, &disk, &dir), (1..=STEPS).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&dir);
}
