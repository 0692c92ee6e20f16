//! A migration destination's NICs, before the switch (root: makes a tap).

use vmm::{Boot, InstanceConfig, NicConfig, Shell};

/// A host tap for the test, deleted at the end.
struct HostTap(String);

impl HostTap {
    fn new() -> HostTap {
        let name = format!("cvn{}", std::process::id() % 1_000_000);
        let o = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .output()
            .expect("ip (package iproute2)");
        assert!(o.status.success(), "ip tuntap add: {}", String::from_utf8_lossy(&o.stderr));
        HostTap(name)
    }

    /// Whether the host's side of the tap does TCP segmentation offload
    /// (ETHTOOL_GTSO): what the tun driver turns on when its reader sets
    /// TUN_F_CSUM and TUN_F_TSO4, so that the host hands it whole segments.
    fn tso(&self) -> bool {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        /// `struct ifreq` with `ifr_data`: 16 bytes of name, then a 24-byte union.
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_GTSO: u32 = 0x1e;
        let mut value = EthtoolValue { cmd: ETHTOOL_GTSO, data: 0 };
        let mut req = IfReq { name: [0; 16], data: &mut value, _pad: [0; 16] };
        req.name[..self.0.len()].copy_from_slice(self.0.as_bytes());
        // SAFETY: plain socket(2), closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: SIOCETHTOOL reads an ifreq whose ifr_data points at an
        // ethtool_value, which `req` is and `value` outlives.
        let r = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
        let err = std::io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        assert!(r == 0, "ETHTOOL_GTSO on {}: {err}", self.0);
        value.data != 0
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn a_destination_sets_the_sources_tap_offloads_on_its_own_taps_before_the_switch() {
    let tap = HostTap::new();
    let config = InstanceConfig {
        boot: Boot::Builtin { guest: "netring".into(), args: String::new() },
        mem_size: 32 << 20,
        vcpus: 1,
        memory_backend: Default::default(),
        disk: None,
        nics: vec![NicConfig { tap: tap.0.clone(), mac: "52:54:00:12:34:56".parse().unwrap() }],
    };
    // What a destination makes on the source's Hello, before it answers Ready.
    let shell = Shell::new(&config, None).expect("a VM with a NIC");
    assert!(!tap.tso(), "a tap cevm has just opened offloads nothing yet");
    // The source's tap: checksums and TCP segments of both IP versions, as a
    // Linux guest's driver accepts them.
    shell.preset_nic_offloads(&[Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)]);
    assert!(tap.tso(), "the destination's tap was not given the source's offloads");
    // A NIC the source had no tap for (or a shorter list) leaves the tap as it is.
    shell.preset_nic_offloads(&[None]);
    assert!(tap.tso());
    drop(shell);
}
