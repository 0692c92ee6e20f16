//! The control API: HTTP/1.1 with JSON bodies on a unix socket (mode 0600), like
//! Firecracker's, so `curl --unix-socket PATH http://localhost/v1/status` works.
//! Described in OpenAPI 3.1 in `docs/api/openapi.json`; the server's route
//! table, [`server::ROUTES`], lists exactly its paths (a test compares them).
//!
//! | method | path            | body                  | answer                                                       |
//! |--------|-----------------|-----------------------|--------------------------------------------------------------|
//! | GET    | /v1/status      |                       | [`Status`], at once, also during a migration or checkpoint   |
//! | PUT    | /v1/pause       |                       | [`Status`]                                                   |
//! | PUT    | /v1/resume      |                       | [`Status`]                                                   |
//! | PUT    | /v1/checkpoint  | [`CheckpointRequest`] | `checkpoint::CheckpointReport` once committed                |
//! | GET    | /v1/checkpoint  |                       | `checkpoint::ProgressView` of the running (or last) checkpoint |
//! | PUT    | /v1/migrate     | [`MigrateRequest`]    | `migrate::Report` once the guest runs at the destination     |
//! | GET    | /v1/migration   |                       | `migrate::Progress` of the running (or last) migration       |
//! | GET    | /v1/checkpoint/barrier |                | [`BarrierView`] of the running (or last) group-cut checkpoint |
//! | PUT    | /v1/checkpoint/cut, /go, /abort |       | [`BarrierView`]; 409 if it is not where the command fits     |
//! | PUT    | /v1/quit        |                       | [`Status`], then the VMM exits                               |
//!
//! Errors answer 4xx/5xx with `{"error": "..."}` (and, where a migration or a
//! checkpoint failed, `"guest"`: where the guest runs now). The version is in
//! the path; a request for another version gets 404 naming the supported one.
//!
//! Connections: one request each, answered with `Connection: close`. The
//! limits (head 8 KiB, body 64 KiB, one `Content-Length`, no
//! `Transfer-Encoding`) are [`http`]'s; the deadlines (10 s to send a whole
//! request) and the cap of [`server::MAX_CONNECTIONS`] are [`server`]'s. How
//! the socket file is claimed and removed is [`socket`]'s.
//!
//! Other hosts reach the same API only through [`remote`]: `--control
//! tcp:HOST:PORT` with the job's secret (authenticated and integrity-checked
//! frames carrying these very requests to the unix socket).
//!
//! This module holds the wire types; [`http`] parses requests (pure, no I/O),
//! [`server`] is the HTTP edge (the only place that knows status codes),
//! [`client`] the typed client the CLI, the benchmarks and the tests use.

pub mod client;
pub mod http;
pub mod remote;
pub mod server;
pub mod socket;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use client::{Addr, Client, ClientError};

/// Version of the API, the `v1` of every path.
pub const API_VERSION: u32 = 1;

/// A group cut's checkpoint, as `GET /v1/checkpoint/barrier` and the
/// coordinator's commands (`PUT /v1/checkpoint/cut`, `/go`, `/abort`) answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BarrierView {
    /// The checkpoint's directory, as `PUT /v1/checkpoint` named it: which
    /// checkpoint this is.
    pub out: PathBuf,
    /// `preparing`, `ready`, `cut`, `switched`, `released` or `aborted` (then
    /// with `reason`).
    #[serde(flatten)]
    pub state: migrate::barrier::State,
}

/// Body of `PUT /v1/checkpoint`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Directory the checkpoint is committed to (absolute; replaced atomically if it exists).
    pub out: PathBuf,
    /// Strategy name: `stop-and-save` (default), `cevm` or `cow`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Leave the VM stopped after the checkpoint (the VMM then exits).
    #[serde(default)]
    pub stop: bool,
    /// The cevm strategy's new instance: `local` (default; thread-based, in this
    /// VMM) or `unix:PATH` / `tcp:HOST:PORT`, a `cevm run --incoming` there
    /// (process-based: the guest goes on there, this VMM writes the checkpoint
    /// and ends).
    #[serde(default)]
    pub to: Option<String>,
    /// cevm strategy, placement (seed: "scheduling possibilities"): CPUs for the
    /// thread that runs the live migration.
    #[serde(default)]
    pub migration_cpus: Option<vmm::placement::CpuList>,
    /// cevm strategy, thread-based: CPUs for the new instance's vCPU threads.
    #[serde(default)]
    pub dest_vcpu_cpus: Option<vmm::placement::CpuList>,
    /// cevm and cow strategies: CPUs for what writes the checkpoint (cevm: the
    /// old instance's writer thread; cow: the forked writer process) and the
    /// disk hand-over it starts.
    #[serde(default)]
    pub writer_cpus: Option<vmm::placement::CpuList>,
    /// cevm strategy, for a group's coordinator: the switch waits for the
    /// group's cut. The checkpoint reports `ready` (`GET
    /// /v1/checkpoint/barrier`) once it could switch, switches at `PUT
    /// /v1/checkpoint/cut` into a paused new instance, and lets the guest run
    /// at `PUT /v1/checkpoint/go` (or `/abort`).
    #[serde(default)]
    pub group_cut: bool,
    /// stop-and-save and cow: hold only the pages written since this VMM's
    /// previous checkpoint, which becomes its parent (restore and verify
    /// follow the chain). The first one, and the first after a migration or
    /// a CEVM checkpoint, holds all of memory and starts tracking the pages
    /// written (KVM's dirty log stays on from then).
    #[serde(default)]
    pub incremental: bool,
}

