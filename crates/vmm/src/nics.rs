//! An instance's NICs: virtio-net devices on host taps, each with its I/O
//! thread, kept in step with the instance's run state.
//!
//! The tap is a host resource, not part of the guest. A NIC binds the tap its
//! configuration names as soon as it is made, if it can; a tap still held by
//! another instance (a migration's source on this host: a tap takes one reader
//! at a time) is bound when the instance starts or resumes. A migration's
//! source releases its taps at the switch, and binds them again if the
//! migration fails and the guest goes on here. The I/O thread is made with the
//! NIC, parked: like the vCPU threads, neither its creation nor, for another
//! tap, the tap's opening falls into a migration's switch.
//!
//! At a migration's switch the source keeps its taps open, detached from its
//! NICs, until the guest runs at the destination: a destination in this
//! process (thread-based migration, CEVM's thread-based checkpoint) takes them
//! over from [`HANDED_OVER`] when it starts, and the source closes the rest
//! once the destination runs. Closing a tap waits for the kernel to detach its
//! queue (an RCU grace period under the RTNL lock: tens of milliseconds
//! nested), which the guest's downtime should not include; and a tap handed
//! over keeps the frames waiting in it. A destination in another process on
//! this host that binds the same tap finds it busy until then: it starts the
//! guest anyway and binds the tap as soon as it is free
//! ([`Nics::wait_for_busy_taps`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::worker::{Kicks, NetWorker, SharedNet};
use devices::virtio::net::{MacAddr, Net, NetCounters, Tap, TapError, RX_QUEUE, TX_QUEUE};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::Serialize;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::config::NicConfig;
use crate::error::{Error, Result};
use crate::layout::{virtio_net_slot, VirtioMmioSlot};

/// What NIC `index` of a VM needs from the host, made before its transport
/// (with the VM, ahead of a migration's switch): the eventfds of its queue
/// notifications registered as ioeventfds and of its interrupt as an irqfd
/// (registering with KVM waits for its readers to leave: milliseconds a
/// switch should not spend), its tap if it is free, and its I/O thread,
/// parked.
pub(crate) struct Prepared {
    irq: EventFd,
    tap: Option<Tap>,
    worker: NetWorker,
}

impl Prepared {
    pub(crate) fn new(vm: &VmFd, index: usize, config: &NicConfig) -> Result<Prepared> {
        let slot = virtio_net_slot(index);
        let eventfd = |what: &str| {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("NIC {index}: {what} eventfd: {e}")))
        };
        let notify = IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        let kick = |queue: usize| -> Result<EventFd> {
            let e = eventfd("notification")?;
            vm.register_ioevent(&e, &notify, queue as u32).map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
            Ok(e)
        };
        let kicks = Kicks { rx: kick(RX_QUEUE)?, tx: kick(TX_QUEUE)? };
        let irq = eventfd("interrupt")?;
        vm.register_irqfd(&irq, slot.gsi).map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let tap = match Tap::open(&config.tap) {
            Ok(tap) => Some(tap),
            // Held by another instance (bound at start), or missing: the start says so.
            Err(e) => {
                tracing::debug!("NIC {index}: tap not bound yet: {e}");
                None
            }
        };
        let on_start = Box::new(move || {
            if let Err(e) = sandbox::confine(sandbox::Kind::Net) {
                // The thread runs on under the VMM's wider filter.
                tracing::error!("net{index}: {e}");
            }
        });
        let worker = NetWorker::spawn(format!("net{index}"), kicks, on_start)
            .map_err(|e| Error::Device(format!("NIC {index}: its I/O thread: {e}")))?;
        Ok(Prepared { irq, tap, worker })
    }

    /// Sets `offload` (`TUN_F_*`) on the prepared tap, if there is one: what
    /// the migration's source has on its tap for this NIC (what the guest's
    /// driver accepted). The NIC sets on its tap what its restored driver
    /// accepted before it reads the first frame, and the tap skips a set it
    /// already has: this moves that ioctl (the RTNL lock, milliseconds nested)
    /// out of the switch. Frames the tap queues meanwhile carry these
    /// offloads; if the driver accepted fewer before the switch (it reset),
    /// the NIC sets those then and drops what the tap queued before (see
    /// `Net::set_tap`), as a busy link would.
    pub(crate) fn preset_offload(&self, index: usize, offload: u32) {
        if let Some(tap) = &self.tap {
            if let Err(e) = tap.set_offload(offload) {
                tracing::debug!("NIC {index}: {e}; set again when the guest runs");
            }
        }
    }
}

/// What the API shows of a NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NicStatus {
    /// The tap it is bound to now (`None` while released, at a migration's switch).
    pub tap: Option<String>,
    pub mac: MacAddr,
    #[serde(flatten)]
    pub counters: NetCounters,
}

