//! Stop-and-save checkpoint of a running Linux guest (2 vCPUs, busy with a hash
//! chain), SIGKILL of its VMM, restore: the guest goes on from the checkpoint, its
//! console keeps working, its clock runs on from where it was, and its result is
//! the one an undisturbed run computes.

mod common;

use std::process::Command;

use common::linux::run_scenario;

const STEPS: u32 = 20;

/// The result the guest's hash chain must reach (busybox md5sum = coreutils md5sum).
fn expected_result() -> String {
    let script = format!(
        "h=start; i=1; while [ $i -le {STEPS} ]; do h=$(echo \"$h $i\" | md5sum | cut -c1-16); i=$((i + 1)); done; echo $h"
    );
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// (step, uptime) of every "step" line with the given prefix.
fn steps(out: &str, prefix: &str) -> Vec<(u32, f64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix)?.strip_prefix("cevm-guest: step "))
        .filter_map(|l| {
            let step = l.split('/').next()?.parse().ok()?;
            let up = l.split("up=").nth(1)?.trim().parse().ok()?;
            Some((step, up))
        })
        .collect()
}

#[test]
fn a_checkpointed_killed_and_restored_linux_guest_finishes_right() {
    let scenario = format!(
        r#"
cd /tmp
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --vcpus 2 --api-sock /tmp/api.sock \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.test=compute cevm.steps={STEPS}" > /tmp/run1.txt 2>&1 &
pid=$!
n=0
while ! grep -q "step 8/" /tmp/run1.txt; do sleep 0.2; n=$((n+1)); [ $n -gt 1500 ] && break; done
$CEVM checkpoint --api-sock /tmp/api.sock --out /tmp/ckpt > /tmp/ck.json
echo "cevm-scenario: checkpoint exit=$?"
grep -E "pause_ms|data_pages" /tmp/ck.json
sleep 1
kill -9 $pid
wait $pid
echo "cevm-scenario: killed"
sed 's/^/run1: /' /tmp/run1.txt
$CEVM verify /tmp/ckpt > /dev/null && echo "cevm-scenario: verified"
$CEVM restore /tmp/ckpt > /tmp/run2.txt 2>&1
echo "cevm-scenario: restore exit=$?"
sed 's/^/run2: /' /tmp/run2.txt
"#
    );
    let (status, out) = run_scenario("checkpoint", &scenario, 1);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("cevm-scenario: checkpoint exit=0"), "{out}");
    assert!(out.contains("cevm-scenario: verified"), "{out}");
    assert!(out.contains("cevm-scenario: restore exit=0"), "{out}");
    // The killed run never finished; the restored one did, with the right result.
    assert!(!out.contains("run1: cevm-guest: result"), "{out}");
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("run2: cevm-guest: result "))
        .unwrap_or_else(|| panic!("the restored guest printed no result: {out}"));
    assert_eq!(result.trim(), expected_result());
    assert!(out.contains("run2: cevm: guest powered off"), "{out}");

    // The restored guest continues after the checkpoint (no step is redone from
    // scratch) and its clock runs on from where it was: uptimes keep increasing.
    let before = steps(&out, "run1: ");
    let after = steps(&out, "run2: ");
    assert!(before.iter().any(|s| s.0 == 8), "{out}");
    let first_after = after.first().unwrap_or_else(|| panic!("no steps after restore: {out}"));
    assert!(first_after.0 > 8 && first_after.0 <= before.last().unwrap().0 + 1, "{before:?} {after:?}");
    assert_eq!(after.last().unwrap().0, STEPS);
    let at_checkpoint = before.iter().find(|s| s.0 == first_after.0 - 1).map(|s| s.1).unwrap();
    assert!(first_after.1 >= at_checkpoint, "the guest clock went back: {before:?} {after:?}");
    assert!(after.windows(2).all(|w| w[1].1 > w[0].1), "uptime not increasing after restore: {after:?}");
}
