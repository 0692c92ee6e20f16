//! The two disk protocols of a CEVM checkpoint (DESIGN.md, "The two protocols"),
//! written as sans-I/O state machines: messages in, messages out, no transport
//! inside, so the same code runs over an in-process channel (thread-based) and
//! over the migration connection (process-based), and is tested against a
//! reference model without KVM or files.
//!
//! Before the switch the guest wrote overlay **T** (over base **B**). At the
//! switch the new instance opens a fresh overlay **U** (over B) and writes only
//! there; **T is never written again**, so T over B stays exactly the disk at the
//! switch and becomes the checkpoint's disk (our one deliberate change to the
//! seed, which writes not-yet-integrated updates into T).
//!
//! - [`OldSide`] (checkpointing protocol): walks T's allocated clusters in address
//!   order and sends each one's data (`Cluster`); between steps it answers the new
//!   side's requests for T data (`ReadFrozen` → `FrozenData`); after the last cluster it
//!   sends `IntegrateEnd`, then answers `LastUpdate` with `UpdateDone`.
//! - [`NewSide`] (disk image manipulation protocol): serves the guest's reads and
//!   writes in order. A cluster whose current data is only in T ("T-only": in T,
//!   not yet integrated, not overwritten since) is first brought into U, whole,
//!   from a `Cluster` or `FrozenData` message; every other access goes to U over B.
//!   A write that covers a T-only cluster whole needs nothing from T.
//!   Integration writes a cluster into U only while it is T-only, so it never
//!   overwrites a newer guest write.
//!
//! The images themselves are behind two small traits ([`NewOverlay`], [`FrozenOverlay`]),
//! implemented over qcow2 files by the VMM and over byte arrays by the tests.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Errors of the protocols.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The peer broke the protocol.
    #[error("disk integration protocol: {0}")]
    Protocol(String),
    /// A guest request outside the disk.
    #[error("request at {off:#x}+{len:#x} is outside the {size:#x}-byte disk")]
    OutOfRange { off: u64, len: u64, size: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Messages from the new instance to the old one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToOld {
    /// Send T's data of this cluster now (a guest request waits for it).
    ReadFrozen { cluster: u64 },
    /// Integration ended here; no more requests will come.
    LastUpdate,
}

/// Messages from the old instance to the new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToNew {
    /// The integration cursor's cluster of T, in address order.
    Cluster { cluster: u64, data: Vec<u8> },
    /// The answer to a `ReadFrozen`.
    FrozenData { cluster: u64, data: Vec<u8> },
    /// Every cluster of T was sent.
    IntegrateEnd,
    /// The answer to `LastUpdate`: the old side is finished.
    UpdateDone,
}

/// The new instance's overlay U over the base B, as the new side uses it.
pub trait NewOverlay {
    /// Reads through U, falling back to B where U holds nothing.
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes into U (where U held nothing, the rest of the cluster comes from B).
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    /// Makes U's writes durable.
    fn flush(&mut self) -> Result<()>;
}

/// The old overlay T, which is only ever read after the switch.
pub trait FrozenOverlay {
    /// Reads one whole cluster of T.
    fn read_cluster(&mut self, cluster: u64, buf: &mut [u8]) -> Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OldState {
    Integrating,
    WaitingForLastUpdate,
    Done,
}

/// The old instance's side: the checkpointing protocol.
pub struct OldSide {
    clusters: Vec<u64>,
    next: usize,
    cluster_size: usize,
    state: OldState,
}

impl OldSide {
    /// `t_clusters`: the clusters T holds (any order); `cluster_size`: bytes.
    pub fn new(mut t_clusters: Vec<u64>, cluster_size: usize) -> Self {
        t_clusters.sort_unstable();
        t_clusters.dedup();
        OldSide { clusters: t_clusters, next: 0, cluster_size, state: OldState::Integrating }
    }

