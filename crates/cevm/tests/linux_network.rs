//! Linux guests on a network (virtio-net on taps of one bridge, in the nested
//! harness's L1): Linux's own virtio_net driver and TCP stack across cevm's
//! migrations, checkpoints and restores.
//!
//! 1. One guest streams a known byte sequence (a hash chain,
//!    guest-linux/stream.c) to another over one TCP connection, which checks
//!    every byte as it arrives. Mid-stream the sender is migrated thread-based,
//!    then to another cevm process whose NIC is on another tap, and the
//!    receiver is CEVM-checkpointed. The receiver gets every byte once and in
//!    order, the connection is never reset, each operation happened while
//!    bytes were still to come, both sides announced themselves after each
//!    move (gratuitous ARPs, seen by the receiver), and the checkpoint verifies.
//! 2. A guest checkpointed (stop-and-save, its VMM stopped) while idle and
//!    restored onto another tap reaches its peer at once: its first ping after
//!    the restore is answered, it announced itself, and a new TCP connection
//!    carries a stream to the peer.

use std::sync::Mutex;

use cevm_testkit::linux::{network, run_scenario, said, start_net_vm};

/// Each scenario boots an L1 that uses both of the machine's cores: one at a time.
static ONE_L1_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Guest memory: no disk, a busybox initramfs and a TCP stream.
const MEM: &str = "192M";

/// The stream of scenario 1: MiB, paced to KiB/s in the guest, so that it
/// lasts long enough for three operations mid-stream (about 50 s undisturbed).
const STREAM_MIB: u64 = 40;
const STREAM_KIB_S: u64 = 800;

/// The lines of `out` that begin with `prefix`, without it (and without the
/// serial console's carriage returns).
fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter_map(|l| Some(l.strip_prefix(prefix)?.trim_end())).collect()
}

/// Prints what a scenario did (for the test's log): its own lines, the
/// guests' results, pings and announcements, cevm's messages.
fn show_key_lines(out: &str) {
    let key = ["cevm-scenario:", "stream ", "round ", "gratuitous", "INFO cevm:", "WARN", "ERROR"];
    for l in out.lines().filter(|l| key.iter().any(|k| l.contains(k))) {
        eprintln!("{}", l.trim_end());
    }
}

/// Whether the console with `prefix` printed exactly `line`.
fn printed(out: &str, prefix: &str, line: &str) -> bool {
    lines_with(out, prefix).contains(&line)
}

/// The N of every "cevm-guest: WORD N MiB" line the console with `prefix` printed.
fn progress(out: &str, prefix: &str, word: &str) -> Vec<u64> {
    let start = format!("cevm-guest: {word} ");
    lines_with(out, prefix)
        .into_iter()
        .filter_map(|l| l.strip_prefix(&start)?.strip_suffix(" MiB")?.parse().ok())
        .collect()
}

/// The receiver's progress an operation's report line gives ("... at N MiB received").
fn received_at(out: &str, what: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("cevm-scenario: {what} done at "))?.strip_suffix(" MiB received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{what} done at N MiB received`: {out}"))
}

/// Gratuitous ARPs for `ip` a console saw (`dir`: "in" or "out").
fn announcements(out: &str, prefix: &str, dir: &str, ip: &str) -> usize {
    let start = format!("cevm-guest: arp {dir} request {ip} ");
    lines_with(out, prefix)
        .iter()
        .filter(|l| l.starts_with(&start) && l.ends_with(&format!("-> {ip} gratuitous")))
        .count()
}

