//! cevm's disks: raw and qcow2 images through the `imago` crate, with backing
//! chains (a read-only base B under a qcow2 overlay), and overlay creation.
//!
//! imago gives synchronous block access (`sync` feature): reads and writes take
//! `&self`, so one image serves the virtio-blk device without a lock of ours.

use std::path::{Path, PathBuf};

pub mod integration;
pub mod qcow2_check;

pub use integration::GuestDisk;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate, Storage, StorageCreateOptions,
};

/// Errors of disk images. Each names the image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened (missing, not an image, corrupt, or its backing file is).
    #[error("disk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// An overlay cannot be created.
    #[error("cannot create overlay {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    /// Refusing to do something that would lose data.
    #[error("disk image {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
}

/// Image formats cevm opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img and qcow2 headers use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Tells qcow2 from raw by the qcow2 magic.
pub fn probe_format(path: &Path) -> Result<ImageFormat, Error> {
    let f = std::fs::File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    probe_format_of(&f, path)
}

/// [`probe_format`] of an open file (`path` names it in errors).
pub fn probe_format_of(f: &std::fs::File, path: &Path) -> Result<ImageFormat, Error> {
    let mut magic = [0u8; 4];
    let n = std::os::unix::fs::FileExt::read_at(f, &mut magic, 0)
        .map_err(|source| Error::Open { path: path.into(), source })?;
    Ok(if n == 4 && &magic == b"QFI\xfb" { ImageFormat::Qcow2 } else { ImageFormat::Raw })
}

/// An open disk image (with its backing chain, for qcow2).
pub struct Disk {
    access: FormatAccess<ImagoFile>,
    path: PathBuf,
    format: ImageFormat,
    writable: bool,
    /// A qcow2 image's cluster size (from its header); 0 for raw images.
    cluster_size: u64,
}

impl Disk {
    /// Opens `path` (format probed). A qcow2 image's backing chain is opened from
    /// its header, read-only. `writable` opens the top image for writing; a qcow2
    /// image is first checked, and repaired if a killed writer left its refcounts
    /// behind its tables ([`qcow2_check`], which says so in a warning).
    pub fn open(path: &Path, writable: bool) -> Result<Disk, Error> {
        let format = probe_format(path)?;
        let open_err = |source| Error::Open { path: path.into(), source };
        if writable && format == ImageFormat::Qcow2 {
            qcow2_check::repair_before_writing(path)?;
        }
        let access = match format {
            ImageFormat::Qcow2 => FormatAccess::new(
                Qcow2::<ImagoFile>::builder_path(path)
                    .write(writable)
                    .open(PermissiveImplicitOpenGate::default())
                    .map_err(open_err)?,
            ),
            ImageFormat::Raw => FormatAccess::new(
                Raw::<ImagoFile>::builder_path(path)
                    .write(writable)
                    .open(PermissiveImplicitOpenGate::default())
                    .map_err(open_err)?,
            ),
        };
        let cluster_size = match format {
            ImageFormat::Qcow2 => qcow2_cluster_size(path).map_err(open_err)?,
            ImageFormat::Raw => 0,
        };
        Ok(Disk { access, path: path.into(), format, writable, cluster_size })
    }

    /// Creates a qcow2 overlay at `overlay` whose backing file is `base` (recorded
    /// as given: a relative name is relative to the overlay's directory, as in qemu).
    /// The overlay has the base's size. Never overwrites an existing file.
    pub fn create_overlay(overlay: &Path, base: &Path) -> Result<(), Error> {
        let base_full =
            if base.is_absolute() { base.to_path_buf() } else { overlay.parent().unwrap_or(Path::new(".")).join(base) };
        let base_disk = Disk::open(&base_full, false)?;
        let create_err = |source| Error::Create { path: overlay.into(), source };
        if overlay.exists() {
            return Err(Error::Refused { path: overlay.into(), reason: "already exists; not overwriting it".into() });
        }
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(overlay).overwrite(false))
            .map_err(create_err)?;
        Qcow2::<ImagoFile>::create_builder(file)
            .backing(base.to_string_lossy().into_owned(), base_disk.format.name().to_string())
            .size(base_disk.size())
            .create()
            .map_err(create_err)
    }

    /// Size of the virtual disk in bytes.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.access.read(buf, offset)
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !self.writable {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "disk is read-only"));
        }
        self.access.write(buf, offset)
    }

    /// Makes every completed write durable: imago's caches, then fsync.
    pub fn flush(&self) -> std::io::Result<()> {
        self.access.flush()?;
        self.access.sync()
    }

    /// The cluster size of a qcow2 image and the clusters the image itself holds
    /// (data or explicit zeroes), in address order; not those its backing file
    /// provides. This is the "allocated clusters of T" a CEVM integration walks.
    pub fn own_clusters(&self) -> Result<(u64, Vec<u64>), Error> {
        use imago::ShallowMapping;
        let err = |source| Error::Open { path: self.path.clone(), source };
        if self.format != ImageFormat::Qcow2 {
            return Err(Error::Refused { path: self.path.clone(), reason: "not a qcow2 image".into() });
        }
        let cluster = self.cluster_size;
        let (size, mut off, mut own) = (self.size(), 0u64, Vec::new());
        while off < size {
            let (mapping, len) = self.access.get_shallow_mapping(off, size - off).map_err(err)?;
            let len = len.max(1);
            let held = match mapping {
                ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => true,
                ShallowMapping::Zero { explicit, .. } => explicit,
                ShallowMapping::Indirect { .. } => false,
                ShallowMapping::Eof { .. } => break,
                _ => true,
            };
            if held {
                own.extend(off / cluster..(off + len).div_ceil(cluster));
            }
            off += len;
        }
        own.dedup();
        Ok((cluster, own))
    }
}

