//! Live migration of a cevm instance: a pre-copy engine ([`source::migrate_out`])
//! that sends guest memory in rounds under KVM dirty logging while the guest runs,
//! then switches (pause, last dirty pages, vCPU/VM/device state, hand-over of the
//! flushed disk), and a receiver ([`dest::migrate_in`]) that builds the new
//! instance and runs it only once everything arrived and checked.
//!
//! The same engine runs over every [`transport::Transport`]: an in-process channel
//! (thread-based: the destination instance lives in the same process) or a byte
//! stream (process-based: a unix socket or TCP). The source instance stays frozen
//! and intact after the switch (the CEVM strategy writes its checkpoint from it).

pub mod barrier;
pub mod dest;
mod destination;
pub mod disk_link;
pub mod local;
pub mod protocol;
pub mod source;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dest::{accept_guest, migrate_in, Arrived, HostBinding};
pub use destination::{migrate_to, Destination, Moved, NewInstance};
pub use local::{migrate_local, Local};
pub use source::migrate_out;
pub use transport::{channel_pair, Endpoint, Listener, Transport};

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame was damaged, of another protocol version, or malformed.
    #[error(transparent)]
    Frame(#[from] protocol::FrameError),
    /// The connection failed.
    #[error("{peer}: {what}: {source}")]
    Io { peer: String, what: &'static str, source: std::io::Error },
    /// The peer closed the connection.
    #[error("{peer} closed the connection")]
    Closed { peer: String },
    /// The peer did not answer in time.
    #[error("{peer} did not answer in time")]
    Timeout { peer: String },
    /// The peer sent a frame that does not belong at this point.
    #[error("{peer} sent {got:?} where {expected} was expected")]
    Unexpected { peer: String, got: protocol::FrameKind, expected: &'static str },
    /// The peer gave up and said why.
    #[error("{peer} reported: {msg}")]
    Peer { peer: String, msg: String },
    /// The instance could not be paused, saved, restored or started.
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// The pre-copy did not converge within the round limit.
    #[error("did not converge after {rounds} rounds: the guest dirtied {dirty_pages_per_s:.0} pages/s while the link moved {link_pages_per_s:.0} pages/s, {remaining} pages remained (expected downtime {expected_ms:.1} ms > limit {limit_ms} ms); the guest runs on here. Raise --max-downtime-ms or --max-rounds, or enable auto-converge")]
    NoConvergence {
        rounds: u32,
        dirty_pages_per_s: f64,
        link_pages_per_s: f64,
        remaining: u64,
        expected_ms: f64,
        limit_ms: f64,
    },
    /// A control message of the peer does not decode.
    #[error("{peer}'s {what} message does not decode: {source}")]
    BadMessage { peer: String, what: &'static str, source: serde_json::Error },
    /// A control message could not be encoded.
    #[error("cannot encode the {what} message: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    /// The peer sent a page that is not in the guest's memory.
    #[error("page at {gpa:#x} lies outside the guest's memory: {reason}")]
    PageOutside { gpa: u64, reason: String },
    /// The peer sent `Done` before the state it completes.
    #[error("{peer} sent Done before the instance state")]
    DoneBeforeState { peer: String },
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: std::io::Error },
    /// The destination thread of a thread-based migration panicked.
    #[error("the destination thread panicked")]
    DestinationPanicked,
    /// The new instance could not start its side of a CEVM checkpoint's disk
    /// hand-over, and completed its disk from T by itself instead (or failed to).
    #[error("the disk hand-over could not start ({error}); {}", match fallback {
        None => "the guest's disk was completed from T directly".to_string(),
        Some(why) => format!("completing the guest's disk from T directly failed too: {why}"),
    })]
    HandoverNotStarted { error: Box<Error>, fallback: Option<disk::integration::IntegrationError> },
    /// A page of guest memory could not be read (an address outside guest RAM).
    #[error("reading the guest page at {gpa:#x}: {source}")]
    GuestMemory {
        gpa: u64,
        #[source]
        source: vmm::vm_memory::GuestMemoryError,
    },
    /// The guest ended (exited, powered off, reset or failed) before the switch;
    /// it was not moved.
    #[error("the guest ended before the switch (it exited, powered off or failed); it was not moved")]
    GuestEnded,
    /// The destination cannot prepare the guest's disk.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// The destination cannot take the guest as this host was told to bind it.
    #[error("{0}")]
    Binding(String),
    /// A migration held for a group's cut was not cut (see [`barrier`]); the
    /// guest runs on in the source instance.
    #[error("no group cut: {0}")]
    NotCut(String),
}

/// How far a migration had come when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Reaching the destination and agreeing on the guest (before any page moved).
    Connect,
    /// Copying memory while the guest runs.
    Precopy,
    /// The guest paused: the last dirty pages, the state, `Done`.
    Switch,
    /// Waiting for the destination to start the guest.
    Resume,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Precopy => "pre-copy",
            Phase::Switch => "switch",
            Phase::Resume => "resume",
        })
    }
}

/// Where the guest is after a migration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestAt {
    /// In the source instance, as before the migration: running again (or still
    /// paused, if it was paused when the migration started).
    Source,
    /// Perhaps at the destination: it had the whole state, but its answer never
    /// came. The source instance stays paused; resume it only once the
    /// destination is known not to run the guest.
    Undecided,
    /// Nowhere: the guest ended (exited, powered off or failed) before the switch.
    Ended,
}

impl std::fmt::Display for GuestAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestAt::Source => "the guest goes on in the source instance",
            GuestAt::Undecided => {
                "the destination had the whole state and may be running the guest, so the source instance stays \
                 paused (resume it with `cevm resume` only if the destination is not running)"
            }
            GuestAt::Ended => "the guest had ended and was not moved",
        })
    }
}

