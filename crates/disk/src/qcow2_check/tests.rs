//! Hand-damaged images, judged by `qemu-img check` before and after the repair.

use std::path::PathBuf;
use std::process::Command;

use super::*;
use crate::Disk;

/// `qemu-img check`'s exit code (0 clean, 2 corruptions, 3 leaks only) and output.
fn qemu_check(path: &Path) -> (i32, String) {
    let o = Command::new("qemu-img").args(["check", path.to_str().unwrap()]).output().expect("qemu-img (qemu-utils)");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn run(tool: &str, args: &[&str]) {
    let o = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} (qemu-utils): {e}"));
    assert!(o.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn image(path: &Path) -> Image {
    Image::open(File::open(path).unwrap()).ok().flatten().expect("a qcow2 image the check covers")
}

fn rw(path: &Path) -> File {
    std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap()
}

/// Sets the refcount of the cluster at `offset` as stored on disk.
fn set_refcount_on_disk(path: &Path, offset: u64, v: u64) {
    let img = image(path);
    let c = offset / img.cs;
    let per_block = img.rb_entries();
    let rt = img.read(img.h.rt_offset, u64::from(img.h.rt_clusters) * img.cs, "rt").ok().unwrap();
    let block_at = be64(&rt, (c / per_block * 8) as usize) & !511;
    assert_ne!(block_at, 0, "no refcount block covers offset {offset:#x}");
    let mut block = img.read(block_at, img.cs, "rb").ok().unwrap();
    set_refcount(&mut block, c % per_block, img.h.refcount_bits, v);
    rw(path).write_all_at(&block, block_at).unwrap();
}

/// The first active L1 entry (which names the L2 table of guest offset 0).
fn l1_entry(path: &Path, index: u64) -> (u64, u64) {
    let img = image(path);
    let at = img.h.l1_offset + index * 8;
    (at, be64(&img.read(at, 8, "l1").ok().unwrap(), 0))
}

/// The L2 entry mapping guest offset `guest` (below 512 MiB with 64 KiB clusters).
fn l2_entry(path: &Path, guest: u64) -> (u64, u64) {
    let img = image(path);
    let (_, l1) = l1_entry(path, 0);
    let at = (l1 & OFFSET_MASK) + guest / img.cs * 8;
    (at, be64(&img.read(at, 8, "l2").ok().unwrap(), 0))
}

/// An overlay made and written by cevm: data at 1 MiB and 5 MiB over a base
/// whose first MiB holds 0xab.
fn overlay(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    run("qemu-io", &["-c", "write -P 0xab 0 1M", base.to_str().unwrap()]);
    Disk::create_overlay(&top, Path::new("base.qcow2")).unwrap();
    let d = Disk::open(&top, true).unwrap();
    d.write(&[0x11; 4096], 1 << 20).unwrap();
    d.write(&[0x22; 4096], 5 << 20).unwrap();
    d.flush().unwrap();
    top
}

fn assert_reads(path: &Path, offset: u64, byte: u8) {
    let d = Disk::open(path, false).unwrap();
    let mut b = vec![0u8; 4096];
    d.read(&mut b, offset).unwrap();
    assert!(b.iter().all(|&x| x == byte), "{} at {offset:#x}: want {byte:#x}, got {:#x}", path.display(), b[0]);
}

#[test]
fn an_l2_table_with_refcount_zero_is_counted_again_and_never_handed_out() {
    let t = tempfile::tempdir().unwrap();
    let top = overlay(t.path());
    let (_, l1) = l1_entry(&top, 0);
    let l2_at = l1 & OFFSET_MASK;
    set_refcount_on_disk(&top, l2_at, 0);
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refcount=0 reference=1"), "{out}");

    // A check alone reports and writes nothing.
    let before = std::fs::read(&top).unwrap();
    let found = check(&top).unwrap().unwrap();
    assert_eq!(found.undercounted, 1, "{found:?}");
    assert_eq!(found.rebuilt_at, None);
    assert_eq!(std::fs::read(&top).unwrap(), before, "check wrote to the image");

    // cevm's writable open repairs it.
    let d = Disk::open(&top, true).unwrap();
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    // New writes do not land on the L2 table.
    d.write(&[0x33; 65536], 3 << 20).unwrap();
    d.write(&[0x44; 65536], 7 << 20).unwrap();
    d.flush().unwrap();
    drop(d);
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    for (off, byte) in [(1 << 20, 0x11), (5 << 20, 0x22), (3 << 20, 0x33), (7 << 20, 0x44), (0, 0xab)] {
        assert_reads(&top, off, byte);
    }
    assert_eq!(l1_entry(&top, 0).1 & OFFSET_MASK, l2_at, "the mapping itself is not touched");
}

#[test]
fn a_leaked_cluster_is_freed() {
    let t = tempfile::tempdir().unwrap();
    let top = overlay(t.path());
    let len = std::fs::metadata(&top).unwrap().len();
    let end = len.next_multiple_of(65536);
    rw(&top).set_len(end + 65536).unwrap();
    set_refcount_on_disk(&top, end, 1);
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("Leaked cluster"), "{out}");

    let report = repair(&top).unwrap().unwrap();
    assert_eq!((report.leaked, report.undercounted), (1, 0), "{report:?}");
    assert!(report.rebuilt_at.is_some());
    assert!(report.to_string().contains("1 cluster leaked"), "{report}");
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    assert_reads(&top, 1 << 20, 0x11);
    assert_reads(&top, 5 << 20, 0x22);
}

#[test]
fn a_wrong_copied_flag_is_set_right() {
    let t = tempfile::tempdir().unwrap();
    let top = overlay(t.path());
    let (at, e) = l2_entry(&top, 1 << 20);
    assert_ne!(e & COPIED, 0);
    rw(&top).write_all_at(&(e & !COPIED).to_be_bytes(), at).unwrap();
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("OFLAG_COPIED"), "{out}");

    let report = repair(&top).unwrap().unwrap();
    assert_eq!(report.copied_flags, 1, "{report:?}");
    assert_eq!(report.rebuilt_at, None, "the refcounts were right");
    let (code, out) = qemu_check(&top);
    assert_eq!(code, 0, "{out}");
    assert_eq!(l2_entry(&top, 1 << 20).1, e);
}

