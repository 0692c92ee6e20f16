//! The migration stream: frames with a fixed header, a protocol version and a
//! CRC32 each, and the payloads of each frame kind. No I/O here: encoding and
//! decoding only, so every check is unit-tested on bytes.
//!
//! ```text
//! header (32 bytes, little endian)
//!   0  magic    "CVMG"
//!   4  version  u32   PROTOCOL_VERSION
//!   8  kind     u32   FrameKind
//!  12  reserved u32   0
//!  16  length   u64   payload bytes
//!  24  crc32    u32   over header bytes 0..24 and the payload
//!  28  reserved u32   0
//! payload (length bytes)
//! ```
//!
//! A session: source `Hello` → destination `Ready` (it could set up memory) →
//! source `Pages`... (pre-copy rounds, each closed by `Sync` → `Synced`) → the
//! switch: last `Pages`, `State`, `Done` → destination `Resumed` once its vCPUs run. Either side may send `Error`
//! instead and end the session. After the switch of a CEVM checkpoint of a guest
//! with a disk (`Hello::cevm`), the disk hand-over's messages follow as `Disk`
//! frames both ways until it ends. A switch held for a group's cut
//! (`Done`'s `hold`) leaves the new instance paused after `Resumed` until the
//! source's `Release` (before any `Disk` frame).

use serde::{Deserialize, Serialize};
use vmm::persist::codec::{self, CodecError, Encoding};

/// Version of the migration stream. A peer speaking another version is refused.
pub const PROTOCOL_VERSION: u32 = 5;
/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CVMG";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest payload a receiver accepts; a larger length is a corrupt header.
pub const MAX_PAYLOAD: u64 = 256 << 20;
/// Guest page size the stream moves.
pub const PAGE_SIZE: usize = 4096;
/// Marks a page entry as all-zero (no data follows for it).
const ZERO_PAGE_FLAG: u64 = 1;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Source → destination: [`Hello`].
    Hello = 1,
    /// Destination → source: memory is set up, send pages.
    Ready = 2,
    /// Source → destination: a batch of guest pages ([`encode_pages`]).
    Pages = 3,
    /// Source → destination: the instance state, in the binary encoding of
    /// `vmm::persist::codec`, with its own state version (KVM's state structs
    /// travel as raw bytes, which JSON would spell out number by number, in the
    /// middle of the guest's downtime).
    State = 4,
    /// Source → destination: everything is sent; start the guest.
    Done = 5,
    /// Destination → source: the guest runs here now ([`Resumed`]).
    Resumed = 6,
    /// Either way: the sender gives up; the payload says why ([`ErrorMsg`]).
    Error = 7,
    /// Source → destination: answer `Synced` once every earlier frame is in memory.
    Sync = 8,
    /// Destination → source: every frame before the `Sync` is in memory.
    Synced = 9,
    /// Either way, after the switch of a CEVM checkpoint: a message of the disk
    /// hand-over (`disk::integration::FromOld` or `integrate::ToOld`, postcard).
    Disk = 10,
    /// Source → destination, after a switch held for a group's cut (`Done`'s
    /// `hold`): the group's members have all switched; run the guest.
    Release = 11,
}

impl FrameKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Ready,
            3 => FrameKind::Pages,
            4 => FrameKind::State,
            5 => FrameKind::Done,
            6 => FrameKind::Resumed,
            7 => FrameKind::Error,
            8 => FrameKind::Sync,
            9 => FrameKind::Synced,
            10 => FrameKind::Disk,
            11 => FrameKind::Release,
            _ => return None,
        })
    }
}

/// Problems with the bytes of a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with a cevm migration frame.
    #[error("not a cevm migration stream (bad magic {0:02x?})")]
    Magic([u8; 4]),
    /// The peer speaks another version of the stream.
    #[error("the peer speaks migration protocol version {theirs}, this cevm speaks version {ours}")]
    Version { theirs: u32, ours: u32 },
    /// The kind field names no frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u32),
    /// The length field is implausible.
    #[error("frame length {0} exceeds the limit of {MAX_PAYLOAD} bytes (corrupt header)")]
    Length(u64),
    /// Header or payload changed in transit.
    #[error("frame ({kind:?}, {len} bytes) fails its checksum: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { kind: FrameKind, len: u64, stored: u32, computed: u32 },
    /// A payload does not decode.
    #[error("malformed {kind:?} frame: {reason}")]
    Payload { kind: FrameKind, reason: String },
    /// The `State` frame holds no instance state this cevm reads.
    #[error("State frame: {0}")]
    State(#[source] CodecError),
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub len: u64,
    pub crc: u32,
}

