//! Interop with qemu-img: cevm opens what qemu-img makes, and qemu-img accepts what
//! cevm writes (`qemu-img check`, `--backing-chain`).

use std::process::Command;

use super::*;

fn run(tool: &str, args: &[&str]) -> String {
    let o = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} (package qemu-utils): {e}"));
    assert!(o.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// qemu-io on an image; returns its output.
fn qemu_io(cmd: &str, image: &Path) -> String {
    run("qemu-io", &["-c", cmd, image.to_str().unwrap()])
}

#[test]
fn overlay_on_a_qemu_made_base_reads_through_and_writes_on_top() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.qcow2");
    let top = t.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    qemu_io("write -P 0xab 1M 64k", &base);

    Disk::create_overlay(&top, Path::new("base.qcow2")).unwrap();
    {
        let d = Disk::open(&top, true).unwrap();
        assert_eq!(d.size(), 8 << 20);
        let mut b = vec![0u8; 4096];
        d.read(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0xab), "reads see the base");
        d.write(&[0x5a; 4096], 2 << 20).unwrap();
        d.flush().unwrap();
    }
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    let info = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
    assert!(info.contains("backing file: base.qcow2") && info.contains("file format: qcow2"), "{info}");
    // The base is untouched; the overlay holds the write.
    let b = qemu_io("read -P 0 2M 4k", &base);
    assert!(!b.contains("Pattern verification failed"), "{b}");
    let o = qemu_io("read -P 0x5a 2M 4k", &top);
    assert!(!o.contains("Pattern verification failed"), "{o}");
}

#[test]
fn raw_images_read_only_bases_and_bad_images() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let d = Disk::open(&raw, false).unwrap();
    assert_eq!(d.format(), ImageFormat::Raw);
    let mut b = [0u8; 512];
    d.read(&mut b, 512).unwrap();
    assert_eq!(b, [7u8; 512]);
    let e = d.write(&[1; 512], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);

    let bad = t.path().join("bad.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 508]);
    std::fs::write(&bad, bytes).unwrap();
    let e = Disk::open(&bad, true).err().expect("a corrupt qcow2 must not open");
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    let e = Disk::open(&t.path().join("missing.qcow2"), false).err().unwrap();
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
    let e = Disk::create_overlay(&raw, Path::new("disk.raw")).err().unwrap();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn the_backing_file_name_can_be_made_absolute() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.qcow2");
    let top = t.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    Disk::create_overlay(&top, Path::new("base.qcow2")).unwrap();
    assert_eq!(backing_file(&top).unwrap().as_deref(), Some("base.qcow2"));
    // Move the overlay elsewhere, as a checkpoint does, and point it at the base.
    let moved = t.path().join("sub");
    std::fs::create_dir(&moved).unwrap();
    let moved = moved.join("disk.qcow2");
    std::fs::copy(&top, &moved).unwrap();
    set_backing_file(&moved, base.to_str().unwrap()).unwrap();
    assert_eq!(backing_file(&moved).unwrap().as_deref(), base.to_str());
    qemu_img(&["check", "-q", moved.to_str().unwrap()]);
    let info = qemu_img(&["info", "--backing-chain", moved.to_str().unwrap()]);
    assert!(info.contains(&format!("backing file: {}", base.display())), "{info}");
    Disk::open(&moved, true).unwrap();
    // Shorter again: the old tail is cleared.
    set_backing_file(&moved, "../base.qcow2").unwrap();
    assert_eq!(backing_file(&moved).unwrap().as_deref(), Some("../base.qcow2"));
    qemu_img(&["check", "-q", moved.to_str().unwrap()]);
    assert!(set_backing_file(&base, "x").is_err(), "an image without backing file is refused");
}

#[test]
fn copies_keep_holes_and_bytes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("sparse.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 32 << 20).unwrap();
    drop(f);
    let dst = t.path().join("copy.raw");
    copy_image(&src, &dst).unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20, "the copy is sparse");
    assert!(copy_image(&src, &dst).is_err(), "never overwrites");
}
