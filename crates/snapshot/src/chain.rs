//! Incremental checkpoints: the map of the pages a checkpoint holds, the chain
//! of parents behind it (followed and checked link by link), loading a chain
//! into guest memory, and merging a full parent into its child.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunks::{ChunkedCrc, CHUNKS_FILE, CHUNK_SIZE};
use crate::reader::{next_extent, open_regular, Checkpoint, MemoryTarget};
use crate::writer::{write_chunk_sums, CheckpointWriter};
use crate::{Error, MemoryLayout, MemoryStats, MANIFEST_FILE, MEMORY_FILE, PAGES_FILE, PROGRESS_STEP};

/// The most links a chain may have (a guard against a cycle of parents).
pub const MAX_CHAIN: usize = 256;

/// A new checkpoint identity: 16 random hex digits.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy to be had: time and pid still tell checkpoints apart.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        b = ((t as u64) ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One bit per page of a memory image (bit i of word j = page 64 j + i).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// No page marked, of `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageBitmap { pages, words: vec![0; pages.div_ceil(64) as usize] }
    }

    /// The image's pages marked where the per-region bitmaps `regions` (in the
    /// layout of KVM's dirty log: bit i of word j = page 64 j + i of region k)
    /// mark them.
    pub fn from_regions(layout: &MemoryLayout, regions: &[Vec<u64>]) -> Self {
        let mut b = PageBitmap::new(layout.image_size() / layout.page_size);
        for (r, bits) in layout.regions.iter().zip(regions) {
            let first = r.guest_addr / layout.page_size;
            let n = r.size / layout.page_size;
            for (j, &w) in bits.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    let i = w.trailing_zeros() as u64;
                    w &= w - 1;
                    let p = j as u64 * 64 + i;
                    if p < n {
                        b.set(first + p);
                    }
                }
            }
        }
        b
    }

    /// Pages of the image.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Pages marked.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether a page of [`first`, `first + n`) is marked.
    pub(crate) fn any_in(&self, first: u64, n: u64) -> bool {
        !self.runs(first, n).is_empty()
    }

    /// The runs of marked pages in [`first`, `first + n`), as page ranges.
    pub(crate) fn runs(&self, first: u64, n: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut p = first;
        let end = (first + n).min(self.pages);
        while p < end {
            let w = self.words[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += u64::from(w.trailing_zeros());
            if p >= end {
                break;
            }
            match out.last_mut() {
                Some(last) if last.end == p => last.end = p + 1,
                _ => out.push(p..p + 1),
            }
            p += 1;
        }
        out
    }

    /// The marked pages of region `k` of `layout`, as byte ranges from the
    /// region's start (the data extents of an incremental image's source).
    pub fn extents_in(&self, layout: &MemoryLayout, k: usize) -> Vec<Range<u64>> {
        let Some(r) = layout.regions.get(k) else { return Vec::new() };
        let (ps, first) = (layout.page_size, r.guest_addr / layout.page_size);
        self.runs(first, r.size / ps).into_iter().map(|p| (p.start - first) * ps..(p.end - first) * ps).collect()
    }

    /// The file's bytes: the words, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Reads the map of `pages` pages from `bytes` (the content of `path`).
    pub fn from_bytes(path: &Path, bytes: &[u8], pages: u64) -> Result<Self, Error> {
        let words = pages.div_ceil(64);
        if bytes.len() as u64 != words * 8 {
            return Err(Error::Size { path: path.into(), expected: words * 8, actual: bytes.len() as u64 });
        }
        let words: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8"))).collect();
        let b = PageBitmap { pages, words };
        if pages % 64 != 0 && b.words.last().is_some_and(|w| w >> (pages % 64) != 0) {
            return Err(Error::Layout { path: path.into(), reason: "marks pages beyond the memory image".into() });
        }
        Ok(b)
    }
}

fn broken(child: &Checkpoint, reason: String) -> Error {
    Error::Chain { path: child.dir.join(MANIFEST_FILE), reason }
}

/// Where the parent `dir` of a checkpoint in `child_dir` is: a sibling, by
/// its name (nothing else: no path leads elsewhere).
fn parent_dir(child_dir: &Path, dir: &str) -> Option<PathBuf> {
    let plain = !dir.is_empty() && dir != "." && dir != ".." && !dir.contains('/');
    plain.then(|| child_dir.parent().unwrap_or(Path::new(".")).join(dir))
}