    /// One integration step: the next cluster of T, or `IntegrateEnd` after the
    /// last; `None` once integration is over (then only messages matter).
    pub fn step(&mut self, t: &mut dyn FrozenOverlay) -> Result<Option<ToNew>> {
        if self.state != OldState::Integrating {
            return Ok(None);
        }
        let Some(&cluster) = self.clusters.get(self.next) else {
            self.state = OldState::WaitingForLastUpdate;
            return Ok(Some(ToNew::IntegrateEnd));
        };
        self.next += 1;
        let mut data = vec![0; self.cluster_size];
        t.read_cluster(cluster, &mut data)?;
        Ok(Some(ToNew::Cluster { cluster, data }))
    }

    /// Serves one message of the new side; returns the answer to send.
    pub fn on_message(&mut self, m: ToOld, t: &mut dyn FrozenOverlay) -> Result<Option<ToNew>> {
        match (m, self.state) {
            (_, OldState::Done) => Err(Error::Protocol("a message after UpdateDone".into())),
            (ToOld::ReadFrozen { cluster }, _) => {
                let mut data = vec![0; self.cluster_size];
                t.read_cluster(cluster, &mut data)?;
                Ok(Some(ToNew::FrozenData { cluster, data }))
            }
            (ToOld::LastUpdate, OldState::WaitingForLastUpdate) => {
                self.state = OldState::Done;
                Ok(Some(ToNew::UpdateDone))
            }
            (ToOld::LastUpdate, OldState::Integrating) => {
                Err(Error::Protocol("LastUpdate before IntegrateEnd was sent".into()))
            }
        }
    }

    /// Whether the protocol is over on this side.
    pub fn done(&self) -> bool {
        self.state == OldState::Done
    }

    /// Clusters still to send.
    pub fn remaining(&self) -> usize {
        self.clusters.len() - self.next
    }
}

/// A guest disk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Read { off: u64, len: u64 },
    Write { off: u64, data: Vec<u8> },
    Flush,
}

/// A finished guest request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    Read(Vec<u8>),
    Write,
    Flush,
}

/// What one [`NewSide::poll`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Polled {
    /// Messages to send to the old side, in order.
    pub to_old: Vec<ToOld>,
    /// Guest requests finished, in submission order, with their ids.
    pub completed: Vec<(u64, Completion)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NewState {
    Integrating,
    /// `IntegrateEnd` came; `LastUpdate` is to be (or was) sent.
    LastUpdateSent,
    Done,
}

/// The new instance's side: the disk image manipulation protocol.
pub struct NewSide {
    cluster_size: u64,
    disk_size: u64,
    /// Clusters whose current data is only in T.
    t_only: BTreeSet<u64>,
    /// `ReadFrozen` sent and not answered yet.
    asked: BTreeSet<u64>,
    queue: VecDeque<(u64, Request)>,
    outbox: Vec<ToOld>,
    state: NewState,
}

impl NewSide {
    /// `t_clusters`: the clusters T holds; the disk is `disk_size` bytes.
    pub fn new(t_clusters: impl IntoIterator<Item = u64>, cluster_size: u64, disk_size: u64) -> Self {
        NewSide {
            cluster_size,
            disk_size,
            t_only: t_clusters.into_iter().collect(),
            asked: BTreeSet::new(),
            queue: VecDeque::new(),
            outbox: Vec::new(),
            state: NewState::Integrating,
        }
    }

    /// Whether this cluster's current data is only in T (the guest's view of it
    /// is T's; U does not hold it yet).
    pub fn is_t_only(&self, cluster: u64) -> bool {
        self.t_only.contains(&cluster)
    }

    /// Whether the protocol is over: U over B is the whole disk, T is not needed.
    pub fn done(&self) -> bool {
        self.state == NewState::Done
    }

    /// The clusters whose current data is still only in T, in address order (what
    /// the new side must still get from T, e.g. by reading T itself when the old
    /// side is gone).
    pub fn t_only_clusters(&self) -> Vec<u64> {
        self.t_only.iter().copied().collect()
    }

