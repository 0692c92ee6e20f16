//! virtio-blk over a [`disk::GuestDisk`] (raw or qcow2 through imago, or a new
//! instance's overlay while a CEVM integration runs): read, write, flush (a real
//! fsync of the image) and get-id. Requests are served synchronously on the vCPU
//! thread that notified the queue; one that needs data the old instance still
//! holds waits for it there, as it would wait for a slow disk.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

use crate::GuestMemoryMmap;

use super::VirtioDevice;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// The maximum size of each of the device's queues (it has one).
pub const QUEUE_MAX_SIZES: &[u16] = &[QUEUE_SIZE];
/// Bytes of a request header: type, reserved, sector.
const HEADER_LEN: u32 = 16;

/// A virtio block device.
pub struct Block {
    disk: Arc<disk::GuestDisk>,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 8],
}

impl Block {
    /// A block device on `disk`, whose get-id answer is `id` (at most 20 bytes kept).
    pub fn new(disk: Arc<disk::GuestDisk>, id: &str) -> Self {
        let mut idb = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(idb.len());
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        let config = (disk.size() / SECTOR).to_le_bytes();
        Block { disk, id: idb, config }
    }

    /// The disk behind the device.
    pub fn disk(&self) -> &Arc<disk::GuestDisk> {
        &self.disk
    }

    /// Puts the device on another disk of the same size (a copy-on-write
    /// checkpoint's switch to a fresh overlay), returning the one it had. The
    /// caller makes sure no request is being served (the vCPUs, which serve
    /// them, are paused).
    pub fn replace_disk(&mut self, disk: Arc<disk::GuestDisk>) -> Result<Arc<disk::GuestDisk>, String> {
        if disk.size() != self.disk.size() {
            return Err(format!("the new disk has {} bytes, the device's {}", disk.size(), self.disk.size()));
        }
        Ok(std::mem::replace(&mut self.disk, disk))
    }

    /// Serves one request; returns (bytes written to the guest, status).
    fn serve(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<(u32, u8), ()> {
        let (head, rest) = descs.split_first().ok_or(())?;
        let (status, data) = rest.split_last().ok_or(())?;
        if head.len() < HEADER_LEN || head.is_write_only() || !status.is_write_only() || status.len() < 1 {
            return Err(());
        }
        let kind: u32 = mem.read_obj(head.addr()).map_err(|_| ())?;
        let sector: u64 = mem.read_obj(head.addr().unchecked_add(8)).map_err(|_| ())?;
        let mut offset = sector.checked_mul(SECTOR).ok_or(())?;
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let in_range = offset.checked_add(total).is_some_and(|end| end <= self.disk.size());
        let mut written = 0u32;
        let st = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT if !in_range => VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_T_IN => {
                let mut ok = true;
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    ok = ok
                        && d.is_write_only()
                        && self.disk.read(&mut buf, offset).is_ok()
                        && mem.write_slice(&buf, d.addr()).is_ok();
                    offset += u64::from(d.len());
                    written += d.len();
                }
                if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            VIRTIO_BLK_T_OUT => {
                let mut ok = true;
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    ok = ok
                        && !d.is_write_only()
                        && mem.read_slice(&mut buf, d.addr()).is_ok()
                        && self.disk.write(&buf, offset).is_ok();
                    offset += u64::from(d.len());
                }
                if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.disk.flush().is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(self.id.len());
                    mem.write_slice(&self.id[..n], d.addr()).map_err(|_| ())?;
                    written += n as u32;
                    VIRTIO_BLK_S_OK
                }
                _ => VIRTIO_BLK_S_IOERR,
            },
            _ => VIRTIO_BLK_S_UNSUPP,
        };
        mem.write_obj(st as u8, status.addr()).map_err(|_| ())?;
        Ok((written + 1, st as u8))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if !self.disk.writable() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let off = offset as usize;
        if off < self.config.len() {
            let n = data.len().min(self.config.len() - off);
            data[..n].copy_from_slice(&self.config[off..off + n]);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            // A malformed chain gets no status (there may be nowhere to put it) but is
            // still returned to the guest, so the queue never jams.
            let len = self.serve(mem, &descs).map(|(len, _)| len).unwrap_or(0);
            if queue.add_used(mem, head, len).is_ok() {
                used = true;
            }
        }
        used
    }
}
