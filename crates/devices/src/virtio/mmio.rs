//! The virtio-mmio transport: the register block of virtio spec 4.2.2, the queues
//! (virtio-queue), and the used-buffer interrupt on an eventfd (a KVM irqfd).
//! Queue notifications are served synchronously on the vCPU that writes them, so
//! a request is complete when the guest's notifying instruction is: a paused
//! instance never has a request in flight.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::persist::{Device, Persist};
use crate::{IoAction, MmioDevice};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4543; // "CEVM"
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;

/// Saved state of one queue (virtio-queue's own state struct has no serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

/// Saved state of the transport (registers and queues).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
}

impl MmioState {
    /// The queues this state holds, each set up and checked as virtio-queue
    /// checks a guest's settings, for a device of `count` queues: what
    /// [`Persist::restore`] loads, and what a saved state's check runs without a
    /// device.
    pub fn queues(&self, count: usize) -> Result<Vec<Queue>, Error> {
        if self.queues.len() != count {
            return Err(Error::Queue {
                index: self.queues.len(),
                reason: format!("wrong number of queues (the device has {count})"),
            });
        }
        let mut queues = Vec::with_capacity(count);
        for (index, qs) in self.queues.iter().enumerate() {
            let bad = |e: virtio_queue::Error| Error::Queue { index, reason: e.to_string() };
            let mut q = Queue::new(qs.max_size).map_err(bad)?;
            q.try_set_size(qs.size).map_err(bad)?;
            q.try_set_desc_table_address(GuestAddress(qs.desc_table)).map_err(bad)?;
            q.try_set_avail_ring_address(GuestAddress(qs.avail_ring)).map_err(bad)?;
            q.try_set_used_ring_address(GuestAddress(qs.used_ring)).map_err(bad)?;
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            q.set_event_idx(qs.event_idx_enabled);
            q.set_ready(qs.ready);
            queues.push(q);
        }
        Ok(queues)
    }
}

/// A virtio device behind its MMIO register block.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue of the saved state is not valid.
    #[error("virtio queue {index}: {reason}")]
    Queue { index: usize, reason: String },
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport in its reset state.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = device.queue_max_sizes().iter().map(|&m| Queue::new(m).expect("valid queue size")).collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, to change.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has set the device up (DRIVER_OK) and not reset it.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Whether queue `index` is served: the driver set the device up and the
    /// queue ready.
    pub fn queue_live(&self, index: usize) -> bool {
        self.driver_ok() && self.queues.get(index).is_some_and(|q| q.ready())
    }

    /// Tells the driver that the configuration space changed (virtio 1.2
    /// §4.2.2.1: the generation moves on, the interrupt status says why).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        // As for a used buffer: a lost write is the irqfd's failure.
        let _ = self.irq.write(1);
    }

    fn features(&self) -> u64 {
        self.device.device_features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
        self.device.reset();
    }

    /// Serves queue `index` as a notification from the driver asks: on the
    /// vCPU that wrote QueueNotify, or on a device's I/O thread woken by the
    /// same write through an ioeventfd, or by its backend (a frame arrived).
    pub fn serve_queue(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(queue) = self.queues.get_mut(index) else { return };
        if !queue.ready() {
            return;
        }
        if self.device.process_queue(index, queue, &self.mem) && driver_wants_interrupt(queue, &self.mem, event_idx) {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            // A lost interrupt is the irqfd's failure, not the guest's: it sees the used
            // ring the next time it looks.
            let _ = self.irq.write(1);
        }
    }
}

/// Whether the driver wants an interrupt for the buffers just used (§2.7.7,
/// §2.7.10). With VIRTIO_RING_F_EVENT_IDX its used_event says, as
/// virtio-queue's `needs_notification` reads it. Without, the avail ring's
/// VRING_AVAIL_F_NO_INTERRUPT flag says, and virtio-queue 0.18 does not read it
/// (it answers yes), so it is read here, after that call's fence has ordered
/// the used ring's writes before it. Linux's driver sets the flag while it
/// polls the ring (NAPI, a block completion loop), and clears it and looks at
/// the used ring once more before it waits for an interrupt again: an
/// interrupt left out here is never one it waits for, only one that would
/// have interrupted its polling (QEMU's devices skip it too). A ring that
/// cannot be read gets one, so that the driver looks.
fn driver_wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap, event_idx: bool) -> bool {
    let wants = queue.needs_notification(mem).unwrap_or(true);
    if !wants || event_idx {
        return wants;
    }
    match mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// What a virtio-mmio transport is built on: the device behind it, guest memory
/// (for the queues), and its interrupt line (an eventfd the VMM registers as a
/// KVM irqfd).
pub struct MmioResources<D> {
    pub device: D,
    pub mem: GuestMemoryMmap,
    pub irq: EventFd,
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type Resources = MmioResources<D>;
    type Error = Error;

    fn save(&self) -> Result<MmioState, Error> {
        Ok(MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx_enabled: q.event_idx_enabled(),
                })
                .collect(),
        })
    }

    fn restore(resources: MmioResources<D>, s: &MmioState) -> Result<Self, Error> {
        let mut t = Self::create(resources);
        t.queues = s.queues(t.queues.len())?;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.driver_features = s.driver_features;
        t.queue_sel = s.queue_sel;
        t.status = s.status;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        if t.driver_ok() {
            t.device.activate(t.driver_features);
        }
        Ok(t)
    }
}

