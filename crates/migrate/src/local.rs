//! Thread-based migration: the destination instance is made in this process, on
//! a thread of its own, and the two ends talk over an in-process channel.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use vmm::{Instance, VmEvent};

use crate::{channel_pair, migrate_out, Error, Failure, GuestAt, Params, Phase, Progress, Report, Transport};

/// Frames in flight between the two threads (each at most ~1 MiB of pages).
const CHANNEL_DEPTH: usize = 8;

/// A finished thread-based migration.
pub struct Local {
    pub report: Report,
    /// The new instance, running the guest.
    pub instance: Instance,
    /// A CEVM checkpoint's migration of a guest with a disk: the old side's end
    /// of the disk link (see [`crate::disk_link`]).
    pub disk_link: Option<Box<dyn Transport>>,
    /// Why the new instance could not start its side of the disk hand-over
    /// ([`Error::HandoverNotStarted`]): it then completed its disk from T by
    /// itself, and the guest runs on in it.
    pub disk_link_error: Option<Error>,
}

/// Live-migrates `inst` to a new instance in this process whose console is
/// `console`, whose events go to `events` and whose vCPUs run on `dest_cpus`
/// (empty: anywhere). On success the new instance runs the guest and `inst`
/// stays paused at the switch, as [`migrate_out`] leaves it. On failure, as
/// [`migrate_out`]'s: the phase, why, and where the guest is.
///
/// A CEVM checkpoint's migration (`params.cevm`) of a guest with a disk also
/// returns the old side's end of the disk hand-over (see [`crate::disk_link`]);
/// the new instance serves its side on a thread of its own.
pub fn migrate_local(
    inst: &mut Instance,
    params: &Params,
    progress: &Mutex<Progress>,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    dest_cpus: &[usize],
) -> std::result::Result<Local, Failure> {
    let (mut src, dst) = channel_pair(CHANNEL_DEPTH);
    // The same host: the guest's NICs bind the taps the source lets go of.
    let host = crate::HostBinding { vcpu_cpus: dest_cpus.to_vec(), taps: Vec::new() };
    let dest = std::thread::Builder::new()
        .name("migrate-dest".into())
        .spawn(move || {
            let arrived = crate::accept_guest(Box::new(dst), console, events, &host)?;
            Ok::<_, Error>((arrived.instance, arrived.disk_link_error))
        })
        .map_err(|source| Failure {
            phase: Phase::Connect,
            guest: GuestAt::Source,
            error: Error::Thread { what: "migration destination", source },
        })?;
    let report = migrate_out(inst, &mut src, params, progress);
    let handover = params.cevm && crate::disk_link::hands_over_disk(inst.config()) && report.is_ok();
    // Closing our end lets a destination still waiting for frames give up.
    let src = if handover {
        Some(Box::new(src) as Box<dyn Transport>)
    } else {
        drop(src);
        None
    };
    let new = dest.join();
    match (report, new) {
        (Ok(report), Ok(Ok((instance, disk_link_error)))) => {
            Ok(Local { report, instance, disk_link: src, disk_link_error })
        }
        (Err(e), _) => Err(e),
        // The source had the destination's `Resumed`, which it sends only once
        // the guest runs there, and a destination that sent it returns its
        // instance: neither can happen. Were it to, the guest is in the new
        // instance that just failed, and the source stays paused.
        (Ok(_), Ok(Err(error))) => Err(Failure { phase: Phase::Resume, guest: GuestAt::Undecided, error }),
        (Ok(_), Err(_)) => {
            Err(Failure { phase: Phase::Resume, guest: GuestAt::Undecided, error: Error::DestinationPanicked })
        }
    }
}
