//! virtio-blk on qcow2: a Linux guest writes files to an overlay over a qcow2 base,
//! syncs and powers off; qemu-img check is clean, the files are there when the
//! guest boots again and when read from outside, and the file system checks clean.

use cevm_testkit::linux::{base_image, run_scenario_with_files, sh};

#[test]
fn guest_files_on_a_qcow2_overlay_survive_a_reboot_and_read_from_outside() {
    let dir = cevm_testkit::workdir("disk-host");
    let base = base_image(&dir);
    let scenario = r#"
cp "$DATA/base.qcow2" /tmp/base.qcow2
cmd="console=ttyS0 reboot=acpi panic=-1 pci=off quiet"
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M \
    --disk /tmp/base.qcow2 --overlay "$OUT/run.qcow2" --cmdline "$cmd cevm.test=disk-write"
echo "cevm-scenario: write exit=$?"
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --disk "$OUT/run.qcow2" \
    --cmdline "$cmd cevm.test=disk-read"
echo "cevm-scenario: read exit=$?"
# A base on a read-only file system, opened for writing: refused clearly.
mkdir -p /tmp/ro && mount -t tmpfs tmpfs /tmp/ro && cp /tmp/base.qcow2 /tmp/ro/ && mount -o remount,ro /tmp/ro
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --disk /tmp/ro/base.qcow2 --cmdline "$cmd"
echo "cevm-scenario: read-only base exit=$?"
"#;
    let (status, out, work) = run_scenario_with_files("disk", scenario, 1, std::slice::from_ref(&base));
    assert_eq!(status, 0, "{out}");
    let expected_md5 = sh("seq 1 50000 | md5sum | cut -c1-32", &dir).trim().to_string();
    assert!(out.contains(&format!("cevm-guest: disk-write md5={expected_md5}")), "{out}");
    assert!(out.contains("cevm-scenario: write exit=0") && out.contains("cevm-scenario: read exit=0"), "{out}");
    // The second boot finds the files.
    assert!(out.contains(&format!("cevm-guest: disk-read md5={expected_md5} hello=written by a cevm guest")), "{out}");
    // A read-only base opened for writing: a clear error, no panic.
    let refusal = out.lines().find(|l| l.contains("disk image /tmp/ro/base.qcow2")).unwrap_or_default();
    assert!(refusal.contains("ERROR cevm: ") && refusal.contains("Read-only file system"), "{out}");
    assert!(out.contains("cevm-scenario: read-only base exit=1"), "{out}");
    assert!(!out.contains("panicked"), "{out}");

    // From outside: point the overlay at this host's copy of the base (the guest
    // side recorded its own absolute path), then qemu-img and e2fsprogs.
    let overlay = work.join("out/run.qcow2");
    assert!(overlay.exists(), "the overlay did not come back: {out}");
    let b = base.display();
    let o = overlay.display();
    sh(&format!("qemu-img rebase -u -b {b} -F qcow2 {o}"), &dir);
    let check = sh(&format!("qemu-img check {o}"), &dir);
    assert!(check.contains("No errors were found"), "{check}");
    let info = sh(&format!("qemu-img info --backing-chain {o}"), &dir);
    assert!(info.contains(&format!("backing file: {b}")), "{info}");
    sh(&format!("qemu-img convert -O raw {o} disk.raw && e2fsck -n -f disk.raw"), &dir);
    let hello = sh("debugfs -R 'cat /hello.txt' disk.raw 2>/dev/null", &dir);
    assert_eq!(hello.trim(), "written by a cevm guest");
    let numbers = sh("debugfs -R 'cat /numbers.txt' disk.raw 2>/dev/null | md5sum | cut -c1-32", &dir);
    assert_eq!(numbers.trim(), expected_md5);
    // The base is untouched by the guest's writes.
    let base_check =
        sh(&format!("qemu-img convert -O raw {b} base.raw && debugfs -R 'ls /' base.raw 2>/dev/null"), &dir);
    assert!(!base_check.contains("hello.txt"), "{base_check}");
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&dir);
}