    /// Queues a guest request (served in order by [`NewSide::poll`]).
    pub fn submit(&mut self, id: u64, req: Request) -> Result<()> {
        let (off, len) = match &req {
            Request::Read { off, len } => (*off, *len),
            Request::Write { off, data } => (*off, data.len() as u64),
            Request::Flush => (0, 0),
        };
        if off.checked_add(len).is_none_or(|end| end > self.disk_size) {
            return Err(Error::OutOfRange { off, len, size: self.disk_size });
        }
        self.queue.push_back((id, req));
        Ok(())
    }

    /// Takes one message of the old side.
    pub fn on_message(&mut self, m: ToNew, u: &mut dyn NewOverlay) -> Result<()> {
        match m {
            ToNew::Cluster { cluster, data } | ToNew::FrozenData { cluster, data } => {
                if data.len() as u64 != self.cluster_size {
                    return Err(Error::Protocol(format!(
                        "cluster {cluster} came with {} bytes, not {}",
                        data.len(),
                        self.cluster_size
                    )));
                }
                self.asked.remove(&cluster);
                // Only while T holds the current data: a later guest write wins.
                if self.t_only.remove(&cluster) {
                    u.write(cluster * self.cluster_size, &data)?;
                }
                Ok(())
            }
            ToNew::IntegrateEnd => {
                if self.state != NewState::Integrating {
                    return Err(Error::Protocol("IntegrateEnd came twice".into()));
                }
                if let Some(c) = self.t_only.first() {
                    return Err(Error::Protocol(format!("IntegrateEnd came before cluster {c} of T")));
                }
                self.state = NewState::LastUpdateSent;
                self.outbox.push(ToOld::LastUpdate);
                Ok(())
            }
            ToNew::UpdateDone => {
                if self.state != NewState::LastUpdateSent {
                    return Err(Error::Protocol("UpdateDone before LastUpdate".into()));
                }
                self.state = NewState::Done;
                Ok(())
            }
        }
    }

    /// Serves queued guest requests in order for as long as none waits for T;
    /// returns the messages to send to the old side and the finished requests.
    pub fn poll(&mut self, u: &mut dyn NewOverlay) -> Result<Polled> {
        let mut done = Vec::new();
        while let Some((_, req)) = self.queue.front() {
            let wanted = self.wanted_from_t(req);
            if !wanted.is_empty() {
                for c in wanted {
                    if self.asked.insert(c) {
                        self.outbox.push(ToOld::ReadFrozen { cluster: c });
                    }
                }
                break;
            }
            let (id, req) = self.queue.pop_front().expect("front exists");
            let completion = match req {
                Request::Read { off, len } => {
                    let mut buf = vec![0; len as usize];
                    u.read(off, &mut buf)?;
                    Completion::Read(buf)
                }
                Request::Write { off, data } => {
                    u.write(off, &data)?;
                    // Clusters it covered whole hold the guest's data in U now.
                    for c in self.clusters(off, data.len() as u64) {
                        self.t_only.remove(&c);
                    }
                    Completion::Write
                }
                Request::Flush => {
                    u.flush()?;
                    Completion::Flush
                }
            };
            done.push((id, completion));
        }
        Ok(Polled { to_old: std::mem::take(&mut self.outbox), completed: done })
    }

    /// The T-only clusters `req` needs T's data for: all it reads; those a write
    /// covers only in part (a whole-cluster write replaces T's data).
    fn wanted_from_t(&self, req: &Request) -> Vec<u64> {
        let (off, len, whole_ok) = match req {
            Request::Read { off, len } => (*off, *len, false),
            Request::Write { off, data } => (*off, data.len() as u64, true),
            Request::Flush => return Vec::new(),
        };
        self.clusters(off, len)
            .filter(|c| self.t_only.contains(c))
            .filter(|&c| {
                let (start, end) = (c * self.cluster_size, (c + 1) * self.cluster_size);
                !(whole_ok && off <= start && off + len >= end)
            })
            .collect()
    }

    /// The clusters [off, off + len) touches.
    fn clusters(&self, off: u64, len: u64) -> impl Iterator<Item = u64> {
        let first = off / self.cluster_size;
        let end = if len == 0 { first } else { (off + len).div_ceil(self.cluster_size) };
        first..end
    }
}
