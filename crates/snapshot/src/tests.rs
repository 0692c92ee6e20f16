//! Unit tests of the format: roundtrip, sparseness, and one test per kind of damage.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::*;

const PS: usize = PAGE_SIZE as usize;

/// Two regions with a gap: [0, 64 KiB) and [128 KiB, 192 KiB); pages 1, 2 and 17
/// hold data, the rest are zero.
fn memory() -> (MemoryLayout, Vec<Vec<u8>>) {
    let layout = MemoryLayout {
        page_size: PAGE_SIZE,
        regions: vec![
            MemoryRegionLayout { guest_addr: 0, size: 16 * PAGE_SIZE },
            MemoryRegionLayout { guest_addr: 32 * PAGE_SIZE, size: 16 * PAGE_SIZE },
        ],
    };
    let mut a = vec![0u8; 16 * PS];
    let mut b = vec![0u8; 16 * PS];
    a[PS..3 * PS].iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8 + 1);
    b[PS + 100] = 0x42;
    (layout, vec![a, b])
}

fn write(dir: &Path, state: &[u8]) -> Manifest {
    let (layout, mem) = memory();
    let mut w = CheckpointWriter::create(dir).unwrap();
    w.write_file(STATE_FILE, state).unwrap();
    let sources: Vec<_> = layout
        .regions
        .iter()
        .zip(&mem)
        .map(|(r, d)| MemorySource { guest_addr: r.guest_addr, data: d, data_extents: None })
        .collect();
    let stats = w.write_memory(&layout, &sources).unwrap();
    assert_eq!(stats, MemoryStats { data_pages: 3, zero_pages: 29, data_bytes: 3 * PAGE_SIZE });
    w.commit("stop-and-save", "test", serde_json::json!({ "guest": "x" })).unwrap()
}

fn load(dir: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let c = Checkpoint::open(dir)?;
    let mut bufs = vec![vec![0u8; 16 * PS], vec![0u8; 16 * PS]];
    let (a, b) = bufs.split_at_mut(1);
    let mut targets =
        [MemoryTarget { guest_addr: 0, data: &mut a[0] }, MemoryTarget { guest_addr: 32 * PAGE_SIZE, data: &mut b[0] }];
    c.load_memory(&mut targets)?;
    Ok(bufs)
}

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ckpt");
    write(&d, b"{\"state\": 1}");
    (t, d)
}

fn flip(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, off).unwrap();
}

#[test]
fn roundtrip_is_exact_and_sparse() {
    let (_t, d) = fresh();
    let c = Checkpoint::open(&d).unwrap();
    assert_eq!(c.read_file(STATE_FILE).unwrap(), b"{\"state\": 1}");
    assert_eq!(c.manifest.format_version, FORMAT_VERSION);
    assert_eq!(load(&d).unwrap(), memory().1);
    let report = verify(&d).unwrap();
    // state.json, memory.img and memory.chunks (one chunk: the image is 48 pages).
    assert_eq!(report.files.len(), 3);
    assert_eq!(c.chunk_sums().unwrap().unwrap().len(), 1);
    // Zero pages are holes: the first data at or after page 3 is page 33.
    let f = std::fs::File::open(d.join(MEMORY_FILE)).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 48 * PAGE_SIZE);
    // SAFETY: lseek takes no pointer, only the descriptor of `f`, open for the
    // whole call; it moves that file's offset and touches no memory of ours.
    let next = unsafe { libc::lseek(f.as_raw_fd(), 3 * PAGE_SIZE as libc::off_t, libc::SEEK_DATA) };
    assert_eq!(next as u64, 33 * PAGE_SIZE);
}

#[test]
fn every_flipped_manifest_byte_is_caught() {
    let (_t, d) = fresh();
    let path = d.join(MANIFEST_FILE);
    let good = std::fs::read(&path).unwrap();
    for off in 0..good.len() as u64 {
        flip(&path, off);
        let err = Checkpoint::open(&d).err().unwrap_or_else(|| panic!("flip at {off} not caught"));
        assert!(err.to_string().contains("manifest.json"), "{err}");
        std::fs::write(&path, &good).unwrap();
    }
    Checkpoint::open(&d).unwrap();
}

