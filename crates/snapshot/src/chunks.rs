//! Per-chunk checksums of the memory image (`memory.chunks`), so that a part
//! of it can be checked alone: a lazy restore checks each chunk before the
//! guest sees any of it, without reading the rest of the image first.
//!
//! `memory.chunks` holds one CRC32 per `memory_chunk_size` bytes of
//! memory.img's logical content (holes read as zeros), little-endian `u32`s,
//! chunk k covering bytes `[k C, min((k + 1) C, size))`. It is a file of its
//! own rather than a list in manifest.json because a large guest has many
//! chunks (2 MiB each: 512 per GiB, 8 hex digits each in JSON) and the
//! manifest is bounded ([`crate::MAX_MANIFEST_SIZE`]); the manifest lists it
//! with its size and CRC like every other file, so it is as trusted as the
//! manifest itself.

use std::path::Path;

use crate::writer::hash_zeros;
use crate::{hex, Error};

/// Size of the chunks new checkpoints checksum: a huge page.
pub const CHUNK_SIZE: u64 = 2 << 20;
/// The chunk checksums' file name.
pub const CHUNKS_FILE: &str = "memory.chunks";
/// The largest chunk size a manifest may give (a sanity bound: a lazy restore
/// reads a chunk whole before the guest may touch any of it).
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// The CRC32 of each chunk of a byte stream and of the whole, in one pass:
/// bytes are hashed once, into their chunk's CRC, and the whole stream's CRC
/// is put together from the chunks' (crc32fast's `combine`); runs of zeros
/// cost O(log n), however long (see [`hash_zeros`]).
#[derive(Clone)]
pub(crate) struct ChunkedCrc {
    chunk: u64,
    /// Bytes fed so far.
    pos: u64,
    /// The current chunk's CRC so far.
    cur: crc32fast::Hasher,
    sums: Vec<u32>,
    whole: crc32fast::Hasher,
    /// The CRC of a whole chunk of zeros.
    zero_chunk: u32,
}

impl ChunkedCrc {
    pub(crate) fn new(chunk: u64) -> Self {
        assert!(chunk > 0, "chunks of no bytes");
        let mut z = crc32fast::Hasher::new();
        hash_zeros(&mut z, chunk);
        ChunkedCrc {
            chunk,
            pos: 0,
            cur: crc32fast::Hasher::new(),
            sums: Vec::new(),
            whole: crc32fast::Hasher::new(),
            zero_chunk: z.finalize(),
        }
    }

    /// Closes the current chunk, of `len` bytes.
    fn close(&mut self, len: u64) {
        let c = std::mem::replace(&mut self.cur, crc32fast::Hasher::new()).finalize();
        self.sums.push(c);
        self.whole.combine(&crc32fast::Hasher::new_with_initial_len(c, len));
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.chunk - self.pos % self.chunk;
            let n = room.min(data.len() as u64) as usize;
            self.cur.update(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.pos % self.chunk == 0 {
                self.close(self.chunk);
            }
        }
    }

    /// Feeds `n` zero bytes without reading any.
    pub(crate) fn zeros(&mut self, mut n: u64) {
        let off = self.pos % self.chunk;
        if off != 0 && n > 0 {
            let k = n.min(self.chunk - off);
            hash_zeros(&mut self.cur, k);
            self.pos += k;
            n -= k;
            if self.pos % self.chunk == 0 {
                self.close(self.chunk);
            }
        }
        let whole_chunks = n / self.chunk;
        if whole_chunks > 0 {
            self.sums.extend(std::iter::repeat_n(self.zero_chunk, whole_chunks as usize));
            // The whole's CRC goes on over zeros: one shift, not one per chunk.
            hash_zeros(&mut self.whole, whole_chunks * self.chunk);
            self.pos += whole_chunks * self.chunk;
            n -= whole_chunks * self.chunk;
        }
        if n > 0 {
            hash_zeros(&mut self.cur, n);
            self.pos += n;
        }
    }

    /// The whole stream's CRC (8 hex digits) and each chunk's.
    pub(crate) fn finish(mut self) -> (String, Vec<u32>) {
        let tail = self.pos % self.chunk;
        if tail != 0 {
            self.close(tail);
        }
        (hex(self.whole.finalize()), self.sums)
    }
}

/// How many chunks of `chunk` bytes an image of `size` bytes has.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// The bytes of `memory.chunks` for these sums.
pub(crate) fn to_bytes(sums: &[u32]) -> Vec<u8> {
    sums.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// The sums `memory.chunks` (at `path`) holds, which must be `count`.
pub(crate) fn from_bytes(path: &Path, bytes: &[u8], count: u64) -> Result<Vec<u32>, Error> {
    if bytes.len() as u64 != count * 4 {
        return Err(Error::Size { path: path.into(), expected: count * 4, actual: bytes.len() as u64 });
    }
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4"))).collect())
}

/// The CRC32 of `len` zero bytes.
pub(crate) fn zeros_crc(len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    hash_zeros(&mut h, len);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk sums and the whole CRC equal those computed directly, for data
    /// and zeros fed in pieces that do and do not fall on chunk boundaries.
    #[test]
    fn chunk_sums_and_the_whole_match_a_direct_computation() {
        let chunk = 4096u64;
        // (data bytes, then zeros), repeated.
        let pieces: [(usize, u64); 6] = [(100, 0), (5000, 3), (0, 9000), (4096, 4096), (1, 3 * 4096 + 5), (7, 0)];
        let mut c = ChunkedCrc::new(chunk);
        let mut all = Vec::new();
        let mut seed = 7u8;
        for (d, z) in pieces {
            let data: Vec<u8> = (0..d)
                .map(|_| {
                    seed = seed.wrapping_mul(31).wrapping_add(17);
                    seed
                })
                .collect();
            c.update(&data);
            all.extend_from_slice(&data);
            c.zeros(z);
            all.extend(std::iter::repeat_n(0u8, z as usize));
        }
        let (whole, sums) = c.finish();
        assert_eq!(whole, hex(crc32fast::hash(&all)));
        let want: Vec<u32> = all.chunks(chunk as usize).map(crc32fast::hash).collect();
        assert_eq!(sums, want);
        assert_eq!(sums.len() as u64, chunk_count(all.len() as u64, chunk));
        assert_eq!(zeros_crc(4096), crc32fast::hash(&[0; 4096]));
    }

    #[test]
    fn the_file_round_trips_and_a_wrong_length_is_refused() {
        let sums = vec![1, 0xdead_beef, 0];
        let p = Path::new("memory.chunks");
        assert_eq!(from_bytes(p, &to_bytes(&sums), 3).unwrap(), sums);
        assert!(matches!(from_bytes(p, &to_bytes(&sums), 4), Err(Error::Size { expected: 16, actual: 12, .. })));
    }
}