/// A failed migration: in which phase, why, and where the guest is now.
#[derive(Debug, thiserror::Error)]
#[error("{error} (in the {phase} phase; {guest})")]
pub struct Failure {
    pub phase: Phase,
    pub guest: GuestAt,
    #[source]
    pub error: Error,
}

impl Error {
    /// The error a peer's `Error` frame carries (its text, if not the expected JSON).
    pub(crate) fn from_error_frame(peer: String, payload: &[u8]) -> Self {
        let msg = serde_json::from_slice::<protocol::ErrorMsg>(payload)
            .map(|m| m.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned());
        Error::Peer { peer, msg }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How a migration converges.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Switch once the remaining dirty pages are expected to move in this time
    /// (at the link rate measured in the last round). The switch also pauses the
    /// vCPUs and moves their state, about 1 ms more here (see `cevm bench migrate`).
    pub max_downtime_ms: f64,
    /// Give up (the guest runs on at the source) after this many pre-copy rounds
    /// without reaching `max_downtime_ms`.
    pub max_rounds: u32,
    /// Throttle the vCPUs when the guest dirties memory faster than the link moves
    /// it: from 20 % of the time in steps of 10 %, up to 99 %.
    pub auto_converge: bool,
    /// How long to wait for the destination's answers.
    pub peer_timeout_s: f64,
    /// Cap on the migration stream, MiB/s (0: none), to leave a shared link to
    /// others; the pre-copy then converges only if the guest dirties less.
    pub max_bandwidth_mib_s: f64,
    /// Set by the CEVM checkpoint strategy, never by users: the destination
    /// writes the guest's disk into a new overlay U, and after the switch the
    /// disk hand-over runs over this connection ([`disk_link`]).
    #[serde(skip)]
    pub cevm: bool,
    /// Set by a group checkpoint, never by users: the migration is held at
    /// its switch for the group's coordinator ([`barrier`]).
    #[serde(skip)]
    pub barrier: Option<Arc<barrier::Barrier>>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_downtime_ms: 1.0,
            max_rounds: 30,
            auto_converge: true,
            peer_timeout_s: 60.0,
            max_bandwidth_mib_s: 0.0,
            cevm: false,
            barrier: None,
        }
    }
}

impl Params {
    fn peer_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.peer_timeout_s.clamp(0.1, 86_400.0))
    }
}

/// A running migration, as the API and the CLI's progress bar show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// `connecting`, `precopy`, `switch`, `done` or `failed`.
    pub phase: String,
    /// Pre-copy round (0 is the first full pass).
    pub round: u32,
    pub pages_total: u64,
    /// Pages sent so far (data and zero markers; a page sent twice counts twice).
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages found dirty at the last harvest.
    pub dirty_pages: u64,
    /// Guest dirty rate measured over the last round.
    pub dirty_pages_per_s: f64,
    /// Link throughput measured over the last round.
    pub mib_per_s: f64,
    /// Downtime expected if the switch happened now.
    pub expected_downtime_ms: f64,
    /// Share of time the vCPUs are held paused by auto-converge.
    pub throttle_pct: u32,
    pub elapsed_ms: f64,
}

/// What a finished migration cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Where the guest went.
    pub to: String,
    /// Guest pause: from stopping the vCPUs here to the destination starting its
    /// vCPUs. Read on the host's monotonic clock when the destination runs on
    /// this host (`downtime_exact`), else estimated: the source's part of the
    /// switch, half the link's round trip, the destination's restore.
    pub downtime_ms: f64,
    pub downtime_exact: bool,
    /// From stopping the vCPUs here to the destination's answer arriving: the
    /// downtime plus the answer's way back (an upper bound of the downtime).
    pub switch_round_trip_ms: f64,
    /// Of the downtime: the destination's restore (state in, vCPUs started).
    pub dest_restore_ms: f64,
    /// Of the downtime: the destination decoding the state.
    pub dest_state_decode_ms: f64,
    /// Of the downtime: the source's steps.
    pub switch: SwitchParts,
    /// From the request to the guest running at the destination.
    pub total_ms: f64,
    /// Pre-copy rounds before the switch (the first full pass included).
    pub rounds: u32,
    pub pages_sent: u64,
    /// Zero pages sent as markers (or skipped in the first pass).
    pub zero_pages: u64,
    pub bytes_sent: u64,
    /// Pages sent during the switch.
    pub switch_pages: u64,
    /// Highest auto-converge throttle used.
    pub max_throttle_pct: u32,
    /// Bytes of the vCPU, VM and device state.
    pub state_bytes: u64,
    /// A migration held for a group's cut: of the downtime, the wait for the
    /// coordinator's go after the switch (the other members' switches).
    #[serde(default)]
    pub held_ms: f64,
    /// When the switch began to stop the vCPUs, on this host's monotonic
    /// clock (µs): with `downtime_ms`, when this guest stopped and ran again,
    /// comparable between the VMMs of one host (a group's pause).
    #[serde(default)]
    pub paused_at_us: u64,
    /// Where the threads ran.
    pub placement: Placement,
}

/// Where the source's part of the downtime went; the rest of it is the
/// destination's restore and the messages between the two.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SwitchParts {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// Collecting and sending the pages dirtied since the last round.
    pub last_pages_ms: f64,
    /// Flushing the disk, saving vCPU, VM and device state, sending it.
    pub state_ms: f64,
}

/// The CPUs each thread of a migration was allowed on (read back, not requested).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Placement {
    /// Source vCPU threads, in vCPU order.
    pub source_vcpus: Vec<Vec<usize>>,
    /// The thread that ran the pre-copy and the switch.
    pub migration_thread: Vec<usize>,
    /// Destination vCPU threads, as the destination reported them.
    pub destination_vcpus: Vec<Vec<usize>>,
}