#[test]
fn flipped_state_and_memory_bytes_are_caught() {
    let (_t, d) = fresh();
    flip(&d.join(STATE_FILE), 3);
    let e = Checkpoint::open(&d).err().unwrap();
    assert!(matches!(&e, Error::Checksum { path, .. } if path.ends_with(STATE_FILE)), "{e}");

    // In a data page, and in a hole (which becomes allocated).
    for off in [PAGE_SIZE + 7, 20 * PAGE_SIZE] {
        let (_t, d) = fresh();
        flip(&d.join(MEMORY_FILE), off);
        let e = load(&d).err().unwrap();
        assert!(matches!(&e, Error::Chunk { path, index: 0, .. } if path.ends_with(MEMORY_FILE)), "{e}");
        let e = verify(&d).err().unwrap();
        assert!(e.to_string().contains("memory.img: chunk 0 (bytes 0x0..0x30000) does not match its checksum"), "{e}");
    }
}

#[test]
fn truncated_and_missing_files_are_named() {
    let (_t, d) = fresh();
    std::fs::OpenOptions::new().write(true).open(d.join(MEMORY_FILE)).unwrap().set_len(PAGE_SIZE).unwrap();
    let e = Checkpoint::open(&d).err().unwrap();
    assert!(e.to_string().contains("memory.img: size is 4096 bytes"), "{e}");
    for f in [STATE_FILE, MEMORY_FILE, MANIFEST_FILE] {
        let (_t, d) = fresh();
        std::fs::remove_file(d.join(f)).unwrap();
        let e = verify(&d).err().unwrap();
        assert!(matches!(&e, Error::Missing { path } if path.ends_with(f)), "{e}");
    }
}

#[test]
fn unknown_version_with_a_valid_checksum_is_a_version_error() {
    let (_t, d) = fresh();
    let path = d.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap().replacen("\"format_version\": 1,", "\"format_version\": 7,", 1);
    std::fs::write(&path, seal_manifest(&text)).unwrap();
    let e = Checkpoint::open(&d).err().unwrap();
    assert!(matches!(e, Error::UnsupportedVersion { found: 7, supported: 1, .. }), "{e}");
    // Without re-sealing, the same edit is a checksum error.
    let (_t, d) = fresh();
    let path = d.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap().replacen("\"format_version\": 1,", "\"format_version\": 7,", 1);
    std::fs::write(&path, text).unwrap();
    assert!(matches!(Checkpoint::open(&d), Err(Error::Checksum { .. })));
}

#[test]
fn an_uncommitted_writer_leaves_the_old_checkpoint_and_no_temp() {
    let (t, d) = fresh();
    let before = std::fs::read(d.join(MANIFEST_FILE)).unwrap();
    {
        let mut w = CheckpointWriter::create(&d).unwrap();
        w.write_file(STATE_FILE, b"new").unwrap();
        // Dropped without commit: a crash or an error mid-write.
    }
    assert_eq!(std::fs::read(d.join(MANIFEST_FILE)).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
    // A commit over it replaces it whole.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let m = write(&d, b"second");
    assert_eq!(Checkpoint::open(&d).unwrap().manifest.created_unix_ms, m.created_unix_ms);
    assert_eq!(Checkpoint::open(&d).unwrap().read_file(STATE_FILE).unwrap(), b"second");
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1, "the older checkpoint was removed");
}

#[test]
fn temp_dirs_of_dead_processes_are_cleaned_and_live_ones_kept() {
    let (t, d) = fresh();
    let dead = t.path().join(".ckpt.tmp-999999999-0");
    let live = t.path().join(format!(".ckpt.tmp-{}-999", std::process::id()));
    std::fs::create_dir(&dead).unwrap();
    std::fs::create_dir(&live).unwrap();
    let w = CheckpointWriter::create(&d).unwrap();
    assert!(!dead.exists());
    assert!(live.exists());
    drop(w);
}