#[test]
fn a_consistent_image_is_left_byte_for_byte() {
    let t = tempfile::tempdir().unwrap();
    let top = overlay(t.path());
    let before = std::fs::read(&top).unwrap();
    let report = repair(&top).unwrap().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.to_string(), "consistent");
    drop(Disk::open(&top, true).unwrap());
    assert_eq!(std::fs::read(&top).unwrap(), before);
}

#[test]
fn every_refcount_width_is_read_and_rebuilt() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("img.qcow2");
        let opts = format!("refcount_bits={bits}");
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opts, img.to_str().unwrap(), "64M"]);
        run("qemu-io", &["-c", "write -P 0x5a 0 192k", "-c", "write -P 0x6b 40M 64k", img.to_str().unwrap()]);
        assert_eq!(image(&img).h.refcount_bits, bits);
        let l2_at = l1_entry(&img, 0).1 & OFFSET_MASK;
        set_refcount_on_disk(&img, l2_at, 0);
        // Also a leak past the end of what is used.
        let end = std::fs::metadata(&img).unwrap().len().next_multiple_of(65536);
        rw(&img).set_len(end + 65536).unwrap();
        set_refcount_on_disk(&img, end, 1);
        let (code, out) = qemu_check(&img);
        assert_eq!(code, 2, "{bits} bits: {out}");

        let report = repair(&img).unwrap().unwrap();
        assert_eq!((report.undercounted, report.leaked), (1, 1), "{bits} bits: {report:?}");
        let (code, out) = qemu_check(&img);
        assert_eq!(code, 0, "{bits} bits: {out}");
        assert!(repair(&img).unwrap().unwrap().is_clean(), "{bits} bits: a second pass finds nothing");
        assert_reads(&img, 128 << 10, 0x5a);
        assert_reads(&img, 40 << 20, 0x6b);
    }
}

