//! The I/O thread of one NIC: it waits (epoll) on the tap and on the guest's
//! notifications of the receive and transmit queues (eventfds KVM writes when
//! the guest writes QueueNotify: ioeventfds, so a notification costs the vCPU
//! no exit to the VMM), and moves frames while it holds the transport's lock.
//! No vCPU ever polls for frames.
//!
//! The instance pauses it with its vCPUs: [`NetWorker::pause`] returns once the
//! thread is parked, after which it touches neither guest memory nor the
//! queues until [`NetWorker::resume`]. A paused instance therefore changes no
//! memory, as a migration's last round and a checkpoint need; frames that
//! arrive meanwhile wait in the tap's queue (the kernel drops the excess, as a
//! busy link would).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Net, RX_QUEUE, TX_QUEUE};
use crate::virtio::mmio::MmioTransport;

/// The transport a NIC's thread and the vCPUs share.
pub type SharedNet = Arc<Mutex<MmioTransport<Net>>>;

const WAKE: u64 = 0;
const RX_KICK: u64 = 1;
const TX_KICK: u64 = 2;
const TAP: u64 = 3;

#[derive(Default)]
struct Control {
    paused: bool,
    parked: bool,
    stop: bool,
    /// The NIC the thread serves, given before its first resume.
    net: Option<SharedNet>,
}

#[derive(Default)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A NIC's I/O thread.
pub struct NetWorker {
    shared: Arc<Shared>,
    wake: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// The eventfds the guest's queue notifications arrive on.
pub struct Kicks {
    /// The receive queue got buffers.
    pub rx: EventFd,
    /// The transmit queue got frames.
    pub tx: EventFd,
}

impl NetWorker {
    /// Starts the thread `name`, parked: it serves nothing until
    /// [`NetWorker::attach`] gave it its NIC and [`NetWorker::resume`] let it
    /// run. Made before the NIC's transport, so that neither the thread's
    /// creation nor `on_start` (the VMM confines the thread there) falls into
    /// a migration's switch, where the transport is made from the saved state.
    pub fn spawn(name: String, kicks: Kicks, on_start: Box<dyn FnOnce() + Send>) -> io::Result<NetWorker> {
        let shared = Arc::new(Shared::default());
        shared.lock().paused = true;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [(wake.as_raw_fd(), WAKE), (kicks.rx.as_raw_fd(), RX_KICK), (kicks.tx.as_raw_fd(), TX_KICK)]
        {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        let (s, w) = (shared.clone(), wake.try_clone()?);
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            on_start();
            if !park_while_paused(&s) {
                return;
            }
            let Some(net) = s.lock().net.clone() else {
                tracing::error!("NIC I/O thread resumed without a NIC; it ends");
                return;
            };
            Loop { net, kicks, epoll, wake: w, shared: s, tap: None, epoch: None, watching: false }.run();
        })?;
        let worker = NetWorker { shared, wake, handle: Some(handle) };
        worker.wait_parked();
        Ok(worker)
    }

    /// An eventfd that, written, makes the thread look at the NIC's tap again
    /// (one bound while it runs).
    pub fn waker(&self) -> io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// Gives the thread the NIC it serves (before its first resume).
    pub fn attach(&self, net: SharedNet) {
        self.shared.lock().net = Some(net);
    }

    /// Tells the thread to stop moving frames, without waiting for it (see
    /// [`NetWorker::wait_parked`]): an instance pauses its NICs' threads and
    /// its vCPUs at the same time.
    pub fn request_pause(&self) {
        self.shared.lock().paused = true;
        let _ = self.wake.write(1);
    }

