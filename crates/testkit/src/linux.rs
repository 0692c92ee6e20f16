//! Running Linux-guest scenarios: directly where /dev/kvm is hardware KVM, in the
//! nested harness (`scripts/nested/run.sh`: QEMU TCG L1 with kvm_amd) on the PVM
//! machines of this project, where a Linux guest cannot run directly.
//!
//! A scenario is a shell script using `$CEVM`, `$GUEST_KERNEL` and `$GUEST_INITRD`;
//! its input files are in `$DATA`, and what it leaves in `$OUT` comes back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use cevm::host::hardware_kvm;

use crate::bin;

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script_output(script: &str) -> String {
    let o = Command::new(top().join(script)).output().unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(o.status.success(), "{script} failed: {}", String::from_utf8_lossy(&o.stderr));
    top().join(String::from_utf8_lossy(&o.stdout).trim()).to_string_lossy().into_owned()
}

/// Runs `scenario` and returns (its exit status, everything it printed).
pub fn run_scenario(name: &str, scenario: &str, npt: u8) -> (i32, String) {
    let (status, text, _) = run_scenario_with_files(name, scenario, npt, &[]);
    (status, text)
}

/// Like [`run_scenario`], with `inputs` in `$DATA`; also returns the directory
/// holding what the scenario left in `$OUT` (the caller removes it).
pub fn run_scenario_with_files(name: &str, scenario: &str, npt: u8, inputs: &[PathBuf]) -> (i32, String, PathBuf) {
    let dir = crate::workdir(&format!("linux-{name}"));
    let file = dir.join("scenario.sh");
    let outdir = dir.join("out");
    let datadir = dir.join("data");
    std::fs::create_dir_all(&outdir).unwrap();
    std::fs::create_dir_all(&datadir).unwrap();
    std::fs::write(&file, scenario).unwrap();
    let out = if hardware_kvm() {
        for f in inputs {
            std::fs::copy(f, datadir.join(f.file_name().unwrap())).unwrap();
        }
        eprintln!("linux scenario {name}: hardware KVM here, running cevm directly");
        let kernel = format!("{}/vmlinuz", script_output("scripts/guest-kernel.sh"));
        let initrd = script_output("scripts/nested/guest-initrd.sh");
        Command::new("sh")
            .arg(&file)
            .env("CEVM", bin())
            .env("GUEST_KERNEL", kernel)
            .env("GUEST_INITRD", initrd)
            .env("DATA", &datadir)
            .env("OUT", &outdir)
            .current_dir(&dir)
            .output()
            .unwrap()
    } else {
        eprintln!("linux scenario {name}: /dev/kvm is PVM here, running it in the nested harness (QEMU TCG L1)");
        // The L1 (QEMU TCG emulating SVM, its KVM running ours) sometimes locks
        // up: both of its CPUs stuck in KVM for minutes (soft lockups; here in
        // one nested scenario out of a few), or a silent stall (a SIGKILLed
        // cevm once went unreaped until the timeout; only L1's kernel can hold
        // that up). Seen with the watchdog's report (l1-init): tasks of L1
        // blocked for minutes on work another L1 CPU never did (khugepaged;
        // a TLB flush in munmap) while QEMU's threads slept, as if L1 had lost
        // an interrupt. The scenario then never reports its end:
        // softlockup_panic ends such an L1 at once (run.sh: 125), a silent
        // stall runs into the timeout (124; 600 s: every scenario here ends in
        // under 160 s, but `wait_vm` must be able to give up on a guest after
        // its 300 s and show its console first). That fails the harness, not
        // cevm, so such a run is retried, loudly, up to three attempts in all.
        // A scenario that ends, with any status, is never retried (a guest
        // that stops making progress is one: `wait_vm` gives up on it); one
        // that hangs in cevm fails every attempt.
        let run = || {
            Command::new(top().join("scripts/nested/run.sh"))
                .arg(&file)
                .arg("--cevm")
                .arg(bin())
                .arg("--npt")
                .arg(npt.to_string())
                .args(["--timeout", "600", "--append", "softlockup_panic=1"])
                .args(inputs.iter().flat_map(|f| [Path::new("--in"), f.as_path()]))
                .arg("--out")
                .arg(&outdir)
                .output()
                .unwrap()
        };
        let mut attempt = 1;
        loop {
            let out = run();
            if attempt == 3 || !matches!(out.status.code(), Some(124 | 125)) {
                break out;
            }
            let printed = String::from_utf8_lossy(&out.stdout);
            // The last lines before L1's report of where the scenario waited
            // (l1-init's watchdog), and that report whole: from the transfer
            // disk, or else as far as the console showed it.
            let at = printed.find("cevm-nested: the scenario still runs").unwrap_or(printed.len());
            let tail: Vec<&str> = printed[..at].lines().rev().take(30).collect();
            let mut tail: Vec<&str> = tail.into_iter().rev().collect();
            let report = std::fs::read_to_string(outdir.join("l1-watchdog.txt")).ok();
            tail.extend(report.as_deref().unwrap_or(&printed[at..]).lines());
            // To the process's own stderr, past the test harness (which shows
            // a passing test's output only on request): a retry costs minutes
            // and must show in every CI log.
            let _ = writeln!(
                std::io::stderr(),
                "NESTED L1 FAILED in scenario {name}, attempt {attempt} of 3 ({}); retrying it. Its last lines:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.join("\n")
            );
            let _ = std::fs::remove_dir_all(&outdir);
            std::fs::create_dir_all(&outdir).unwrap();
            attempt += 1;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&datadir);
    (out.status.code().unwrap_or(-1), text, dir)
}

/// Runs `cmd` with `sh -c` in `dir`; panics with its output if it fails.
pub fn sh(cmd: &str, dir: &Path) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
    assert!(
        o.status.success(),
        "`{cmd}`: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Shell functions for scenarios: `wait_for TEXT FILE` (up to 300 s; status 0
/// once TEXT is in FILE, 1 if it never came) and `wait_vm PID NAME` (waits up
/// to 300 s for a VMM whose console is /tmp/NAME.txt and returns its status;
/// one still running then has its console and messages printed and is killed,
/// status 124, so that a hung guest shows where it stopped instead of running
/// into the harness's timeout).
pub const SCENARIO_FUNCTIONS: &str = r#"wait_for() { n=0; while ! grep -q "$1" "$2"; do sleep 0.1; n=$((n+1)); [ $n -gt 3000 ] && return 1; done; return 0; }
wait_vm() {
    n=0
    while kill -0 "$1" 2>/dev/null; do
        sleep 0.1; n=$((n+1))
        if [ $n -gt 3000 ]; then
            echo "cevm-scenario: $2 still running after 300 s; its console and messages so far:"
            sed "s/^/$2 (hung): /" /tmp/$2.txt /tmp/$2.err
            kill -9 "$1"; wait "$1"; return 124
        fi
    done
    wait "$1"
}
"#;

/// The start of a scenario that gets base.qcow2 as its input: defines the
/// [`SCENARIO_FUNCTIONS`], and starts a Linux guest (2 vCPUs,
/// 256 MiB, API at /tmp/api.sock) on an overlay /tmp/run.qcow2 over the base,
/// its command line ending in `guest_args`, in the background: console in
/// /tmp/NAME.txt, cevm's own messages in /tmp/NAME.err (apart, so that neither
/// cuts into the other's lines), its pid in `$NAME`.
pub fn start_linux_vm(name: &str, guest_args: &str) -> String {
    start_linux_vm_with(name, guest_args, "")
}

/// [`start_linux_vm`], with more arguments `vmm_args` for `cevm run`.
pub fn start_linux_vm_with(name: &str, guest_args: &str, vmm_args: &str) -> String {
    format!(
        r#"cd /tmp
cp "$DATA/base.qcow2" /tmp/base.qcow2
{SCENARIO_FUNCTIONS}$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --vcpus 2 --api-sock /tmp/api.sock {vmm_args} \
    --disk /tmp/base.qcow2 --overlay /tmp/run.qcow2 \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet {guest_args}" \
    > /tmp/{name}.txt 2> /tmp/{name}.err &
{name}=$!
"#
    )
}

/// The start of a network scenario: [`SCENARIO_FUNCTIONS`], then a bridge
/// `bridge` with the taps `taps` on it, all up and IPv6 off (a quiet network:
/// only what the guests send), removed when the scenario ends. With busybox's
/// `tunctl` and `brctl` (in the nested harness's L1), else iproute2's `ip
/// tuntap` and `ip link set master` (a hardware KVM host). A tap nobody has
/// open has no carrier; the one a VMM opens is forwarded to at once (the bridge
/// runs no STP, so there is no learning delay). Defines `fdb`, which prints
/// the tap the bridge forwards each MAC it learned to, a line each:
/// "cevm-scenario: BRIDGE forwards MAC to TAP" (read from sysfs: busybox's
/// brctl has no showmacs).
pub fn network(bridge: &str, taps: &[&str]) -> String {
    let taps = taps.join(" ");
    format!(
        r#"cd /tmp
{SCENARIO_FUNCTIONS}quiet() {{ {{ echo 1 > /proc/sys/net/ipv6/conf/$1/disable_ipv6; }} 2> /dev/null; true; }}
ip link add {bridge} type bridge && quiet {bridge} && ip link set {bridge} up || {{ echo "cevm-scenario: cannot make bridge {bridge}"; exit 1; }}
for t in {taps}; do
    if command -v tunctl > /dev/null; then tunctl -t $t > /dev/null; else ip tuntap add dev $t mode tap; fi &&
        quiet $t &&
        if command -v brctl > /dev/null; then brctl addif {bridge} $t; else ip link set $t master {bridge}; fi &&
        ip link set $t up || {{ echo "cevm-scenario: cannot make tap $t on {bridge}"; exit 1; }}
done
trap 'for t in {taps}; do ip link del $t; done; ip link del {bridge}' EXIT
fdb() {{
    for p in /sys/class/net/{bridge}/brif/*; do echo "$(($(cat $p/port_no))) ${{p##*/}}"; done > /tmp/{bridge}.ports
    # struct __fdb_entry: the MAC, the port number, whether the MAC is the bridge's own, ...
    od -An -tx1 -v -w16 /sys/class/net/{bridge}/brforward | while read a b c d e f port local rest; do
        [ "$local" = 00 ] && echo "cevm-scenario: {bridge} forwards $a:$b:$c:$d:$e:$f to $(awk -v n=$((0x$port)) '$1 == n {{print $2}}' /tmp/{bridge}.ports)"
    done
    true
}}
echo "cevm-scenario: bridge {bridge} with taps {taps}"
"#
    )
}

