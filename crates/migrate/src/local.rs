//! Thread-based migration: the destination instance is made in this process, on
//! a thread of its own, and the two ends talk over an in-process channel.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use vmm::{Instance, VmEvent};

use crate::{channel_pair, migrate_in, migrate_out, Error, Params, Progress, Report, Result, Transport};

/// Frames in flight between the two threads (each at most ~1 MiB of pages).
const CHANNEL_DEPTH: usize = 8;

/// A finished thread-based migration.
pub struct Local {
    pub report: Report,
    /// The new instance, running the guest.
    pub instance: Instance,
    /// A CEVM checkpoint's migration of a guest with a disk: the old side's end
    /// of the disk hand-over (see [`crate::handover`]).
    pub handover: Option<Box<dyn Transport>>,
}

/// Live-migrates `inst` to a new instance in this process whose console is
/// `console`, whose events go to `events` and whose vCPUs run on `dest_cpus`
/// (empty: anywhere). On success the new instance runs the guest and `inst`
/// stays paused at the switch, as [`migrate_out`] leaves it.
///
/// A CEVM checkpoint's migration (`params.cevm`) of a guest with a disk also
/// returns the old side's end of the disk hand-over (see [`crate::handover`]);
/// the new instance serves its side on a thread of its own.
pub fn migrate_local(
    inst: &mut Instance,
    params: &Params,
    progress: &Mutex<Progress>,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    dest_cpus: &[usize],
) -> Result<Local> {
    let (mut src, mut dst) = channel_pair(CHANNEL_DEPTH);
    let dest_cpus = dest_cpus.to_vec();
    let dest = std::thread::Builder::new()
        .name("migrate-dest".into())
        .spawn(move || {
            let (inst, hello) = migrate_in(&mut dst, console, events, &dest_cpus)?;
            if hello.cevm {
                crate::handover::serve_new_side(Box::new(dst), &inst)?;
            }
            Ok::<_, Error>(inst)
        })
        .map_err(|e| Error::Decode(format!("cannot start the destination thread: {e}")))?;
    let report = migrate_out(inst, &mut src, params, progress);
    let handover = params.cevm && crate::handover::hands_over_disk(inst.config()) && report.is_ok();
    // Closing our end lets a destination still waiting for frames give up.
    let src = if handover {
        Some(Box::new(src) as Box<dyn Transport>)
    } else {
        drop(src);
        None
    };
    let new = dest.join().map_err(|_| Error::Decode("the destination thread panicked".into()))?;
    match (report, new) {
        (Ok(report), Ok(instance)) => Ok(Local { report, instance, handover: src }),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(Error::Decode(format!("the destination failed after the switch: {e}"))),
    }
}
