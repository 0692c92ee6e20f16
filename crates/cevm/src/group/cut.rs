//! A group checkpoint by CEVM: the coordinator's side of a group cut whose
//! members stop only for their switches (`migrate::barrier` is the members'
//! side).
//!
//! 1. Every member starts a CEVM checkpoint held for the cut (`PUT
//!    /v1/checkpoint` with `group_cut`): its pre-copy runs, all members' at
//!    once, guests running, until each could switch (`ready`); a ready member
//!    goes on copying what its guest dirties.
//! 2. Once all are ready, the coordinator tells each to cut (`PUT
//!    /v1/checkpoint/cut`): each stops its vCPUs and its NICs and switches to
//!    a new instance made **paused** (`switched`).
//! 3. Once all have switched, the coordinator tells each to go: each new
//!    instance runs its guest; each old one writes its member's checkpoint
//!    (its answer to step 1 comes when written).
//! 4. The group checkpoint is committed once every member's is.
//!
//! # Why the cut is consistent
//!
//! It is stop-and-save's argument (`take`), with a member's stop being its
//! switch: a member's checkpoint is its old instance at the switch, which
//! moved no frame after its vCPUs and NIC threads stopped; the guest goes on
//! only in the new instance, whose vCPUs and NIC threads start parked and run
//! only at go, which comes after every member has switched. So no member's
//! guest sends anything after its cut before every member has cut: no frame
//! is in a receiver's checkpoint as received unless it is in its sender's as
//! sent. A frame that reaches a switched member's tap before go waits in the
//! tap's queue and is read by the new instance: after the cut, on the side
//! of it it was sent to; in the checkpoints it is in flight (dropped at a
//! restore, sent again by the guests' protocols).
//!
//! Anything short of that aborts the group checkpoint: a member not ready in
//! time, refusing a command, or failing, makes the coordinator abort every
//! member (before its switch its guest runs on where it was; after it, in the
//! new instance) and remove the group's directory; the previous group
//! checkpoint stays the newest. A coordinator that dies mid-way strands
//! nobody: the members' leases let their guests run on, and a late command
//! is refused.

use std::path::PathBuf;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use checkpoint::series::Series;
use checkpoint::CheckpointReport;
use migrate::barrier::State;

use super::take::{abort, begin, commit, each, first_error, ms, GroupError, GroupReport, Taken, MEMBER_TIMEOUT};
use super::MemberSpec;
use crate::api::{CheckpointRequest, ClientError};

/// How often the coordinator asks the members where their cut is.
const POLL: Duration = Duration::from_micros(200);
/// How long the members' pre-copies may take to be all ready (a member waits
/// 120 s for the cut once it is ready).
const READY_WITHIN: Duration = Duration::from_secs(110);
/// How long one question to a member may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

type Answer = Result<CheckpointReport, ClientError>;

/// Takes one group checkpoint of `members` by CEVM (thread-based: each
/// member's guest goes on in a new instance in its own VMM; process-based,
/// members with a `to`: in the `cevm run --incoming` there, and the member's
/// VMM ends once it has written) into the next checkpoint of `series`, and
/// commits it there.
pub fn cevm(members: &[MemberSpec], series: &mut Series) -> Result<GroupReport, GroupError> {
    let started = Instant::now();
    let (statuses, dir) = begin(members, series)?;
    let outs: Vec<PathBuf> = members.iter().map(|m| dir.join(&m.name)).collect();
    let (cut, answers) = std::thread::scope(|s| {
        let checkpoints: Vec<ScopedJoinHandle<'_, Answer>> = members
            .iter()
            .zip(&outs)
            .map(|(m, out)| {
                let req = CheckpointRequest {
                    group_cut: true,
                    to: m.to.clone(),
                    ..CheckpointRequest::new(out.clone(), "cevm")
                };
                s.spawn(move || m.client(MEMBER_TIMEOUT).checkpoint(&req))
            })
            .collect();
        let cut = coordinate(members, &outs, &checkpoints);
        if let Err(e) = &cut {
            let why = e.to_string();
            each(members, |_, _, c| c.barrier_command("abort").map(drop));
            tracing::warn!("group cut aborted: {why}");
        }
        let answers: Vec<Answer> =
            checkpoints.into_iter().map(|h| h.join().expect("a member's thread panicked")).collect();
        (cut, answers)
    });
    let (reports, coordinator_ms) = match cut {
        Err(e) => {
            abort(&dir);
            // The member the cut failed at says best why in its own answer,
            // if it has one (the others' only say that the cut was aborted).
            let at = e.member().and_then(|n| members.iter().position(|m| m.name == n));
            return Err(match at.and_then(|i| answers.into_iter().nth(i)?.err().map(|error| (i, error))) {
                Some((i, error)) => GroupError::Member { member: members[i].name.clone(), error },
                None => e,
            });
        }
        Ok(ms) => match first_error(members, answers) {
            Ok(reports) => (reports, ms),
            Err(e) => {
                abort(&dir);
                return Err(e);
            }
        },
    };
    let group_pause_ms = pause_span_ms(&reports).unwrap_or(coordinator_ms);
    let taken = Taken { members, statuses: &statuses, reports: &reports, group_pause_ms, started };
    let method = if members.iter().any(|m| m.to.is_some()) {
        checkpoint::Method::CevmProcess
    } else {
        checkpoint::Method::CevmThread
    };
    commit(taken, method, dir, series)
}

