//! Reading and checking a checkpoint. Nothing in the directory is trusted: every
//! file is opened without following a symbolic link and without blocking (a FIFO
//! or a device is refused, never read), must be a regular file the manifest lists
//! once, and is bounded in size before anything is read from it; an entry the
//! manifest does not list is an error that names it.

use std::collections::HashSet;
use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::chunks::{self, chunk_count, ChunkedCrc, CHUNKS_FILE, CHUNK_SIZE, MAX_CHUNK_SIZE};
use crate::manifest::{decode, FileEntry, Manifest};
use crate::{hex, Error, MANIFEST_FILE, MEMORY_FILE, STATE_FILE};

/// The largest manifest.json read: a manifest lists a few files and a guest
/// configuration, a few KiB.
pub const MAX_MANIFEST_SIZE: u64 = 1 << 20;
/// The largest file read whole into memory ([`Checkpoint::read_file`]), state.json
/// among them: the state of a 64-vCPU guest is about 1.6 MiB of JSON.
pub const MAX_READ_SIZE: u64 = 16 << 20;
/// How many unlisted entries an error names (then says how many more there are).
const UNLISTED_NAMED: usize = 8;

/// A contiguous piece of guest memory to fill on restore. The caller provides zeroed
/// memory: holes of the image are left untouched.
pub struct MemoryTarget<'a> {
    pub guest_addr: u64,
    pub data: &'a mut [u8],
}

/// A checkpoint whose manifest and small files have been checked.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What [`verify`] checked.
pub struct VerifyReport {
    pub manifest: Manifest,
    /// Every file checked, memory.img included.
    pub files: Vec<FileEntry>,
}

/// What a file type is, in words.
fn kind_of(t: FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "of an unknown kind"
    }
}

/// Opens `path` for reading if it is a regular file, and returns it with its
/// size. `O_NOFOLLOW`: a symbolic link is refused, not followed; `O_NONBLOCK`: a
/// FIFO opens at once (then is refused by its type) instead of waiting for a writer.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), Error> {
    let opened =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path);
    let f = match opened {
        Ok(f) => f,
        // ELOOP is O_NOFOLLOW's answer for a link; ENXIO a socket's: say what it is.
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_file() => {
                return Err(Error::NotRegular { path: path.into(), kind: kind_of(m.file_type()) })
            }
            _ => return Err(Error::io(path, "open")(e)),
        },
    };
    let meta = f.metadata().map_err(Error::io(path, "stat"))?;
    if !meta.file_type().is_file() {
        return Err(Error::NotRegular { path: path.into(), kind: kind_of(meta.file_type()) });
    }
    Ok((f, meta.len()))
}

/// Reads all of `f` (of `size` bytes by its metadata), refusing more than `max`
/// bytes before and while reading (a file that grows is not read past `max`).
fn read_bounded(f: &File, path: &Path, size: u64, max: u64) -> Result<Vec<u8>, Error> {
    if size > max {
        return Err(Error::TooLarge { path: path.into(), size, max });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(Error::io(path, "read"))?;
    if bytes.len() as u64 > max {
        return Err(Error::TooLarge { path: path.into(), size: bytes.len() as u64, max });
    }
    Ok(bytes)
}

/// Checks the size and CRC of an open file against its entry, reading it in
/// pieces (a disk image can be large).
fn check_streamed(mut f: &File, path: &Path, entry: &FileEntry) -> Result<(), Error> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(Error::io(path, "read"))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > entry.size {
            break;
        }
        crc.update(&buf[..n]);
    }
    if size != entry.size {
        return Err(Error::Size { path: path.into(), expected: entry.size, actual: size });
    }
    let actual = hex(crc.finalize());
    if actual != entry.crc32 {
        return Err(Error::Checksum { path: path.into(), expected: entry.crc32.clone(), actual });
    }
    Ok(())
}