/// Scenario 1: the receiver on tap cln1, the sender on cln0; the sender is
/// migrated thread-based, then to a cevm process on cln2; then the receiver
/// is CEVM-checkpointed. Each operation starts a few MiB after the one before.
fn stream_scenario(bytes: u64) -> String {
    let stream = format!("cevm.port=5000 cevm.bytes={bytes}");
    format!(
        r#"{net}{rx}{tx}got() {{ grep -c "cevm-guest: received [0-9]* MiB" /tmp/rx.txt; }}
done_at() {{ echo "cevm-scenario: $1 done at $(got) MiB received"; }}
fail() {{ echo "cevm-scenario: $1"; sed 's/^/rx: /' /tmp/rx.txt /tmp/rx.err; sed 's/^/tx: /' /tmp/tx.txt /tmp/tx.err; exit 1; }}
wait_for "cevm-guest: sent 4 MiB" /tmp/tx.txt || fail "the stream did not start"
$CEVM migrate --api-sock /tmp/tx.sock --to local > /tmp/m1.json 2> /tmp/m1.err
echo "cevm-scenario: local migration exit=$?"
done_at "local migration"
$CEVM run --incoming unix:/tmp/dst.sock --net tap=cln2 > /tmp/dst.txt 2> /tmp/dst.err &
dst=$!
n=$(($(grep -c "cevm-guest: sent [0-9]* MiB" /tmp/tx.txt) + 3))
wait_for "cevm-guest: sent $n MiB" /tmp/tx.txt || fail "the stream stopped after the local migration"
$CEVM migrate --api-sock /tmp/tx.sock --to unix:/tmp/dst.sock > /tmp/m2.json 2> /tmp/m2.err
echo "cevm-scenario: unix migration exit=$?"
done_at "unix migration"
n=$(($(got) + 3))
wait_for "cevm-guest: received $n MiB" /tmp/rx.txt || fail "the stream stopped after the unix migration"
$CEVM checkpoint --api-sock /tmp/rx.sock --out /tmp/ck --strategy cevm > /tmp/ck.json 2> /tmp/ck.err
echo "cevm-scenario: checkpoint exit=$?"
done_at "checkpoint"
wait_vm $tx tx
echo "cevm-scenario: source exit=$?"
wait_vm $dst dst
echo "cevm-scenario: destination exit=$?"
wait_vm $rx rx
echo "cevm-scenario: receiver exit=$?"
$CEVM verify /tmp/ck > /tmp/verify.txt 2>&1
echo "cevm-scenario: verify exit=$?"
for f in m1 m2 ck; do sed "s/^/$f: /" /tmp/$f.json /tmp/$f.err; done
sed 's/^/verify: /' /tmp/verify.txt
sed 's/^/tx: /' /tmp/tx.txt /tmp/tx.err
sed 's/^/dst: /' /tmp/dst.txt /tmp/dst.err
sed 's/^/rx: /' /tmp/rx.txt /tmp/rx.err
"#,
        net = network("clnbr", &["cln0", "cln1", "cln2"]),
        rx = start_net_vm(
            "rx",
            "cln1",
            "52:54:00:c1:00:01",
            MEM,
            &format!("cevm.test=stream-recv cevm.ip=10.0.0.1/24 {stream}")
        ),
        tx = start_net_vm(
            "tx",
            "cln0",
            "52:54:00:c1:00:02",
            MEM,
            &format!("cevm.test=stream-send cevm.ip=10.0.0.2/24 cevm.peer=10.0.0.1 cevm.rate={STREAM_KIB_S} {stream}")
        ),
    )
}