impl Checkpoint {
    /// An incremental checkpoint's map of the pages it holds (read and
    /// checked); `None` for a full checkpoint.
    pub fn pages(&self) -> Result<Option<PageBitmap>, Error> {
        if self.manifest.parent.is_none() {
            return Ok(None);
        }
        let bytes = self.read_file(PAGES_FILE)?;
        let layout = &self.manifest.memory;
        let path = self.dir.join(PAGES_FILE);
        let map = PageBitmap::from_bytes(&path, &bytes, layout.image_size() / layout.page_size)?;
        // No page outside guest memory (the hole below 4 GiB, say).
        let mut from = 0;
        for r in &layout.regions {
            let first = r.guest_addr / layout.page_size;
            if !map.runs(from, first - from).is_empty() {
                return Err(Error::Layout { path, reason: "marks pages outside guest memory".into() });
            }
            from = first + r.size / layout.page_size;
        }
        Ok(Some(map))
    }
}

/// Opens the checkpoint at `dir` and, if it is incremental, every parent
/// behind it ([`Checkpoint::open`] each): each parent must be where its child
/// says, be exactly the checkpoint it names (its `id`), and have the same
/// memory layout. Returns the chain root first (a full checkpoint), `dir`'s
/// last. A link that fails is named in the error.
pub fn open_chain(dir: &Path) -> Result<Vec<Checkpoint>, Error> {
    let mut links = vec![Checkpoint::open(dir)?];
    loop {
        let child = links.last().expect("at least the leaf");
        let Some(link) = child.manifest.parent.clone() else { break };
        if links.len() >= MAX_CHAIN {
            return Err(broken(child, format!("more than {MAX_CHAIN} checkpoints behind it")));
        }
        if !child.manifest.files.iter().any(|f| f.name == PAGES_FILE) {
            return Err(broken(child, format!("an incremental checkpoint without its {PAGES_FILE}")));
        }
        if link.id.is_empty() {
            return Err(broken(child, "its parent link names no id".into()));
        }
        let Some(pdir) = parent_dir(&child.dir, &link.dir) else {
            return Err(broken(child, format!("its parent `{}` is not the name of a sibling directory", link.dir)));
        };
        let parent = Checkpoint::open(&pdir)
            .map_err(|e| broken(child, format!("its parent {} cannot be used: {e}", pdir.display())))?;
        if parent.manifest.id != link.id {
            return Err(broken(
                child,
                format!(
                    "its parent {} is another checkpoint (id `{}`, where it names `{}`)",
                    pdir.display(),
                    parent.manifest.id,
                    link.id
                ),
            ));
        }
        if parent.manifest.memory != child.manifest.memory {
            return Err(broken(child, format!("its parent {} has another memory layout", pdir.display())));
        }
        links.push(parent);
    }
    links.reverse();
    Ok(links)
}

/// Checks the memory image (and page map) of every link of a chain from
/// [`open_chain`]; `progress(done, total)` over all of them.
pub fn verify_chain_memory(links: &[Checkpoint], progress: &mut dyn FnMut(u64, u64)) -> Result<(), Error> {
    let total: u64 = links.iter().map(|l| l.manifest.memory.image_size()).sum();
    let mut done = 0;
    for l in links {
        l.pages()?;
        l.verify_memory_with(&mut |d, _| progress(done + d, total))?;
        done += l.manifest.memory.image_size();
    }
    Ok(())
}

