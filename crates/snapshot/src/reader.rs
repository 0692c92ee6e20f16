//! Reading and checking a checkpoint.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::manifest::{decode, FileEntry, Manifest};
use crate::writer::hash_zeros;
use crate::{hex, Error, MANIFEST_FILE, MEMORY_FILE};

/// A contiguous piece of guest memory to fill on restore. The caller provides zeroed
/// memory: holes of the image are left untouched.
pub struct MemoryTarget<'a> {
    pub guest_addr: u64,
    pub data: &'a mut [u8],
}

/// A checkpoint whose manifest and small files have been checked.
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

fn read_checked(path: &Path, entry: &FileEntry) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(Error::io(path, "read"))?;
    if bytes.len() as u64 != entry.size {
        return Err(Error::Size { path: path.into(), expected: entry.size, actual: bytes.len() as u64 });
    }
    let actual = hex(crc32fast::hash(&bytes));
    if actual != entry.crc32 {
        return Err(Error::Checksum { path: path.into(), expected: entry.crc32.clone(), actual });
    }
    Ok(bytes)
}

impl Checkpoint {
    /// Checks manifest.json (checksum, version, fields), that every listed file is
    /// there with its size, and the CRC of every file but memory.img.
    pub fn open(dir: &Path) -> Result<Checkpoint, Error> {
        let mpath = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&mpath).map_err(Error::io(&mpath, "read"))?;
        let manifest = decode(&mpath, &bytes)?;
        let mut has_memory = false;
        for f in &manifest.files {
            if f.name.is_empty() || f.name.contains('/') || f.name == ".." || f.name == "." || f.name == MANIFEST_FILE {
                return Err(Error::Manifest { path: mpath, reason: format!("bad file name `{}`", f.name) });
            }
            let path = dir.join(&f.name);
            let size = std::fs::metadata(&path).map_err(Error::io(&path, "stat"))?.len();
            if size != f.size {
                return Err(Error::Size { path, expected: f.size, actual: size });
            }
            if f.name == MEMORY_FILE {
                has_memory = true;
                if size != manifest.memory.image_size() {
                    return Err(Error::Size { path, expected: manifest.memory.image_size(), actual: size });
                }
            } else {
                read_checked(&path, f)?;
            }
        }
        if !has_memory {
            return Err(Error::Manifest { path: mpath, reason: format!("lists no {MEMORY_FILE}") });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), manifest })
    }

    fn entry(&self, name: &str) -> Result<&FileEntry, Error> {
        self.manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::Manifest { path: self.dir.join(MANIFEST_FILE), reason: format!("lists no {name}") })
    }

    /// Reads one file of the checkpoint, checking its size and CRC again.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>, Error> {
        read_checked(&self.dir.join(name), self.entry(name)?)
    }

    /// Path of the memory image.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// Loads memory.img into `targets` (which must match the layout), reading only
    /// its data extents straight into them, and checks its CRC in the same pass.
    pub fn load_memory(&self, targets: &mut [MemoryTarget<'_>]) -> Result<(), Error> {
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
        self.scan_memory(targets)
    }

    /// Reads memory.img's data extents into the targets (parts outside every target
    /// into a scratch buffer) and checks the CRC of the whole logical content.
    fn scan_memory(&self, targets: &mut [MemoryTarget<'_>]) -> Result<(), Error> {
        let path = self.memory_path();
        let entry = self.entry(MEMORY_FILE)?;
        let f = File::open(&path).map_err(Error::io(&path, "open"))?;
        let size = f.metadata().map_err(Error::io(&path, "stat"))?.len();
        if size != entry.size {
            return Err(Error::Size { path, expected: entry.size, actual: size });
        }
        let mut crc = crc32fast::Hasher::new();
        let mut scratch = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let Some((start, end)) = next_extent(&f, pos, size).map_err(Error::io(&path, "seek"))? else { break };
            hash_zeros(&mut crc, start - pos);
            let mut off = start;
            while off < end {
                let target =
                    targets.iter_mut().find(|t| off >= t.guest_addr && off < t.guest_addr + t.data.len() as u64);
                let n = match target {
                    Some(t) => {
                        let n = (end - off).min(t.guest_addr + t.data.len() as u64 - off);
                        let at = (off - t.guest_addr) as usize;
                        let buf = &mut t.data[at..at + n as usize];
                        f.read_exact_at(buf, off).map_err(Error::io(&path, "read"))?;
                        crc.update(buf);
                        n
                    }
                    None => {
                        let n = (end - off).min(8 << 20);
                        scratch.resize(n as usize, 0);
                        f.read_exact_at(&mut scratch, off).map_err(Error::io(&path, "read"))?;
                        crc.update(&scratch);
                        n
                    }
                };
                off += n;
            }
            pos = end;
        }
        hash_zeros(&mut crc, size - pos);
        let actual = hex(crc.finalize());
        if actual != entry.crc32 {
            return Err(Error::Checksum { path, expected: entry.crc32.clone(), actual });
        }
        Ok(())
    }
}

/// The next data extent at or after `pos` (SEEK_DATA / SEEK_HOLE), or None.
fn next_extent(f: &File, pos: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
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

/// Checks a checkpoint completely: manifest, every file's size and CRC, memory.img
/// included (read as a stream).
pub fn verify(dir: &Path) -> Result<VerifyReport, Error> {
    let c = Checkpoint::open(dir)?;
    c.scan_memory(&mut [])?;
    Ok(VerifyReport { files: c.manifest.files.clone(), manifest: c.manifest })
}