#[test]
fn a_tcp_stream_between_linux_guests_survives_both_migrations_of_the_sender_and_a_checkpoint_of_the_receiver() {
    let _one = ONE_L1_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let bytes = STREAM_MIB << 20;
    // npt=0, as for every live migration in the nested harness (see linux_migration.rs).
    let (status, out) = run_scenario("network-stream", &stream_scenario(bytes), 0);
    show_key_lines(&out);
    assert_eq!(status, 0, "{out}");
    for line in [
        "cevm-scenario: local migration exit=0",
        "cevm-scenario: unix migration exit=0",
        "cevm-scenario: checkpoint exit=0",
        "cevm-scenario: source exit=0",
        "cevm-scenario: destination exit=0",
        "cevm-scenario: receiver exit=0",
        "cevm-scenario: verify exit=0",
    ] {
        assert!(out.contains(line), "missing `{line}`: {out}");
    }
    for (who, words) in [
        ("tx: ", "INFO cevm: guest migrated to a new instance in this process"),
        ("tx: ", "INFO cevm: guest migrated to unix:/tmp/dst.sock"),
        ("dst: ", "INFO cevm: guest powered off"),
        ("rx: ", "INFO cevm: guest powered off"),
    ] {
        assert!(said(&out, who, words), "missing `{who}... {words}`: {out}");
    }

    // Every byte once, in order, checked as it arrived; never a reset.
    assert!(printed(&out, "rx: ", &format!("cevm-guest: stream ok {bytes}")), "{out}");
    assert!(printed(&out, "rx: ", "cevm-guest: stream-recv exit=0"), "{out}");
    assert!(printed(&out, "dst: ", &format!("cevm-guest: stream sent {bytes}")), "{out}");
    assert!(printed(&out, "dst: ", "cevm-guest: stream-send exit=0"), "{out}");
    for bad in ["stream reset", "stream mismatch", "stream longer"] {
        assert!(!out.contains(bad), "`{bad}`: {out}");
    }
    // The sender's progress across its three instances (two consoles), the
    // receiver's across its two: each MiB once, in order.
    let sent: Vec<u64> = progress(&out, "tx: ", "sent").into_iter().chain(progress(&out, "dst: ", "sent")).collect();
    assert_eq!(sent, (1..=STREAM_MIB).collect::<Vec<_>>(), "{out}");
    assert_eq!(progress(&out, "rx: ", "received"), (1..=STREAM_MIB).collect::<Vec<_>>(), "{out}");

    // Each operation ended while bytes were still to come, one after the other.
    let at: Vec<u64> =
        ["local migration", "unix migration", "checkpoint"].iter().map(|w| received_at(&out, w)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]) && at[2] < STREAM_MIB,
        "received at each operation's end: {at:?}: {out}"
    );
    // Both migrations were real ones.
    for m in ["m1: ", "m2: "] {
        let json: String = lines_with(&out, m).join("\n");
        let report: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{m}{e}: {out}"));
        assert!(report["pages_sent"].as_u64().unwrap() > 1000, "{report}");
    }
    let json: String = lines_with(&out, "ck: ").join("\n");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("ck: {e}: {out}"));
    assert_eq!(report["strategy"], "cevm", "{report}");

    // After each of its moves the sender announced itself (virtio-net's
    // GUEST_ANNOUNCE: a gratuitous ARP), and the receiver saw it; the
    // receiver announced itself after its checkpoint's switch.
    let (seen, own) = (announcements(&out, "rx: ", "in", "10.0.0.2"), announcements(&out, "rx: ", "out", "10.0.0.1"));
    assert!(seen >= 2 && own >= 1, "the receiver saw {seen} announcements of the sender and made {own}: {out}");
}

/// Scenario 2: ping rounds of the guest `a`.
const ROUNDS: u32 = 4;
/// Scenario 2: the stream after the rounds.
const BYTES: u64 = 1 << 20;

/// Scenario 2: the peer on tap clr0, the guest `a` on clr1, checkpointed
/// (stop-and-save, stopped) while idle after its second round, restored as `b`
/// onto clr2.
fn restore_scenario() -> String {
    let stream = format!("cevm.port=5000 cevm.bytes={BYTES}");
    format!(
        r#"{net}{peer}{a}fail() {{ echo "cevm-scenario: $1"; sed 's/^/a: /' /tmp/a.txt /tmp/a.err; sed 's/^/peer: /' /tmp/peer.txt /tmp/peer.err; exit 1; }}
wait_for "cevm-guest: round 2 idle" /tmp/a.txt || fail "the guest never reached its second round"
# Idle for 4 s between rounds: checkpointed now, it is not in the middle of a ping.
$CEVM checkpoint --api-sock /tmp/a.sock --out /tmp/ck --strategy stop-and-save --stop > /tmp/ck.json 2> /tmp/ck.err
echo "cevm-scenario: checkpoint exit=$?"
wait_vm $a a
echo "cevm-scenario: checkpointed VMM exit=$?"
$CEVM verify /tmp/ck > /tmp/verify.txt 2>&1
echo "cevm-scenario: verify exit=$?"
$CEVM restore /tmp/ck --net tap=clr2 > /tmp/b.txt 2> /tmp/b.err &
b=$!
# Where the bridge sends the guest's frames once it announced itself, before
# its next ping (it sleeps on for seconds): on the tap it is on now.
wait_for "cevm-guest: arp out request 10.0.1.2 .* gratuitous" /tmp/b.txt && sleep 0.5 && echo "cevm-scenario: after the announcement:" && fdb
wait_vm $b b
echo "cevm-scenario: restored exit=$?"
wait_vm $peer peer
echo "cevm-scenario: peer exit=$?"
sed 's/^/ck: /' /tmp/ck.json /tmp/ck.err
sed 's/^/verify: /' /tmp/verify.txt
sed 's/^/a: /' /tmp/a.txt /tmp/a.err
sed 's/^/b: /' /tmp/b.txt /tmp/b.err
sed 's/^/peer: /' /tmp/peer.txt /tmp/peer.err
"#,
        net = network("clrbr", &["clr0", "clr1", "clr2"]),
        peer = start_net_vm(
            "peer",
            "clr0",
            "52:54:00:c2:00:01",
            MEM,
            &format!("cevm.test=stream-recv cevm.ip=10.0.1.1/24 {stream}")
        ),
        a = start_net_vm(
            "a",
            "clr1",
            "52:54:00:c2:00:02",
            MEM,
            &format!("cevm.test=reach cevm.ip=10.0.1.2/24 cevm.peer=10.0.1.1 cevm.rounds={ROUNDS} {stream}")
        ),
    )
}