#[test]
fn a_directory_that_is_not_a_checkpoint_is_never_replaced() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("precious");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("thesis.tex"), b"x").unwrap();
    let e = CheckpointWriter::create(&d).err().unwrap();
    assert!(e.to_string().contains("not a checkpoint"), "{e}");
    assert!(CheckpointWriter::create(&t.path().join("no/such/parent/ckpt")).is_err());
}

#[test]
fn memory_that_does_not_match_the_layout_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (layout, mem) = memory();
    let mut w = CheckpointWriter::create(&t.path().join("c")).unwrap();
    let short = [MemorySource { guest_addr: 0, data: &mem[0], data_extents: None }];
    assert!(matches!(w.write_memory(&layout, &short), Err(Error::Layout { .. })));
    let moved = [
        MemorySource { guest_addr: 0, data: &mem[0], data_extents: None },
        MemorySource { guest_addr: 4096, data: &mem[1], data_extents: None },
    ];
    assert!(matches!(w.write_memory(&layout, &moved), Err(Error::Layout { .. })));
}

#[test]
fn write_errors_are_reported_not_panics() {
    // /dev/full answers every write with ENOSPC: the disk-full case.
    let (layout, mem) = memory();
    let t = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::create(&t.path().join("c")).unwrap();
    std::os::unix::fs::symlink("/dev/full", w.tmp_path().join(MEMORY_FILE)).unwrap();
    let sources: Vec<_> = layout
        .regions
        .iter()
        .zip(&mem)
        .map(|(r, d)| MemorySource { guest_addr: r.guest_addr, data: d, data_extents: None })
        .collect();
    let e = w.write_memory(&layout, &sources).err().unwrap();
    assert!(e.to_string().contains("No space left on device"), "{e}");
}

#[test]
fn pages_outside_the_data_extents_are_not_read_and_count_as_zero() {
    let t = tempfile::tempdir().unwrap();
    let (layout, mut mem) = memory();
    // Region 0: only pages 1..3 may hold data. Garbage outside the extents would be
    // a caller bug; it proves those pages are not read.
    mem[0][10 * PS] = 0x99;
    let ext0 = [std::ops::Range { start: PAGE_SIZE + 10, end: 3 * PAGE_SIZE - 1 }];
    let ext1: [std::ops::Range<u64>; 2] = [0..PAGE_SIZE, PAGE_SIZE..2 * PAGE_SIZE];
    let sources = [
        MemorySource { guest_addr: 0, data: &mem[0], data_extents: Some(&ext0) },
        MemorySource { guest_addr: 32 * PAGE_SIZE, data: &mem[1], data_extents: Some(&ext1) },
    ];
    let d = t.path().join("c");
    let mut w = CheckpointWriter::create(&d).unwrap();
    w.write_file(STATE_FILE, b"s").unwrap();
    let stats = w.write_memory(&layout, &sources).unwrap();
    assert_eq!(stats, MemoryStats { data_pages: 3, zero_pages: 29, data_bytes: 3 * PAGE_SIZE });
    w.commit("t", "t", serde_json::Value::Null).unwrap();
    mem[0][10 * PS] = 0;
    assert_eq!(load(&d).unwrap(), mem);
    verify(&d).unwrap();
}

/// Writes `m` as the manifest of `dir`, sealed with a valid checksum: a forgery
/// that only the checks after the checksum can catch.
fn reseal(dir: &Path, m: &Manifest) {
    std::fs::write(dir.join(MANIFEST_FILE), crate::manifest::encode(m).unwrap()).unwrap();
}

/// Runs `f` on another thread and gives its result, failing the test if it does
/// not return within a minute (a read blocked on a FIFO would never return; the
/// limit only keeps such a failure from hanging the test run).
fn without_hanging<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the checkpoint reader blocked")
}

