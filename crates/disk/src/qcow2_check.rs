//! Checks a qcow2 image's refcounts against what its tables reference, and
//! rebuilds them when they disagree: how cevm makes an overlay whole again
//! after the VMM writing it was killed.
//!
//! Why by hand: imago 0.2.6 (the newest release) writes a new L2 table's L1
//! entry, and a new refblock's reftable entry, while the new cluster's refcount
//! is still only in its refblock cache. A VMM killed between the two leaves an
//! image where `qemu-img check` says "refcount=0 reference=1", and the next
//! writer hands that cluster out again: guest data lands on an L2 table. imago
//! has no check or repair API, and it refuses to open an image whose qcow2 dirty
//! bit is set, even read-only, so qemu's answer (dirty bit, repair on open)
//! would make a killed VMM's disk unreadable to every other cevm path. Instead
//! cevm runs this check before every writable open of a qcow2 image. It reads
//! only metadata (header, L1 and L2 tables, snapshot table, reftable and
//! refblocks: with 64 KiB clusters about 1/8000 of the data) and writes nothing
//! when the image is consistent.
//!
//! The repair never touches guest data or mappings: references are the truth,
//! refcounts are derived from them. New refcount structures are written past
//! the end of the file, made durable, and only then does the header point at
//! them, so a crash during a repair leaves the old (inconsistent, repairable)
//! state. Layout facts follow the qcow2 specification (QEMU's
//! docs/interop/qcow2.txt).

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::Error;

/// L1/L2 entry flag: the cluster's refcount is exactly one (it may be written in place).
const COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// Host offset bits of an L1 entry or a standard L2 entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Incompatible feature bits: dirty, corrupt, external data file, compression type, extended L2.
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_KNOWN: u64 = 1 | 1 << 3 | 1 << 4;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Autoclear feature bit: persistent bitmaps (their clusters are not walked here).
const AUTOCLEAR_BITMAPS: u64 = 1;
/// Bounds on tables read from an untrusted header (qemu's own limits).
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;

/// What a check found in an image (and, from [`repair`], what was fixed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Clusters whose refcount is below the number of references to them
    /// (`qemu-img check`: "refcount=0 reference=1"): a writer could hand them out again.
    pub undercounted: u64,
    /// Clusters whose refcount is above the number of references to them
    /// (`qemu-img check`: leaked clusters).
    pub leaked: u64,
    /// Reftable entries that point where no refcount block can be.
    pub bad_reftable_entries: u64,
    /// L1/L2 entries whose COPIED flag disagrees with their cluster's refcount.
    pub copied_flags: u64,
    /// The header's dirty bit was set (qemu's lazy refcounts).
    pub dirty: bool,
    /// Where the rebuilt refcount table went, when the refcounts were rebuilt.
    pub rebuilt_at: Option<u64>,
}

impl Report {
    /// Whether the image needed nothing.
    pub fn is_clean(&self) -> bool {
        self.undercounted == 0
            && self.leaked == 0
            && self.bad_reftable_entries == 0
            && self.copied_flags == 0
            && !self.dirty
    }

    fn refcounts_wrong(&self) -> bool {
        self.undercounted > 0 || self.leaked > 0 || self.bad_reftable_entries > 0
    }
}

/// `n` and a noun, in the singular for one.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.undercounted > 0 {
            parts.push(format!(
                "{} in use with a refcount below the references to it",
                count(self.undercounted, "cluster", "clusters")
            ));
        }
        if self.leaked > 0 {
            parts.push(format!("{} leaked", count(self.leaked, "cluster", "clusters")));
        }
        if self.bad_reftable_entries > 0 {
            parts.push(format!(
                "{} pointing nowhere",
                count(self.bad_reftable_entries, "refcount table entry", "refcount table entries")
            ));
        }
        if self.copied_flags > 0 {
            parts
                .push(format!("{} with a wrong COPIED flag", count(self.copied_flags, "L1/L2 entry", "L1/L2 entries")));
        }
        if self.dirty {
            parts.push("the dirty bit set".into());
        }
        if parts.is_empty() {
            parts.push("consistent".into());
        }
        write!(f, "{}", parts.join(", "))?;
        if let Some(at) = self.rebuilt_at {
            write!(f, "; refcounts rebuilt from the L1/L2 tables (refcount table now at offset {at:#x})")?;
        }
        Ok(())
    }
}

/// The header fields the walk needs.
struct Header {
    cluster_bits: u32,
    l1_size: u32,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible: u64,
    refcount_bits: u32,
}

