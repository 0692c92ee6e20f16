//! One group checkpoint: the coordinator's side of the consistent cut.
//!
//! # Why the cut is consistent
//!
//! A member's checkpoint holds what its guest sent and received up to the
//! instant its vCPUs and its NICs' I/O threads stopped (a paused instance
//! moves no frame: `vmm::Instance::pause`). The coordinator lets no member run
//! again before every member has stopped and saved. So for any frame F from
//! member A to member B:
//!
//! - if B's checkpoint holds F as received, B's NIC took F in before B
//!   stopped; A sent F before that, and A cannot have sent it after its own
//!   stop either, because A runs again only once B has stopped too: A sent F
//!   before A stopped, and A's checkpoint holds F as sent. No orphan.
//! - a frame A sent before its stop that B had not taken in when B stopped is
//!   in flight at the cut: in a tap's queue or the host's bridge, which are in
//!   no checkpoint. A restore drops it (new taps, empty queues), and the
//!   guests' own protocols send it again (TCP; the built-in ring's
//!   retransmission), since the receiver's checkpoint does not acknowledge it.
//!   After a group checkpoint that the group simply goes on from, it is
//!   delivered as usual, to the side of the cut it was sent to.
//!
//! The members stop in any order and each saves as soon as it has stopped
//! (stop-and-save: its own checkpoint, committed into the group's directory);
//! the one barrier is before the first resume. The group checkpoint is
//! committed (its manifest written, `latest` moved) only after every member's
//! checkpoint is; a member that fails or dies before that aborts it: the
//! others resume, the directory is removed, and the previous group
//! checkpoint stays the newest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use checkpoint::group::{self, GroupManifest};
use checkpoint::series::Series;
use serde::{Deserialize, Serialize};

use super::MemberSpec;
use crate::api::{Addr, CheckpointRequest, Client, ClientError, Status};

/// How long the coordinator waits for one member's answer.
pub(super) const MEMBER_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a group checkpoint was not taken.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A member could not be asked, or refused (the group checkpoint was aborted).
    #[error("member {member}: {error}")]
    Member { member: String, error: ClientError },
    /// The group's directory could not be made, or the group not committed.
    #[error("{0}")]
    Commit(checkpoint::Error),
    /// A member's checkpoint did not reach the group's cut (the group
    /// checkpoint was aborted).
    #[error("member {member}: {why}")]
    Cut { member: String, why: String },
}

/// What a group checkpoint did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// The committed group checkpoint.
    pub dir: PathBuf,
    /// The method of every member's checkpoint.
    pub method: checkpoint::Method,
    /// How long the group was stopped: by cevm, from the first member's
    /// vCPUs stopping to the last member's running again (as the members'
    /// VMMs timed them, on this host's monotonic clock); by stop-and-save,
    /// from the first pause asked to the last resume answered.
    pub group_pause_ms: f64,
    /// Each member's own stop, as its VMM reported it: its save
    /// (stop-and-save) or its switch (cevm), without its wait for the others.
    pub member_stop_ms: Vec<(String, f64)>,
    /// What the coordination itself cost: the group pause less the slowest
    /// member's own stop.
    pub coordination_ms: f64,
    /// From the start of the group checkpoint to its commit.
    pub total_ms: f64,
    /// Older group checkpoints removed by the retention.
    pub removed: Vec<PathBuf>,
}