#[test]
fn clusters_shared_with_a_snapshot_keep_their_refcount() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    run("qemu-io", &["-c", "write -P 0x01 0 128k", p]);
    run("qemu-img", &["snapshot", "-c", "one", p]);
    run("qemu-io", &["-c", "write -P 0x02 0 4k", p]);
    // The second data cluster is shared by the snapshot and the active table:
    // refcount 2. Say 1 on disk, and leak one more cluster.
    let (_, shared) = l2_entry(&img, 65536);
    assert_eq!(shared & COPIED, 0, "shared, so not COPIED");
    set_refcount_on_disk(&img, shared & OFFSET_MASK, 1);
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refcount=1 reference=2"), "{out}");

    let report = repair(&img).unwrap().unwrap();
    assert_eq!(report.undercounted, 1, "{report:?}");
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{out}");
    // The snapshot still holds what it held.
    run("qemu-img", &["snapshot", "-a", "one", p]);
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{out}");
    assert_reads(&img, 0, 0x01);
}

#[test]
fn a_dirty_image_left_by_lazy_refcounts_is_repaired_and_opens() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "16M"]);
    run("qemu-io", &["-c", "write -P 0x7c 2M 64k", p]);
    // What qemu leaves when killed with lazy refcounts: the dirty bit set and
    // refcounts behind the tables.
    let (_, e) = l2_entry(&img, 2 << 20);
    set_refcount_on_disk(&img, e & OFFSET_MASK, 0);
    let f = rw(&img);
    let mut flags = [0u8; 8];
    f.read_exact_at(&mut flags, 72).unwrap();
    f.write_all_at(&(u64::from_be_bytes(flags) | INCOMPAT_DIRTY).to_be_bytes(), 72).unwrap();
    drop(f);

    let d = Disk::open(&img, true).expect("cevm repairs a dirty image and opens it");
    drop(d);
    let mut flags = [0u8; 8];
    File::open(&img).unwrap().read_exact_at(&mut flags, 72).unwrap();
    assert_eq!(u64::from_be_bytes(flags) & INCOMPAT_DIRTY, 0, "the dirty bit is cleared");
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{out}");
    assert_reads(&img, 2 << 20, 0x7c);
}

#[test]
fn broken_tables_are_refused_and_left_alone() {
    let t = tempfile::tempdir().unwrap();
    let top = overlay(t.path());
    // An L1 entry naming an L2 table far past the end of the file, and an L2
    // entry naming a misaligned data cluster.
    let (at, e) = l1_entry(&top, 0);
    let len = std::fs::metadata(&top).unwrap().len();
    let far = (len + (1 << 30)).next_multiple_of(65536);
    let broken = t.path().join("broken.qcow2");
    std::fs::copy(&top, &broken).unwrap();
    rw(&broken).write_all_at(&((e & !OFFSET_MASK) | far).to_be_bytes(), at).unwrap();
    let (l2_at, l2e) = l2_entry(&top, 1 << 20);
    rw(&top).write_all_at(&(l2e + 512).to_be_bytes(), l2_at).unwrap();

    for path in [&broken, &top] {
        let before = std::fs::read(path).unwrap();
        let err = Disk::open(path, true).err().expect("a broken image must not open for writing");
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()) && msg.contains("cannot repair"), "{msg}");
        assert_eq!(std::fs::read(path).unwrap(), before, "a refusal changes nothing");
    }
}

#[test]
fn images_the_check_does_not_cover_are_left_to_imago() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(repair(&raw).unwrap(), None);
    // Persistent bitmaps: their clusters are not walked here.
    let img = t.path().join("bitmaps.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    run("qemu-img", &["bitmap", "--add", p, "b0"]);
    let before = std::fs::read(&img).unwrap();
    assert_eq!(repair(&img).unwrap(), None);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}