/// The group's pause as its guests had it: from the first member's vCPUs
/// stopping to the last member's running again, on the members' common
/// monotonic clock (they are all on this host); `None` if a member did not
/// say when.
fn pause_span_ms(reports: &[CheckpointReport]) -> Option<f64> {
    let stopped = reports.iter().map(|r| (r.paused_at_us > 0).then_some(r.paused_at_us)).collect::<Option<Vec<_>>>()?;
    let first = *stopped.iter().min()?;
    let last = reports.iter().zip(&stopped).map(|(r, at)| *at as f64 + r.pause_ms * 1e3).fold(0.0, f64::max);
    Some((last - first as f64) / 1e3)
}

/// Steps 1-3 of the module's protocol; how long the coordinator took from
/// the first cut asked to the last go answered.
fn coordinate(
    members: &[MemberSpec],
    outs: &[PathBuf],
    checkpoints: &[ScopedJoinHandle<'_, Answer>],
) -> Result<f64, GroupError> {
    wait_ready(members, outs, checkpoints)?;
    let t0 = Instant::now();
    // A member answers the cut once it has switched.
    command_all(members, "cut", "switched")?;
    command_all(members, "go", "released")?;
    Ok(ms(t0.elapsed()))
}

/// Sends `command` to every member at once; each must answer that it is
/// now `then`. The first refusal fails.
fn command_all(members: &[MemberSpec], command: &str, then: &str) -> Result<(), GroupError> {
    let states = first_error(members, each(members, |_, _, c| c.barrier_command(command)))?;
    match members.iter().zip(states).find(|(_, v)| v.state.name() != then) {
        Some((m, v)) => Err(GroupError::Cut {
            member: m.name.clone(),
            why: format!("it is {} after {command}, not {then}", v.state.name()),
        }),
        None => Ok(()),
    }
}

/// Waits until every member's checkpoint into its `outs` is ready for the
/// cut (within [`READY_WITHIN`]).
fn wait_ready(
    members: &[MemberSpec],
    outs: &[PathBuf],
    checkpoints: &[ScopedJoinHandle<'_, Answer>],
) -> Result<(), GroupError> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut there = vec![false; members.len()];
    loop {
        for (i, m) in members.iter().enumerate() {
            if there[i] {
                continue;
            }
            let failed = |why: String| GroupError::Cut { member: m.name.clone(), why };
            match m.client(ASK_TIMEOUT).barrier() {
                Ok(v) if v.out == outs[i] => match v.state {
                    State::Ready => there[i] = true,
                    State::Aborted(why) => return Err(failed(why)),
                    _ => {}
                },
                // This checkpoint has not begun there yet (none, or an older one, is shown).
                Ok(_) | Err(ClientError::Api { code: 404, .. }) => {}
                Err(error) => return Err(GroupError::Member { member: m.name.clone(), error }),
            }
            if !there[i] && checkpoints[i].is_finished() {
                return Err(failed("its checkpoint ended before it was ready".into()));
            }
        }
        if there.iter().all(|t| *t) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let late: Vec<&str> =
                members.iter().zip(&there).filter(|(_, t)| !**t).map(|(m, _)| m.name.as_str()).collect();
            return Err(GroupError::Cut {
                member: late.join(", "),
                why: format!("not ready within {} s", READY_WITHIN.as_secs()),
            });
        }
        std::thread::sleep(POLL);
    }
}
