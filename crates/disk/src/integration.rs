//! A CEVM checkpoint's disk hand-over over real images: the drivers around the
//! sans-I/O state machines of crate `integrate` (DESIGN.md, "The two protocols").
//!
//! - [`GuestDisk`] is the disk the guest's virtio-blk device reads and writes.
//!   Usually it is one image. In the new instance of a CEVM switch it is a fresh
//!   overlay U (over T's base B), and each request goes through
//!   [`integrate::NewSide`] until the integration ends; then U takes the guest
//!   disk's own path (T's until then) and requests go straight to it.
//! - [`run_old_side`] runs the checkpointing protocol over T in the old instance.
//!
//! The messages travel over whatever the caller gives: an in-process channel
//! (thread-based CEVM) or the migration connection (process-based). If the old
//! side goes away before the end, the new side reads what it still needs from T
//! itself ([`GuestDisk::finish_from_t`]): T is never written after the switch, so
//! the guest keeps a whole disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use integrate::{Completion, FrozenOverlay, NewOverlay, NewSide, OldSide, Request, ToNew, ToOld};
use serde::{Deserialize, Serialize};

use crate::{Disk, Error};

/// What the old instance sends the new one after the switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromOld {
    /// The first message: T's cluster size and the clusters T holds, as runs
    /// `(first, count)`. Listing them after the switch keeps it out of the downtime.
    Begin { cluster_size: u64, runs: Vec<(u64, u64)> },
    /// A message of the checkpointing protocol.
    Protocol(ToNew),
}

/// Sends one message to the other side; an error (the transport's own words)
/// means that side is gone.
pub type Outbox<M> = Box<dyn FnMut(M) -> Result<(), String> + Send>;

/// Why a disk integration did not end normally.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    /// The new instance went away while T was being sent.
    #[error("the new instance went away during the disk integration, after {sent} of {total} clusters ({reason})")]
    NewSideGone { sent: usize, total: usize, reason: String },
    /// The new instance's messages stopped coming.
    #[error("the new instance went away during the disk integration")]
    NewSideClosed,
    /// The new instance did not end the integration in time.
    #[error("the new instance did not end the disk integration within {0} s")]
    NewSideSilent(u64),
    /// The old instance went away before the end; the new side finished from T.
    #[error("the old instance went away during the disk integration; the rest was read from T directly and the guest's disk is whole")]
    OldSideGone,
    /// The old instance broke the protocol; the new side finished from T.
    #[error("the old instance broke the disk integration protocol: {0}; the rest was read from T directly and the guest's disk is whole")]
    OldSideBroke(Box<IntegrationError>),
    /// A protocol message this side cannot take.
    #[error("{0}")]
    BadMessage(&'static str),
    /// `Begin` named a cluster size no qcow2 image has.
    #[error("Begin names an invalid cluster size {0}")]
    BadClusterSize(u64),
    /// The protocol state machines refused a step.
    #[error(transparent)]
    Protocol(#[from] integrate::Error),
    /// T could not be opened or read.
    #[error(transparent)]
    Image(#[from] Error),
}

/// A [`Disk`] as the state machines see it: U on the new side, T on the old
/// (with T's cluster size).
pub(crate) struct Image<'a>(pub(crate) &'a Disk, pub(crate) u64);

fn io_err(e: std::io::Error) -> integrate::Error {
    integrate::Error::Io(e.to_string())
}

impl NewOverlay for Image<'_> {
    fn read(&mut self, off: u64, buf: &mut [u8]) -> integrate::Result<()> {
        self.0.read(buf, off).map_err(io_err)
    }
    fn write(&mut self, off: u64, data: &[u8]) -> integrate::Result<()> {
        self.0.write(data, off).map_err(io_err)
    }
    fn flush(&mut self) -> integrate::Result<()> {
        self.0.flush().map_err(io_err)
    }
}

impl FrozenOverlay for Image<'_> {
    fn read_cluster(&mut self, cluster: u64, buf: &mut [u8]) -> integrate::Result<()> {
        // The last cluster may end past the disk: read what exists, the rest is zero.
        let off = cluster * self.1;
        let n = (self.0.size().saturating_sub(off) as usize).min(buf.len());
        buf[n..].fill(0);
        self.0.read(&mut buf[..n], off).map_err(io_err)
    }
}