/// Starts a Linux guest without a disk on `tap` with address `mac`, in the
/// background (1 vCPU, `mem` of memory): API at /tmp/NAME.sock, console in
/// /tmp/NAME.txt, cevm's own messages in /tmp/NAME.err, its pid in `$NAME`;
/// its command line ends in `guest_args`.
pub fn start_net_vm(name: &str, tap: &str, mac: &str, mem: &str, guest_args: &str) -> String {
    format!(
        r#"$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem {mem} --vcpus 1 --api-sock /tmp/{name}.sock \
    --net tap={tap},mac={mac} --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet {guest_args}" \
    > /tmp/{name}.txt 2> /tmp/{name}.err &
{name}=$!
"#
    )
}

/// A 64 MiB ext4 file system as a qcow2 base image in `dir`, made with the host's tools.
pub fn base_image(dir: &Path) -> PathBuf {
    sh("truncate -s 64M base.raw && mkfs.ext4 -q -F base.raw && qemu-img convert -f raw -O qcow2 base.raw base.qcow2 && rm base.raw", dir);
    dir.join("base.qcow2")
}

/// The result the guest's `cevm.test=compute` hash chain reaches after `steps`
/// steps, computed here (busybox md5sum = coreutils md5sum).
pub fn hash_chain_result(steps: u32) -> String {
    let script = format!(
        "h=start; i=1; while [ $i -le {steps} ]; do h=$(echo \"$h $i\" | md5sum | cut -c1-16); i=$((i + 1)); done; echo $h"
    );
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The result the guest's `cevm.test=files` reaches after `steps` steps: the
/// same files made here with the same commands, hashed the same way.
pub fn files_result(steps: u32) -> String {
    let dir = crate::workdir("files-result");
    let script = format!(
        r#"h=start; i=1; mkdir files
while [ $i -le {steps} ]; do
    h=$(echo "$h $i" | md5sum | cut -c1-16)
    yes "$h" | head -c 131072 > files/f$i
    echo "$i $h" | dd of=files/state conv=notrunc 2>/dev/null
    echo "step $i h=$h" >> log.txt
    i=$((i + 1))
done
(cat log.txt files/state; j=1; while [ $j -le {steps} ]; do cat files/f$j; j=$((j + 1)); done) | md5sum | cut -c1-16"#
    );
    let r = sh(&script, &dir).trim().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// (step, uptime) of every compute "step" line of `out` with the given prefix.
pub fn compute_steps(out: &str, prefix: &str) -> Vec<(u32, f64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix)?.strip_prefix("cevm-guest: step "))
        .filter_map(|l| {
            let step = l.split('/').next()?.parse().ok()?;
            let up = l.split("up=").nth(1)?.trim().parse().ok()?;
            Some((step, up))
        })
        .collect()
}

