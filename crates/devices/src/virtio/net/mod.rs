//! virtio-net (virtio 1.2 §5.1) over a host tap: a receive queue, a transmit
//! queue and a control queue, the MAC address and link status in the
//! configuration space, checksum and TCP segmentation offloads passed through
//! to the tap (its virtio-net header is the guest's), and the guest's
//! self-announcement after a move (`VIRTIO_NET_F_GUEST_ANNOUNCE`).
//!
//! The device holds no state of its own beyond what the transport saves (the
//! negotiated features, the queues): the MAC is configuration, the tap a host
//! resource that a restore or a migration's destination binds anew. Frames are
//! moved by the NIC's I/O thread ([`worker`]), which waits on the tap and on
//! the queues' notifications; the vCPUs only serve the control queue.

pub mod tap;
pub mod worker;

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use crate::GuestMemoryMmap;

use super::VirtioDevice;
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The control queue.
pub const CTRL_QUEUE: usize = 2;
/// The maximum size of each queue.
pub const QUEUE_MAX_SIZES: &[u16] = &[256, 256, 64];
/// Largest frame with its header: a TSO segment of 64 KiB plus its Ethernet,
/// IP and TCP headers, and the virtio-net header in front.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_536 + 256;
/// Frames moved in one turn before the queue lock is let go (a busy link does
/// not keep a vCPU that reads a register waiting long).
const BATCH: usize = 64;

