//! cevm's disks: raw and qcow2 images through the `imago` crate, with backing
//! chains (a read-only base B under a qcow2 overlay), and overlay creation.
//!
//! imago gives synchronous block access (`sync` feature): reads and writes take
//! `&self`, so one image serves the virtio-blk device without a lock of ours.

use std::io::Read;
use std::path::{Path, PathBuf};

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
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let n = f.read(&mut magic).map_err(|source| Error::Open { path: path.into(), source })?;
    Ok(if n == 4 && &magic == b"QFI\xfb" { ImageFormat::Qcow2 } else { ImageFormat::Raw })
}

/// An open disk image (with its backing chain, for qcow2).
pub struct Disk {
    access: FormatAccess<ImagoFile>,
    path: PathBuf,
    format: ImageFormat,
    writable: bool,
}

impl Disk {
    /// Opens `path` (format probed). A qcow2 image's backing chain is opened from
    /// its header, read-only. `writable` opens the top image for writing.
    pub fn open(path: &Path, writable: bool) -> Result<Disk, Error> {
        let format = probe_format(path)?;
        let open_err = |source| Error::Open { path: path.into(), source };
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
        Ok(Disk { access, path: path.into(), format, writable })
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
}

#[cfg(test)]
mod tests;
