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

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::worker::{Kicks, NetWorker, SharedNet};
use devices::virtio::net::{MacAddr, Net, NetCounters, Tap, RX_QUEUE, TX_QUEUE};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::Serialize;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::config::NicConfig;
use crate::error::{Error, Result};
use crate::layout::{virtio_net_slot, VirtioMmioSlot};

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

/// The NICs of one instance.
#[derive(Default)]
pub(crate) struct Nics {
    nics: Vec<Nic>,
}

impl Nics {
    /// Adds NIC `index` of `config`: its transport (built by `add`, which puts
    /// it on the MMIO bus and restores its saved state if there is one), and
    /// the ioeventfds of its receive and transmit queues.
    pub(crate) fn add(
        &mut self,
        vm: &VmFd,
        config: &NicConfig,
        add: impl FnOnce(Net, VirtioMmioSlot) -> Result<Arc<Mutex<MmioTransport<Net>>>>,
    ) -> Result<()> {
        let index = self.nics.len();
        let slot = virtio_net_slot(index);
        let transport = add(Net::new(config.mac, None), slot)?;
        let notify = IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        let kick = |queue: usize| -> Result<EventFd> {
            let e =
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("NIC {index}: eventfd: {e}")))?;
            vm.register_ioevent(&e, &notify, queue as u32).map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
            Ok(e)
        };
        let kicks = Kicks { rx: kick(RX_QUEUE)?, tx: kick(TX_QUEUE)? };
        match Tap::open(&config.tap) {
            Ok(tap) => {
                lock(&transport)
                    .device_mut()
                    .set_tap(Some(tap))
                    .map_err(|e| Error::Device(format!("NIC {index}: {e}")))?;
            }
            // Held by another instance (bound at start), or missing: the start says so.
            Err(e) => tracing::debug!("NIC {index}: tap not bound yet: {e}"),
        }
        let on_start = Box::new(move || {
            if let Err(e) = sandbox::confine(sandbox::Kind::Net) {
                // The thread runs on under the VMM's wider filter.
                tracing::error!("net{index}: {e}");
            }
        });
        let worker = NetWorker::spawn(format!("net{index}"), transport.clone(), kicks, true, on_start)
            .map_err(|e| Error::Device(format!("NIC {index}: its I/O thread: {e}")))?;
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

    /// Binds every NIC without a tap to its configured one.
    fn bind(&self) -> Result<()> {
        for (i, n) in self.nics.iter().enumerate() {
            let mut t = lock(&n.transport);
            if t.device().tap().is_some() {
                continue;
            }
            let tap = Tap::open(&n.config.tap).map_err(|e| Error::Device(format!("NIC {i}: {e}")))?;
            t.device_mut().set_tap(Some(tap)).map_err(|e| Error::Device(format!("NIC {i}: {e}")))?;
            tracing::debug!("NIC {i} ({}) bound to tap {}", n.config.mac, n.config.tap);
        }
        Ok(())
    }

    /// The instance starts: taps bound, I/O threads running.
    pub(crate) fn start(&mut self) -> Result<()> {
        self.bind()?;
        for n in &self.nics {
            if let Some(w) = &n.worker {
                w.resume();
            }
        }
        Ok(())
    }

    /// The vCPUs have paused: the I/O threads stop too.
    pub(crate) fn pause(&self) {
        for n in &self.nics {
            if let Some(w) = &n.worker {
                w.pause();
            }
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

    /// Lets go of every tap (the instance is paused: a migration's switch).
    pub(crate) fn release(&self) {
        for n in &self.nics {
            let _ = lock(&n.transport).device_mut().set_tap(None);
        }
    }

    /// Ends the I/O threads (the instance shuts down).
    pub(crate) fn shutdown(&mut self) {
        for n in &mut self.nics {
            n.worker = None;
        }
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
