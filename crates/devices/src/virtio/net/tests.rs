use super::*;

#[test]
fn mac_addresses_parse_print_and_refuse_what_a_nic_cannot_use() {
    let m: MacAddr = "52:54:00:CE:00:0a".parse().unwrap();
    assert_eq!(m.0, [0x52, 0x54, 0x00, 0xce, 0x00, 0x0a]);
    assert_eq!(m.to_string(), "52:54:00:ce:00:0a");
    assert_eq!(serde_json::to_string(&m).unwrap(), "\"52:54:00:ce:00:0a\"");
    assert_eq!(serde_json::from_str::<MacAddr>("\"52:54:00:ce:00:0a\"").unwrap(), m);
    for bad in
        ["", "52:54:00:ce:00", "52:54:00:ce:00:0a:01", "52-54-00-ce-00-0a", "52:54:00:ce:00:0g", "5:54:00:ce:00:0a"]
    {
        let e = bad.parse::<MacAddr>().unwrap_err();
        assert!(e.contains("is not a MAC address"), "{bad}: {e}");
    }
    assert!("01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err().contains("multicast"));
    assert!("00:00:00:00:00:00".parse::<MacAddr>().unwrap_err().contains("null"));
    assert!(serde_json::from_str::<MacAddr>("\"ff:ff:ff:ff:ff:ff\"").is_err());
    assert_eq!(MacAddr::local(0x0102_0304).to_string(), "52:54:00:02:03:04");
}

#[test]
fn the_config_space_holds_the_mac_then_the_status_and_an_announcement_needs_the_feature() {
    let mut net = Net::new("52:54:00:ce:00:01".parse().unwrap(), None);
    let mut c = [0u8; 8];
    net.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0x00, 0xce, 0x00, 0x01, VIRTIO_NET_S_LINK_UP as u8, 0]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    // Past the end reads as zero.
    let mut tail = [0xffu8; 4];
    net.read_config(8, &mut tail);
    assert_eq!(tail, [0; 4]);

    // A driver that did not take GUEST_ANNOUNCE is not asked to announce.
    net.activate(1 << VIRTIO_NET_F_MAC);
    assert!(!net.request_announce());
    net.activate(1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
    assert!(net.request_announce());
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16);
    net.reset();
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
}

