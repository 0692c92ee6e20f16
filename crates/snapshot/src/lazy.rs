//! Reading a checkpoint's memory one chunk at a time, each checked against
//! its checksum (memory.chunks) before any of it is handed out: what a lazy
//! restore serves the guest's page faults from. Works on a chain of
//! incremental checkpoints: a chunk is the root's, with each link's pages of
//! that chunk laid over it in order, and every link's part is checked.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::chain::PageBitmap;
use crate::chunks::zeros_crc;
use crate::reader::{next_extent, open_regular, Checkpoint};
use crate::{hex, Error, MANIFEST_FILE, MEMORY_FILE};

/// One link of the chain, opened.
struct Link {
    path: PathBuf,
    file: File,
    sums: Vec<u32>,
    /// The pages an incremental link holds; `None` for the root.
    held: Option<PageBitmap>,
}

/// The memory of a checkpoint (or of a chain, root first) to be read chunk
/// by chunk. Opening reads only the small files (chunk sums, page maps);
/// memory.img is read one chunk at a time, on request.
pub struct ChunkReader {
    links: Vec<Link>,
    chunk: u64,
    size: u64,
    page_size: u64,
}

impl ChunkReader {
    /// Opens the memory of `links` (from [`crate::open_chain`], root first;
    /// one link for a full checkpoint). Every link must carry chunk sums of
    /// the same chunk size.
    pub fn open(links: &[Checkpoint]) -> Result<Self, Error> {
        let root =
            links.first().ok_or_else(|| Error::Layout { path: PathBuf::new(), reason: "no checkpoint".into() })?;
        let (chunk, size, page_size) =
            (root.manifest.memory_chunk_size, root.manifest.memory.image_size(), root.manifest.memory.page_size);
        let mut out = Vec::new();
        for (i, l) in links.iter().enumerate() {
            let mpath = l.dir.join(MANIFEST_FILE);
            let Some(sums) = l.chunk_sums()? else {
                return Err(Error::Manifest {
                    path: mpath,
                    reason: "written without per-chunk checksums (by an older cevm): it can be restored, but not \
                             lazily"
                        .into(),
                });
            };
            if l.manifest.memory_chunk_size != chunk || l.manifest.memory.image_size() != size {
                return Err(Error::Chain { path: mpath, reason: "its memory chunks differ from its parent's".into() });
            }
            let held = l.pages()?;
            if held.is_some() != (i > 0) {
                return Err(Error::Chain { path: mpath, reason: "a full checkpoint only at the chain's root".into() });
            }
            let path = l.memory_path();
            let (file, actual) = open_regular(&path)?;
            let expected = l.entry(MEMORY_FILE)?.size;
            if actual != expected {
                return Err(Error::Size { path, expected, actual });
            }
            out.push(Link { path, file, sums, held });
        }
        Ok(ChunkReader { links: out, chunk, size, page_size })
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The image's size (guest-physical bytes, the gaps between regions included).
    pub fn image_size(&self) -> u64 {
        self.size
    }

    /// The bytes chunk `k` covers.
    pub fn range(&self, k: u64) -> std::ops::Range<u64> {
        let start = k * self.chunk;
        start..(start + self.chunk).min(self.size)
    }

    /// Whether chunk `k` is zeros in every link: its expected sum is that of
    /// zeros and the file holds no data there (holes read as zeros, so its
    /// content is checked, not just its sum). Nothing is read.
    pub fn is_zero(&self, k: u64) -> Result<bool, Error> {
        let r = self.range(k);
        let z = zeros_crc(r.end - r.start);
        for l in &self.links {
            if l.sums.get(k as usize) != Some(&z) {
                return Ok(false);
            }
            if let Some((start, _)) = next_extent(&l.file, r.start, self.size).map_err(Error::io(&l.path, "seek"))? {
                if start < r.end {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Reads chunk `k` into `buf` (resized to the chunk), checking each
    /// link's part against its sum first: on a mismatch, `buf` holds nothing
    /// anyone may use, and the error names the file and the chunk.
    pub fn read(&self, k: u64, buf: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Result<(), Error> {
        let r = self.range(k);
        let n = (r.end - r.start) as usize;
        buf.resize(n, 0);
        let ps = self.page_size;
        for l in &self.links {
            let into: &mut Vec<u8> = if l.held.is_none() { &mut *buf } else { &mut *scratch };
            if let Some(held) = &l.held {
                // A link without a page here has nothing to lay over the chunk.
                if !held.any_in(r.start / ps, (r.end - r.start) / ps) {
                    continue;
                }
                into.resize(n, 0);
            }
            l.file.read_exact_at(into, r.start).map_err(Error::io(&l.path, "read"))?;
            let actual = crc32fast::hash(into);
            let expected = l.sums.get(k as usize).copied().unwrap_or(0);
            if actual != expected {
                return Err(Error::Chunk {
                    path: l.path.clone(),
                    index: k,
                    start: r.start,
                    end: r.end,
                    expected: hex(expected),
                    actual: hex(actual),
                });
            }
            if let Some(held) = &l.held {
                for run in held.runs(r.start / ps, (r.end - r.start) / ps) {
                    let (a, b) = ((run.start * ps - r.start) as usize, (run.end * ps - r.start) as usize);
                    buf[a..b].copy_from_slice(&scratch[a..b]);
                }
            }
        }
        Ok(())
    }
}
