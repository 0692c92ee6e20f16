//! Running Linux-guest scenarios: directly where /dev/kvm is hardware KVM, in the
//! nested harness (`scripts/nested/run.sh`: QEMU TCG L1 with kvm_amd) on the PVM
//! machines of this project, where a Linux guest cannot run directly.
//!
//! A scenario is a shell script using `$CEVM`, `$GUEST_KERNEL` and `$GUEST_INITRD`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::bin;

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether this CPU offers hardware virtualization (then KVM here is not PVM).
fn hardware_kvm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))))
        .unwrap_or(false)
}

fn script_output(script: &str) -> String {
    let o = Command::new(top().join(script)).output().unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(o.status.success(), "{script} failed: {}", String::from_utf8_lossy(&o.stderr));
    top().join(String::from_utf8_lossy(&o.stdout).trim()).to_string_lossy().into_owned()
}

/// Runs `scenario` and returns (its exit status, everything it printed).
pub fn run_scenario(name: &str, scenario: &str, npt: u8) -> (i32, String) {
    let dir = super::workdir(&format!("linux-{name}"));
    let file = dir.join("scenario.sh");
    std::fs::write(&file, scenario).unwrap();
    let out = if hardware_kvm() {
        eprintln!("linux scenario {name}: hardware KVM here, running cevm directly");
        let kernel = format!("{}/vmlinuz", script_output("scripts/guest-kernel.sh"));
        let initrd = script_output("scripts/nested/guest-initrd.sh");
        Command::new("sh")
            .arg(&file)
            .env("CEVM", bin())
            .env("GUEST_KERNEL", kernel)
            .env("GUEST_INITRD", initrd)
            .current_dir(&dir)
            .output()
            .unwrap()
    } else {
        eprintln!("linux scenario {name}: /dev/kvm is PVM here, running it in the nested harness (QEMU TCG L1)");
        Command::new(top().join("scripts/nested/run.sh"))
            .arg(&file)
            .arg("--cevm")
            .arg(bin())
            .arg("--npt")
            .arg(npt.to_string())
            .output()
            .unwrap()
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), text)
}