/// The step numbers the compute test logged in /log.txt of the ext4 image
/// `raw` (relative to `dir`), read with debugfs.
pub fn logged_steps(raw: &str, dir: &Path) -> Vec<u32> {
    let log = sh(&format!("debugfs -R 'cat /log.txt' {raw} 2>/dev/null"), dir);
    log.lines().filter_map(|l| l.strip_prefix("step ")?.split(' ').next()?.parse().ok()).collect()
}

/// The qcow2 overlay `disk` a scenario brought back, checked from here: its
/// backing pointed at this host's copy of `base` (the guest side recorded
/// its own path), `qemu-img check` and `e2fsck -n -f` of it as raw clean
/// (panics otherwise); returns the steps the compute test logged on it.
pub fn checked_disk_steps(base: &Path, disk: &Path, dir: &Path) -> Vec<u32> {
    let (b, d) = (base.display(), disk.display());
    let raw = format!("{}.raw", disk.file_stem().unwrap().to_string_lossy());
    sh(&format!("qemu-img rebase -u -b {b} -F qcow2 {d} && qemu-img check -q {d}"), dir);
    sh(&format!("qemu-img convert -O raw {d} {raw} && e2fsck -n -f {raw}"), dir);
    logged_steps(&raw, dir)
}

/// Whether a line of `out` begins with `prefix` (a scenario's `src: ` and so
/// on) and holds `words`: a cevm diagnostic such as `INFO cevm: guest powered
/// off`, after its timestamp.
pub fn said(out: &str, prefix: &str, words: &str) -> bool {
    out.lines().any(|l| l.strip_prefix(prefix).is_some_and(|l| l.contains(words)))
}
