//! The results of one `cevm-bench all` run, as data: what `all` measures and
//! saves as JSON, and what `report` renders. No measuring and no rendering here.

use serde::{Deserialize, Serialize};

use crate::host::Limits;
use crate::{compare, turnaround};

/// Where the Linux-guest comparison runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LinuxPath {
    /// In the nested harness (QEMU TCG, emulated SVM), for a /dev/kvm that cannot run Linux.
    Nested,
    /// On this host's /dev/kvm (hardware KVM).
    Direct,
    /// Not at all.
    Off,
}

/// The machine the run was on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub host: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    /// What /dev/kvm is: hardware (VMX/SVM) or PVM.
    pub kvm: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Versions {
    pub cevm: String,
    pub git: String,
    pub rustc: String,
    pub qemu: Option<String>,
}

/// The Linux-guest comparison and where it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinuxPart {
    pub path: LinuxPath,
    /// How the environment was set up (for nested: L1's emulator and settings).
    pub environment: String,
    pub guest_kernel: String,
    pub results: compare::Results,
    /// Guests that could not be measured, and why.
    #[serde(default)]
    pub failed: Vec<String>,
}

/// The turnaround benchmark's setting and runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TurnaroundPart {
    pub mem_mib: u64,
    pub data_mib: u64,
    pub ws_mib: u64,
    pub rate: u64,
    pub seconds: u64,
    pub runs: Vec<turnaround::Run>,
}

/// Everything one `cevm bench all` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllResults {
    pub schema: u32,
    /// UTC, when the run started.
    pub started: String,
    pub duration_s: f64,
    pub quick: bool,
    pub machine: Machine,
    pub versions: Versions,
    /// How threads were placed on CPUs.
    pub placement: String,
    pub host_limits: Limits,
    pub linux: Option<LinuxPart>,
    pub turnaround: Option<TurnaroundPart>,
    /// Parts of the plan that failed, and why: a late failure costs its own
    /// part, never what the run had measured before it.
    #[serde(default)]
    pub not_measured: Vec<String>,
    /// Parts the run had not reached yet. The results file and the report are
    /// written again after every part, so a run stopped midway (killed, or its
    /// session ended) leaves what it had measured, saying what it had not.
    #[serde(default)]
    pub not_reached: Vec<String>,
}