impl CheckpointRequest {
    /// A request for strategy `strategy` into `out`, nothing else set.
    pub fn new(out: PathBuf, strategy: &str) -> Self {
        CheckpointRequest {
            out,
            strategy: strategy.into(),
            stop: false,
            to: None,
            migration_cpus: None,
            dest_vcpu_cpus: None,
            writer_cpus: None,
            group_cut: false,
            incremental: false,
        }
    }

    /// The request that takes a checkpoint by `method` into `out`; a
    /// process-based method's new instance waits at `to`. `None` for the
    /// migrations, which write nothing (see [`MigrateRequest::of_method`]).
    pub fn of_method(method: checkpoint::Method, out: PathBuf, to: Option<String>) -> Option<Self> {
        method.writes_checkpoint().then(|| CheckpointRequest {
            to: if method.process_based() { to } else { None },
            ..CheckpointRequest::new(out, method.strategy())
        })
    }
}

/// Body of `PUT /v1/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `local` (thread-based: a new instance in this process), `unix:PATH` or
    /// `tcp:HOST:PORT` (process-based: a `cevm run --incoming` there).
    pub to: String,
    /// Convergence policy; defaults as `migrate::Params::default()`.
    #[serde(default)]
    pub params: migrate::Params,
    /// CPUs for the thread that runs the migration (e.g. `1`; default: anywhere).
    #[serde(default)]
    pub migration_cpus: Option<vmm::placement::CpuList>,
    /// CPUs for the new instance's vCPU threads, thread-based only (a process-based
    /// destination places its own with `cevm run --incoming --vcpu-cpus`).
    #[serde(default)]
    pub dest_vcpu_cpus: Option<vmm::placement::CpuList>,
}

impl MigrateRequest {
    /// A migration to `to` (`local`, `unix:PATH`, `tcp:HOST:PORT`) with the
    /// default convergence policy.
    pub fn new(to: &str) -> Self {
        MigrateRequest { to: to.into(), params: migrate::Params::default(), migration_cpus: None, dest_vcpu_cpus: None }
    }

    /// The request of a migration `method` (`local`, or `to` when
    /// process-based); `None` for the methods that write a checkpoint.
    pub fn of_method(method: checkpoint::Method, to: &str) -> Option<Self> {
        let to = if method.process_based() { to } else { "local" };
        (!method.writes_checkpoint()).then(|| MigrateRequest::new(to))
    }
}

fn default_strategy() -> String {
    "stop-and-save".into()
}

/// Answer of status, pause, resume and quit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub api_version: u32,
    /// `running`, `paused` or `stopping`.
    pub state: String,
    pub guest: vmm::InstanceConfig,
    /// Checkpoints committed by this VMM process.
    pub checkpoints: u64,
    /// The long operation under way, if any: `checkpoint` (its progress at
    /// `GET /v1/checkpoint`) or `migration` (`GET /v1/migration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Each NIC: the tap it is bound to now, and what it moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicStatusView>,
    /// The checkpoint this VMM restored its guest from (`cevm restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<RestoredFrom>,
    /// A lazy restore's progress (`cevm restore --lazy`): guest memory in
    /// place so far, and whether all of it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_restore: Option<checkpoint::LazyStatus>,
}

/// The checkpoint a VMM restored its guest from: a group restore checks that
/// a member restored on another host restored the right one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredFrom {
    /// Its directory, as the restoring VMM opened it.
    pub dir: PathBuf,
    /// The CRC32 of its manifest (8 hex digits), as a group manifest records it.
    pub manifest_crc32: String,
}

/// What `status` shows of a NIC (see `vmm::nics::NicStatus`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NicStatusView {
    pub tap: Option<String>,
    pub mac: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub dropped: u64,
}

impl From<vmm::nics::NicStatus> for NicStatusView {
    fn from(n: vmm::nics::NicStatus) -> Self {
        let c = n.counters;
        NicStatusView {
            tap: n.tap,
            mac: n.mac.to_string(),
            rx_frames: c.rx_frames,
            rx_bytes: c.rx_bytes,
            tx_frames: c.tx_frames,
            tx_bytes: c.tx_bytes,
            dropped: c.dropped,
        }
    }
}