/// Checks the names the manifest lists: plain file names, each once, memory.img
/// among them, and state.json no larger than it can be read.
fn check_names(mpath: &Path, manifest: &Manifest) -> Result<(), Error> {
    let bad = |reason: String| Error::Manifest { path: mpath.into(), reason };
    let mut seen = HashSet::new();
    for f in &manifest.files {
        let n = f.name.as_str();
        if n.is_empty() || n.contains('/') || n.contains('\0') || n == ".." || n == "." || n == MANIFEST_FILE {
            return Err(bad(format!("bad file name `{n}`")));
        }
        if !seen.insert(n) {
            return Err(bad(format!("lists `{n}` twice")));
        }
        if n == STATE_FILE && f.size > MAX_READ_SIZE {
            return Err(Error::TooLarge { path: mpath.with_file_name(n), size: f.size, max: MAX_READ_SIZE });
        }
    }
    if !seen.contains(MEMORY_FILE) {
        return Err(bad(format!("lists no {MEMORY_FILE}")));
    }
    let c = manifest.memory_chunk_size;
    match manifest.files.iter().find(|f| f.name == CHUNKS_FILE) {
        None if c == 0 => {}
        None => return Err(bad(format!("gives a memory_chunk_size but lists no {CHUNKS_FILE}"))),
        Some(_) if c == 0 => return Err(bad(format!("lists {CHUNKS_FILE} but gives no memory_chunk_size"))),
        Some(f) => {
            let ps = manifest.memory.page_size;
            if !c.is_power_of_two() || c < ps || c > MAX_CHUNK_SIZE {
                return Err(bad(format!("memory_chunk_size {c} is not a power of two from the page size to 1 GiB")));
            }
            let want = 4 * chunk_count(manifest.memory.image_size(), c);
            if f.size != want {
                return Err(Error::Size { path: mpath.with_file_name(CHUNKS_FILE), expected: want, actual: f.size });
            }
        }
    }
    Ok(())
}

/// Refuses every entry of `dir` the manifest does not list (files, directories,
/// links, whatever they are), naming them.
fn check_listing(dir: &Path, manifest: &Manifest) -> Result<(), Error> {
    let listed: HashSet<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    let mut unlisted = Vec::new();
    for e in std::fs::read_dir(dir).map_err(Error::io(dir, "list"))? {
        let e = e.map_err(Error::io(dir, "list"))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == MANIFEST_FILE || listed.contains(name.as_ref()) {
            continue;
        }
        let kind = e.file_type().map(kind_of).unwrap_or("of an unknown kind");
        unlisted.push(format!("`{name}` ({kind})"));
    }
    if unlisted.is_empty() {
        return Ok(());
    }
    unlisted.sort();
    let more = unlisted.len().saturating_sub(UNLISTED_NAMED);
    unlisted.truncate(UNLISTED_NAMED);
    let mut entries = unlisted.join(", ");
    if more > 0 {
        entries.push_str(&format!(" and {more} more"));
    }
    Err(Error::Unlisted { dir: dir.into(), entries })
}