#[test]
fn entries_the_manifest_does_not_list_are_refused_by_name() {
    let (_t, d) = fresh();
    std::fs::write(d.join("extra.bin"), b"x").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d.join("link")).unwrap();
    for e in [Checkpoint::open(&d).err().unwrap(), verify(&d).err().unwrap()] {
        let msg = e.to_string();
        assert!(msg.contains("not listed in the manifest"), "{msg}");
        for needle in ["`extra.bin` (a regular file)", "`sub` (a directory)", "`link` (a symbolic link)"] {
            assert!(msg.contains(needle), "`{needle}` missing in: {msg}");
        }
    }
    for name in ["extra.bin", "link"] {
        std::fs::remove_file(d.join(name)).unwrap();
    }
    std::fs::remove_dir(d.join("sub")).unwrap();
    verify(&d).unwrap();
}

#[test]
fn a_symlink_in_place_of_a_file_is_refused_even_to_an_identical_file() {
    for name in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
        let (t, d) = fresh();
        // The link's target holds the very bytes the manifest expects: only
        // following it would make it pass.
        let outside = t.path().join(format!("outside-{name}"));
        std::fs::rename(d.join(name), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, d.join(name)).unwrap();
        let e = without_hanging(move || verify(&d).err().map(|e| e.to_string())).expect("a link passed verify");
        assert!(e.contains(&format!("{name}: is a symbolic link, not a regular file")), "{e}");
    }
}

#[test]
fn a_listed_link_to_a_host_file_is_refused() {
    // A re-sealed manifest lists disk.raw with the size and CRC of /etc/hostname,
    // and disk.raw links there.
    let (_t, d) = fresh();
    let host = std::fs::read("/etc/hostname").unwrap();
    let mut m = Checkpoint::open(&d).unwrap().manifest;
    m.files.push(FileEntry { name: "disk.raw".into(), size: host.len() as u64, crc32: hex(crc32fast::hash(&host)) });
    reseal(&d, &m);
    std::os::unix::fs::symlink("/etc/hostname", d.join("disk.raw")).unwrap();
    let e = verify(&d).err().expect("a link to a host file passed verify").to_string();
    assert!(e.contains("disk.raw: is a symbolic link, not a regular file"), "{e}");
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    for name in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
        let (t, d) = fresh();
        std::fs::remove_file(d.join(name)).unwrap();
        let c = std::ffi::CString::new(d.join(name).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = without_hanging(move || verify(&d).err().map(|e| e.to_string()));
        let e = e.expect("a FIFO passed verify");
        assert!(e.contains(&format!("{name}: is a FIFO, not a regular file")), "{e}");
        drop(t);
    }
}

#[test]
fn links_to_dev_zero_and_huge_files_are_refused_before_reading() {
    for name in [MANIFEST_FILE, STATE_FILE] {
        let (_t, d) = fresh();
        std::fs::remove_file(d.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join(name)).unwrap();
        let e = without_hanging(move || verify(&d).err().map(|e| e.to_string())).expect("/dev/zero passed");
        assert!(e.contains(&format!("{name}: is a symbolic link")), "{e}");
    }
    // A 3 GiB sparse manifest: refused by its size, nothing of it read.
    let (_t, d) = fresh();
    std::fs::OpenOptions::new().write(true).open(d.join(MANIFEST_FILE)).unwrap().set_len(3 << 30).unwrap();
    let e = without_hanging(move || verify(&d).err().map(|e| e.to_string())).expect("a 3 GiB manifest passed");
    assert!(e.contains("manifest.json: 3221225472 bytes, more than the 1048576 bytes"), "{e}");
    // A state file the (re-sealed) manifest says is 3 GiB: refused before any read.
    let (_t, d) = fresh();
    let mut m = Checkpoint::open(&d).unwrap().manifest;
    m.files.iter_mut().find(|f| f.name == STATE_FILE).unwrap().size = 3 << 30;
    reseal(&d, &m);
    std::fs::OpenOptions::new().write(true).open(d.join(STATE_FILE)).unwrap().set_len(3 << 30).unwrap();
    let e = without_hanging(move || verify(&d).err().map(|e| e.to_string())).expect("a 3 GiB state passed");
    assert!(e.contains("state.json: 3221225472 bytes, more than the 16777216 bytes"), "{e}");
}

