//! Where a live migration goes, and the one call that runs it there:
//! [`migrate_to`] places the migration thread, migrates to a new instance in
//! this process ([`Destination::Local`], thread-based) or to a `cevm run
//! --incoming` ([`Destination::Remote`], process-based), and hands back what a
//! CEVM checkpoint needs next (the old side's end of the disk link).

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use vmm::placement::CpuList;
use vmm::{Instance, VmEvent};

use crate::{Endpoint, Error, Failure, GuestAt, Params, Phase, Progress, Report, Transport};

/// Where a live migration's new instance runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    /// In this VMM process (thread-based), its vCPU threads on these CPUs
    /// (none: anywhere).
    Local { vcpu_cpus: Option<CpuList> },
    /// In the `cevm run --incoming` waiting at this endpoint (process-based); it
    /// places its own vCPUs.
    Remote(Endpoint),
}

impl Destination {
    /// `local`, or the endpoint.
    pub fn name(&self) -> String {
        match self {
            Destination::Local { .. } => "local".into(),
            Destination::Remote(e) => e.to_string(),
        }
    }
}

/// What a new instance in this process is given: its console and where its
/// events go.
pub struct NewInstance {
    pub console: Box<dyn Write + Send>,
    pub events: Sender<VmEvent>,
}

/// A finished migration.
pub struct Moved {
    pub report: Report,
    /// Thread-based: the new instance, running the guest here.
    pub new: Option<Instance>,
    /// A CEVM checkpoint's migration of a guest with a writable disk: the old
    /// side's end of the disk link (see [`crate::disk_link`]).
    pub disk_link: Option<Box<dyn Transport>>,
}

/// Live-migrates `inst` to `to` with `params`, publishing progress in
/// `progress`; the thread running it is placed on `migration_cpus` for the
/// migration and put back afterwards. A new instance here gets `new`.
/// Failures as [`crate::migrate_out`]'s: the phase, why, where the guest is.
pub fn migrate_to(
    inst: &mut Instance,
    to: &Destination,
    params: &Params,
    progress: &Mutex<Progress>,
    migration_cpus: Option<&CpuList>,
    new: NewInstance,
) -> Result<Moved, Failure> {
    let me = vmm::placement::this_thread();
    let before = vmm::placement::affinity(me);
    if let Some(c) = migration_cpus {
        vmm::placement::set_affinity(me, &c.0).map_err(|e| connect_failure(e.into()))?;
    }
    let r = match to {
        Destination::Local { vcpu_cpus } => {
            let cpus = vcpu_cpus.clone().unwrap_or_default().0;
            crate::migrate_local(inst, params, progress, new.console, new.events, &cpus).map(|done| {
                if let Some(e) = &done.disk_link_error {
                    tracing::warn!("disk hand-over, new instance: {e}");
                }
                Moved { report: done.report, new: Some(done.instance), disk_link: done.disk_link }
            })
        }
        Destination::Remote(endpoint) => migrate_remote(inst, endpoint, params, progress),
    };
    // Whatever happened, the thread goes back to its CPUs.
    let _ = vmm::placement::set_affinity(me, &before);
    r
}

fn migrate_remote(
    inst: &mut Instance,
    endpoint: &Endpoint,
    params: &Params,
    progress: &Mutex<Progress>,
) -> Result<Moved, Failure> {
    let mut t = endpoint.connect().map_err(connect_failure)?;
    let report = crate::migrate_out(inst, t.as_mut(), params, progress)?;
    // A CEVM checkpoint's disk hand-over goes on over the same connection.
    let disk_link = (params.cevm && crate::disk_link::hands_over_disk(inst.config())).then_some(t);
    Ok(Moved { report, new: None, disk_link })
}

fn connect_failure(error: Error) -> Failure {
    Failure { phase: Phase::Connect, guest: GuestAt::Source, error }
}