struct Nic {
    config: NicConfig,
    transport: SharedNet,
    worker: Option<NetWorker>,
}

/// Taps an instance of this process let go of at a migration's switch, still
/// open: by tap name, with the id of the [`Nics`] that left them. A new
/// instance of this process takes them at its start; the old one takes them
/// back if the migration fails, and closes what is left once the guest runs
/// elsewhere or when it shuts down.
static HANDED_OVER: Mutex<Vec<(u64, Tap)>> = Mutex::new(Vec::new());

fn handed_over() -> std::sync::MutexGuard<'static, Vec<(u64, Tap)>> {
    HANDED_OVER.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tap left in [`HANDED_OVER`] under `name`, taken out.
fn take_handed_over(name: &str) -> Option<Tap> {
    let mut h = handed_over();
    let i = h.iter().position(|(_, t)| t.name() == name)?;
    Some(h.swap_remove(i).1)
}

/// How long a migration's destination waits for a busy tap to be let go of.
const BUSY_TAP_WAIT: Duration = Duration::from_secs(30);

/// The NICs of one instance.
pub(crate) struct Nics {
    nics: Vec<Nic>,
    /// Tells this instance's entries in [`HANDED_OVER`] apart.
    id: u64,
    /// A busy tap is bound once free instead of failing the start.
    wait_for_busy: bool,
    /// Moves on at every release: a late binding of an older generation is
    /// not made.
    generation: Arc<AtomicU64>,
}

impl Default for Nics {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Nics {
            nics: Vec::new(),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            wait_for_busy: false,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Nics {
    /// Adds NIC `index` of `config` on what [`Prepared::new`] made for it: its
    /// transport (built by `add` with the prepared interrupt line, which puts
    /// it on the MMIO bus and restores its saved state if there is one), the
    /// tap if it was free, and the I/O thread, given the transport.
    pub(crate) fn add(
        &mut self,
        config: &NicConfig,
        prepared: Prepared,
        add: impl FnOnce(Net, VirtioMmioSlot, EventFd) -> Result<Arc<Mutex<MmioTransport<Net>>>>,
    ) -> Result<()> {
        let index = self.nics.len();
        let Prepared { irq, tap, worker } = prepared;
        let transport = add(Net::new(config.mac, None), virtio_net_slot(index), irq)?;
        if let Some(tap) = tap {
            lock(&transport).device_mut().set_tap(Some(tap));
        }
        worker.attach(transport.clone());
        self.nics.push(Nic { config: config.clone(), transport, worker: Some(worker) });
        Ok(())
    }

    /// The slots of the NICs, for the firmware tables.
    pub(crate) fn slots(&self) -> impl Iterator<Item = VirtioMmioSlot> + '_ {
        (0..self.nics.len()).map(virtio_net_slot)
    }

    /// Asks every restored NIC's guest driver to announce itself (it moved).
    pub(crate) fn announce(&self) {
        for n in &self.nics {
            let mut t = lock(&n.transport);
            if t.device_mut().request_announce() {
                t.config_changed();
            }
        }
    }

    /// Binds every NIC without a tap to its configured one (see
    /// [`Nics::wait_for_busy_taps`] for a busy one).
    fn bind(&self) -> Result<()> {
        for (i, n) in self.nics.iter().enumerate() {
            let mut t = lock(&n.transport);
            if t.device().tap().is_some() {
                continue;
            }
            let tap = match take_handed_over(&n.config.tap).map(Ok).unwrap_or_else(|| Tap::open(&n.config.tap)) {
                Ok(tap) => tap,
                Err(TapError::Busy(_)) if self.wait_for_busy => {
                    drop(t);
                    self.bind_when_free(i, n)?;
                    continue;
                }
                Err(e) => return Err(Error::Device(format!("NIC {i}: {e}"))),
            };
            t.device_mut().set_tap(Some(tap));
            tracing::debug!("NIC {i} ({}) bound to tap {}", n.config.mac, n.config.tap);
        }
        Ok(())
    }

    /// A migration's destination: see [`crate::Instance::bind_busy_taps_when_free`].
    pub(crate) fn wait_for_busy_taps(&mut self) {
        self.wait_for_busy = true;
    }

