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