/// An image being checked: its file, header and size in clusters.
struct Image {
    file: File,
    h: Header,
    cs: u64,
    /// Clusters the file spans (the last may be partial).
    clusters: u64,
}

/// Why the walk stopped: an I/O error, or an image this check must not repair.
enum Stop {
    Io(std::io::Error),
    Corrupt(String),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

type Walk<T> = Result<T, Stop>;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap_or_default())
}

/// Checks `path` and repairs what it finds: refcounts rebuilt from the tables,
/// COPIED flags set right, the dirty bit cleared. `Ok(None)` for an image this
/// check does not cover (encrypted, an external data file, persistent bitmaps,
/// unknown incompatible features, not qcow2 v2/v3): it is left as it is. An
/// image whose tables themselves are broken (a table outside the file or
/// misaligned, one cluster used twice) is refused, and left untouched.
pub fn repair(path: &Path) -> Result<Option<Report>, Error> {
    run(path, true)
}

/// As [`repair`], but only reports; never writes.
pub fn check(path: &Path) -> Result<Option<Report>, Error> {
    run(path, false)
}

fn run(path: &Path, fix: bool) -> Result<Option<Report>, Error> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(fix)
        .open(path)
        .map_err(|source| Error::Open { path: path.into(), source })?;
    let r = (|| -> Walk<Option<Report>> {
        let Some(img) = Image::open(file)? else { return Ok(None) };
        img.check_and_repair(fix).map(Some)
    })();
    r.map_err(|stop| match stop {
        Stop::Io(source) => Error::Open { path: path.into(), source },
        Stop::Corrupt(reason) => Error::Refused {
            path: path.into(),
            reason: format!("corrupt qcow2 metadata that cevm cannot repair ({reason})"),
        },
    })
}

impl Image {
    /// Reads the header; `None` when the image uses something this check does not cover.
    fn open(file: File) -> Walk<Option<Self>> {
        let len = file.metadata()?.len();
        let mut b = [0u8; 104];
        let n = read_upto(&file, &mut b, 0)?;
        if n < 72 || &b[..4] != b"QFI\xfb" {
            return Ok(None);
        }
        let version = be32(&b, 4);
        if !(2..=3).contains(&version) || (version == 3 && n < 104) {
            return Ok(None);
        }
        let cluster_bits = be32(&b, 20);
        let (incompatible, autoclear, refcount_order) =
            if version == 3 { (be64(&b, 72), be64(&b, 88), be32(&b, 96)) } else { (0, 0, 4) };
        let encrypted = be32(&b, 32) != 0;
        if !(9..=21).contains(&cluster_bits)
            || encrypted
            || incompatible & !INCOMPAT_KNOWN != 0
            || autoclear & AUTOCLEAR_BITMAPS != 0
            || refcount_order > 6
        {
            return Ok(None);
        }
        let cs = 1u64 << cluster_bits;
        let h = Header {
            cluster_bits,
            l1_size: be32(&b, 36),
            l1_offset: be64(&b, 40),
            rt_offset: be64(&b, 48),
            rt_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible,
            refcount_bits: 1 << refcount_order,
        };
        Ok(Some(Image { file, h, cs, clusters: len.div_ceil(cs) }))
    }

    fn check_and_repair(&self, fix: bool) -> Walk<Report> {
        let mut report = Report { dirty: self.h.incompatible & INCOMPAT_DIRTY != 0, ..Report::default() };
        // References from the tables, with the refcount structures counted as in use.
        let mut refs = self.count_references()?;
        report.bad_reftable_entries = self.count_refcount_structures(&mut refs)?;
        let on_disk = self.read_refcounts()?;
        for (c, &want) in refs.iter().enumerate() {
            let have = on_disk.get(c).copied().unwrap_or(0);
            if have < want {
                report.undercounted += 1;
            } else if have > want {
                report.leaked += 1;
            }
        }
        report.leaked += on_disk.iter().skip(refs.len()).filter(|&&v| v > 0).count() as u64;
        if report.refcounts_wrong() {
            // The rebuild counts the tables only: the old refcount structures become free.
            refs = self.count_references()?;
            if fix {
                report.rebuilt_at = Some(self.rebuild(&refs)?);
            }
        }
        report.copied_flags = self.fix_copied_flags(&refs, fix)?;
        if fix && report.dirty {
            let flags = self.h.incompatible & !INCOMPAT_DIRTY;
            self.file.write_all_at(&flags.to_be_bytes(), 72)?;
        }
        if fix && !report.is_clean() {
            self.file.sync_all()?;
        }
        Ok(report)
    }