#[test]
fn the_tap_offloads_follow_what_the_driver_takes() {
    assert_eq!(tap_offloads(0), 0);
    // TSO without checksum offload is not valid for the driver and gets nothing.
    assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    let all = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;
    assert_eq!(tap_offloads(all), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    // What the device offers keeps the spec's dependencies (§5.1.3.1).
    let has = |f: u32| FEATURES & (1 << f) != 0;
    assert!(has(VIRTIO_NET_F_GUEST_CSUM) || !has(VIRTIO_NET_F_GUEST_TSO4));
    assert!(has(VIRTIO_NET_F_CSUM) || !has(VIRTIO_NET_F_HOST_TSO4));
    assert!(has(VIRTIO_NET_F_CTRL_VQ) || !has(VIRTIO_NET_F_GUEST_ANNOUNCE));
}

/// The device on a real tap, the host's side of which a packet socket sends
/// into and reads from (the tests run as root, as CI does).
mod on_a_tap {
    use super::*;
    use crate::virtio::mmio::{MmioResources, MmioTransport};
    use crate::{Device, MmioDevice};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct HostTap(String);

    impl HostTap {
        fn new() -> HostTap {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let name = format!("cvd{}x{n}", std::process::id() % 1_000_000);
            let ip = |a: &[&str]| {
                let o = std::process::Command::new("ip").args(a).output().expect("ip (package iproute2)");
                assert!(o.status.success(), "ip {a:?}: {}", String::from_utf8_lossy(&o.stderr));
            };
            ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
            // Jumbo frames, so that one frame needs several guest buffers.
            ip(&["link", "set", &name, "mtu", "9000", "up"]);
            HostTap(name)
        }

        /// A packet socket bound to the interface: what it sends, the tap's
        /// reader (the device) receives; what the device writes, it reads.
        fn socket(&self) -> OwnedFd {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned from here on.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: fd was just opened and is ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(self.0.clone()).unwrap();
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            // SAFETY: an all-zero sockaddr_ll is valid; the fields set are its own.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: sa is a sockaddr_ll of the length given.
            let r = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        }
    }

    impl HostTap {
        /// Waits until the kernel runs the tap (its operstate "up"): it gets its
        /// carrier when the device attaches, but its queue discipline is
        /// activated later, asynchronously (linkwatch), and until then frames
        /// sent into it are dropped. The tests failed now and then without it.
        fn wait_running(&self) {
            let path = format!("/sys/class/net/{}/operstate", self.0);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::read_to_string(&path).map(|s| s.trim() != "up").unwrap_or(true) {
                assert!(std::time::Instant::now() < deadline, "tap {} never came up", self.0);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    impl Drop for HostTap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }

    fn send(fd: &OwnedFd, frame: &[u8]) {
        // SAFETY: frame is a readable buffer of its length.
        let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    fn frame(dst: [u8; 6], len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xee, 0, 9]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFS: u64 = 0x4000;

    fn write(t: &mut MmioTransport<Net>, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    /// Sets queue `q` up with one single-descriptor buffer per `(len, device_writes)`.
    fn queue(t: &mut MmioTransport<Net>, mem: &GuestMemoryMmap, q: u32, bufs: &[(u32, bool)]) {
        let base = u64::from(q) * 0x400;
        for (i, &(len, writes)) in bufs.iter().enumerate() {
            let at = GuestAddress(DESC + base + 16 * i as u64);
            mem.write_obj(BUFS + (base + i as u64 * 0x100) * 0x10, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(if writes { 2u16 } else { 0 }, at.unchecked_add(12)).unwrap();
            mem.write_obj(i as u16, GuestAddress(AVAIL + base + 4 + 2 * i as u64)).unwrap();
        }
        mem.write_obj(bufs.len() as u16, GuestAddress(AVAIL + base + 2)).unwrap();
        write(t, VIRTIO_MMIO_QUEUE_SEL, q);
        write(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, (DESC + base) as u32);
        write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (AVAIL + base) as u32);
        write(t, VIRTIO_MMIO_QUEUE_USED_LOW, (USED + base) as u32);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn buf(q: u64, i: u64) -> GuestAddress {
        GuestAddress(BUFS + (q * 0x400 + i * 0x100) * 0x10)
    }

    /// Used ring entry `i` of queue `q`: (descriptor, length).
    fn used(mem: &GuestMemoryMmap, q: u64, i: u64) -> (u32, u32) {
        let at = GuestAddress(USED + q * 0x400 + 4 + 8 * i);
        (mem.read_obj(at).unwrap(), mem.read_obj(at.unchecked_add(4)).unwrap())
    }

    /// Serves the receive queue until the device has used `n` buffers in
    /// all (frames sent into the tap arrive in their own time: a fixed wait
    /// was too short once on a loaded CI machine), or 5 s have passed.
    fn serve_until_used(t: &mut MmioTransport<Net>, mem: &GuestMemoryMmap, n: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            t.serve_queue(RX_QUEUE);
            if mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() >= n || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A NIC on `host`'s tap whose driver accepted `features` (and VERSION_1),
    /// queues not yet set up.
    fn device(host: &HostTap, mac: MacAddr, features: u32) -> (MmioTransport<Net>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let net = Net::new(mac, Some(Tap::open(&host.0).unwrap()));
        host.wait_running();
        let mut t = MmioTransport::create(MmioResources { device: net, mem: mem.clone(), irq });
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, features);
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        (t, mem)
    }

    #[test]
    fn frames_go_between_the_tap_and_the_guests_buffers_and_one_too_large_is_dropped() {
        let host = HostTap::new();
        let sock = host.socket();
        let mac: MacAddr = "52:54:00:ce:00:07".parse().unwrap();
        let (mut t, mem) = device(&host, mac, 1 << VIRTIO_NET_F_MAC);
        // Receive: a buffer too small for the first frame, then one that fits the second.
        queue(&mut t, &mem, 0, &[(64, true), (1526, true)]);
        // Transmit: one frame of 12 + 90 bytes.
        queue(&mut t, &mem, 1, &[(12 + 90, false)]);
        let out = frame([0xff; 6], 90, 0x5a);
        mem.write_slice(&[0u8; 12], buf(1, 0)).unwrap();
        mem.write_slice(&out, buf(1, 0).unchecked_add(12)).unwrap();
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);

        let (big, small) = (frame(mac.0, 300, 0x11), frame(mac.0, 100, 0x22));
        send(&sock, &big);
        send(&sock, &small);
        serve_until_used(&mut t, &mem, 2);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2, "both buffers used");
        assert_eq!(used(&mem, 0, 0), (0, 0), "the frame that does not fit comes back empty");
        assert_eq!(used(&mem, 0, 1), (1, 12 + 100));
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, buf(0, 1)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &small[..]);
        assert_eq!(t.device().counters().dropped, 1);
        assert_eq!(t.device().counters().rx_frames, 1);
        assert!(t.device().rx_starved() || t.device().counters().rx_frames == 1);

        t.serve_queue(TX_QUEUE);
        assert_eq!(used(&mem, 1, 0), (0, 0));
        assert_eq!(t.device().counters().tx_frames, 1);
        // The frame the device wrote to the tap arrives on the host side.
        let mut seen = vec![0u8; 2048];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // SAFETY: seen is a writable buffer of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), seen.as_mut_ptr().cast(), seen.len(), libc::MSG_DONTWAIT) };
            if n == out.len() as isize && seen[..out.len()] == out[..] {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the transmitted frame never reached the host");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn with_mergeable_buffers_a_large_frame_spans_several_and_waits_for_enough() {
        let host = HostTap::new();
        let sock = host.socket();
        let mac: MacAddr = "52:54:00:ce:00:08".parse().unwrap();
        let (mut t, mem) = device(&host, mac, 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF);
        // Four buffers of 1024 bytes.
        queue(&mut t, &mem, 0, &[(1024, true); 4]);
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        let (big, small, bigger) = (frame(mac.0, 2500, 0x33), frame(mac.0, 100, 0x44), frame(mac.0, 3000, 0x55));
        for f in [&big, &small, &bigger] {
            send(&sock, f);
        }
        serve_until_used(&mut t, &mem, 4);
        // The 12 + 2500 bytes in buffers 0-2, the small frame in buffer 3.
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 4);
        assert_eq!([used(&mem, 0, 0), used(&mem, 0, 1), used(&mem, 0, 2)], [(0, 1024), (1, 1024), (2, 464)]);
        assert_eq!(used(&mem, 0, 3), (3, 112));
        let mut got = vec![0u8; 3 * 1024];
        for i in 0..3 {
            mem.read_slice(&mut got[i * 1024..(i + 1) * 1024], buf(0, i as u64)).unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[12..12 + 2500], &big[..]);
        // The 3000-byte frame waits: no buffer left.
        assert!(t.device().rx_starved());
        assert_eq!(t.device().counters().rx_frames, 2);
        // The driver adds three more buffers (descriptors 4-6): it arrives whole.
        for i in 4..7u64 {
            let at = GuestAddress(DESC + 16 * i);
            mem.write_obj(buf(0, i).0, at).unwrap();
            mem.write_obj(1024u32, at.unchecked_add(8)).unwrap();
            mem.write_obj(2u16, at.unchecked_add(12)).unwrap();
            mem.write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * i)).unwrap();
        }
        mem.write_obj(7u16, GuestAddress(AVAIL + 2)).unwrap();
        t.serve_queue(RX_QUEUE);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 7);
        assert_eq!([used(&mem, 0, 4), used(&mem, 0, 5), used(&mem, 0, 6)], [(4, 1024), (5, 1024), (6, 964)]);
        for i in 4..7 {
            mem.read_slice(&mut got[(i - 4) * 1024..(i - 3) * 1024], buf(0, i as u64)).unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        assert_eq!(&got[12..12 + 3000], &bigger[..]);
        assert_eq!(t.device().counters().dropped, 0);
    }

    /// Waits until the NIC's tap has a frame to read (a frame sent into the
    /// tap is queued on it asynchronously), or 5 s have passed.
    fn wait_queued(t: &MmioTransport<Net>) {
        let fd = t.device().tap().unwrap().as_raw_fd();
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, ours.
        let n = unsafe { libc::poll(&mut p, 1, 5000) };
        assert_eq!(n, 1, "no frame reached the tap");
    }

    #[test]
    fn frames_a_tap_queued_with_offloads_the_driver_did_not_accept_are_dropped() {
        let host = HostTap::new();
        let sock = host.socket();
        let mac: MacAddr = "52:54:00:ce:00:09".parse().unwrap();
        // The driver takes no checksum offload.
        let (mut t, mem) = device(&host, mac, 1 << VIRTIO_NET_F_MAC);
        // A migration's destination set the source's offloads on its tap, and
        // the host queued a frame under them before the switch.
        t.device().tap().unwrap().set_offload(libc::TUN_F_CSUM).unwrap();
        let (early, late) = (frame(mac.0, 100, 0x66), frame(mac.0, 100, 0x77));
        send(&sock, &early);
        wait_queued(&t);
        queue(&mut t, &mem, 0, &[(1526, true); 2]);
        write(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        assert_eq!(t.device().tap().unwrap().offload(), Some(0), "the tap keeps offloads the driver did not accept");
        assert_eq!(t.device().counters().dropped, 1, "the frame queued under them was not dropped");
        // What the tap queues from now on reaches the guest.
        send(&sock, &late);
        serve_until_used(&mut t, &mem, 1);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, buf(0, 0)).unwrap();
        assert_eq!(&got[12..], &late[..]);
    }
}
