//! What an instance runs: the guest configuration, recorded in every checkpoint
//! manifest and sent in a live migration's Hello.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::MemoryBackend;

/// What the instance boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Boot {
    /// A built-in freestanding guest, by its name in crate `guests`, with its
    /// argument string (the image itself is given to [`crate::Instance::new`]).
    Builtin { guest: String, args: String },
    /// A Linux bzImage, with an optional initramfs and a command line.
    Linux { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
}

impl std::fmt::Display for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Boot::Builtin { guest, args } => write!(f, "{guest} \"{args}\""),
            Boot::Linux { kernel, initrd, cmdline } => {
                write!(f, "Linux {}", kernel.display())?;
                if let Some(i) = initrd {
                    write!(f, " + {}", i.display())?;
                }
                write!(f, " \"{cmdline}\"")
            }
        }
    }
}

/// The guest's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image the virtio-blk device reads and writes: raw or qcow2 (typically
    /// an overlay whose read-only backing file is the base image).
    pub path: PathBuf,
    /// Offer the disk read-only.
    pub read_only: bool,
}

/// A NIC: a virtio-net device on a host tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// The host tap interface it is bound to. A host resource: a restore or a
    /// migration's destination may bind the NIC to another.
    pub tap: String,
    /// Its MAC address (part of the guest: the same wherever it runs).
    pub mac: devices::virtio::net::MacAddr,
}

/// What an instance runs: the guest configuration, recorded in every checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceConfig {
    /// What to boot.
    pub boot: Boot,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Where guest memory lives.
    pub memory_backend: MemoryBackend,
    /// The virtio-blk disk, if any.
    #[serde(default)]
    pub disk: Option<DiskConfig>,
    /// The NICs, in the order the guest finds them (at most [`crate::layout::MAX_NICS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
}