/// The header of a frame of `kind` whose payload is `parts` (in order).
pub fn encode_header(kind: FrameKind, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(kind as u32).to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..24]);
    for p in parts {
        crc.update(p);
    }
    h[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Checks and decodes a header (magic, version, kind, length). The checksum is
/// checked with the payload by [`check_payload`].
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let version = u32_at(4);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version { theirs: version, ours: PROTOCOL_VERSION });
    }
    let kind = FrameKind::from_u32(u32_at(8)).ok_or(FrameError::Kind(u32_at(8)))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&h[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(FrameError::Length(len));
    }
    Ok(Header { kind, len, crc: u32_at(24) })
}

/// Checks the CRC of a frame: `h` its raw header, `payload` its payload.
pub fn check_payload(h: &[u8; HEADER_LEN], header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..24]);
    crc.update(payload);
    let computed = crc.finalize();
    if computed != header.crc {
        return Err(FrameError::Checksum { kind: header.kind, len: header.len, stored: header.crc, computed });
    }
    Ok(())
}

/// The source's first frame: who it is and what it migrates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The source's cevm version (informational; the protocol version is in every header).
    pub cevm_version: String,
    /// The guest configuration (`vmm::InstanceConfig`).
    pub config: vmm::InstanceConfig,
    /// A CEVM checkpoint's migration: the destination writes the guest's disk
    /// into a new overlay U, and the disk hand-over follows the switch.
    #[serde(default)]
    pub cevm: bool,
    /// The offloads set on each of the source's NIC taps (`TUN_F_*`), for
    /// the destination to set on its own taps before the switch rather than in it.
    #[serde(default)]
    pub nic_offloads: Vec<Option<u32>>,
}

/// The destination's last frame: the guest runs there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resumed {
    /// From `Done` received to vCPUs running, on the destination's clock.
    pub restore_ms: f64,
    /// Decoding the `State` frame (before `Done`), on the destination's clock.
    #[serde(default)]
    pub state_decode_ms: f64,
    /// When the destination's vCPUs were started, on its CLOCK_MONOTONIC (µs):
    /// the downtime's end, exact when the source shares that clock.
    #[serde(default)]
    pub started_at_us: u64,
    /// The CPUs each destination vCPU thread may run on.
    #[serde(default)]
    pub vcpu_cpus: Vec<Vec<usize>>,
}

/// This host's CLOCK_MONOTONIC in µs: one clock for every process here (unlike
/// `Instant`, whose value cannot be sent), to time a switch across processes.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Encodes the instance state for a `State` frame (the state codec's binary
/// encoding, current state version).
pub fn encode_state(state: &vmm::InstanceState) -> Result<Vec<u8>, FrameError> {
    codec::encode(state, Encoding::Binary).map_err(FrameError::State)
}

/// Decodes a `State` frame's payload: a state of the current or the previous
/// state version.
pub fn decode_state(payload: &[u8]) -> Result<vmm::InstanceState, FrameError> {
    codec::decode(payload, Encoding::Binary).map_err(FrameError::State)
}

/// Payload of an `Error` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub error: String,
}

/// One page of a `Pages` frame: its guest-physical address, and whether it is all
/// zeros (a marker, no data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    pub gpa: u64,
    pub zero: bool,
}

/// The table of a `Pages` frame: `u32` count, `u32` 0, then one `u64` per page
/// (its page-aligned guest-physical address, bit 0 set for a zero page). The data
/// of the non-zero pages follows the table, in table order, `PAGE_SIZE` bytes each
/// (copied out of guest memory once, into the frame).
pub fn encode_page_table(entries: &[PageEntry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + 8 * entries.len());
    t.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        t.extend_from_slice(&(e.gpa | if e.zero { ZERO_PAGE_FLAG } else { 0 }).to_le_bytes());
    }
    t
}

