//! The virtio devices behind their MMIO transport, driven by a hostile guest:
//! the guest's memory (descriptor tables, rings, request headers, frames) and
//! its register accesses come from the fuzzer, as does, in the second mode, a
//! saved transport state read back from a forged checkpoint. virtio-blk works
//! on a raw image; virtio-net has no tap (its transmit queue is walked and its
//! frames dropped, its control queue answered), as between a migration's
//! switch and the destination's start.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioResources, MmioState, MmioTransport};
use devices::virtio::net::{MacAddr, Net};
use devices::virtio::VirtioDevice;
use devices::{Device, GuestMemoryMmap, MmioDevice, Persist};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory of the fuzzed VM: 64 KiB at guest-physical 0.
const MEM_SIZE: usize = 64 << 10;
/// The disk behind the device: 1 MiB, raw.
const DISK_SIZE: u64 = 1 << 20;
/// At most this many register accesses per input (the fuzzer finds long
/// inputs slow, not interesting).
const MAX_OPS: usize = 4096;

/// A raw disk image for the device, made once per process.
fn disk_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("cevm-fuzz-virtio-{}.raw", std::process::id()));
        let f = std::fs::File::create(&p).expect("create the fuzz disk");
        f.set_len(DISK_SIZE).expect("size the fuzz disk");
        p
    })
}

fn block_device() -> Block {
    let image = disk::Disk::open(disk_path(), true).expect("open the fuzz disk");
    Block::new(Arc::new(disk::GuestDisk::plain(image)), "fuzz")
}

fn transport<D: VirtioDevice>(device: D, state: Option<&MmioState>, mem: GuestMemoryMmap) -> Option<MmioTransport<D>> {
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let resources = MmioResources { device, mem, irq };
    match state {
        None => Some(MmioTransport::create(resources)),
        Some(s) => MmioTransport::restore(resources, s).ok(),
    }
}

/// Input: a mode byte, a little-endian u16 `n`, then `n` bytes of guest memory
/// (copied at guest-physical 0); the rest is, in mode 0, register accesses of
/// 6 bytes each (`op`, `register / 4`, `u32` value: op bit 0 clear writes, set
/// reads); in mode 1, a saved transport state as JSON, restored, after which
/// every queue is notified.
pub fn block(data: &[u8]) {
    drop(run(data));
}

/// [`block`], giving back the guest's memory afterwards.
pub fn run(data: &[u8]) -> Option<GuestMemoryMmap> {
    drive(data, block_device)
}

/// As [`block`], of a virtio-net device without a tap.
pub fn net(data: &[u8]) {
    drop(run_net(data));
}

/// [`net`], giving back the guest's memory afterwards.
pub fn run_net(data: &[u8]) -> Option<GuestMemoryMmap> {
    drive(data, || Net::new(MacAddr([0x52, 0x54, 0, 0xce, 0, 1]), None))
}

fn drive<D: VirtioDevice>(data: &[u8], device: impl Fn() -> D) -> Option<GuestMemoryMmap> {
    let (&mode, rest) = data.split_first()?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len()).min(MEM_SIZE);
    let (image, ops) = rest.split_at(n);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(0)).expect("within guest memory");
    let (t, ops) = match mode {
        0 => (transport(device(), None, mem.clone()), ops.to_vec()),
        1 => {
            let state = serde_json::from_slice::<MmioState>(ops).ok()?;
            // The queues of the restored device are notified as a guest would.
            (transport(device(), Some(&state), mem.clone()), notify_all(state.queues.len()))
        }
        _ => return None,
    };
    let mut t = t?;
    for op in ops.chunks_exact(6).take(MAX_OPS) {
        let reg = u64::from(op[1]) * 4;
        if op[0] & 1 == 0 {
            t.write(reg, &op[2..6]);
        } else {
            let mut v = [0u8; 4];
            t.read(reg, &mut v);
        }
    }
    Some(mem)
}

/// Register writes that notify queues `0..n`.
fn notify_all(n: usize) -> Vec<u8> {
    let reg = (virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY / 4) as u8;
    (0..n as u32).flat_map(|q| [0, reg].into_iter().chain(q.to_le_bytes())).collect()
}