    /// Reads `len` bytes at `off`, which must lie inside the file.
    fn read(&self, off: u64, len: u64, what: &str) -> Walk<Vec<u8>> {
        if off.checked_add(len).is_none_or(|end| end > self.clusters * self.cs) {
            return Err(Stop::Corrupt(format!(
                "{what} at offset {off:#x} ({len} bytes) lies past the end of the file"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        let n = read_upto(&self.file, &mut buf, off)?;
        // The last cluster may be partial: what the file does not hold reads as zero.
        buf[n..].fill(0);
        Ok(buf)
    }

    /// Counts one reference to each cluster of `[off, off + len)`.
    fn add(&self, refs: &mut [u32], off: u64, len: u64, what: &str) -> Walk<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (off / self.cs, (off + len - 1) / self.cs);
        if last >= self.clusters {
            return Err(Stop::Corrupt(format!("{what} at offset {off:#x} lies past the end of the file")));
        }
        for r in &mut refs[first as usize..=last as usize] {
            *r = r
                .checked_add(1)
                .ok_or_else(|| Stop::Corrupt(format!("{what} at offset {off:#x} is referenced too often")))?;
        }
        Ok(())
    }

    /// References from the header, the active L1 table and its L2 tables, and
    /// every snapshot's tables. Refuses an image whose tables are broken.
    fn count_references(&self) -> Walk<Vec<u32>> {
        let mut refs = vec![0u32; self.clusters as usize];
        self.add(&mut refs, 0, self.cs, "the header")?;
        self.count_l1(&mut refs, self.h.l1_offset, self.h.l1_size, "the active L1 table")?;
        self.count_snapshots(&mut refs)?;
        if self.h.nb_snapshots == 0 {
            if let Some(c) = refs.iter().position(|&r| r > 1) {
                return Err(Stop::Corrupt(format!(
                    "the cluster at offset {:#x} is used {} times in an image without snapshots",
                    c as u64 * self.cs,
                    refs[c]
                )));
            }
        }
        Ok(refs)
    }

    fn count_l1(&self, refs: &mut [u32], l1_offset: u64, l1_size: u32, what: &str) -> Walk<()> {
        let bytes = u64::from(l1_size) * 8;
        if l1_size == 0 {
            return Ok(());
        }
        if bytes > MAX_L1_BYTES || l1_offset % self.cs != 0 {
            return Err(Stop::Corrupt(format!("{what} ({l1_size} entries at offset {l1_offset:#x}) is invalid")));
        }
        self.add(refs, l1_offset, bytes, what)?;
        let l1 = self.read(l1_offset, bytes, what)?;
        for e in l1.chunks_exact(8).map(|e| be64(e, 0)) {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % self.cs != 0 {
                return Err(Stop::Corrupt(format!("{what} names an L2 table at the unaligned offset {l2:#x}")));
            }
            self.add(refs, l2, self.cs, "an L2 table")?;
            let table = self.read(l2, self.cs, "an L2 table")?;
            for e in table.chunks_exact(self.l2_entry_bytes()).map(|e| be64(e, 0)) {
                self.count_l2_entry(refs, e, l2)?;
            }
        }
        Ok(())
    }

    fn l2_entry_bytes(&self) -> usize {
        if self.h.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            16
        } else {
            8
        }
    }

    /// The host range a compressed L2 entry names (qcow2 spec: offset in the low
    /// `62 - (cluster_bits - 8)` bits, then the number of extra 512-byte sectors).
    fn compressed_range(&self, e: u64) -> (u64, u64) {
        let x = 62 - (self.h.cluster_bits - 8);
        let off = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (self.h.cluster_bits - 8)) - 1)) + 1;
        (off, (off & !511) + sectors * 512 - off)
    }

    fn count_l2_entry(&self, refs: &mut [u32], e: u64, l2: u64) -> Walk<()> {
        if e & COMPRESSED != 0 {
            let (off, len) = self.compressed_range(e);
            return self.add(refs, off, len, "a compressed cluster");
        }
        let data = e & OFFSET_MASK;
        if data == 0 {
            return Ok(());
        }
        if data % self.cs != 0 {
            return Err(Stop::Corrupt(format!(
                "the L2 table at {l2:#x} names a data cluster at the unaligned offset {data:#x}"
            )));
        }
        self.add(refs, data, self.cs, "a data cluster")
    }

    /// Each snapshot's L1 and L2 tables and data (a cluster shared by n tables
    /// has refcount n), and the snapshot table itself.
    fn count_snapshots(&self, refs: &mut [u32]) -> Walk<()> {
        if self.h.nb_snapshots == 0 {
            return Ok(());
        }
        if self.h.nb_snapshots > MAX_SNAPSHOTS || self.h.snapshots_offset % self.cs != 0 {
            return Err(Stop::Corrupt("the snapshot table is invalid".into()));
        }
        let mut pos = self.h.snapshots_offset;
        for i in 0..self.h.nb_snapshots {
            let fixed = self.read(pos, 40, "the snapshot table")?;
            let (l1_offset, l1_size) = (be64(&fixed, 0), be32(&fixed, 8));
            let (id_len, name_len, extra) = (be16(&fixed, 12), be16(&fixed, 14), be32(&fixed, 36));
            let len = (40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len)).next_multiple_of(8);
            self.count_l1(refs, l1_offset, l1_size, &format!("the L1 table of snapshot {i}"))?;
            pos += len;
        }
        let table = self.h.snapshots_offset;
        self.add(refs, table, pos - table, "the snapshot table")
    }

    fn rb_entries(&self) -> u64 {
        self.cs * 8 / u64::from(self.h.refcount_bits)
    }

    /// Counts the refcount table and the refblocks it names as in use.
    /// Returns how many reftable entries point nowhere (outside the file, unaligned).
    fn count_refcount_structures(&self, refs: &mut [u32]) -> Walk<u64> {
        let (rt, rt_bytes) = (self.h.rt_offset, u64::from(self.h.rt_clusters) * self.cs);
        if rt % self.cs != 0
            || rt_bytes == 0
            || rt_bytes > MAX_REFTABLE_BYTES
            || rt + rt_bytes > self.clusters * self.cs
        {
            // The whole table is unusable: every refcount is missing.
            return Ok(1);
        }
        self.add(refs, rt, rt_bytes, "the refcount table")?;
        let mut bad = 0;
        for e in self.read(rt, rt_bytes, "the refcount table")?.chunks_exact(8).map(|e| be64(e, 0) & !511) {
            if e == 0 {
                continue;
            }
            if e % self.cs != 0 || e / self.cs >= self.clusters {
                bad += 1;
            } else {
                refs[(e / self.cs) as usize] += 1;
            }
        }
        Ok(bad)
    }

    /// The refcounts on disk, indexed by cluster (as far as refblocks reach;
    /// clusters no refblock covers have none). Broken entries are skipped.
    fn read_refcounts(&self) -> Walk<Vec<u32>> {
        let (rt, rt_bytes) = (self.h.rt_offset, u64::from(self.h.rt_clusters) * self.cs);
        let mut counts = Vec::new();
        if rt % self.cs != 0
            || rt_bytes == 0
            || rt_bytes > MAX_REFTABLE_BYTES
            || rt + rt_bytes > self.clusters * self.cs
        {
            return Ok(counts);
        }
        let per_block = self.rb_entries();
        let table = self.read(rt, rt_bytes, "the refcount table")?;
        for (i, e) in table.chunks_exact(8).map(|e| be64(e, 0) & !511).enumerate() {
            if e == 0 || e % self.cs != 0 || e / self.cs >= self.clusters {
                continue;
            }
            let block = self.read(e, self.cs, "a refcount block")?;
            let first = i as u64 * per_block;
            for j in 0..per_block {
                let v = get_refcount(&block, j, self.h.refcount_bits);
                if v > 0 {
                    let c = (first + j) as usize;
                    if counts.len() <= c {
                        counts.resize(c + 1, 0);
                    }
                    counts[c] = u32::try_from(v).unwrap_or(u32::MAX);
                }
            }
        }
        Ok(counts)
    }

    /// Writes new refcount blocks and a new refcount table holding `refs` past
    /// the end of the file, syncs them, then points the header at them (one
    /// 12-byte write, synced). Returns the new table's offset.
    fn rebuild(&self, refs: &[u32]) -> Walk<u64> {
        let max = if self.h.refcount_bits == 64 { u64::MAX } else { (1u64 << self.h.refcount_bits) - 1 };
        if let Some(c) = refs.iter().position(|&r| u64::from(r) > max) {
            return Err(Stop::Corrupt(format!(
                "the cluster at offset {:#x} has more references than {}-bit refcounts hold",
                c as u64 * self.cs,
                self.h.refcount_bits
            )));
        }
        let per_block = self.rb_entries();
        let start = self.clusters;
        // Enough refblocks to cover the file and themselves and the table after them.
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let need_blocks = (start + blocks + table).div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(self.cs);
            if need_blocks == blocks && need_table == table {
                break;
            }
            (blocks, table) = (need_blocks, need_table);
        }
        let table_at = (start + blocks) * self.cs;
        if table * self.cs > MAX_REFTABLE_BYTES {
            return Err(Stop::Corrupt("the image is too large for a refcount table".into()));
        }
        let mut rt = vec![0u8; (table * self.cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; self.cs as usize];
            for j in 0..per_block {
                let c = b * per_block + j;
                let v = if c < start { u64::from(refs[c as usize]) } else { u64::from(c < start + blocks + table) };
                set_refcount(&mut block, j, self.h.refcount_bits, v);
            }
            let at = (start + b) * self.cs;
            self.file.write_all_at(&block, at)?;
            rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
        }
        self.file.write_all_at(&rt, table_at)?;
        self.file.sync_all()?;
        let mut pointer = [0u8; 12];
        pointer[..8].copy_from_slice(&table_at.to_be_bytes());
        pointer[8..].copy_from_slice(&(table as u32).to_be_bytes());
        self.file.write_all_at(&pointer, 48)?;
        self.file.sync_all()?;
        Ok(table_at)
    }

    /// Counts (and with `fix`, corrects) the COPIED flags of the active L1 and L2
    /// entries: set exactly when the cluster they name has refcount one.
    fn fix_copied_flags(&self, refs: &[u32], fix: bool) -> Walk<u64> {
        let mut wrong = 0;
        let l1_bytes = u64::from(self.h.l1_size) * 8;
        if l1_bytes == 0 {
            return Ok(0);
        }
        let l1 = self.read(self.h.l1_offset, l1_bytes, "the active L1 table")?;
        let refcount = |off: u64| refs.get((off / self.cs) as usize).copied().unwrap_or(0);
        for (i, e) in l1.chunks_exact(8).map(|e| be64(e, 0)).enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if (e & COPIED != 0) != (refcount(l2) == 1) {
                wrong += 1;
                if fix {
                    let at = self.h.l1_offset + i as u64 * 8;
                    self.file.write_all_at(&(e ^ COPIED).to_be_bytes(), at)?;
                }
            }
            let table = self.read(l2, self.cs, "an L2 table")?;
            let step = self.l2_entry_bytes();
            for (j, e) in table.chunks_exact(step).map(|e| be64(e, 0)).enumerate() {
                let data = e & OFFSET_MASK;
                let want = e & COMPRESSED == 0 && refcount(data) == 1;
                if e & COMPRESSED != 0 && e & COPIED == 0 || e & COMPRESSED == 0 && data == 0 {
                    continue;
                }
                if (e & COPIED != 0) != want {
                    wrong += 1;
                    if fix {
                        self.file.write_all_at(&(e ^ COPIED).to_be_bytes(), l2 + (j * step) as u64)?;
                    }
                }
            }
        }
        Ok(wrong)
    }
}