#[test]
fn a_file_listed_twice_is_refused() {
    let (_t, d) = fresh();
    let mut m = Checkpoint::open(&d).unwrap().manifest;
    let state = m.files.iter().find(|f| f.name == STATE_FILE).unwrap().clone();
    m.files.push(state);
    reseal(&d, &m);
    let e = verify(&d).err().expect("a duplicate entry passed verify");
    assert!(e.to_string().contains("manifest.json: invalid manifest: lists `state.json` twice"), "{e}");
}

/// Verifying and loading report their progress: rising, at most
/// [`PROGRESS_STEP`] apart over data, ending at memory.img's size.
#[test]
fn verify_and_load_report_rising_progress_to_the_end() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ckpt");
    let size = 5 * PROGRESS_STEP / 2;
    let layout = MemoryLayout { page_size: PAGE_SIZE, regions: vec![MemoryRegionLayout { guest_addr: 0, size }] };
    let data: Vec<u8> = (0..size).map(|i| (i / PAGE_SIZE % 251) as u8 + 1).collect();
    let mut w = CheckpointWriter::create(&d).unwrap();
    w.write_file(STATE_FILE, b"{}").unwrap();
    w.write_memory(&layout, &[MemorySource { guest_addr: 0, data: &data, data_extents: None }]).unwrap();
    w.commit("stop-and-save", "test", serde_json::json!({ "guest": "x" })).unwrap();
    let c = Checkpoint::open(&d).unwrap();
    let check = |seen: Vec<(u64, u64)>| {
        assert!(seen.len() >= 3, "{seen:?}");
        assert!(seen.iter().all(|&(_, total)| total == size), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].0 - w[0].0 <= PROGRESS_STEP), "{seen:?}");
        assert_eq!(seen.last().unwrap().0, size);
    };
    let mut seen = Vec::new();
    c.verify_memory_with(&mut |done, total| seen.push((done, total))).unwrap();
    check(seen);
    let mut back = vec![0u8; size as usize];
    let mut seen = Vec::new();
    c.load_memory_with(&mut [MemoryTarget { guest_addr: 0, data: &mut back }], &mut |d, t| seen.push((d, t))).unwrap();
    check(seen);
    assert!(back == data, "loaded memory differs");
}

/// The memory of `memory()` after the guest wrote: page 2 rewritten, page 1
/// zeroed, page 33 (second region) rewritten, page 40 written.
fn written_memory() -> (Vec<Vec<u8>>, PageBitmap) {
    let (layout, mut mem) = memory();
    mem[0][2 * PS..3 * PS].fill(0x77);
    mem[0][PS..2 * PS].fill(0);
    mem[1][PS..2 * PS].fill(0x33);
    mem[1][8 * PS + 5] = 9;
    // Dirty bitmaps per region, as KVM reports them: pages 1, 2; pages 1, 8.
    let pages = PageBitmap::from_regions(&layout, &[vec![0b110], vec![(1 << 1) | (1 << 8)]]);
    (mem, pages)
}

fn write_child(dir: &Path, parent: &Manifest, mem: &[Vec<u8>], pages: &PageBitmap) -> Manifest {
    let (layout, _) = memory();
    let extents: Vec<Vec<std::ops::Range<u64>>> = (0..2).map(|k| pages.extents_in(&layout, k)).collect();
    let mut w = CheckpointWriter::create(dir).unwrap();
    w.write_file(STATE_FILE, b"{\"state\": 2}").unwrap();
    let sources: Vec<_> = layout
        .regions
        .iter()
        .zip(mem)
        .zip(&extents)
        .map(|((r, d), e)| MemorySource { guest_addr: r.guest_addr, data: d, data_extents: Some(e) })
        .collect();
    w.write_memory(&layout, &sources).unwrap();
    w.set_parent(ParentRef { dir: "ckpt".into(), id: parent.id.clone() }, pages).unwrap();
    w.commit("cow", "test", serde_json::json!({ "guest": "x" })).unwrap()
}

