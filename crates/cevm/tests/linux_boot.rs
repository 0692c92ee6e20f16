//! A real Linux guest (the pinned Debian cloud kernel, busybox initramfs) boots to
//! init under cevm on 1 and 2 vCPUs, prints its marker and powers off; cevm exits 0.
//! A guest that reboots ends the VM too, with a message saying so, and exit 0.

use cevm_testkit::linux::run_scenario;

#[test]
fn linux_boots_to_init_on_one_and_two_vcpus_and_powers_off() {
    let scenario = r#"
for n in 1 2; do
    $CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M --vcpus $n \
        --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.test=boot"
    echo "cevm-scenario: vcpus=$n exit=$?"
done
$CEVM run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --mem 256M \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off quiet cevm.test=reboot"
echo "cevm-scenario: reboot exit=$?"
"#;
    let (status, out) = run_scenario("boot", scenario, 1);
    assert_eq!(status, 0, "{out}");
    for n in [1, 2] {
        let run = out.split(&format!("cevm-scenario: vcpus={n} exit=")).next().unwrap();
        let run = run.rsplit("cevm-scenario:").next().unwrap();
        assert!(run.contains(&format!("cevm-guest: init vcpus={n} ")), "vcpus={n}: {out}");
        assert!(run.contains("cevm-guest: marker boot-ok"), "vcpus={n}: {out}");
        assert!(run.contains("cevm: guest powered off"), "vcpus={n}: {out}");
        assert!(out.contains(&format!("cevm-scenario: vcpus={n} exit=0")), "vcpus={n}: {out}");
    }
    let reboot = out.split("cevm-scenario: vcpus=2 exit=").nth(1).unwrap_or_default();
    assert!(reboot.contains("cevm-guest: rebooting"), "{out}");
    assert!(reboot.contains("cevm: guest asked for a reboot; cevm ends the VM"), "{out}");
    assert!(reboot.contains("cevm-scenario: reboot exit=0"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}
