//! Well-formed inputs for the targets: the first entries of their corpora,
//! from which the fuzzer mutates its way into the parsers' deep paths.

use devices::GuestMemoryMmap;
use migrate::protocol::{encode_header, encode_page_table, FrameKind, Hello, PageEntry};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Address, Bytes, GuestAddress};

/// Every seed, with the name of its target.
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = vec![("migration_stream", migration_stream()), ("virtio_block", virtio_read())];
    seeds.extend(api_requests().into_iter().map(|r| ("api_request", r)));
    seeds.push(("checkpoint_dir", checkpoint_dir(true)));
    seeds.push(("checkpoint_dir", checkpoint_dir(false)));
    // Last, so that the seeds before it keep their numbers.
    seeds.push(("virtio_net", virtio_net_frame_and_announce_ack()));
    seeds
}

/// Requests a client sends: a status query and a checkpoint with a body.
pub fn api_requests() -> Vec<Vec<u8>> {
    let body = br#"{"out":"/tmp/ckpt","strategy":"cevm","writer_cpus":[1]}"#;
    let mut put = format!("PUT /v1/checkpoint HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    put.extend_from_slice(body);
    vec![b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), put]
}

/// The checkpoint the restore-fixture test keeps (a digest guest taken by
/// cevm f3e6526), its manifest and state packed as the target reads them;
/// memory.img is made by the target (all zeros), so only the re-sealed form
/// verifies.
pub fn checkpoint_dir(reseal: bool) -> Vec<u8> {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cevm/tests/fixtures/main-f3e6526");
    let mut out = vec![u8::from(reseal)];
    for name in [snapshot::MANIFEST_FILE, snapshot::STATE_FILE] {
        let bytes = std::fs::read(fixture.join(name)).expect("the restore fixture");
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_header(kind, &[payload]).to_vec();
    f.extend_from_slice(payload);
    f
}

/// A source's stream: Hello, a Pages frame of one zero and one data page, Sync, Done.
pub fn migration_stream() -> Vec<u8> {
    let hello = Hello {
        cevm_version: "fuzz".into(),
        config: vmm::InstanceConfig {
            boot: vmm::Boot::Builtin { guest: "digest".into(), args: String::new() },
            mem_size: 64 << 20,
            vcpus: 1,
            memory_backend: Default::default(),
            disk: None,
            nics: vec![],
        },
        cevm: false,
        nic_offloads: vec![],
    };
    let mut pages = encode_page_table(&[PageEntry { gpa: 0, zero: true }, PageEntry { gpa: 0x1000, zero: false }]);
    pages.extend(std::iter::repeat_n(0xa5, 4096));
    let mut s = frame(FrameKind::Hello, &serde_json::to_vec(&hello).expect("Hello serializes"));
    s.extend(frame(FrameKind::Pages, &pages));
    s.extend(frame(FrameKind::Sync, &[]));
    s.extend(frame(FrameKind::Done, &[]));
    s
}

/// How many frames of the stream seed decode.
pub fn migration_stream_decodes() -> usize {
    crate::migration::decoded(&migration_stream())
}

// Where the virtio seed puts its queue and request.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const NOT_YET: u8 = 0xff;

/// Memory holding one virtio-blk read of sector 0 into DATA, then a driver's
/// setup of queue 0 (virtio spec 3.1.1 and 4.2.3) and a notification.
pub fn virtio_read() -> Vec<u8> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x7000)]).expect("memory");
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = GuestAddress(DESC + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    desc(0, HEADER, 16, NEXT, 1);
    desc(1, DATA, 512, NEXT | WRITE, 2);
    desc(2, STATUS, 1, WRITE, 0);
    mem.write_obj(0u32, GuestAddress(HEADER)).unwrap(); // VIRTIO_BLK_T_IN
    mem.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap(); // sector 0
    mem.write_obj(NOT_YET, GuestAddress(STATUS)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx 1, ring[0] = 0
    let mut image = vec![0u8; 0x7000];
    mem.read_slice(&mut image, GuestAddress(0)).unwrap();

    let mut input = vec![0u8];
    input.extend_from_slice(&(image.len() as u16).to_le_bytes());
    input.extend_from_slice(&image);
    let mut w = |reg: u32, v: u32| {
        input.extend_from_slice(&[0, (reg / 4) as u8]);
        input.extend_from_slice(&v.to_le_bytes());
    };
    w(VIRTIO_MMIO_STATUS, 1 | 2);
    w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    w(VIRTIO_MMIO_QUEUE_SEL, 0);
    w(VIRTIO_MMIO_QUEUE_NUM, 8);
    w(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    w(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    w(VIRTIO_MMIO_QUEUE_READY, 1);
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    input
}

/// Whether the device served the seed's read: the used ring holds it and its
/// status byte says OK.
pub fn virtio_read_is_served() -> bool {
    let Some(mem) = crate::virtio::run(&virtio_read()) else { return false };
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    used_idx == 1 && status == 0
}

// Where the virtio-net seed puts its transmit queue (the control queue uses
// the block seed's places).
const TX_DESC: u64 = 0x1800;
const TX_AVAIL: u64 = 0x2800;
const TX_USED: u64 = 0x3800;

/// Memory holding one frame to send (transmit queue) and the acknowledgement
/// of an announcement (control queue), then a driver's setup of both queues
/// with VERSION_1, MAC, CTRL_VQ and GUEST_ANNOUNCE, and their notifications.
pub fn virtio_net_frame_and_announce_ack() -> Vec<u8> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x7000)]).expect("memory");
    let desc = |table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = GuestAddress(table + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    // Control: class VIRTIO_NET_CTRL_ANNOUNCE (3), command ACK (0), then the ack byte.
    desc(DESC, 0, HEADER, 2, NEXT, 1);
    desc(DESC, 1, STATUS, 1, WRITE, 0);
    mem.write_obj([3u8, 0u8], GuestAddress(HEADER)).unwrap();
    mem.write_obj(NOT_YET, GuestAddress(STATUS)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    // Transmit: a 12-byte header and a 60-byte frame in one buffer.
    desc(TX_DESC, 0, DATA, 72, 0, 0);
    mem.write_obj(1u16, GuestAddress(TX_AVAIL + 2)).unwrap();
    let mut image = vec![0u8; 0x7000];
    mem.read_slice(&mut image, GuestAddress(0)).unwrap();

    let mut input = vec![0u8];
    input.extend_from_slice(&(image.len() as u16).to_le_bytes());
    input.extend_from_slice(&image);
    let mut w = |reg: u32, v: u32| {
        input.extend_from_slice(&[0, (reg / 4) as u8]);
        input.extend_from_slice(&v.to_le_bytes());
    };
    w(VIRTIO_MMIO_STATUS, 1 | 2);
    w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5 | 1 << 17 | 1 << 21); // MAC, CTRL_VQ, GUEST_ANNOUNCE
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    for (q, d, a, u) in [(1, TX_DESC, TX_AVAIL, TX_USED), (2, DESC, AVAIL, USED)] {
        w(VIRTIO_MMIO_QUEUE_SEL, q);
        w(VIRTIO_MMIO_QUEUE_NUM, 8);
        w(VIRTIO_MMIO_QUEUE_DESC_LOW, d as u32);
        w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, a as u32);
        w(VIRTIO_MMIO_QUEUE_USED_LOW, u as u32);
        w(VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w(VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    input
}

/// Whether the device served the net seed: the frame's buffer came back, and
/// the announcement's acknowledgement was answered VIRTIO_NET_OK.
pub fn virtio_net_seed_is_served() -> bool {
    let Some(mem) = crate::virtio::run_net(&virtio_net_frame_and_announce_ack()) else { return false };
    let tx_used: u16 = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap();
    let ctrl_used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let ack: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    tx_used == 1 && ctrl_used == 1 && ack == 0
}
