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
    assert_eq!(report.files.len(), 2);
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
        assert!(matches!(&e, Error::Checksum { path, .. } if path.ends_with(MEMORY_FILE)), "{e}");
        let e = verify(&d).err().unwrap();
        assert!(e.to_string().contains("memory.img: checksum mismatch"), "{e}");
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
