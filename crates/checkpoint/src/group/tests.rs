use super::*;
use crate::series::{Series, LATEST};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cevm-group-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A real, complete member checkpoint at `p` (one page of memory filled with `fill`).
fn member_commit(p: &Path, fill: u8) {
    use snapshot::{CheckpointWriter, MemoryLayout, MemoryRegionLayout, MemorySource};
    let mut w = CheckpointWriter::create(p).unwrap();
    w.write_file(snapshot::STATE_FILE, b"{}").unwrap();
    let layout = MemoryLayout { page_size: 4096, regions: vec![MemoryRegionLayout { guest_addr: 0, size: 4096 }] };
    let page = [fill; 4096];
    w.write_memory(&layout, &[MemorySource { guest_addr: 0, data: &page, data_extents: None }]).unwrap();
    w.commit("stop-and-save", "test", serde_json::json!({})).unwrap();
}

fn manifest(names: &[&str]) -> GroupManifest {
    GroupManifest {
        format_version: GROUP_FORMAT_VERSION,
        cevm_version: "test".into(),
        created_unix_ms: 1,
        method: "stop-and-save".into(),
        group_pause_ms: 1.5,
        members: names
            .iter()
            .map(|n| Member {
                name: (*n).into(),
                api_sock: Some(PathBuf::from(format!("/run/{n}.sock"))),
                control: None,
                taps: vec![format!("tap-{n}")],
                manifest_crc32: String::new(),
                pause_ms: 1.0,
            })
            .collect(),
    }
}

#[test]
fn a_group_is_complete_only_once_its_manifest_is_committed_over_complete_members() {
    let t = scratch("commit");
    let mut s = Series::open(&t, 2).unwrap();
    let g = s.next_path();
    std::fs::create_dir(&g).unwrap();
    member_commit(&g.join("m0"), 1);
    // One member committed, the other not yet: no group checkpoint, and the
    // commit of the group is refused without writing anything.
    assert!(crate::series::incomplete(&g).is_some());
    let err = commit(&g, manifest(&["m0", "m1"])).unwrap_err().to_string();
    assert!(err.contains("m1") && err.contains("not a complete checkpoint"), "{err}");
    assert!(!g.join(GROUP_MANIFEST).exists());
    assert!(s.committed(&g).is_err());
    member_commit(&g.join("m1"), 2);
    let m = commit(&g, manifest(&["m0", "m1"])).unwrap();
    assert!(m.members.iter().all(|m| m.manifest_crc32.len() == 8));
    assert_eq!(open(&g).unwrap(), m);
    assert!(crate::series::incomplete(&g).is_none());
    assert!(s.committed(&g).unwrap().is_empty());
    assert!(t.join(LATEST).join(GROUP_MANIFEST).exists());
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn a_damaged_manifest_or_a_replaced_member_is_refused_naming_it() {
    let t = scratch("damage");
    let g = t.join("ckpt-000001");
    std::fs::create_dir(&g).unwrap();
    member_commit(&g.join("a"), 1);
    member_commit(&g.join("b"), 2);
    commit(&g, manifest(&["a", "b"])).unwrap();
    // A flipped byte in the group manifest.
    let path = g.join(GROUP_MANIFEST);
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("\"method\": \"stop-and-save\"", "\"method\": \"stop-and-savf\"")).unwrap();
    let err = open(&g).unwrap_err().to_string();
    assert!(err.contains("group.json") && err.contains("checksum"), "{err}");
    std::fs::write(&path, &good).unwrap();
    open(&g).unwrap();
    // Member b replaced by another complete checkpoint (of another cut).
    std::fs::remove_dir_all(g.join("b")).unwrap();
    member_commit(&g.join("b"), 9);
    let err = open(&g).unwrap_err().to_string();
    assert!(err.contains("/b:") && err.contains("not the one the group committed"), "{err}");
    assert!(crate::series::incomplete(&g).is_some());
    // A member removed.
    std::fs::remove_dir_all(g.join("b")).unwrap();
    assert!(open(&g).unwrap_err().to_string().contains("not a complete checkpoint"));
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn member_names_stay_inside_the_group_directory() {
    for ok in ["m0", "node-1.vm_2"] {
        check_member_name(ok).unwrap();
    }
    for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
        assert!(check_member_name(bad).is_err(), "{bad}");
    }
    let t = scratch("names");
    let mut m = manifest(&["m0", "m0"]);
    m.members[1].manifest_crc32 = "00000000".into();
    m.members[0].manifest_crc32 = "00000000".into();
    let text = m.encode().unwrap();
    let err = GroupManifest::decode(&t.join(GROUP_MANIFEST), &text).unwrap_err().to_string();
    assert!(err.contains("member m0 twice"), "{err}");
    let _ = std::fs::remove_dir_all(&t);
}