impl GroupError {
    /// The member it is about, if one.
    pub fn member(&self) -> Option<&str> {
        match self {
            GroupError::Member { member, .. } | GroupError::Cut { member, .. } => Some(member),
            GroupError::Commit(_) => None,
        }
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `f` for every member at once (one thread each), with its place in
/// `members`; the results in member order.
pub(crate) fn each<T: Send>(members: &[MemberSpec], f: impl Fn(usize, &MemberSpec, &Client) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let f = &f;
                s.spawn(move || f(i, m, &m.client(MEMBER_TIMEOUT)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a member's thread panicked")).collect()
    })
}

/// The first failure of `results`, named by its member.
pub(super) fn first_error<T>(
    members: &[MemberSpec],
    results: Vec<Result<T, ClientError>>,
) -> Result<Vec<T>, GroupError> {
    let mut out = Vec::with_capacity(results.len());
    for (m, r) in members.iter().zip(results) {
        out.push(r.map_err(|error| GroupError::Member { member: m.name.clone(), error })?);
    }
    Ok(out)
}

/// Takes one group checkpoint of `members` by stop-and-save into the next
/// checkpoint of `series`, and commits it there.
pub fn stop_and_save(members: &[MemberSpec], series: &mut Series) -> Result<GroupReport, GroupError> {
    let started = Instant::now();
    let (statuses, dir) = begin(members, series)?;
    let t0 = Instant::now();
    // Each member stops, then saves into the group's directory; none resumes yet.
    let saved = each(members, |_, m, c| {
        c.pause()?;
        c.checkpoint(&CheckpointRequest::new(dir.join(&m.name), checkpoint::Method::StopAndSave.strategy()))
    });
    // The barrier: every member has stopped (and saved, or failed). Every one
    // that ran before runs again, whatever the outcome (one its user had
    // paused stays paused).
    let resumed = each(members, |i, _, c| if statuses[i].state == "running" { c.resume().map(drop) } else { Ok(()) });
    let group_pause_ms = ms(t0.elapsed());
    let reports = match first_error(members, saved) {
        Ok(r) => r,
        Err(e) => {
            abort(&dir);
            return Err(e);
        }
    };
    // The checkpoint holds; a member that could not be resumed is said.
    for (m, r) in members.iter().zip(resumed) {
        if let Err(e) = r {
            tracing::error!("member {}: could not be resumed after the group checkpoint: {e}", m.name);
        }
    }
    let taken = Taken { members, statuses: &statuses, reports: &reports, group_pause_ms, started };
    commit(taken, checkpoint::Method::StopAndSave, dir, series)
}

/// Asks every member who it is and where it runs, before anything stops (a
/// member that is not there aborts the group checkpoint before it begins),
/// and makes the group checkpoint's directory, the next of `series`.
pub(super) fn begin(members: &[MemberSpec], series: &mut Series) -> Result<(Vec<Status>, PathBuf), GroupError> {
    let statuses: Vec<Status> = first_error(members, each(members, |_, _, c| c.status()))?;
    let dir = series.next_path();
    std::fs::create_dir(&dir).map_err(|e| {
        GroupError::Commit(checkpoint::Error::Decode { path: dir.clone(), reason: format!("cannot make it: {e}") })
    })?;
    Ok((statuses, dir))
}

/// Every member's checkpoint of one group checkpoint, taken.
pub(super) struct Taken<'a> {
    pub members: &'a [MemberSpec],
    pub statuses: &'a [Status],
    pub reports: &'a [checkpoint::CheckpointReport],
    pub group_pause_ms: f64,
    /// When the group checkpoint began.
    pub started: Instant,
}

/// Commits the group checkpoint `dir` of `taken` by `method` (its manifest
/// written last) and moves `latest` to it; aborted if that fails.
pub(super) fn commit(
    taken: Taken<'_>,
    method: checkpoint::Method,
    dir: PathBuf,
    series: &mut Series,
) -> Result<GroupReport, GroupError> {
    let Taken { members, statuses, reports, group_pause_ms, started } = taken;
    let manifest = GroupManifest {
        format_version: group::GROUP_FORMAT_VERSION,
        cevm_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms: now_ms(),
        method: method.name().into(),
        group_pause_ms,
        members: members
            .iter()
            .zip(statuses)
            .zip(reports)
            .map(|((m, s), r)| group::Member {
                name: m.name.clone(),
                api_sock: match &m.api {
                    Addr::Unix(p) => Some(p.clone()),
                    Addr::Tcp(_) => None,
                },
                control: match &m.api {
                    Addr::Tcp(a) => Some(a.clone()),
                    Addr::Unix(_) => None,
                },
                taps: s.nics.iter().map(|n| n.tap.clone().unwrap_or_default()).collect(),
                manifest_crc32: String::new(),
                pause_ms: r.pause_ms,
            })
            .collect(),
    };
    if let Err(e) = group::commit(&dir, manifest) {
        abort(&dir);
        return Err(GroupError::Commit(e));
    }
    let removed = series.committed(&dir).map_err(GroupError::Commit)?;
    let own: Vec<f64> = reports.iter().map(|r| r.pause_ms - r.held_ms).collect();
    Ok(GroupReport {
        dir,
        method,
        group_pause_ms,
        member_stop_ms: members.iter().zip(&own).map(|(m, ms)| (m.name.clone(), *ms)).collect(),
        coordination_ms: group_pause_ms - own.iter().copied().fold(0.0, f64::max),
        total_ms: ms(started.elapsed()),
        removed,
    })
}

/// Removes an aborted group checkpoint's directory (what members committed
/// into it included); one the series would sweep anyway, said if it cannot.
pub(super) fn abort(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("cannot remove the aborted group checkpoint {}: {e}", dir.display());
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