/// Reads into `buf` at `off` until it is full or the file ends; returns the bytes read.
fn read_upto(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Entry `i` of a refcount block of `bits`-bit entries: big-endian from 8 bits
/// up; narrower ones packed from the least significant bit of each byte.
fn get_refcount(block: &[u8], i: u64, bits: u32) -> u64 {
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        block[at..at + w].iter().fold(0, |v, &b| v << 8 | u64::from(b))
    } else {
        let bit = i * u64::from(bits);
        (u64::from(block[(bit / 8) as usize]) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

fn set_refcount(block: &mut [u8], i: u64, bits: u32, v: u64) {
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        block[at..at + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
    } else {
        let bit = i * u64::from(bits);
        let mask = ((1u64 << bits) - 1) as u8;
        let byte = &mut block[(bit / 8) as usize];
        *byte = (*byte & !(mask << (bit % 8))) | ((v as u8 & mask) << (bit % 8));
    }
}

/// Run before a qcow2 image is opened for writing: repairs it if it must and
/// says so in a warning (cevm's log, on stderr).
pub(crate) fn repair_before_writing(path: &Path) -> Result<(), Error> {
    if let Some(report) = repair(path)? {
        if !report.is_clean() {
            let kind = if crate::backing_file(path)?.is_some() { "overlay" } else { "qcow2 image" };
            tracing::warn!("repaired {kind} {}: found {report}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
