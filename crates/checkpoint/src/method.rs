//! [`Method`]: every way cevm checkpoints a running guest, or only moves it. The
//! API's requests ask for one, checkpoints and reports record it, the benchmarks
//! compare them: one enum for all of them.

use serde::{Deserialize, Serialize};

/// How a checkpoint is taken, or the guest only moved (the migrations, the
/// seed's `T_mg`, write nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Pause, write everything, resume: the guest waits for the whole write
    /// (the seed's traditional checkpoint, `T_cpt`).
    StopAndSave,
    /// A live migration to a new instance in the same VMM; nothing written.
    #[serde(alias = "migrate")]
    MigrateThread,
    /// A live migration to another VMM process (`cevm run --incoming`); nothing written.
    MigrateProcess,
    /// CEVM: live-migrate the guest to a new instance in the same VMM; the old
    /// instance, frozen at the switch, writes the checkpoint while the guest
    /// runs on. The guest waits only for the switch.
    CevmThread,
    /// CEVM with the new instance in another VMM process: the old VMM writes the
    /// checkpoint, then ends.
    CevmProcess,
    /// Copy-on-write: pause, save the vCPU and device state, `fork()` the VMM
    /// and resume at once; the child writes the frozen memory it sees while
    /// the guest runs on in the same instance.
    Cow,
}

impl Method {
    /// Every method, the baseline first.
    pub const ALL: [Method; 6] = [
        Method::StopAndSave,
        Method::MigrateThread,
        Method::MigrateProcess,
        Method::CevmThread,
        Method::CevmProcess,
        Method::Cow,
    ];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Method::StopAndSave => "stop-and-save",
            Method::MigrateThread => "migrate-thread",
            Method::MigrateProcess => "migrate-process",
            Method::CevmThread => "cevm-thread",
            Method::CevmProcess => "cevm-process",
            Method::Cow => "cow",
        }
    }

    /// The strategy's name, as the API's `strategy`, manifests and reports say it
    /// (`stop-and-save`, `cevm`, `cow`; `migrate` for the migrations).
    pub fn strategy(self) -> &'static str {
        match self {
            Method::StopAndSave => "stop-and-save",
            Method::MigrateThread | Method::MigrateProcess => "migrate",
            Method::CevmThread | Method::CevmProcess => "cevm",
            Method::Cow => "cow",
        }
    }

    /// The method of checkpoint strategy `name` (`stop-and-save`, `cevm` or
    /// `cow`), a CEVM checkpoint's new instance in another process when
    /// `process_based`.
    pub fn of_strategy(name: &str, process_based: bool) -> Result<Method, String> {
        match (name, process_based) {
            ("stop-and-save", _) => Ok(Method::StopAndSave),
            ("cevm", false) => Ok(Method::CevmThread),
            ("cevm", true) => Ok(Method::CevmProcess),
            ("cow", _) => Ok(Method::Cow),
            _ => Err(format!("unknown checkpoint strategy `{name}` (available: stop-and-save, cevm, cow)")),
        }
    }

    /// Whether it writes a checkpoint (the migrations only move the guest).
    pub fn writes_checkpoint(self) -> bool {
        !matches!(self, Method::MigrateThread | Method::MigrateProcess)
    }

    /// Whether the guest goes on in another VMM process.
    pub fn process_based(self) -> bool {
        matches!(self, Method::MigrateProcess | Method::CevmProcess)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names = || Method::ALL.map(Method::name).join(", ");
        match s {
            "migrate" => Ok(Method::MigrateThread),
            _ => {
                Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| format!("`{s}`: methods are {}", names()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Method;

    #[test]
    fn names_parse_back_and_serialize_the_same() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
        // Results written before the migrations had two methods.
        assert_eq!(serde_json::from_str::<Method>("\"migrate\"").unwrap(), Method::MigrateThread);
        assert!("cevm".parse::<Method>().unwrap_err().contains("cevm-thread"));
    }

    #[test]
    fn strategies_map_to_methods() {
        assert_eq!(Method::of_strategy("cevm", true), Ok(Method::CevmProcess));
        assert_eq!(Method::of_strategy("stop-and-save", false).map(Method::strategy), Ok("stop-and-save"));
        assert_eq!(Method::of_strategy("cow", false).map(Method::strategy), Ok("cow"));
        assert!(Method::of_strategy("fast", false).unwrap_err().contains("available: stop-and-save, cevm, cow"));
    }
}