impl<D: VirtioDevice> Device for MmioTransport<D> {
    fn create(resources: MmioResources<D>) -> Self {
        MmioTransport::new(resources.device, resources.mem, resources.irq)
    }

    /// Raises the interrupt line again if the guest has not yet acknowledged the
    /// interrupt status: as with the UART (see `Serial`'s), the irqfd's
    /// asynchronous delivery of an interrupt raised just before the source paused
    /// can miss the saved irqchip, and the guest's virtio requests would wait for
    /// it forever.
    fn reassert_pending_interrupt(&self) -> std::io::Result<()> {
        if self.interrupt_status != 0 {
            self.irq.write(1)?;
        }
        Ok(())
    }
}

fn set_half(v: &mut u64, high: bool, x: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(x);
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(self.queue_sel as usize).map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return IoAction::None; // the devices' configuration spaces are read-only
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return IoAction::None };
        let v = u32::from_le_bytes(bytes);
        let features_open = self.status & STATUS_FEATURES_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open && self.driver_features_sel < 2 => {
                let offered = self.features();
                set_half(&mut self.driver_features, self.driver_features_sel == 1, v);
                self.driver_features &= offered;
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let high = offset as u32 == VIRTIO_MMIO_QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address((!high).then_some(v), high.then_some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let high = offset as u32 == VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let high = offset as u32 == VIRTIO_MMIO_QUEUE_USED_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.serve_queue(v as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => {
                if v == 0 {
                    self.reset();
                } else {
                    let activates = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
                    self.status = v;
                    if activates {
                        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                        for q in &mut self.queues {
                            q.set_event_idx(event_idx);
                        }
                        self.device.activate(self.driver_features);
                    }
                }
            }
            _ => {}
        }
        IoAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::raised;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device whose every queue notification uses a buffer.
    struct AlwaysUses;

    impl VirtioDevice for AlwaysUses {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn device_features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process_queue(&mut self, _index: usize, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
            true
        }
    }

    fn transport(irq: &EventFd, state: Option<&MmioState>) -> MmioTransport<AlwaysUses> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = irq.try_clone().unwrap();
        let resources = MmioResources { device: AlwaysUses, mem, irq };
        match state {
            Some(s) => MmioTransport::restore(resources, s).unwrap(),
            None => MmioTransport::create(resources),
        }
    }

    fn write(t: &mut MmioTransport<AlwaysUses>, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    #[test]
    fn a_restored_transport_raises_again_only_an_interrupt_the_guest_has_not_acknowledged() {
        let src_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut src = transport(&src_irq, None);
        write(&mut src, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut src, VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut src, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        write(&mut src, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(raised(&src_irq), "a used buffer raises the interrupt");

        // Saved before the guest acknowledged it: the destination raises it again.
        let pending = src.save().unwrap();
        assert_eq!(pending.interrupt_status, VIRTIO_MMIO_INT_VRING);
        let dst_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dst = transport(&dst_irq, Some(&pending));
        assert!(!raised(&dst_irq), "restoring alone raises nothing");
        dst.reassert_pending_interrupt().unwrap();
        assert!(raised(&dst_irq));

        // Saved after the acknowledgement: nothing to raise.
        write(&mut src, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        let taken = src.save().unwrap();
        let dst_irq = EventFd::new(EFD_NONBLOCK).unwrap();
        transport(&dst_irq, Some(&taken)).reassert_pending_interrupt().unwrap();
        assert!(!raised(&dst_irq));
    }

    #[test]
    fn a_driver_that_polls_the_ring_gets_no_interrupt_until_it_asks_again() {
        const AVAIL: u32 = 0x2000;
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = transport(&irq, None);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let flags = GuestAddress(u64::from(AVAIL));

        // Polling (NAPI): the avail ring's flags say no interrupt.
        t.mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, flags).unwrap();
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(!raised(&irq), "a used buffer raised the interrupt the driver had turned off");
        assert_eq!(t.interrupt_status, 0);

        // Waiting again: the next used buffer raises it.
        t.mem.write_obj(0u16, flags).unwrap();
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(raised(&irq), "a used buffer did not raise the interrupt the driver waits for");
        assert_eq!(t.interrupt_status, VIRTIO_MMIO_INT_VRING);
    }
}
