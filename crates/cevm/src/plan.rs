//! Requests turned into plans, once, at the edge: a [`CheckpointPlan`] or a
//! [`MigrationPlan`] cannot hold an invalid combination (a stop-and-save with a
//! destination, a CEVM checkpoint that stops the VM, a remote destination with
//! CPUs for its vCPUs), so the controller never checks them again.

use std::path::PathBuf;

use checkpoint::Method;
use vmm::placement::CpuList;

use crate::api::{CheckpointRequest, MigrateRequest};

use migrate::Destination;

/// Parses `local`, `unix:PATH` or `tcp:HOST:PORT` into where the new instance
/// runs; `vcpu_cpus` only for `local` (a process-based one places its own).
fn parse_destination(to: &str, vcpu_cpus: Option<CpuList>) -> Result<Destination, PlanError> {
    if to == "local" {
        return Ok(Destination::Local { vcpu_cpus });
    }
    let endpoint = to.parse().map_err(|e| PlanError::Target(format!("{e} (or `local`)")))?;
    if vcpu_cpus.is_some() {
        return Err(PlanError::RemoteVcpuCpus);
    }
    Ok(Destination::Remote(endpoint))
}

/// A checkpoint to take.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckpointPlan {
    /// Pause, write, resume (or stay stopped: the VMM then ends); only the
    /// pages written since the previous checkpoint when `incremental`.
    StopAndSave { out: PathBuf, stop: bool, incremental: bool },
    /// CEVM: live-migrate the guest to `to`; the old instance writes the checkpoint.
    Cevm(CevmPlan),
    /// Copy-on-write: pause, fork, resume; the fork writes the frozen memory
    /// (on `writer_cpus`, if given).
    Cow { out: PathBuf, writer_cpus: Option<CpuList>, incremental: bool },
}

/// A CEVM checkpoint to take.
#[derive(Clone, Debug, PartialEq)]
pub struct CevmPlan {
    /// The directory the checkpoint is committed to (absolute).
    pub out: PathBuf,
    /// Where the guest goes on.
    pub to: Destination,
    /// CPUs for the thread that runs the live migration.
    pub migration_cpus: Option<CpuList>,
    /// CPUs for the thread that writes the checkpoint from the old instance
    /// (and the disk hand-over it starts).
    pub writer_cpus: Option<CpuList>,
    /// A group checkpoint's member: the switch waits for the group's cut
    /// (`PUT /v1/checkpoint/cut`, then `/go`).
    pub group_cut: bool,
}

impl CheckpointPlan {
    /// The directory the checkpoint is committed to.
    pub fn out(&self) -> &std::path::Path {
        match self {
            CheckpointPlan::StopAndSave { out, .. } => out,
            CheckpointPlan::Cevm(p) => &p.out,
            CheckpointPlan::Cow { out, .. } => out,
        }
    }

    /// The plan of a periodic checkpoint into `out`: `method` with nothing
    /// placed, `incremental` where the method can be.
    pub fn periodic(method: Method, out: PathBuf, incremental: bool) -> CheckpointPlan {
        match method {
            Method::CevmThread | Method::CevmProcess => CheckpointPlan::Cevm(CevmPlan {
                out,
                to: Destination::Local { vcpu_cpus: None },
                migration_cpus: None,
                writer_cpus: None,
                group_cut: false,
            }),
            Method::Cow => CheckpointPlan::Cow { out, writer_cpus: None, incremental },
            _ => CheckpointPlan::StopAndSave { out, stop: false, incremental },
        }
    }
}

/// A live migration to run.
#[derive(Clone, Debug)]
pub struct MigrationPlan {
    pub to: Destination,
    pub params: migrate::Params,
    /// CPUs for the thread that runs the migration.
    pub migration_cpus: Option<CpuList>,
}

/// Why a request cannot be served as asked.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("`out` must be an absolute path, not {0}")]
    RelativeOut(PathBuf),
    #[error("{0}")]
    Strategy(String),
    #[error("--to {0}")]
    Target(String),
    #[error("dest_vcpu_cpus is for a new instance in this VMM; a process-based one places its own vCPUs (cevm run --incoming --vcpu-cpus)")]
    RemoteVcpuCpus,
    #[error("to, migration_cpus, dest_vcpu_cpus, writer_cpus and group_cut are for the cevm strategy")]
    CevmOnly,
    #[error("to, migration_cpus, dest_vcpu_cpus and group_cut are for the cevm strategy (cow takes writer_cpus)")]
    CowWithCevm,
    #[error("--stop ends the VM: use the stop-and-save strategy for that")]
    CevmStop,
    #[error("incremental checkpoints are taken by the stop-and-save and cow strategies")]
    CevmIncremental,
}