fn load_chain_of(dir: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let links = open_chain(dir)?;
    // Zeroed, as a new guest's memory is (the root's holes are not written).
    let mut bufs = vec![vec![0u8; 16 * PS], vec![0u8; 16 * PS]];
    let (a, b) = bufs.split_at_mut(1);
    let mut targets =
        [MemoryTarget { guest_addr: 0, data: &mut a[0] }, MemoryTarget { guest_addr: 32 * PAGE_SIZE, data: &mut b[0] }];
    load_chain(&links, &mut targets, &mut |_, _| {})?;
    Ok(bufs)
}

#[test]
fn page_maps_place_each_region_at_its_guest_address() {
    let (layout, _) = memory();
    let (_, pages) = written_memory();
    assert_eq!(pages.pages(), 48);
    assert_eq!(pages.count(), 4);
    assert!(pages.get(1) && pages.get(2) && pages.get(33) && pages.get(40) && !pages.get(17));
    assert_eq!(pages.extents_in(&layout, 0), vec![PAGE_SIZE..3 * PAGE_SIZE]);
    assert_eq!(pages.extents_in(&layout, 1), vec![PAGE_SIZE..2 * PAGE_SIZE, 8 * PAGE_SIZE..9 * PAGE_SIZE]);
    let bytes = pages.to_bytes();
    assert_eq!(PageBitmap::from_bytes(Path::new("p"), &bytes, 48).unwrap(), pages);
    // Bits beyond the image, or a map of another size, are refused.
    assert!(PageBitmap::from_bytes(Path::new("p"), &[0xff; 8], 48).is_err());
    assert!(PageBitmap::from_bytes(Path::new("p"), &bytes[..4], 48).is_err());
}

#[test]
fn a_chain_loads_to_the_childs_memory_and_merges_into_a_full_checkpoint_of_the_same_id() {
    let t = tempfile::tempdir().unwrap();
    let (parent_dir, child_dir) = (t.path().join("ckpt"), t.path().join("child"));
    let parent = write(&parent_dir, b"{\"state\": 1}");
    let (mem, pages) = written_memory();
    let child = write_child(&child_dir, &parent, &mem, &pages);
    assert_eq!(child.parent.as_ref().map(|p| p.id.as_str()), Some(parent.id.as_str()));
    assert_eq!(child.memory_stats.data_pages, 3, "{child:?}");
    assert!(load_chain_of(&child_dir).unwrap() == mem, "the chain did not load to the child's memory");
    verify_chain_memory(&open_chain(&child_dir).unwrap(), &mut |_, _| {}).unwrap();

    merge_parent(&child_dir).unwrap();
    let merged = Checkpoint::open(&child_dir).unwrap();
    assert_eq!((merged.manifest.parent.as_ref(), merged.manifest.id.as_str()), (None, child.id.as_str()));
    assert_eq!(merged.manifest.created_unix_ms, child.created_unix_ms);
    assert!(!child_dir.join(PAGES_FILE).exists());
    assert_eq!(merged.read_file(STATE_FILE).unwrap(), b"{\"state\": 2}");
    assert!(load(&child_dir).unwrap() == mem, "the merged checkpoint does not hold the child's memory");
    assert_eq!(merged.manifest.memory_stats.data_pages, 3);
    // Merging a full checkpoint is refused.
    assert!(merge_parent(&child_dir).unwrap_err().to_string().contains("not an incremental checkpoint"));
}