/// Loads a chain from [`open_chain`] into `targets`, root first, each link's
/// pages over its parent's, checking every memory image's CRC (and every page
/// map) as it goes.
pub fn load_chain(
    links: &[Checkpoint],
    targets: &mut [MemoryTarget<'_>],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let total: u64 = links.iter().map(|l| l.manifest.memory.image_size()).sum();
    let mut done = 0;
    for (i, l) in links.iter().enumerate() {
        let mut p = |d: u64, _: u64| progress(done + d, total);
        match l.pages()? {
            None if i == 0 => l.load_memory_with(targets, &mut p)?,
            None => return Err(broken(l, "a full checkpoint in the middle of a chain".into())),
            Some(held) => l.apply_memory(targets, &held, &mut p)?,
        }
        done += l.manifest.memory.image_size();
    }
    Ok(())
}

impl Checkpoint {
    /// Puts the pages `held` marks from this (incremental) checkpoint's
    /// memory image into `targets`, which hold its parent's memory, checking
    /// the image's CRC in the same pass. A held page that is a hole is zero.
    fn apply_memory(
        &self,
        targets: &mut [MemoryTarget<'_>],
        held: &PageBitmap,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error> {
        let path = self.memory_path();
        let layout = &self.manifest.memory;
        let ps = layout.page_size;
        let matches = targets.len() == layout.regions.len()
            && targets
                .iter()
                .zip(&layout.regions)
                .all(|(t, r)| t.guest_addr == r.guest_addr && t.data.len() as u64 == r.size);
        if !matches {
            return Err(Error::Layout { path, reason: "guest memory does not match the checkpoint's layout".into() });
        }
        for t in targets.iter_mut() {
            for run in held.runs(t.guest_addr / ps, t.data.len() as u64 / ps) {
                let (a, b) = ((run.start * ps - t.guest_addr) as usize, (run.end * ps - t.guest_addr) as usize);
                t.data[a..b].fill(0);
            }
        }
        let entry = self.manifest.files.iter().find(|f| f.name == MEMORY_FILE).ok_or_else(|| Error::Manifest {
            path: self.dir.join(MANIFEST_FILE),
            reason: format!("lists no {MEMORY_FILE}"),
        })?;
        let (f, size) = open_regular(&path)?;
        if size != entry.size {
            return Err(Error::Size { path, expected: entry.size, actual: size });
        }
        let sums = self.chunk_sums()?;
        let mut crc = ChunkedCrc::new(self.chunk_size());
        let mut buf = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let Some((start, end)) = next_extent(&f, pos, size).map_err(Error::io(&path, "seek"))? else { break };
            crc.zeros(start - pos);
            let mut off = start;
            while off < end {
                let n = (end - off).min(PROGRESS_STEP);
                buf.resize(n as usize, 0);
                f.read_exact_at(&mut buf, off).map_err(Error::io(&path, "read"))?;
                crc.update(&buf);
                // The held pages of this piece go to their target.
                for run in held.runs(off / ps, n.div_ceil(ps)) {
                    let (a, b) = ((run.start * ps).max(off), (run.end * ps).min(off + n));
                    let t = targets.iter_mut().find(|t| a >= t.guest_addr && b <= t.guest_addr + t.data.len() as u64);
                    if let Some(t) = t {
                        let at = (a - t.guest_addr) as usize;
                        t.data[at..at + (b - a) as usize].copy_from_slice(&buf[(a - off) as usize..(b - off) as usize]);
                    }
                }
                off += n;
                progress(off, size);
            }
            pos = end;
        }
        crc.zeros(size - pos);
        progress(size, size);
        self.check_sums(crc, sums.as_deref())
    }
}

/// Copies `src` to `dst` (new), keeping it sparse: only its data extents.
fn copy_sparse(src: &Path, dst: &Path) -> Result<File, Error> {
    let (from, size) = open_regular(src)?;
    let to = OpenOptions::new().read(true).write(true).create_new(true).open(dst).map_err(Error::io(dst, "create"))?;
    let mut pos = 0;
    while let Some((start, end)) = next_extent(&from, pos, size).map_err(Error::io(src, "seek"))? {
        let mut off = start;
        while off < end {
            let (mut a, mut b) = (off as i64, off as i64);
            // SAFETY: both descriptors are open; the offsets are ours, read and
            // advanced by the call.
            let n = unsafe {
                libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, (end - off) as usize, 0)
            };
            if n <= 0 {
                let e = if n == 0 { std::io::ErrorKind::UnexpectedEof.into() } else { std::io::Error::last_os_error() };
                return Err(Error::io(dst, "copy_file_range")(e));
            }
            off += n as u64;
        }
        pos = end;
    }
    to.set_len(size).map_err(Error::io(dst, "set length"))?;
    Ok(to)
}

/// The CRC32 (hex), chunk sums and page counts of a memory image file, read whole.
fn scan_image(path: &Path, f: &File, size: u64, ps: u64) -> Result<(String, Vec<u32>, MemoryStats), Error> {
    let mut crc = ChunkedCrc::new(CHUNK_SIZE);
    let mut stats = MemoryStats::default();
    let mut buf = Vec::new();
    let mut pos = 0;
    while let Some((start, end)) = next_extent(f, pos, size).map_err(Error::io(path, "seek"))? {
        crc.zeros(start - pos);
        let mut off = start;
        while off < end {
            let n = (end - off).min(PROGRESS_STEP);
            buf.resize(n as usize, 0);
            f.read_exact_at(&mut buf, off).map_err(Error::io(path, "read"))?;
            crc.update(&buf);
            for page in buf.chunks(ps as usize) {
                if page.iter().any(|&b| b != 0) {
                    stats.data_pages += 1;
                    stats.data_bytes += page.len() as u64;
                }
            }
            off += n;
        }
        pos = end;
    }
    crc.zeros(size - pos);
    stats.zero_pages = size / ps - stats.data_pages;
    let (whole, sums) = crc.finish();
    Ok((whole, sums, stats))
}

/// Folds the full parent of the incremental checkpoint at `child` into it:
/// `child` becomes a full checkpoint of the same content, identity and
/// creation time (so its own children still name it), committed atomically
/// over the incremental one; the parent is left as it was, for the caller to
/// remove. Both memory images are verified first: a merge never makes a
/// checkpoint out of damaged data. The child's other files (state, disk) are
/// linked into the new one, or copied on another file system, and checked.
pub fn merge_parent(child: &Path) -> Result<(), Error> {
    let links = open_chain(child)?;
    let [parent, leaf] = links.as_slice() else {
        let l = links.last().expect("at least the leaf");
        let reason = match links.len() {
            1 => "not an incremental checkpoint: there is no parent to merge into it".into(),
            n => format!("{} checkpoints behind it: merge from the chain's root first", n - 1),
        };
        return Err(Error::Layout { path: l.dir.join(MANIFEST_FILE), reason });
    };
    let held = leaf.pages()?.expect("the leaf of a chain of two is incremental");
    parent.verify_memory()?;
    leaf.verify_memory()?;
    let layout = &leaf.manifest.memory;
    let ps = layout.page_size;
    let mut w = CheckpointWriter::create(child)?;
    w.keep_identity(&leaf.manifest.id, leaf.manifest.created_unix_ms);
    let dst = w.tmp_path().join(MEMORY_FILE);
    let out = copy_sparse(&parent.memory_path(), &dst)?;
    let (src, _) = open_regular(&leaf.memory_path())?;
    let mut buf = Vec::new();
    // A run of pages at most PROGRESS_STEP bytes at a time.
    let pieces = held.runs(0, held.pages()).into_iter().flat_map(|r| {
        let step = PROGRESS_STEP / ps;
        (r.start..r.end).step_by(step as usize).map(move |p| p..(p + step).min(r.end))
    });
    for run in pieces {
        let (a, n) = (run.start * ps, (run.end - run.start) * ps);
        buf.resize(n as usize, 0);
        src.read_exact_at(&mut buf, a).map_err(Error::io(leaf.memory_path(), "read"))?;
        for (k, page) in buf.chunks(ps as usize).enumerate() {
            let at = a + k as u64 * ps;
            if page.iter().all(|&b| b == 0) {
                // A page that became zero is a hole again.
                // SAFETY: punches a hole inside the file we own; no memory is passed.
                let r = unsafe {
                    libc::fallocate(
                        out.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        at as libc::off_t,
                        ps as libc::off_t,
                    )
                };
                if r != 0 {
                    out.write_all_at(page, at).map_err(Error::io(&dst, "write"))?;
                }
            } else {
                out.write_all_at(page, at).map_err(Error::io(&dst, "write"))?;
            }
        }
    }
    out.sync_all().map_err(Error::io(&dst, "fsync"))?;
    let (crc, sums, stats) = scan_image(&dst, &out, layout.image_size(), ps)?;
    write_chunk_sums(&w.tmp_path().join(CHUNKS_FILE), &sums)?;
    w.record_memory(layout, stats, &crc)?;
    for f in &leaf.manifest.files {
        if f.name == MEMORY_FILE || f.name == PAGES_FILE || f.name == CHUNKS_FILE {
            continue;
        }
        let (from, to) = (leaf.dir.join(&f.name), w.tmp_path().join(&f.name));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(Error::io(&to, "copy"))?;
        }
        w.add_file(&f.name)?;
        let got = w.entry(&f.name).map(|e| e.crc32.clone()).unwrap_or_default();
        if got != f.crc32 {
            return Err(Error::Checksum { path: from, expected: f.crc32.clone(), actual: got });
        }
    }
    w.commit(&leaf.manifest.strategy, &leaf.manifest.cevm_version, leaf.manifest.guest.clone())?;
    Ok(())
}
