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

/// How much memory this host can give a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The most a guest may have.
    pub bytes: u64,
    /// RAM of the host (`MemTotal`).
    pub ram: u64,
    /// Swap of the host (`SwapTotal`).
    pub swap: u64,
    /// The kernel refuses to commit more than `bytes` (`vm.overcommit_memory = 2`).
    pub strict: bool,
}

impl MemoryLimit {
    /// Why a guest of `bytes` is too large for this host.
    pub fn refusal(&self, bytes: u64) -> Option<String> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let swap = if self.swap == 0 { "no swap".to_string() } else { format!("{:.1} GiB of swap", gib(self.swap)) };
        (bytes > self.bytes).then(|| {
            if self.strict {
                format!(
                    "this host has {:.1} GiB of RAM and {swap}, and its kernel commits at most {:.1} GiB \
                     (vm.overcommit_memory = 2): a larger guest could not get its memory",
                    gib(self.ram),
                    gib(self.bytes)
                )
            } else {
                format!(
                    "this host has {:.1} GiB of RAM and {swap}: a guest larger than that could not hold its memory",
                    gib(self.ram)
                )
            }
        })
    }
}

/// This host's [`MemoryLimit`], from /proc/meminfo and the kernel's overcommit
/// policy; `None` when they cannot be read (then no limit is checked).
pub fn memory_limit() -> Option<MemoryLimit> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let policy = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    memory_limit_of(&meminfo, &policy)
}

/// The limit of a host whose /proc/meminfo reads `meminfo` and whose
/// `vm.overcommit_memory` is `policy`: its RAM and swap, or under strict
/// accounting (policy 2) the kernel's `CommitLimit`. A guest's memory is
/// mapped without reserving it, so the kernel's heuristic would let a 1 TiB guest
/// start on a 23 GiB host and fail only once the guest touched it.
pub fn memory_limit_of(meminfo: &str, policy: &str) -> Option<MemoryLimit> {
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.split(':').next() == Some(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()?.checked_mul(1024)
    };
    let (ram, swap) = (kib("MemTotal")?, kib("SwapTotal").unwrap_or(0));
    let strict = policy.trim() == "2";
    let bytes = if strict { kib("CommitLimit")? } else { ram.saturating_add(swap) };
    Some(MemoryLimit { bytes, ram, swap, strict })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        2000 kB\nSwapTotal:      1048576 kB\n\
                           CommitLimit:    13336576 kB\n";

    #[test]
    fn the_limit_is_ram_and_swap_or_the_commit_limit_under_strict_accounting() {
        let l = memory_limit_of(MEMINFO, "0\n").unwrap();
        assert_eq!(
            l,
            MemoryLimit { bytes: (24576000 + 1048576) << 10, ram: 24576000 << 10, swap: 1 << 30, strict: false }
        );
        assert_eq!(l.refusal(l.bytes), None);
        let why = l.refusal(1 << 40).unwrap();
        assert!(why.contains("23.4 GiB of RAM and 1.0 GiB of swap"), "{why}");
        let s = memory_limit_of(MEMINFO, "2").unwrap();
        assert_eq!((s.bytes, s.strict), (13336576 << 10, true));
        assert!(s.refusal(16 << 30).unwrap().contains("commits at most 12.7 GiB"));
        assert_eq!(memory_limit_of("MemFree: 1 kB\n", "0"), None);
        let no_swap = memory_limit_of("MemTotal: 1048576 kB\n", "1").unwrap();
        assert!(no_swap.refusal(2 << 30).unwrap().contains("1.0 GiB of RAM and no swap"));
    }

    #[test]
    fn this_host_has_a_limit() {
        let l = memory_limit().expect("/proc/meminfo names MemTotal");
        assert!(l.ram > 0, "{l:?}");
    }
}
