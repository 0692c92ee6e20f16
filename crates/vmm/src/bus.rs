//! The x86 I/O port bus: port ranges mapped to devices.

use std::sync::{Arc, Mutex};

use devices::{IoAction, MmioDevice, PioDevice};

/// A device shared between the bus (vCPU threads) and its owner (to save its state).
pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port ranges and their devices. Built before the vCPUs start, read-only after.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<(u16, u16, SharedDevice)>,
}

impl PioBus {
    /// Adds `device` at ports `base .. base + len`. Ranges must not overlap.
    pub fn insert(&mut self, base: u16, len: u16, device: SharedDevice) {
        debug_assert!(self.ranges.iter().all(|(b, l, _)| base + len <= *b || *b + *l <= base));
        self.ranges.push((base, len, device));
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.ranges.iter().find(|(b, l, _)| port >= *b && port - *b < *l).map(|(b, _, d)| (port - *b, d))
    }

    /// A guest read of `port`. A port without a device reads as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((off, dev)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to `port`. Writes to a port without a device are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        match self.find(port) {
            Some((off, dev)) => lock(dev).write(off, data),
            None => IoAction::None,
        }
    }
}

/// An MMIO device shared between the bus and its owner.
pub type SharedMmioDevice = Arc<Mutex<dyn MmioDevice>>;

/// Guest-physical MMIO ranges and their devices. Built before the vCPUs start.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<(u64, u64, SharedMmioDevice)>,
}

impl MmioBus {
    /// Adds `device` at `base .. base + len`. Ranges must not overlap.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedMmioDevice) {
        debug_assert!(self.ranges.iter().all(|(b, l, _)| base + len <= *b || *b + *l <= base));
        self.ranges.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedMmioDevice)> {
        self.ranges.iter().find(|(b, l, _)| addr >= *b && addr - *b < *l).map(|(b, _, d)| (addr - *b, d))
    }

    /// A guest read at `addr`. Unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, dev)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write at `addr`. Writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> IoAction {
        match self.find(addr) {
            Some((off, dev)) => lock(dev).write(off, data),
            None => IoAction::None,
        }
    }
}

/// Locks a device. A device whose lock is poisoned (a vCPU thread panicked inside
/// it) is still used: device state is plain registers, never left half-updated
/// in a way that breaks memory safety.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::ExitPort;

    #[test]
    fn routes_by_port_and_ignores_holes() {
        let mut bus = PioBus::default();
        bus.insert(0xf4, 1, Arc::new(Mutex::new(ExitPort)));
        assert_eq!(bus.write(0xf4, &[5, 0, 0, 0]), IoAction::GuestExit(5));
        assert_eq!(bus.write(0xf5, &[5]), IoAction::None);
        let mut b = [0u8; 1];
        bus.read(0x80, &mut b);
        assert_eq!(b, [0xff]);
    }
}