impl TryFrom<CheckpointRequest> for CheckpointPlan {
    type Error = PlanError;
    fn try_from(r: CheckpointRequest) -> Result<Self, PlanError> {
        if !r.out.is_absolute() {
            return Err(PlanError::RelativeOut(r.out));
        }
        match Method::of_strategy(&r.strategy, false).map_err(PlanError::Strategy)? {
            Method::StopAndSave => {
                let cevm_only = r.to.is_some()
                    || r.migration_cpus.is_some()
                    || r.dest_vcpu_cpus.is_some()
                    || r.writer_cpus.is_some()
                    || r.group_cut;
                if cevm_only {
                    return Err(PlanError::CevmOnly);
                }
                Ok(CheckpointPlan::StopAndSave { out: r.out, stop: r.stop, incremental: r.incremental })
            }
            Method::Cow => {
                if r.stop {
                    return Err(PlanError::CevmStop);
                }
                if r.to.is_some() || r.migration_cpus.is_some() || r.dest_vcpu_cpus.is_some() || r.group_cut {
                    return Err(PlanError::CowWithCevm);
                }
                Ok(CheckpointPlan::Cow { out: r.out, writer_cpus: r.writer_cpus, incremental: r.incremental })
            }
            _ => {
                if r.stop {
                    return Err(PlanError::CevmStop);
                }
                if r.incremental {
                    return Err(PlanError::CevmIncremental);
                }
                let to = parse_destination(r.to.as_deref().unwrap_or("local"), r.dest_vcpu_cpus)?;
                Ok(CheckpointPlan::Cevm(CevmPlan {
                    out: r.out,
                    to,
                    migration_cpus: r.migration_cpus,
                    writer_cpus: r.writer_cpus,
                    group_cut: r.group_cut,
                }))
            }
        }
    }
}

impl TryFrom<MigrateRequest> for MigrationPlan {
    type Error = PlanError;
    fn try_from(r: MigrateRequest) -> Result<Self, PlanError> {
        Ok(MigrationPlan {
            to: parse_destination(&r.to, r.dest_vcpu_cpus)?,
            params: r.params,
            migration_cpus: r.migration_cpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(strategy: &str) -> CheckpointRequest {
        CheckpointRequest::new("/ck".into(), strategy)
    }

    #[test]
    fn every_invalid_combination_is_refused_by_name() {
        let cases = [
            (CheckpointRequest { out: "rel".into(), ..req("stop-and-save") }, PlanError::RelativeOut("rel".into())),
            (CheckpointRequest { to: Some("local".into()), ..req("stop-and-save") }, PlanError::CevmOnly),
            (CheckpointRequest { writer_cpus: Some(CpuList(vec![1])), ..req("stop-and-save") }, PlanError::CevmOnly),
            (CheckpointRequest { stop: true, ..req("cevm") }, PlanError::CevmStop),
            (CheckpointRequest { stop: true, ..req("cow") }, PlanError::CevmStop),
            (CheckpointRequest { incremental: true, ..req("cevm") }, PlanError::CevmIncremental),
            (CheckpointRequest { to: Some("local".into()), ..req("cow") }, PlanError::CowWithCevm),
            (
                CheckpointRequest { to: Some("unix:/x".into()), dest_vcpu_cpus: Some(CpuList(vec![0])), ..req("cevm") },
                PlanError::RemoteVcpuCpus,
            ),
        ];
        for (r, e) in cases {
            assert_eq!(CheckpointPlan::try_from(r), Err(e));
        }
        let e = CheckpointPlan::try_from(CheckpointRequest { to: Some("ftp:x".into()), ..req("cevm") }).unwrap_err();
        assert!(e.to_string().starts_with("--to ") && e.to_string().ends_with("(or `local`)"), "{e}");
        let e = CheckpointPlan::try_from(req("fast")).unwrap_err();
        assert!(e.to_string().contains("unknown checkpoint strategy `fast`"), "{e}");
    }

    #[test]
    fn valid_requests_become_their_plans() {
        assert_eq!(
            CheckpointPlan::try_from(CheckpointRequest { stop: true, ..req("stop-and-save") }),
            Ok(CheckpointPlan::StopAndSave { out: "/ck".into(), stop: true, incremental: false })
        );
        let p = CheckpointPlan::try_from(CheckpointRequest { to: Some("unix:/d.sock".into()), ..req("cevm") }).unwrap();
        let remote = Destination::Remote("unix:/d.sock".parse().unwrap());
        assert!(
            matches!(&p, CheckpointPlan::Cevm(CevmPlan { out, to, .. }) if out.as_path() == std::path::Path::new("/ck") && *to == remote),
            "{p:?}"
        );
        assert_eq!(
            CheckpointPlan::try_from(CheckpointRequest { writer_cpus: Some(CpuList(vec![1])), ..req("cow") }),
            Ok(CheckpointPlan::Cow { out: "/ck".into(), writer_cpus: Some(CpuList(vec![1])), incremental: false })
        );
        let p = CheckpointPlan::try_from(CheckpointRequest { dest_vcpu_cpus: Some(CpuList(vec![1])), ..req("cevm") });
        assert!(matches!(p, Ok(CheckpointPlan::Cevm(CevmPlan { to: Destination::Local { vcpu_cpus: Some(_) }, .. }))));
    }
}