/// Decodes a `Pages` payload into its entries and the data of its non-zero pages.
pub fn decode_pages(payload: &[u8]) -> Result<(Vec<PageEntry>, &[u8]), FrameError> {
    let bad = |reason: String| FrameError::Payload { kind: FrameKind::Pages, reason };
    if payload.len() < 8 {
        return Err(bad(format!("{} bytes, shorter than its table header", payload.len())));
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    let table_end = 8 + 8 * count;
    if payload.len() < table_end {
        return Err(bad(format!("table of {count} pages does not fit in {} bytes", payload.len())));
    }
    let mut entries = Vec::with_capacity(count);
    for c in payload[8..table_end].chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_le_bytes(w);
        if v & (PAGE_SIZE as u64 - 1) & !ZERO_PAGE_FLAG != 0 {
            return Err(bad(format!("page address {v:#x} is not page-aligned")));
        }
        entries.push(PageEntry { gpa: v & !(PAGE_SIZE as u64 - 1), zero: v & ZERO_PAGE_FLAG != 0 });
    }
    let data = &payload[table_end..];
    let with_data = entries.iter().filter(|e| !e.zero).count();
    if data.len() != with_data * PAGE_SIZE {
        return Err(bad(format!(
            "{with_data} data pages need {} bytes, the frame has {}",
            with_data * PAGE_SIZE,
            data.len()
        )));
    }
    Ok((entries, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, payload: &[u8]) -> ([u8; HEADER_LEN], Vec<u8>) {
        (encode_header(kind, &[payload]), payload.to_vec())
    }

    #[test]
    fn a_frame_round_trips_and_its_parts_checksum_as_one() {
        let (h, p) = frame(FrameKind::State, b"{\"x\":1}");
        let hd = decode_header(&h).unwrap();
        assert_eq!(hd.kind, FrameKind::State);
        assert_eq!(hd.len, 7);
        check_payload(&h, &hd, &p).unwrap();
        // Split parts give the same header as one buffer.
        assert_eq!(encode_header(FrameKind::State, &[b"{\"x\"", b":1}"]), h);
    }

    #[test]
    fn every_damaged_field_is_refused_by_name() {
        let (h, p) = frame(FrameKind::Pages, &encode_page_table(&[]));
        let mut m = h;
        m[0] = b'X';
        assert!(matches!(decode_header(&m), Err(FrameError::Magic(_))));
        let mut v = h;
        v[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(decode_header(&v), Err(FrameError::Version { theirs: 7, ours: PROTOCOL_VERSION }));
        assert!(decode_header(&v).unwrap_err().to_string().contains("version 7"));
        let mut k = h;
        k[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(decode_header(&k), Err(FrameError::Kind(99)));
        let mut l = h;
        l[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(decode_header(&l), Err(FrameError::Length(_))));
        // A flipped payload bit, and a flipped reserved header bit, fail the checksum.
        let hd = decode_header(&h).unwrap();
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert!(matches!(check_payload(&h, &hd, &bad), Err(FrameError::Checksum { .. })));
        let mut r = h;
        r[12] ^= 1;
        assert!(matches!(check_payload(&r, &decode_header(&r).unwrap(), &p), Err(FrameError::Checksum { .. })));
    }

    #[test]
    fn page_tables_round_trip_and_bad_ones_are_refused() {
        let entries = [
            PageEntry { gpa: 0x1000, zero: false },
            PageEntry { gpa: 0x2000, zero: true },
            PageEntry { gpa: 0x1_0000_0000, zero: false },
        ];
        let mut payload = encode_page_table(&entries);
        payload.extend(std::iter::repeat_n(0xab, 2 * PAGE_SIZE));
        let (got, data) = decode_pages(&payload).unwrap();
        assert_eq!(got, entries);
        assert_eq!(data.len(), 2 * PAGE_SIZE);
        // Missing data, an unaligned address, a table longer than the frame.
        assert!(decode_pages(&payload[..payload.len() - 1]).is_err());
        let mut unaligned = encode_page_table(&[PageEntry { gpa: 0x1000, zero: true }]);
        unaligned[8] = 0x11;
        assert!(decode_pages(&unaligned).unwrap_err().to_string().contains("page-aligned"));
        let mut long = encode_page_table(&[]);
        long[0] = 200;
        assert!(decode_pages(&long).is_err());
        assert!(decode_pages(&[1, 2]).is_err());
    }
}