#[test]
fn a_broken_chain_names_its_link() {
    let t = tempfile::tempdir().unwrap();
    let (parent_dir, child_dir) = (t.path().join("ckpt"), t.path().join("child"));
    let parent = write(&parent_dir, b"{\"state\": 1}");
    let (mem, pages) = written_memory();
    write_child(&child_dir, &parent, &mem, &pages);
    // Another checkpoint in the parent's place.
    std::fs::remove_dir_all(&parent_dir).unwrap();
    write(&parent_dir, b"{\"state\": 3}");
    let e = load_chain_of(&child_dir).unwrap_err().to_string();
    assert!(e.contains("child/manifest.json: broken checkpoint chain") && e.contains("is another checkpoint"), "{e}");
    // A damaged parent image is found while loading, and named.
    std::fs::remove_dir_all(&parent_dir).unwrap();
    std::fs::remove_dir_all(&child_dir).unwrap();
    let parent = write(&parent_dir, b"{\"state\": 1}");
    write_child(&child_dir, &parent, &mem, &pages);
    flip(&parent_dir.join(MEMORY_FILE), PAGE_SIZE + 7);
    let e = load_chain_of(&child_dir).unwrap_err().to_string();
    assert!(e.contains("ckpt/memory.img: chunk 0 (bytes"), "{e}");
    assert!(merge_parent(&child_dir).is_err(), "a merge must not build on damaged data");
    assert!(child_dir.join(PAGES_FILE).exists(), "the failed merge changed the child");
}

#[test]
fn a_parent_is_a_sibling_named_by_its_id() {
    let t = tempfile::tempdir().unwrap();
    let (parent_dir, child_dir) = (t.path().join("ckpt"), t.path().join("child"));
    let parent = write(&parent_dir, b"{\"state\": 1}");
    let (mem, pages) = written_memory();
    let (layout, _) = memory();
    for (dir, id, why) in [("../ckpt", parent.id.as_str(), "not the name of a sibling"), ("ckpt", "", "names no id")] {
        let _ = std::fs::remove_dir_all(&child_dir);
        let mut w = CheckpointWriter::create(&child_dir).unwrap();
        w.write_file(STATE_FILE, b"{}").unwrap();
        let extents: Vec<Vec<std::ops::Range<u64>>> = (0..2).map(|k| pages.extents_in(&layout, k)).collect();
        let sources: Vec<_> = layout
            .regions
            .iter()
            .zip(&mem)
            .zip(&extents)
            .map(|((r, d), e)| MemorySource { guest_addr: r.guest_addr, data: d, data_extents: Some(e) })
            .collect();
        w.write_memory(&layout, &sources).unwrap();
        w.set_parent(ParentRef { dir: dir.into(), id: id.into() }, &pages).unwrap();
        w.commit("cow", "test", serde_json::json!({})).unwrap();
        let e = open_chain(&child_dir).unwrap_err().to_string();
        assert!(e.contains("broken checkpoint chain") && e.contains(why), "{dir} {id}: {e}");
    }
    // A page map that marks a page in the gap between the regions is refused.
    let mut gap = pages.clone();
    gap.set(20);
    let _ = std::fs::remove_dir_all(&child_dir);
    write_child(&child_dir, &parent, &mem, &gap);
    let e = load_chain_of(&child_dir).unwrap_err().to_string();
    assert!(e.contains("marks pages outside guest memory"), "{e}");
}

/// A chain read chunk by chunk gives the child's memory, exactly as a whole
/// load does; a flipped bit in either link's chunk is named, with the chunk.
#[test]
fn a_chain_read_by_chunks_is_the_childs_memory_and_each_chunk_is_checked() {
    let t = tempfile::tempdir().unwrap();
    let (parent_dir, child_dir) = (t.path().join("ckpt"), t.path().join("child"));
    let parent = write(&parent_dir, b"{\"state\": 1}");
    let (mem, pages) = written_memory();
    write_child(&child_dir, &parent, &mem, &pages);
    let r = ChunkReader::open(&open_chain(&child_dir).unwrap()).unwrap();
    assert_eq!((r.chunk_size(), r.image_size()), (CHUNK_SIZE, 48 * PAGE_SIZE));
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    r.read(0, &mut buf, &mut scratch).unwrap();
    let mut want = mem[0].clone();
    want.extend(vec![0u8; 16 * PS]);
    want.extend(&mem[1]);
    assert!(buf == want, "the chunk is not the child's memory");
    assert!(!r.is_zero(0).unwrap());
    for (dir, page) in [(&child_dir, 33), (&parent_dir, 17)] {
        let img = dir.join(MEMORY_FILE);
        flip(&img, page * PAGE_SIZE + 100);
        let e = r.read(0, &mut buf, &mut scratch).unwrap_err();
        assert!(matches!(&e, Error::Chunk { path, index: 0, .. } if *path == img), "{e}");
        flip(&img, page * PAGE_SIZE + 100);
    }
    r.read(0, &mut buf, &mut scratch).unwrap();
}

