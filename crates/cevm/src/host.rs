//! Facts about the host cevm runs on.

/// Whether this CPU offers hardware virtualization (VMX or SVM in
/// /proc/cpuinfo): then /dev/kvm is hardware KVM and runs Linux guests directly;
/// without it (PVM, as on the project's machines) Linux guests need the nested
/// harness.
pub fn hardware_kvm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))))
        .unwrap_or(false)
}