    /// Returns once the thread has stopped after a pause request.
    pub fn wait_parked(&self) {
        let mut c = self.shared.lock();
        while !c.parked && !c.stop && self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            c = self
                .shared
                .changed
                .wait_timeout(c, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets the thread move frames again (on the tap the NIC holds now).
    pub fn resume(&self) {
        self.shared.lock().paused = false;
        self.shared.changed.notify_all();
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        let _ = self.wake.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Parks while the instance is paused. Returns false when the thread must end.
fn park_while_paused(shared: &Shared) -> bool {
    let mut c = shared.lock();
    while c.paused && !c.stop {
        if !c.parked {
            c.parked = true;
            shared.changed.notify_all();
        }
        c = shared.changed.wait(c).unwrap_or_else(|p| p.into_inner());
    }
    c.parked = false;
    !c.stop
}

struct Loop {
    net: SharedNet,
    kicks: Kicks,
    epoll: Epoll,
    wake: EventFd,
    shared: Arc<Shared>,
    /// The tap fd registered with epoll and its epoch (see [`Net::tap_epoch`]),
    /// and whether it is watched for frames.
    tap: Option<RawFd>,
    epoch: Option<u64>,
    watching: bool,
}

impl Loop {
    fn run(mut self) {
        self.follow_tap();
        // A NIC restored or migrated in may have frames queued whose
        // notification went to the old instance, or none to come (the driver's
        // notifications were off mid-turn there): the queues are looked at once.
        self.serve(RX_QUEUE);
        self.serve(TX_QUEUE);
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("NIC I/O thread: epoll: {e}; the NIC stops moving frames");
                    return;
                }
            };
            // The control word first: a pause must stop everything else.
            if events[..n].iter().any(|e| e.data() == WAKE) {
                let _ = self.wake.read();
                if !park_while_paused(&self.shared) {
                    return;
                }
                self.follow_tap();
                // Whatever else this batch said is asked again (level-triggered).
                self.serve(RX_QUEUE);
                self.serve(TX_QUEUE);
                continue;
            }
            for e in &events[..n] {
                match e.data() {
                    RX_KICK => {
                        let _ = self.kicks.rx.read();
                        self.serve(RX_QUEUE);
                    }
                    TX_KICK => {
                        let _ = self.kicks.tx.read();
                        self.serve(TX_QUEUE);
                    }
                    TAP => self.serve(RX_QUEUE),
                    _ => {}
                }
            }
        }
    }

    /// Serves queue `index`; afterwards watches the tap only while the guest
    /// has receive buffers (a frame without one waits in the tap): before its
    /// driver has set the receive queue up, or once it is full, a frame
    /// waiting on the tap would wake this thread again and again. The driver's
    /// next notification of the receive queue (it adds buffers) watches it again.
    ///
    /// A transmit turn that left frames in the ring (its batch ran out while
    /// the driver's notifications were off) is taken up again at once through
    /// the queue's own eventfd, after whatever else epoll has to say.
    fn serve(&mut self, index: usize) {
        let (starved, tx_pending) = {
            let mut t = self.net.lock().unwrap_or_else(|p| p.into_inner());
            t.serve_queue(index);
            (!t.queue_live(RX_QUEUE) || t.device().rx_starved(), t.queue_live(TX_QUEUE) && t.device().tx_pending())
        };
        self.watch(!starved);
        if tx_pending {
            let _ = self.kicks.tx.write(1);
        }
    }

    /// Registers the tap the NIC holds now (it changes only while paused: a
    /// migration releases it, a resume binds one again).
    fn follow_tap(&mut self) {
        let (now, epoch) = {
            let t = self.net.lock().unwrap_or_else(|p| p.into_inner());
            (t.device().tap().map(|t| t.as_raw_fd()), t.device().tap_epoch())
        };
        if self.epoch == Some(epoch) {
            return;
        }
        self.epoch = Some(epoch);
        if let Some(old) = self.tap.take() {
            // The old tap may be closed already, which removed it from the set.
            let _ = self.epoll.ctl(ControlOperation::Delete, old, EpollEvent::default());
        }
        if let Some(fd) = now {
            match self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, TAP)) {
                Ok(()) => {
                    self.tap = Some(fd);
                    self.watching = true;
                }
                Err(e) => tracing::error!("NIC I/O thread: cannot watch the tap: {e}"),
            }
        }
    }

    fn watch(&mut self, on: bool) {
        let Some(fd) = self.tap else { return };
        if on == self.watching {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        if self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, TAP)).is_ok() {
            self.watching = on;
        }
    }
}