/// Chunks of zeros are known without reading them, and a chunk that should
/// be zeros but holds data (a hole written over) is neither zero nor readable.
#[test]
fn zero_chunks_are_known_without_reading_and_damage_to_them_is_caught() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("big");
    let size = 3 * CHUNK_SIZE;
    let layout = MemoryLayout { page_size: PAGE_SIZE, regions: vec![MemoryRegionLayout { guest_addr: 0, size }] };
    let mut mem = vec![0u8; size as usize];
    mem[CHUNK_SIZE as usize + 5] = 1;
    let mut w = CheckpointWriter::create(&d).unwrap();
    w.write_file(STATE_FILE, b"{}").unwrap();
    w.write_memory(&layout, &[MemorySource { guest_addr: 0, data: &mem, data_extents: None }]).unwrap();
    w.commit("stop-and-save", "test", serde_json::json!({})).unwrap();
    let c = Checkpoint::open(&d).unwrap();
    assert_eq!(c.manifest.memory_chunk_size, CHUNK_SIZE);
    let r = ChunkReader::open(std::slice::from_ref(&c)).unwrap();
    let zero: Vec<bool> = (0..3).map(|k| r.is_zero(k).unwrap()).collect();
    assert_eq!(zero, [true, false, true]);
    flip(&d.join(MEMORY_FILE), 2 * CHUNK_SIZE + 9);
    assert!(!r.is_zero(2).unwrap());
    let e = r.read(2, &mut Vec::new(), &mut Vec::new()).unwrap_err();
    assert!(matches!(e, Error::Chunk { index: 2, start, end, .. } if start == 2 * CHUNK_SIZE && end == size), "{e}");
    let e = verify(&d).err().unwrap();
    assert!(matches!(e, Error::Chunk { index: 2, .. }), "{e}");
}

/// A checkpoint written before chunk sums existed (no memory.chunks, no
/// memory_chunk_size) still opens and verifies, but cannot be read lazily;
/// a damaged memory.chunks is caught like any listed file.
#[test]
fn chunk_sums_are_optional_for_a_full_restore_and_checked_when_present() {
    let (_t, d) = fresh();
    let mpath = d.join(MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let o = m.as_object_mut().unwrap();
    o.remove("memory_chunk_size");
    o.remove("manifest_crc32");
    o["files"].as_array_mut().unwrap().retain(|f| f["name"] != CHUNKS_FILE);
    std::fs::remove_file(d.join(CHUNKS_FILE)).unwrap();
    // The checksum field first, as the format wants it.
    let body = serde_json::to_string_pretty(&m).unwrap();
    let text = format!("{{\n  \"manifest_crc32\": \"00000000\",{}", &body[1..]);
    std::fs::write(&mpath, seal_manifest(&text)).unwrap();
    let c = Checkpoint::open(&d).unwrap();
    assert_eq!(c.chunk_sums().unwrap(), None);
    verify(&d).unwrap();
    let e = ChunkReader::open(&[c]).err().unwrap().to_string();
    assert!(e.contains("without per-chunk checksums") && e.contains("not lazily"), "{e}");

    let (_t, d) = fresh();
    flip(&d.join(CHUNKS_FILE), 1);
    let e = Checkpoint::open(&d).unwrap_err();
    assert!(matches!(&e, Error::Checksum { path, .. } if path.ends_with(CHUNKS_FILE)), "{e}");
}
