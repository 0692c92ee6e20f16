//! The cevm checkpoint format.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! DIR/
//!   manifest.json   what the checkpoint holds; checksummed itself (see below)
//!   state.json      the VMM's serialized vCPU/VM/device state (opaque here)
//!   memory.img      guest memory, each page at its guest-physical offset;
//!                   all-zero pages are holes, never written (a sparse file)
//!   memory.chunks   the CRC32 of each 2 MiB chunk of memory.img (the
//!                   manifest's `memory_chunk_size`), little-endian u32s: a
//!                   chunk can be checked alone (a lazy restore; see `chunks`)
//! ```
//!
//! **Incremental checkpoints** name a `parent` (a sibling directory's name, and
//! its `id`) in their
//! manifest and hold one more file, `pages.bitmap`: one bit per page of the
//! image (little-endian 64-bit words, bit i of word j = page 64 j + i), set
//! for the pages their memory.img holds; every other page is the parent's
//! (which may be incremental in turn). [`open_chain`] follows and checks
//! every link, [`load_chain`] loads them root first, [`merge_parent`] folds a
//! full parent into its child, which keeps its `id`.
//!
//! Callers may add other files with [`CheckpointWriter::write_file`]; the manifest
//! lists every file but itself with its size and CRC32 (IEEE, as `crc32` or
//! `gzip` compute it), memory.img's over its whole logical content (holes read as
//! zeros).
//!
//! **manifest.json's own checksum.** The file is pretty-printed JSON whose first
//! field is `"manifest_crc32": "XXXXXXXX"`, so it begins with the exact bytes
//! `{\n  "manifest_crc32": "`. The CRC32 is computed over the whole file with those
//! eight hex digits replaced by `00000000`. To check by hand: copy the file, put
//! `00000000` there, `crc32` the copy. Any flipped byte of the file is caught,
//! and the file stays plain JSON for `jq` and friends.
//!
//! **Reading trusts nothing** (see `reader`): manifest.json and every file it lists
//! must be regular files (a symbolic link, FIFO or device is refused, never
//! followed or read), each listed once; anything else in the directory is an
//! error naming it; manifest.json and the files read whole (state.json) have a
//! maximum size, checked before they are read; memory.img's size is its layout's.
//!
//! **Atomic commit.** Everything is written into a temporary sibling directory
//! (`.<name>.tmp-<pid>-<n>`), each file and the directory are fsynced, then the
//! directory is renamed into place (`renameat2(RENAME_EXCHANGE)` when an older
//! checkpoint is there, which is then removed) and the parent is fsynced. A crash at
//! any moment leaves the name holding one complete checkpoint, old or new.

mod chain;
mod chunks;
mod error;
mod lazy;
mod manifest;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use chain::{load_chain, merge_parent, open_chain, verify_chain_memory, PageBitmap};
pub use chunks::{chunk_count, CHUNKS_FILE, CHUNK_SIZE, MAX_CHUNK_SIZE};
pub use error::Error;
pub use lazy::ChunkReader;
pub use manifest::{seal_manifest, FileEntry, Manifest, MemoryLayout, MemoryRegionLayout, MemoryStats, ParentRef};
pub use reader::{
    read_manifest, verify, Checkpoint, MemoryTarget, VerifyReport, MAX_MANIFEST_SIZE, MAX_READ_SIZE, PROGRESS_STEP,
};
pub use writer::{exchange, write_memory_image, CheckpointWriter, MemoryProgress, MemorySource, Replaced};

/// Version of the format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The state file's name.
pub const STATE_FILE: &str = "state.json";
/// The memory image's name.
pub const MEMORY_FILE: &str = "memory.img";
/// An incremental checkpoint's map of the pages its memory image holds.
pub const PAGES_FILE: &str = "pages.bitmap";
/// Page size of memory images.
pub const PAGE_SIZE: u64 = 4096;

/// CRC32 as 8 lowercase hex digits.
pub(crate) fn hex(crc: u32) -> String {
    format!("{crc:08x}")
}