#[test]
fn a_linux_guest_restored_onto_another_tap_reaches_its_peer_at_once() {
    let _one = ONE_L1_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (status, out) = run_scenario("network-restore", &restore_scenario(), 0);
    show_key_lines(&out);
    assert_eq!(status, 0, "{out}");
    for line in [
        "cevm-scenario: checkpoint exit=0",
        "cevm-scenario: checkpointed VMM exit=0",
        "cevm-scenario: verify exit=0",
        "cevm-scenario: restored exit=0",
        "cevm-scenario: peer exit=0",
    ] {
        assert!(out.contains(line), "missing `{line}`: {out}");
    }
    assert!(said(&out, "a: ", "INFO cevm: VM stopped after its checkpoint to /tmp/ck"), "{out}");
    assert!(said(&out, "b: ", "INFO cevm: guest powered off"), "{out}");

    // Before the checkpoint: the peer answered every round.
    let rounds = |prefix: &str| -> Vec<(u32, String)> {
        lines_with(&out, prefix)
            .into_iter()
            .filter_map(|l| {
                let r = l.strip_prefix("cevm-guest: round ")?;
                let (n, rest) = r.split_once(' ')?;
                Some((n.parse().ok()?, rest.strip_prefix("ping ")?.to_string()))
            })
            .collect()
    };
    let before = rounds("a: ");
    let after = rounds("b: ");
    assert!(!before.is_empty() && before.iter().all(|r| r.1.starts_with("ok")), "{before:?}: {out}");
    // The restored guest went on with the next round (it was idle, not
    // mid-ping, when checkpointed), and its first ping after the restore, like
    // every later one, was answered: no ARP timeout, no retry.
    let last = before.last().unwrap().0;
    assert!(last < ROUNDS, "the checkpoint came after the last round: {out}");
    let first = after.first().unwrap_or_else(|| panic!("the restored guest pinged nothing: {out}"));
    assert_eq!(first.0, last + 1, "{out}");
    assert!(after.iter().all(|r| r.1.starts_with("ok")), "after the restore: {after:?}: {out}");
    assert_eq!(after.last().unwrap().0, ROUNDS, "{out}");
    eprintln!("the restored guest's first ping: round {} {}", first.0, first.1);
    // It announced itself on its new tap: the peer heard it, and the bridge
    // forwards to it there.
    assert!(announcements(&out, "b: ", "out", "10.0.1.2") >= 1, "no announcement from the restored guest: {out}");
    assert!(announcements(&out, "peer: ", "in", "10.0.1.2") >= 1, "the peer heard no announcement: {out}");
    assert!(out.contains("cevm-scenario: clrbr forwards 52:54:00:c2:00:02 to clr2"), "{out}");
    // A new TCP connection after the restore carried a whole stream.
    assert!(printed(&out, "b: ", &format!("cevm-guest: stream sent {BYTES}")), "{out}");
    assert!(printed(&out, "b: ", "cevm-guest: stream-send exit=0"), "{out}");
    assert!(printed(&out, "peer: ", &format!("cevm-guest: stream ok {BYTES}")), "{out}");
    assert!(printed(&out, "peer: ", "cevm-guest: stream-recv exit=0"), "{out}");
    assert!(!out.contains("stream reset") && !out.contains("stream mismatch"), "{out}");
}
