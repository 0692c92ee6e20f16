//! The saved state's layout of version 1 (cevm up to commit f3e6526): no version
//! field, and one named field per device kind instead of sections. Kept to read
//! checkpoints and migration streams of that cevm; converted on reading.

use devices::virtio::mmio::MmioState;
use devices::SerialState;
use serde::{Deserialize, Serialize};

use super::device_ids;
use crate::error::Result;
use crate::state::{DeviceStates, InstanceState, VcpuState, VmState};

/// The instance state of version 1.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct InstanceStateV1 {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStatesV1,
}

/// The devices of version 1: the UART, and the virtio-blk transport if the
/// instance had a disk.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeviceStatesV1 {
    pub serial: SerialState,
    #[serde(default)]
    pub virtio_blk: Option<MmioState>,
}

impl InstanceStateV1 {
    /// The same state in today's layout: each device's state in its section.
    pub fn upgrade(self) -> Result<InstanceState> {
        let mut devices = DeviceStates::default();
        devices.insert(device_ids::SERIAL, self.devices.serial);
        if let Some(blk) = self.devices.virtio_blk {
            devices.insert(device_ids::VIRTIO_BLK, blk);
        }
        Ok(InstanceState { vm: self.vm, vcpus: self.vcpus, devices })
    }
}