impl Checkpoint {
    /// Checks manifest.json (bounded size, checksum, version, fields, each name
    /// listed once), that the directory holds nothing else, that every listed file
    /// is a regular file of its size, and the CRC of every file but memory.img.
    pub fn open(dir: &Path) -> Result<Checkpoint, Error> {
        let mpath = dir.join(MANIFEST_FILE);
        let (f, size) = open_regular(&mpath)?;
        let bytes = read_bounded(&f, &mpath, size, MAX_MANIFEST_SIZE)?;
        let manifest = decode(&mpath, &bytes)?;
        check_names(&mpath, &manifest)?;
        check_listing(dir, &manifest)?;
        for entry in &manifest.files {
            let path = dir.join(&entry.name);
            let (f, size) = open_regular(&path)?;
            if size != entry.size {
                return Err(Error::Size { path, expected: entry.size, actual: size });
            }
            if entry.name == MEMORY_FILE {
                if size != manifest.memory.image_size() {
                    return Err(Error::Size { path, expected: manifest.memory.image_size(), actual: size });
                }
            } else {
                check_streamed(&f, &path, entry)?;
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), manifest })
    }

    pub(crate) fn entry(&self, name: &str) -> Result<&FileEntry, Error> {
        self.manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::Manifest { path: self.dir.join(MANIFEST_FILE), reason: format!("lists no {name}") })
    }

    /// Reads one file of the checkpoint whole (at most [`MAX_READ_SIZE`] bytes),
    /// checking again that it is a regular file, its size and its CRC.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>, Error> {
        let entry = self.entry(name)?;
        let path = self.dir.join(name);
        let (f, size) = open_regular(&path)?;
        let bytes = read_bounded(&f, &path, size, MAX_READ_SIZE)?;
        if bytes.len() as u64 != entry.size {
            return Err(Error::Size { path, expected: entry.size, actual: bytes.len() as u64 });
        }
        let actual = hex(crc32fast::hash(&bytes));
        if actual != entry.crc32 {
            return Err(Error::Checksum { path, expected: entry.crc32.clone(), actual });
        }
        Ok(bytes)
    }

    /// Opens one listed file of the checkpoint for reading (a regular file, never
    /// through a link), checking its size again: to copy a disk image from.
    pub fn open_file(&self, name: &str) -> Result<File, Error> {
        let entry = self.entry(name)?;
        let path = self.dir.join(name);
        let (f, size) = open_regular(&path)?;
        if size != entry.size {
            return Err(Error::Size { path, expected: entry.size, actual: size });
        }
        Ok(f)
    }

    /// Checks memory.img's CRC over its whole logical content (holes read as zeros).
    pub fn verify_memory(&self) -> Result<(), Error> {
        self.verify_memory_with(&mut |_, _| {})
    }

    /// [`verify_memory`](Self::verify_memory), calling `progress(done, total)`
    /// with the bytes of memory.img's logical content checked so far as it goes
    /// (after each hole and each read of at most [`PROGRESS_STEP`] bytes).
    pub fn verify_memory_with(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), Error> {
        self.scan_memory(&mut [], progress)
    }

    /// Path of the memory image.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// Loads memory.img into `targets` (which must match the layout), reading only
    /// its data extents straight into them, and checks its CRC in the same pass.
    pub fn load_memory(&self, targets: &mut [MemoryTarget<'_>]) -> Result<(), Error> {
        self.load_memory_with(targets, &mut |_, _| {})
    }

    /// [`load_memory`](Self::load_memory), calling `progress(done, total)` as
    /// [`verify_memory_with`](Self::verify_memory_with) does.
    pub fn load_memory_with(
        &self,
        targets: &mut [MemoryTarget<'_>],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error> {
        let path = self.memory_path();
        let layout = &self.manifest.memory;
        let matches = targets.len() == layout.regions.len()
            && targets
                .iter()
                .zip(&layout.regions)
                .all(|(t, r)| t.guest_addr == r.guest_addr && t.data.len() as u64 == r.size);
        if !matches {
            return Err(Error::Layout { path, reason: "guest memory does not match the checkpoint's layout".into() });
        }
        self.scan_memory(targets, progress)
    }

    /// Reads memory.img's data extents into the targets (parts outside every target
    /// into a scratch buffer) and checks the CRC of the whole logical content.
    fn scan_memory(&self, targets: &mut [MemoryTarget<'_>], progress: &mut dyn FnMut(u64, u64)) -> Result<(), Error> {
        let path = self.memory_path();
        let entry = self.entry(MEMORY_FILE)?;
        let (f, size) = open_regular(&path)?;
        if size != entry.size {
            return Err(Error::Size { path, expected: entry.size, actual: size });
        }
        let sums = self.chunk_sums()?;
        let mut crc = ChunkedCrc::new(self.chunk_size());
        let mut scratch = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let Some((start, end)) = next_extent(&f, pos, size).map_err(Error::io(&path, "seek"))? else { break };
            crc.zeros(start - pos);
            progress(start, size);
            let mut off = start;
            while off < end {
                let target =
                    targets.iter_mut().find(|t| off >= t.guest_addr && off < t.guest_addr + t.data.len() as u64);
                let n = match target {
                    Some(t) => {
                        let n = (end - off).min(t.guest_addr + t.data.len() as u64 - off).min(PROGRESS_STEP);
                        let at = (off - t.guest_addr) as usize;
                        let buf = &mut t.data[at..at + n as usize];
                        f.read_exact_at(buf, off).map_err(Error::io(&path, "read"))?;
                        crc.update(buf);
                        n
                    }
                    None => {
                        let n = (end - off).min(PROGRESS_STEP);
                        scratch.resize(n as usize, 0);
                        f.read_exact_at(&mut scratch, off).map_err(Error::io(&path, "read"))?;
                        crc.update(&scratch);
                        n
                    }
                };
                off += n;
                progress(off, size);
            }
            pos = end;
        }
        crc.zeros(size - pos);
        progress(size, size);
        self.check_sums(crc, sums.as_deref())
    }

    /// The bytes each memory chunk covers: the manifest's `memory_chunk_size`,
    /// or (an older checkpoint without chunk sums) the size new ones use.
    pub fn chunk_size(&self) -> u64 {
        match self.manifest.memory_chunk_size {
            0 => CHUNK_SIZE,
            c => c,
        }
    }

    /// The CRC32 of each chunk of memory.img (memory.chunks, read and checked
    /// against the manifest); `None` for a checkpoint written before them.
    pub fn chunk_sums(&self) -> Result<Option<Vec<u32>>, Error> {
        if self.manifest.memory_chunk_size == 0 {
            return Ok(None);
        }
        let bytes = self.read_file(CHUNKS_FILE)?;
        let n = chunk_count(self.manifest.memory.image_size(), self.manifest.memory_chunk_size);
        chunks::from_bytes(&self.dir.join(CHUNKS_FILE), &bytes, n).map(Some)
    }

    /// Checks what a pass over memory.img hashed against its chunks' sums
    /// (naming the first chunk that differs) and its whole CRC.
    pub(crate) fn check_sums(&self, crc: ChunkedCrc, sums: Option<&[u32]>) -> Result<(), Error> {
        let path = self.memory_path();
        let entry = self.entry(MEMORY_FILE)?;
        let (whole, got) = crc.finish();
        if let Some(want) = sums {
            let c = self.chunk_size();
            let size = self.manifest.memory.image_size();
            if let Some(k) = (0..want.len()).find(|&k| got.get(k) != Some(&want[k])) {
                let start = k as u64 * c;
                return Err(Error::Chunk {
                    path,
                    index: k as u64,
                    start,
                    end: (start + c).min(size),
                    expected: hex(want[k]),
                    actual: got.get(k).map_or_else(|| "nothing".into(), |&a| hex(a)),
                });
            }
        }
        if whole != entry.crc32 {
            return Err(Error::Checksum { path, expected: entry.crc32.clone(), actual: whole });
        }
        Ok(())
    }
}

/// The most memory.img bytes read between two progress reports (and the
/// scratch buffer's size for data outside every target).
pub const PROGRESS_STEP: u64 = 8 << 20;

/// The next data extent at or after `pos` (SEEK_DATA / SEEK_HOLE), or None.
pub(crate) fn next_extent(f: &File, pos: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek takes no pointer, only `fd`, which `f` keeps open for the
    // whole call; it moves that file's offset and touches no memory of ours.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    // SAFETY: as the SEEK_DATA call above: no pointer, `fd` kept open by `f`.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((data as u64, (hole as u64).min(size))))
}

/// Reads and checks (bounded size, checksum, version, fields) the manifest of
/// the checkpoint at `dir`, and nothing else.
pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let mpath = dir.join(MANIFEST_FILE);
    let (f, size) = open_regular(&mpath)?;
    let bytes = read_bounded(&f, &mpath, size, MAX_MANIFEST_SIZE)?;
    decode(&mpath, &bytes)
}

/// Checks a checkpoint completely: manifest, every file's size and CRC, memory.img
/// included (read as a stream).
pub fn verify(dir: &Path) -> Result<VerifyReport, Error> {
    let c = Checkpoint::open(dir)?;
    c.verify_memory()?;
    Ok(VerifyReport { files: c.manifest.files.clone(), manifest: c.manifest })
}