    /// Binds NIC `i`'s tap from a thread of its own as soon as its holder
    /// lets go of it (polled every millisecond, up to [`BUSY_TAP_WAIT`]),
    /// then wakes the NIC's I/O thread to watch it. Frames the guest sends
    /// meanwhile are dropped, as on a link that is down.
    fn bind_when_free(&self, i: usize, n: &Nic) -> Result<()> {
        let (name, transport, generation) = (n.config.tap.clone(), n.transport.clone(), self.generation.clone());
        let since = generation.load(Ordering::SeqCst);
        let waker = n.worker.as_ref().map(NetWorker::waker).transpose();
        let waker = waker.map_err(|e| Error::Device(format!("NIC {i}: {e}")))?;
        tracing::info!("NIC {i}: tap {name} is busy (the migration's source lets go of it once the guest runs here)");
        let bind = move || {
            let t0 = Instant::now();
            loop {
                match Tap::open(&name) {
                    Ok(tap) => {
                        let mut t = lock(&transport);
                        if generation.load(Ordering::SeqCst) != since || t.device().tap().is_some() {
                            return;
                        }
                        t.device_mut().set_tap(Some(tap));
                        drop(t);
                        if let Some(w) = &waker {
                            let _ = w.write(1);
                        }
                        tracing::info!(
                            "NIC {i} bound to tap {name}, {:.1} ms after the start",
                            t0.elapsed().as_secs_f64() * 1e3
                        );
                        return;
                    }
                    Err(TapError::Busy(_)) if t0.elapsed() < BUSY_TAP_WAIT => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => {
                        tracing::error!("NIC {i}: {e}; the guest runs on without that network");
                        return;
                    }
                }
            }
        };
        std::thread::Builder::new()
            .name(format!("net{i}-bind"))
            .spawn(bind)
            .map(drop)
            .map_err(|e| Error::Device(format!("NIC {i}: a thread to bind tap {}: {e}", n.config.tap)))
    }

    /// The instance starts: taps bound, I/O threads running if `run` (else
    /// they stay parked until [`Nics::resume`]).
    pub(crate) fn start(&mut self, run: bool) -> Result<()> {
        self.bind()?;
        for w in self.nics.iter().filter_map(|n| n.worker.as_ref()).filter(|_| run) {
            w.resume();
        }
        Ok(())
    }

    /// The instance pauses: the I/O threads are told to stop (they stop
    /// while the vCPUs do; [`Nics::wait_paused`] waits for them).
    pub(crate) fn request_pause(&self) {
        for w in self.nics.iter().filter_map(|n| n.worker.as_ref()) {
            w.request_pause();
        }
    }

    /// Returns once every I/O thread has stopped.
    pub(crate) fn wait_paused(&self) {
        for w in self.nics.iter().filter_map(|n| n.worker.as_ref()) {
            w.wait_parked();
        }
    }

    /// Before the vCPUs resume: taps bound again if they were released (a
    /// failed migration), I/O threads running. A tap that cannot be bound
    /// leaves its NIC without a network, said in the log: the guest runs on.
    pub(crate) fn resume(&self) {
        if let Err(e) = self.bind() {
            tracing::error!("{e}; the guest runs on without that network");
        }
        for n in &self.nics {
            if let Some(w) = &n.worker {
                w.resume();
            }
        }
    }

    /// Lets go of every tap (the instance is paused: a migration's switch),
    /// left open in [`HANDED_OVER`].
    pub(crate) fn release(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for n in &self.nics {
            let mut t = lock(&n.transport);
            if let Some(len) = t.device_mut().held_frame() {
                tracing::warn!(
                    "NIC {}: a frame of {len} bytes read from its tap and waiting for receive buffers is lost at this switch",
                    n.config.tap
                );
            }
            if let Some(tap) = t.device_mut().set_tap(None) {
                handed_over().push((self.id, tap));
            }
        }
    }

    /// Closes the taps this instance let go of that nobody took.
    pub(crate) fn close_released(&self) {
        let mine: Vec<Tap> = {
            let mut h = handed_over();
            let (mine, rest) = std::mem::take(&mut *h).into_iter().partition(|(id, _)| *id == self.id);
            *h = rest;
            mine.into_iter().map(|(_, t)| t).collect()
        };
        // Closed here, with the registry unlocked: each close waits for the kernel.
        drop(mine);
    }

    /// Ends the I/O threads (the instance shuts down), and closes the taps it
    /// let go of that nobody took.
    pub(crate) fn shutdown(&mut self) {
        for n in &mut self.nics {
            n.worker = None;
        }
        self.close_released();
    }

    /// The offloads set on each NIC's tap (`None`: no tap).
    pub(crate) fn offloads(&self) -> Vec<Option<u32>> {
        self.nics.iter().map(|n| lock(&n.transport).device().tap().and_then(Tap::offload)).collect()
    }

    /// What each NIC is bound to and has moved.
    pub(crate) fn status(&self) -> Vec<NicStatus> {
        self.nics
            .iter()
            .map(|n| {
                let t = lock(&n.transport);
                NicStatus {
                    tap: t.device().tap().map(|t| t.name().to_string()),
                    mac: t.device().mac(),
                    counters: t.device().counters(),
                }
            })
            .collect()
    }
}