fn to_runs(clusters: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &c in clusters {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == c => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

/// What the old side did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OldSideReport {
    /// Clusters of T sent in address order.
    pub clusters: u64,
    /// Clusters the new instance asked for ahead of the cursor (a guest request waited).
    pub t_reads: u64,
    /// Bytes of T's data sent.
    pub bytes: u64,
    /// From the first message to `UpdateDone`.
    pub ms: f64,
}

/// How long the old side waits for the new one once all of T was sent.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// The checkpointing protocol in the old instance: sends T's clusters in address
/// order, answering the new instance's requests between clusters, until
/// `LastUpdate`/`UpdateDone`. `t` is only read.
pub fn run_old_side(
    t: &Disk,
    inbound: Receiver<ToOld>,
    mut send: Outbox<FromOld>,
) -> Result<OldSideReport, IntegrationError> {
    let start = Instant::now();
    let (cluster_size, own) = t.own_clusters()?;
    let total = own.len();
    let mut sent = 0usize;
    // A message that cannot be sent means the new instance is gone.
    let mut send = move |m: FromOld| {
        let is_cluster = matches!(m, FromOld::Protocol(ToNew::Cluster { .. }));
        send(m).map_err(|reason| IntegrationError::NewSideGone { sent, total, reason })?;
        sent += usize::from(is_cluster);
        Ok::<(), IntegrationError>(())
    };
    send(FromOld::Begin { cluster_size, runs: to_runs(&own) })?;
    let mut old = OldSide::new(own, cluster_size as usize);
    let mut image = Image(t, cluster_size);
    let mut report = OldSideReport::default();
    while !old.done() {
        let stepped = old.step(&mut image)?;
        let mut inbox = Vec::new();
        if let Some(m) = stepped {
            if let ToNew::Cluster { data, .. } = &m {
                report.clusters += 1;
                report.bytes += data.len() as u64;
            }
            send(FromOld::Protocol(m))?;
            // The seed's `nrecv`: take what came in without waiting.
            loop {
                match inbound.try_recv() {
                    Ok(m) => inbox.push(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(IntegrationError::NewSideClosed),
                }
            }
        } else {
            // All of T was sent: only the new side's messages matter now.
            match inbound.recv_timeout(PEER_TIMEOUT) {
                Ok(m) => inbox.push(m),
                Err(RecvTimeoutError::Disconnected) => return Err(IntegrationError::NewSideClosed),
                Err(RecvTimeoutError::Timeout) => return Err(IntegrationError::NewSideSilent(PEER_TIMEOUT.as_secs())),
            }
        }
        for m in inbox {
            if matches!(m, ToOld::ReadFrozen { .. }) {
                report.t_reads += 1;
            }
            if let Some(answer) = old.on_message(m, &mut image)? {
                if let ToNew::FrozenData { data, .. } = &answer {
                    report.bytes += data.len() as u64;
                }
                send(FromOld::Protocol(answer))?;
            }
        }
    }
    report.ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// Where a new instance's overlay U is made while it is integrated: beside the
/// guest's disk, whose name it takes at the end.
pub fn overlay_path(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".cevm-next");
    disk.with_file_name(name)
}

/// The integration's state on the new side.
struct NewState {
    /// Made when `Begin` arrives; requests wait until then.
    side: Option<NewSide>,
    outbox: Option<Outbox<ToOld>>,
    next_id: u64,
    completed: HashMap<u64, Completion>,
    /// U could not be read or written: every request fails from then on.
    failed: Option<String>,
    done: bool,
}

struct Integration {
    state: Mutex<NewState>,
    changed: Condvar,
    /// The guest disk's own path: T's during the integration, U's after it.
    path: PathBuf,
}

/// The disk a guest's virtio-blk device uses (see the module documentation).
pub struct GuestDisk {
    image: Disk,
    /// Where `image` is now (U moves to the guest disk's path at the end).
    current: Mutex<PathBuf>,
    /// Whether requests still go through the integration.
    integrating: AtomicBool,
    integration: Option<Integration>,
}

impl GuestDisk {
    /// One image, used directly.
    pub fn plain(image: Disk) -> Self {
        let current = Mutex::new(image.path().to_path_buf());
        GuestDisk { image, current, integrating: AtomicBool::new(false), integration: None }
    }

    /// The disk of the new instance of a CEVM switch: makes overlay U at
    /// [`overlay_path`] over the base of `path` (the overlay T the old instance
    /// writes until the switch) and opens it. Requests wait for the old side's
    /// `Begin`, which comes after [`GuestDisk::connect`].
    pub fn for_integration(path: &Path) -> Result<Self, Error> {
        let refuse = |reason: String| Error::Refused { path: path.into(), reason };
        let Some(base) = crate::backing_file(path)? else {
            return Err(refuse(
                "a CEVM checkpoint needs the guest's disk to be a qcow2 overlay over a base image".into(),
            ));
        };
        let u = overlay_path(path);
        if u.exists() {
            return Err(Error::Refused {
                path: u,
                reason: "is left over from an interrupted CEVM checkpoint (its data belongs to no checkpoint); remove \
                         it to checkpoint this disk again"
                    .into(),
            });
        }
        Disk::create_overlay(&u, Path::new(&base))?;
        let image = match Disk::open(&u, true) {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(&u);
                return Err(e);
            }
        };
        let state =
            NewState { side: None, outbox: None, next_id: 0, completed: HashMap::new(), failed: None, done: false };
        Ok(GuestDisk {
            image,
            current: Mutex::new(u),
            integrating: AtomicBool::new(true),
            integration: Some(Integration { state: Mutex::new(state), changed: Condvar::new(), path: path.into() }),
        })
    }

    /// Gives the integration its way to the old side (after the switch).
    pub fn connect(&self, outbox: Outbox<ToOld>) {
        if let Some(int) = &self.integration {
            lock(&int.state).outbox = Some(outbox);
        }
    }

    /// The image requests go to (U during an integration).
    pub fn image(&self) -> &Disk {
        &self.image
    }

    /// Where the image is now.
    pub fn current_path(&self) -> PathBuf {
        lock(&self.current).clone()
    }

    /// Whether an integration is under way.
    pub fn integrating(&self) -> bool {
        self.integrating.load(Ordering::Acquire)
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    pub fn writable(&self) -> bool {
        self.image.writable()
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self.through_integration(Request::Read { off: offset, len: buf.len() as u64 })? {
            Some(Completion::Read(data)) => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            Some(_) => Err(std::io::Error::other("disk integration answered a read with something else")),
            None => self.image.read(buf, offset),
        }
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !self.image.writable() {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "disk is read-only"));
        }
        match self.through_integration(Request::Write { off: offset, data: buf.to_vec() })? {
            Some(_) => Ok(()),
            None => self.image.write(buf, offset),
        }
    }

    pub fn flush(&self) -> std::io::Result<()> {
        match self.through_integration(Request::Flush)? {
            Some(_) => Ok(()),
            None => self.image.flush(),
        }
    }

    /// Serves `req` through the integration while there is one (waiting for T's
    /// data where it needs it); `None` when the image serves it directly.
    fn through_integration(&self, req: Request) -> std::io::Result<Option<Completion>> {
        let Some(int) = &self.integration else { return Ok(None) };
        if !self.integrating() {
            return Ok(None);
        }
        let mut st = lock(&int.state);
        loop {
            if st.done {
                return Ok(None);
            }
            if let Some(e) = &st.failed {
                return Err(std::io::Error::other(e.clone()));
            }
            if st.side.is_some() {
                break;
            }
            st = int.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let id = st.next_id;
        st.next_id += 1;
        let side = st.side.as_mut().expect("checked above");
        side.submit(id, req).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.advance(&mut st);
        loop {
            if let Some(c) = st.completed.remove(&id) {
                return Ok(Some(c));
            }
            if let Some(e) = &st.failed {
                return Err(std::io::Error::other(e.clone()));
            }
            st = int.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Serves what the new side can serve now, sends its messages, and ends the
    /// integration when the protocol is over. Wakes every waiting request.
    fn advance(&self, st: &mut NewState) {
        let int = self.integration.as_ref().expect("only called while integrating");
        if let Some(side) = st.side.as_mut() {
            match side.poll(&mut Image(&self.image, 0)) {
                Ok(p) => {
                    st.completed.extend(p.completed);
                    if let Some(out) = st.outbox.as_mut() {
                        for m in p.to_old {
                            // A lost old side shows on the inbound side too, which then
                            // finishes from T ([`GuestDisk::finish_from_t`]).
                            if out(m).is_err() {
                                break;
                            }
                        }
                    }
                }
                Err(e) => st.failed = Some(format!("disk overlay {}: {e}", self.image.path().display())),
            }
            if st.side.as_ref().is_some_and(NewSide::done) && !st.done {
                self.finish(st, &int.path);
            }
        }
        int.changed.notify_all();
    }

    /// The protocol is over: U over B is the whole disk. U's writes are made
    /// durable and U takes the guest disk's path (T keeps its data under the
    /// checkpoint's name, which the old side gave it before it began).
    fn finish(&self, st: &mut NewState, path: &Path) {
        st.done = true;
        st.outbox = None;
        self.integrating.store(false, Ordering::Release);
        let u = self.current_path();
        let r = self.image.flush().and_then(|()| std::fs::rename(&u, path));
        match r {
            Ok(()) => *lock(&self.current) = path.to_path_buf(),
            Err(e) => tracing::warn!(
                "the disk integration ended but {} could not become {}: {e}; the guest keeps using it under its \
                 present name",
                u.display(),
                path.display()
            ),
        }
    }

    /// Waits until no integration is under way (it ended, or failed for good).
    pub fn wait_integrated(&self) {
        let Some(int) = &self.integration else { return };
        let mut st = lock(&int.state);
        while !st.done && st.failed.is_none() {
            st = int.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes one message of the old side. Returns whether the integration is over.
    pub fn deliver(&self, m: FromOld) -> Result<bool, IntegrationError> {
        let Some(int) = &self.integration else {
            return Err(IntegrationError::BadMessage("no disk integration on this disk"));
        };
        let mut st = lock(&int.state);
        if st.done {
            return Err(IntegrationError::BadMessage("a disk integration message after the end"));
        }
        let r = match m {
            FromOld::Begin { cluster_size, runs } => {
                if st.side.is_some() {
                    Err(IntegrationError::BadMessage("Begin came twice"))
                } else if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
                    Err(IntegrationError::BadClusterSize(cluster_size))
                } else {
                    let clusters = runs.into_iter().flat_map(|(first, n)| first..first.saturating_add(n));
                    st.side = Some(NewSide::new(clusters, cluster_size, self.image.size()));
                    Ok(())
                }
            }
            FromOld::Protocol(m) => match st.side.as_mut() {
                None => Err(IntegrationError::BadMessage("a protocol message before Begin")),
                Some(side) => side.on_message(m, &mut Image(&self.image, 0)).map_err(IntegrationError::from),
            },
        };
        self.advance(&mut st);
        r.map(|()| st.done)
    }

    /// The old side is gone before the end: reads what is still needed from T
    /// (the guest disk's path, never written since the switch) and ends the
    /// integration here, so the guest keeps a whole disk.
    pub fn finish_from_t(&self) -> Result<(), IntegrationError> {
        let Some(int) = &self.integration else { return Ok(()) };
        let mut st = lock(&int.state);
        if st.done {
            return Ok(());
        }
        st.outbox = None;
        let r = (|| -> Result<(), IntegrationError> {
            let t = Disk::open(&int.path, false)?;
            if st.side.is_none() {
                let (cs, own) = t.own_clusters()?;
                st.side = Some(NewSide::new(own, cs, self.image.size()));
            }
            let side = st.side.as_mut().expect("made above");
            let cs = t.cluster_size;
            let mut u = Image(&self.image, 0);
            for cluster in side.t_only_clusters() {
                let mut data = vec![0; cs as usize];
                Image(&t, cs).read_cluster(cluster, &mut data)?;
                side.on_message(ToNew::Cluster { cluster, data }, &mut u)?;
            }
            // The rest of the protocol's own ending, with nobody on the other side.
            if !side.done() {
                let _ = side.on_message(ToNew::IntegrateEnd, &mut u);
                side.on_message(ToNew::UpdateDone, &mut u)?;
            }
            Ok(())
        })();
        if let Err(e) = &r {
            st.failed = Some(format!("the old instance went away and T could not be read: {e}"));
        }
        self.advance(&mut st);
        r
    }
}

impl Drop for GuestDisk {
    fn drop(&mut self) {
        // A U that never began holds nothing of the guest's (requests wait for
        // `Begin`): a migration that failed before its switch leaves no file.
        if let Some(int) = &self.integration {
            let st = lock(&int.state);
            if st.side.is_none() && !st.done {
                let _ = std::fs::remove_file(lock(&self.current).as_path());
            }
        }
    }
}

/// The new side's half of the hand-over: delivers the old side's messages until
/// the integration ends. If the old side goes away first, finishes from T and
/// says so in the error.
pub fn serve_new_side(disk: &GuestDisk, inbound: Receiver<FromOld>) -> Result<(), IntegrationError> {
    loop {
        let why = match inbound.recv() {
            Ok(m) => match disk.deliver(m) {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => IntegrationError::OldSideBroke(Box::new(e)),
            },
            Err(_) => IntegrationError::OldSideGone,
        };
        disk.finish_from_t()?;
        return Err(why);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