/// Copies an image file, keeping it sparse: only its data extents are copied
/// (SEEK_DATA/SEEK_HOLE + copy_file_range), holes stay holes. `dst` must not exist.
pub fn copy_image(src: &Path, dst: &Path) -> Result<(), Error> {
    let from = std::fs::File::open(src).map_err(|source| Error::Open { path: src.into(), source })?;
    copy_image_from(&from, src, dst)
}

/// [`copy_image`] from an open file (`src` names it in errors): the copy is of
/// the file opened, whatever its name is by now.
pub fn copy_image_from(from: &std::fs::File, src: &Path, dst: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let rerr = |source| Error::Open { path: src.into(), source };
    let werr = |source| Error::Create { path: dst.into(), source };
    let size = from.metadata().map_err(rerr)?.len();
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(dst).map_err(werr)?;
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek takes no pointer, only the descriptor of `from`, open for
        // the whole call; it moves that file's offset and touches no memory of ours.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(rerr(e));
        }
        // SAFETY: as the SEEK_DATA call above: no pointer, `from` open.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(rerr(std::io::Error::last_os_error()));
        }
        let (mut off_in, mut off_out) = (data, data);
        let end = (hole as u64).min(size) as i64;
        while off_in < end {
            // SAFETY: both descriptors belong to files open for the whole call, and
            // the two offset pointers point to live local i64s the call updates.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    (end - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // Between some file systems (tmpfs and ext4, say) the kernel will
                // not copy in place: copy through a buffer instead.
                if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) {
                    copy_range_buffered(from, &to, off_in as u64, end as u64).map_err(werr)?;
                    off_in = end;
                    continue;
                }
                return Err(werr(e));
            }
            if n == 0 {
                return Err(werr(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                )));
            }
        }
        pos = end as u64;
    }
    to.set_len(size).map_err(werr)?;
    to.sync_all().map_err(werr)
}

/// Copies bytes [start, end) of `from` to the same offsets of `to` through a buffer.
fn copy_range_buffered(from: &std::fs::File, to: &std::fs::File, start: u64, end: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        from.read_exact_at(&mut buf[..n], off)?;
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// The backing file name recorded in a qcow2 image's header (None for raw images
/// and images without a backing file).
pub fn backing_file(path: &Path) -> Result<Option<String>, Error> {
    let err = |source| Error::Open { path: path.into(), source };
    if probe_format(path)? != ImageFormat::Qcow2 {
        return Ok(None);
    }
    let f = std::fs::File::open(path).map_err(err)?;
    let mut hdr = [0u8; 24];
    read_exact_at(&f, &mut hdr, 0).map_err(err)?;
    let offset = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap_or_default());
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    let mut name = vec![0u8; len as usize];
    read_exact_at(&f, &mut name, offset).map_err(err)?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// The cluster size a qcow2 header records (bytes 20..24: its log2).
fn qcow2_cluster_size(path: &Path) -> std::io::Result<u64> {
    let f = std::fs::File::open(path)?;
    let mut hdr = [0u8; 24];
    read_exact_at(&f, &mut hdr, 0)?;
    let bits = u32::from_be_bytes(hdr[20..24].try_into().unwrap_or_default());
    if !(9..=21).contains(&bits) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("invalid cluster size 2^{bits}")));
    }
    Ok(1 << bits)
}

fn read_exact_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

/// Rewrites the backing file name in a qcow2 image's header.
///
/// imago cannot change it (and the product must not depend on `qemu-img rebase
/// -u`), so this is done by hand, following the qcow2 specification: the name is
/// stored at `backing_file_offset` (header bytes 8..16, big-endian) with its length
/// at bytes 16..20, and it lives in the header cluster after the header
/// extensions, with nothing after it in that cluster. The new name is written in
/// place and must fit before the end of the first cluster; the old name's tail is
/// zeroed. The image's data and metadata are not touched.
pub fn set_backing_file(path: &Path, name: &str) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let err = |source| Error::Open { path: path.into(), source };
    let refuse = |reason: String| Error::Refused { path: path.into(), reason };
    if probe_format(path)? != ImageFormat::Qcow2 {
        return Err(refuse("not a qcow2 image".into()));
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
    let mut hdr = [0u8; 24];
    read_exact_at(&f, &mut hdr, 0).map_err(err)?;
    let offset = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
    let old_len = u32::from_be_bytes(hdr[16..20].try_into().unwrap_or_default());
    let cluster_bits = u32::from_be_bytes(hdr[20..24].try_into().unwrap_or_default());
    if offset == 0 {
        return Err(refuse("has no backing file to rename".into()));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(refuse(format!("invalid cluster size 2^{cluster_bits}")));
    }
    let end = offset + name.len().max(old_len as usize) as u64;
    if name.is_empty() || name.len() > 1023 || end > 1 << cluster_bits {
        return Err(refuse(format!("backing file name of {} bytes does not fit in the header cluster", name.len())));
    }
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(name.len().max(old_len as usize), 0);
    f.write_all_at(&bytes, offset).map_err(err)?;
    f.write_all_at(&(name.len() as u32).to_be_bytes(), 16).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests;
