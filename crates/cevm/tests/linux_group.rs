//! A group CEVM checkpoint of two Linux guests (nested harness): one streams
//! a known byte sequence (a hash chain, guest-linux/stream.c) to the other
//! over one TCP connection, both writing their disks meanwhile (a line synced
//! every 0.5 s). `cevm group checkpoint --strategy cevm` takes both at one
//! cut, the stream runs on, both VMMs are SIGKILLed, and `cevm group restore`
//! brings the group back: the receiver gets every byte once and in order to
//! the end (the hash chain checked byte by byte), the connection is never
//! reset, and both restored disks check clean (`qemu-img check`, `e2fsck`)
//! and hold their lines without a gap or a repeat.

use cevm_testkit::linux::{base_image, run_scenario_with_files, sh, SCENARIO_FUNCTIONS};

/// The stream: MiB, paced to KiB/s in the guest (about 30 s undisturbed).
const STREAM_MIB: u64 = 24;
const STREAM_KIB_S: u64 = 800;

/// Starts member `name` (API at /tmp/NAME.sock, console /tmp/NAME.txt, pid
/// in $NAME) on `tap`, its disk an overlay /tmp/NAME.qcow2 of the shared base.
fn member(name: &str, tap: &str, mac: &str, args: &str) -> String {
    format!(
        r#"$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 192M --vcpus 1 --api-sock /tmp/{name}.sock \
    --net tap={tap},mac={mac} --disk /tmp/base.qcow2 --overlay /tmp/{name}.qcow2 \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.disk=1 {args}" > /tmp/{name}.txt 2> /tmp/{name}.err &
{name}=$!
"#
    )
}

fn scenario() -> String {
    let stream = format!("cevm.port=5000 cevm.bytes={}", STREAM_MIB << 20);
    let net = cevm_testkit::linux::network("gbr", &["g0", "g1"]);
    // `network` begins with the scenario functions; the disk's base comes first.
    let net =
        net.replace(SCENARIO_FUNCTIONS, &format!("cp \"$DATA/base.qcow2\" /tmp/base.qcow2\n{SCENARIO_FUNCTIONS}"));
    format!(
        r#"{net}{rx}{tx}got() {{ grep -c "cevm-guest: received [0-9]* MiB" /tmp/rx.txt /tmp/g.txt 2>/dev/null | awk -F: '{{s += $2}} END {{print s}}'; }}
fail() {{ echo "cevm-scenario: $1"; for f in tx rx g; do sed "s/^/$f: /" /tmp/$f.txt /tmp/$f.err 2>/dev/null; done; exit 1; }}
wait_for "cevm-guest: sent 4 MiB" /tmp/tx.txt || fail "the stream did not start"
$CEVM group checkpoint --strategy cevm --dir /tmp/series --member tx=/tmp/tx.sock --member rx=/tmp/rx.sock > /tmp/gc.json 2> /tmp/gc.err
echo "cevm-scenario: group checkpoint exit=$?"
echo "cevm-scenario: group checkpoint done at $(got) MiB received"
n=$(($(got) + 2))
wait_for "cevm-guest: received $n MiB" /tmp/rx.txt || fail "the stream stopped after the group checkpoint"
kill -9 $tx $rx
wait $tx $rx 2> /dev/null
echo "cevm-scenario: both killed at $(got) MiB received"
$CEVM group verify /tmp/series > /tmp/gv.txt 2>&1
echo "cevm-scenario: group verify exit=$?"
mkdir -p /tmp/restored
$CEVM group restore /tmp/series --disk-dir /tmp/restored > /tmp/g.txt 2> /tmp/g.err &
g=$!
wait_vm $g g
echo "cevm-scenario: group restore exit=$?"
for m in tx rx; do
    cp /tmp/series/latest/$m/disk.qcow2 "$OUT/ck-$m.qcow2"
    cp /tmp/restored/ckpt-000001.$m.disk.qcow2 "$OUT/r-$m.qcow2"
done
for f in gc gv; do sed "s/^/$f: /" /tmp/$f.*; done
for f in tx rx g; do sed "s/^/$f: /" /tmp/$f.txt /tmp/$f.err; done
"#,
        rx = member("rx", "g1", "52:54:00:c2:00:01", &format!("cevm.test=stream-recv cevm.ip=10.0.0.1/24 {stream}")),
        tx = member(
            "tx",
            "g0",
            "52:54:00:c2:00:02",
            &format!("cevm.test=stream-send cevm.ip=10.0.0.2/24 cevm.peer=10.0.0.1 cevm.rate={STREAM_KIB_S} {stream}")
        ),
    )
}

/// The "tick N" lines of the file system in raw image `raw`.
fn ticks(raw: &str, dir: &std::path::Path) -> Vec<u64> {
    sh(&format!("debugfs -R 'cat /ticks.txt' {raw} 2>/dev/null"), dir)
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

#[test]
fn a_group_cevm_checkpoint_of_two_linux_guests_streaming_tcp_restores_after_sigkill_with_the_stream_whole() {
    let dir = cevm_testkit::workdir("group-disks");
    let base = base_image(&dir);
    // npt=0, as for every live migration in the nested harness (see linux_migration.rs).
    let (status, out, work) = run_scenario_with_files("group", &scenario(), 0, std::slice::from_ref(&base));
    for l in out.lines().filter(|l| l.contains("cevm-scenario:") || l.contains("stream ") || l.starts_with("gc: ")) {
        eprintln!("{l}");
    }
    assert_eq!(status, 0, "{out}");
    for line in [
        "cevm-scenario: group checkpoint exit=0",
        "cevm-scenario: group verify exit=0",
        "cevm-scenario: group restore exit=0",
    ] {
        assert!(out.contains(line), "missing `{line}`: {out}");
    }
    let bytes = STREAM_MIB << 20;
    // After the restore: the receiver checked every byte to the end, and the
    // sender sent them all; nobody saw a reset.
    assert!(out.contains(&format!("g: rx: cevm-guest: stream ok {bytes}")), "{out}");
    assert!(out.contains(&format!("g: tx: cevm-guest: stream sent {bytes}")), "{out}");
    assert!(!out.contains("stream reset") && !out.contains("mismatch"), "{out}");
    assert!(out.contains("g: rx: cevm-guest: ticks stopped, disk unmounted"), "{out}");
    // The group checkpoint was taken mid-stream, and the restore went on from it.
    let at = |what: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("cevm-scenario: {what} at "))?.strip_suffix(" MiB received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{what}`: {out}"))
    };
    assert!(at("group checkpoint done") < STREAM_MIB && at("both killed") < STREAM_MIB, "{out}");

    // The restored disks: clean, every tick once and in order.
    let out_dir = work.join("out");
    for m in ["tx", "rx"] {
        let (ck, r) = (out_dir.join(format!("ck-{m}.qcow2")), out_dir.join(format!("r-{m}.qcow2")));
        assert!(ck.exists() && r.exists(), "{m}'s disks did not come back: {out}");
        let (b, ck, r) = (base.display(), ck.display(), r.display());
        sh(&format!("qemu-img rebase -u -b {b} -F qcow2 {ck} && qemu-img rebase -u -b {ck} -F qcow2 {r}"), &dir);
        sh(&format!("qemu-img check -q {r} && qemu-img convert -O raw {r} {m}.raw && e2fsck -n -f {m}.raw"), &dir);
        let t = ticks(&format!("{m}.raw"), &dir);
        assert!(t.len() > 4, "{m}: ticks {t:?}");
        assert_eq!(t, (1..=t.len() as u64).collect::<Vec<_>>(), "{m}: a tick lost or repeated");
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&dir);
}
