//! Errors of the checkpoint format. Every one names the file at fault.

use std::path::PathBuf;

/// What is wrong with a checkpoint, or what failed while writing one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file's content does not match its checksum.
    #[error("{path}: checksum mismatch (expected {expected}, found {actual}): the file is damaged")]
    Checksum { path: PathBuf, expected: String, actual: String },
    /// One chunk of the memory image does not match its checksum (memory.chunks).
    #[error(
        "{path}: chunk {index} (bytes {start:#x}..{end:#x}) does not match its checksum (expected {expected}, found {actual}): the file is damaged there"
    )]
    Chunk { path: PathBuf, index: u64, start: u64, end: u64, expected: String, actual: String },
    /// A file has another size than the manifest says.
    #[error("{path}: size is {actual} bytes, the manifest says {expected}")]
    Size { path: PathBuf, expected: u64, actual: u64 },
    /// An entry of the checkpoint is not a regular file (a symbolic link, a
    /// FIFO, a device, a directory...): it is never followed nor read.
    #[error("{path}: is {kind}, not a regular file (a checkpoint holds only regular files)")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The directory holds entries its manifest does not list.
    #[error("{dir}: not listed in the manifest: {entries}")]
    Unlisted { dir: PathBuf, entries: String },
    /// A file is larger than what this format ever reads whole.
    #[error("{path}: {size} bytes, more than the {max} bytes such a file can have")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    /// A file of the checkpoint is missing.
    #[error("{path}: missing")]
    Missing { path: PathBuf },
    /// The manifest is of a format version this cevm does not read.
    #[error("{path}: unsupported checkpoint format version {found} (this cevm reads version {supported})")]
    UnsupportedVersion { path: PathBuf, found: u64, supported: u32 },
    /// The manifest does not start with its checksum field.
    #[error("{path}: manifest header damaged (it must begin with its \"manifest_crc32\" field)")]
    ManifestHeader { path: PathBuf },
    /// The manifest is not what this format says.
    #[error("{path}: invalid manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// An incremental checkpoint's chain of parents is broken at this link.
    #[error("{path}: broken checkpoint chain: {reason}")]
    Chain { path: PathBuf, reason: String },
    /// Writing was stopped by the one who asked for it.
    #[error("{path}: writing was stopped")]
    Stopped { path: PathBuf },
    /// The caller's memory does not match the layout.
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    /// A file operation failed.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::Missing { path }
            } else {
                Error::Io { path, op, source }
            }
        }
    }
}