/// Features offered. Each offload comes with the one the spec says it needs
/// (§5.1.3.1): TSO with checksum offload, the announcement with the control queue.
const FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// An Ethernet MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address from `seed` (for a NIC given no
    /// MAC): 52:54:00 (the prefix QEMU and libvirt use) and three bytes of it.
    pub fn local(seed: u32) -> MacAddr {
        let b = seed.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[1], b[2], b[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (x, p) in b.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *x = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if b[0] & 1 != 0 {
            return Err(format!("`{s}` is a multicast address; a NIC needs a unicast one (first byte even)"));
        }
        if b == [0; 6] {
            return Err(format!("`{s}` is the null address"));
        }
        Ok(MacAddr(b))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Frames and bytes a NIC moved, and frames it dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames lost: larger than the guest's buffer, or the tap refused them.
    pub dropped: u64,
}

/// A virtio-net device.
pub struct Net {
    mac: MacAddr,
    tap: Option<Tap>,
    /// Counts tap changes, so that the I/O thread sees one even when a new tap
    /// got the old one's file descriptor number.
    tap_epoch: u64,
    features: u64,
    status: u16,
    /// The receive queue had no buffer for the last frame waiting on the tap:
    /// the I/O thread stops watching the tap until the guest adds buffers.
    rx_starved: bool,
    /// A frame read from the tap that the guest's buffers could not hold yet
    /// (with mergeable buffers, it waits for more): its length in `frame`.
    pending: Option<usize>,
    /// The last transmit turn ended with frames still queued (see [`Net::transmit`]).
    tx_pending: bool,
    /// Reading the tap failed (said once per tap).
    tap_failed: bool,
    /// The tap has the offloads of the features negotiated (see [`Net::set_tap`]).
    offloads_applied: bool,
    frame: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// A NIC with address `mac` on `tap` (`None`: bound later, see [`Net::set_tap`]).
    pub fn new(mac: MacAddr, tap: Option<Tap>) -> Self {
        Net {
            mac,
            tap,
            tap_epoch: 0,
            features: 0,
            status: VIRTIO_NET_S_LINK_UP as u16,
            rx_starved: false,
            pending: None,
            tx_pending: false,
            tap_failed: false,
            offloads_applied: false,
            frame: vec![0; MAX_FRAME],
            counters: NetCounters::default(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap, if one is bound.
    pub fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref()
    }

    /// Binds the NIC to `tap` or releases its tap (`None`: frames to and from
    /// the guest are dropped until another is bound). Returns the tap it held.
    ///
    /// The offloads the guest accepted are set on the tap by the first
    /// receive turn, on the I/O thread, before it reads a frame: a binding
    /// falls into a migration's switch, and setting them costs milliseconds
    /// there (see [`Tap::set_offload`]). Frames the tap queued before carry the
    /// offloads it had: none for a tap just opened, which every guest takes;
    /// those of the source's tap for one a migration's destination prepared.
    /// If the tap had offloads the driver did not accept (it reset during the
    /// migration), what it queued is dropped when its offloads are set: such a
    /// frame may carry a checksum or segment the driver cannot take (§5.1.6.4.1).
    pub fn set_tap(&mut self, tap: Option<Tap>) -> Option<Tap> {
        self.tap_epoch += 1;
        self.tap_failed = false;
        self.offloads_applied = false;
        std::mem::replace(&mut self.tap, tap)
    }

    /// Sets the offloads the guest accepted on the tap, once per tap and
    /// feature set (a failure is said, and the guest gets plain frames).
    fn apply_offloads(&mut self) {
        if self.offloads_applied {
            return;
        }
        let Some(tap) = &self.tap else { return };
        self.offloads_applied = true;
        let wanted = tap_offloads(self.features);
        let narrower = tap.offload().is_some_and(|had| had & !wanted != 0);
        if let Err(e) = tap.set_offload(wanted) {
            tracing::warn!("{e}; the guest gets no offloaded frames");
        }
        if narrower {
            let mut dropped = 0;
            while tap.read(&mut self.frame).is_ok() {
                dropped += 1;
            }
            self.counters.dropped += dropped;
            tracing::debug!(
                "tap {}: {dropped} frames queued with offloads the driver did not accept dropped",
                tap.name()
            );
        }
    }

    /// Which tap this is: changes with every [`Net::set_tap`].
    pub fn tap_epoch(&self) -> u64 {
        self.tap_epoch
    }

    /// What it moved so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the last transmit turn left frames in the ring (the I/O thread
    /// serves the queue again without waiting for a notification).
    /// The bytes of a frame read from the tap that waits for receive buffers
    /// (it is in no saved state: a switch now loses it).
    pub fn held_frame(&self) -> Option<usize> {
        self.pending
    }

    pub fn tx_pending(&self) -> bool {
        self.tx_pending
    }

    /// Whether the last receive found no buffer (see the I/O thread).
    pub fn rx_starved(&self) -> bool {
        self.rx_starved
    }

    /// Asks the guest to announce itself (gratuitous ARP, IPv6 neighbour
    /// advertisements) if its driver can: after a migration or a restore, so
    /// that bridges and peers learn its new place at once. Returns whether the
    /// configuration changed (the transport then raises a configuration interrupt).
    pub fn request_announce(&mut self) -> bool {
        if self.features & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) == 0 {
            return false;
        }
        self.status |= VIRTIO_NET_S_ANNOUNCE as u16;
        true
    }

    /// Frames from the tap into the guest's receive buffers: each into one
    /// buffer, or, with VIRTIO_NET_F_MRG_RXBUF, into as many as it needs
    /// (§5.1.6.4), the first buffer's header saying how many.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.apply_offloads();
        let Some(tap) = &self.tap else { return false };
        let mergeable = self.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut used = false;
        // The driver's notifications of new buffers matter only once they run
        // out: off while there are some, on again (and the ring looked at once
        // more, for buffers added meanwhile) when there are none.
        let _ = queue.disable_notification(mem);
        for _ in 0..BATCH {
            let available = |q: &Queue| {
                q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map(|i| (i - std::num::Wrapping(q.next_avail())).0)
                    .unwrap_or(0)
            };
            if available(queue) == 0 && !(queue.enable_notification(mem).unwrap_or(false) && available(queue) > 0) {
                self.rx_starved = true;
                break;
            }
            self.rx_starved = false;
            let n = match self.pending.take() {
                Some(n) => n,
                None => match tap.read(&mut self.frame) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // A tap that fails (deleted under the VM: EBADFD) stays
                        // readable: it is said once, and not watched again until
                        // the driver's next notification of the queue.
                        if !self.tap_failed {
                            tracing::warn!("tap {}: read: {e}; frames from it are not received", tap.name());
                            self.tap_failed = true;
                        }
                        let _ = queue.enable_notification(mem);
                        self.rx_starved = true;
                        break;
                    }
                },
            };
            // The buffers the frame goes into, each a chain of writable areas.
            let mut buffers: Vec<(u16, Vec<(vm_memory::GuestAddress, usize)>)> = Vec::new();
            let mut room = 0usize;
            while room < n && (buffers.is_empty() || mergeable) {
                let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
                let head = chain.head_index();
                let areas: Vec<_> =
                    chain.take_while(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
                room += areas.iter().map(|a| a.1).sum::<usize>();
                buffers.push((head, areas));
            }
            if room < n && mergeable {
                // Not enough buffers yet: they go back, the frame waits for more.
                // Notifications on first, while every buffer the driver has
                // made available is taken, so that its next one is notified
                // (with EVENT_IDX, avail_event is where the ring is taken up
                // to); if it added one meanwhile, try again at once.
                let more = queue.enable_notification(mem).unwrap_or(false);
                for _ in 0..buffers.len() {
                    queue.go_to_previous_position();
                }
                self.pending = Some(n);
                if more {
                    continue;
                }
                self.rx_starved = true;
                break;
            }
            if room < n {
                // Without mergeable buffers, a frame that does not fit its buffer
                // is dropped: the buffer goes back empty (the driver counts a
                // length error).
                self.counters.dropped += 1;
                used |= queue.add_used(mem, buffers[0].0, 0).is_ok();
                continue;
            }
            // num_buffers (§5.1.6.4): how many buffers the frame took.
            if n >= VNET_HDR_LEN {
                self.frame[10..12].copy_from_slice(&(buffers.len() as u16).to_le_bytes());
            }
            let mut written = 0usize;
            for (head, areas) in buffers {
                let mut len = 0usize;
                for (addr, size) in areas {
                    let take = size.min(n - written);
                    if take == 0 || mem.write_slice(&self.frame[written..written + take], addr).is_err() {
                        break;
                    }
                    written += take;
                    len += take;
                }
                used |= queue.add_used(mem, head, len as u32).is_ok();
            }
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += (n - VNET_HDR_LEN.min(n)) as u64;
        }
        used
    }

    /// Frames the guest queued, out to the tap (dropped without one). The
    /// driver's notifications are off while the ring is drained and on again
    /// once it is empty, when the ring is looked at once more (a frame queued
    /// meanwhile came with no notification). After [`BATCH`] frames the turn
    /// ends with them off and [`Net::tx_pending`] set: the I/O thread comes
    /// back for the rest.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut budget = BATCH;
        loop {
            let _ = queue.disable_notification(mem);
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.send_frame(chain, mem);
                used |= queue.add_used(mem, head, 0).is_ok();
                budget -= 1;
                if budget == 0 {
                    self.tx_pending = true;
                    return used;
                }
            }
            if !queue.enable_notification(mem).unwrap_or(false) {
                self.tx_pending = false;
                return used;
            }
        }
    }

    /// One frame the guest queued, out to the tap; counted as dropped if it
    /// cannot be read, is too large, or the tap refuses it.
    fn send_frame(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        let mut len = 0usize;
        let mut fits = true;
        for d in chain {
            if d.is_write_only() {
                break;
            }
            let dl = d.len() as usize;
            if len + dl > self.frame.len() || mem.read_slice(&mut self.frame[len..len + dl], d.addr()).is_err() {
                fits = false;
                break;
            }
            len += dl;
        }
        let sent = match (&self.tap, fits && len > VNET_HDR_LEN) {
            (Some(tap), true) => match tap.write(&self.frame[..len]) {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!("tap {}: a frame of {len} bytes was refused: {e}", tap.name());
                    false
                }
            },
            _ => false,
        };
        if sent {
            self.counters.tx_frames += 1;
            self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
        } else {
            self.counters.dropped += 1;
        }
    }

    /// Control commands (§5.1.6.5): the announcement's acknowledgement; any
    /// other command is answered VIRTIO_NET_ERR.
    fn control(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let command: Option<[u8; 2]> =
                descs.first().filter(|d| !d.is_write_only()).and_then(|d| mem.read_obj(d.addr()).ok());
            let ack = match command {
                Some([class, cmd])
                    if u32::from(class) == VIRTIO_NET_CTRL_ANNOUNCE
                        && u32::from(cmd) == VIRTIO_NET_CTRL_ANNOUNCE_ACK =>
                {
                    self.status &= !(VIRTIO_NET_S_ANNOUNCE as u16);
                    VIRTIO_NET_OK as u8
                }
                _ => VIRTIO_NET_ERR as u8,
            };
            let len = match descs.last().filter(|d| d.is_write_only()) {
                Some(d) if mem.write_obj(ack, d.addr()).is_ok() => 1,
                _ => 0,
            };
            used |= queue.add_used(mem, head, len).is_ok();
        }
        used
    }
}

/// The tap offloads (`TUN_F_*`) that match the guest's receive features: the
/// host may hand it frames with partial checksums or larger than the MTU only
/// if its driver said it takes them.
fn tap_offloads(features: u64) -> u32 {
    let has = |f: u32| features & (1 << f) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn device_features(&self) -> u64 {
        FEATURES
    }

    /// `struct virtio_net_config`: the MAC, then the status.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&self.status.to_le_bytes());
        data.fill(0);
        let off = offset as usize;
        if off < config.len() {
            let n = data.len().min(config.len() - off);
            data[..n].copy_from_slice(&config[off..off + n]);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            CTRL_QUEUE => self.control(queue, mem),
            _ => false,
        }
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        self.offloads_applied = false;
        self.apply_offloads();
    }

    fn reset(&mut self) {
        self.features = 0;
        self.offloads_applied = false;
        self.status = VIRTIO_NET_S_LINK_UP as u16;
        self.rx_starved = false;
        self.pending = None;
        self.tx_pending = false;
    }
}

#[cfg(test)]
mod tests;
