//! virtio devices on the virtio-mmio transport (version 2, "modern").

pub mod block;
pub mod mmio;
pub mod net;

use crate::GuestMemoryMmap;
use virtio_queue::Queue;

/// What a virtio device is, apart from its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Reads its configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves every available request of queue `index`; returns whether any was used.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver accepted `features` and set DRIVER_OK (or a restored
    /// transport was in that state): the device starts working with them.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
}
