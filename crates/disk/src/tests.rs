//! Interop with qemu-img: cevm opens what qemu-img makes, and qemu-img accepts what
//! cevm writes (`qemu-img check`, `--backing-chain`).

use std::process::Command;

use super::*;

fn run(tool: &str, args: &[&str]) -> String {
    let o = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} (package qemu-utils): {e}"));
    assert!(o.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A seed that differs from run to run (a failure prints the seed it used).
fn time_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() << 8
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

#[test]
fn own_clusters_are_exactly_the_ones_qemu_img_maps_to_the_overlay() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.qcow2");
    let top = t.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    qemu_io("write -P 0xab 0 1M", &base);
    Disk::create_overlay(&top, &base).unwrap();
    {
        let d = Disk::open(&top, true).unwrap();
        d.write(&[1; 4096], 0).unwrap(); // a partial cluster
        d.write(&[2; 200_000], 3 << 20).unwrap(); // spans clusters
        d.write(&[3; 512], (7 << 20) + 65_300).unwrap(); // straddles a boundary
        d.flush().unwrap();
    }
    qemu_io("write -z 5M 64k", &top); // an explicit zero cluster
    let d = Disk::open(&top, false).unwrap();
    let (cluster, own) = d.own_clusters().unwrap();
    assert_eq!(cluster, 65536);
    // The oracle: qemu-img's map of the overlay's own (depth 0) data and zeroes.
    let map = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
    let mut want = Vec::new();
    for line in map.lines().filter(|l| l.contains("\"depth\": 0")) {
        let num = |key: &str| -> u64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            rest.trim_start_matches([':', ' ']).split([',', '}']).next().unwrap().trim().parse().unwrap()
        };
        let (start, length) = (num("\"start\""), num("\"length\""));
        want.extend(start / cluster..(start + length).div_ceil(cluster));
    }
    assert_eq!(own, want, "{map}");
    assert_eq!(own, vec![0, 48, 49, 50, 51, 80, 112, 113], "{map}");
    // A raw image has no backing layer to tell apart.
    let raw = t.path().join("r.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    assert!(Disk::open(&raw, false).unwrap().own_clusters().is_err());
}

/// The CEVM disk protocols (crate `integrate`) over real qcow2 files: T, the
/// overlay at the switch, is only read; U, a fresh overlay over the same base,
/// takes the guest's writes and T's integrated clusters.
mod integration_over_qcow2 {
    use std::collections::VecDeque;

    use integrate::{Completion, NewSide, OldSide, Request, ToNew, ToOld};

    use super::*;
    use crate::integration::Image;

    fn read_all(d: &Disk) -> Vec<u8> {
        let mut v = vec![0; d.size() as usize];
        d.read(&mut v, 0).unwrap();
        v
    }

    fn run(seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().unwrap();
        let (b, t, u) = (dir.path().join("b.qcow2"), dir.path().join("t.qcow2"), dir.path().join("u.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "4M"]);
        qemu_io("write -P 0xab 0 3M", &b);
        Disk::create_overlay(&t, &b).unwrap();
        {
            // The guest's writes before the switch.
            let td = Disk::open(&t, true).unwrap();
            for _ in 0..rng.usize(0..12) {
                let mut data = vec![0; rng.usize(1..150_000)];
                rng.fill(&mut data);
                td.write(&data, rng.u64(0..(4 << 20) - data.len() as u64)).unwrap();
            }
            td.flush().unwrap();
        }
        Disk::create_overlay(&u, &b).unwrap();
        let td = Disk::open(&t, false).unwrap();
        let ud = Disk::open(&u, true).unwrap();
        let at_switch = read_all(&td);
        let (cs, own) = td.own_clusters().unwrap();
        let mut reference = at_switch.clone();
        let size = td.size();
        let mut old = OldSide::new(own.clone(), cs as usize);
        let mut new = NewSide::new(own.clone(), cs, size);
        let (mut tt, mut uu) = (Image(&td, cs), Image(&ud, 0));
        let (mut to_new, mut to_old) = (VecDeque::<ToNew>::new(), VecDeque::<ToOld>::new());
        let mut pending = VecDeque::new();
        let (requests, mut submitted) = (rng.u64(0..40), 0);
        while !(submitted == requests && pending.is_empty() && new.done() && old.done()) {
            match rng.u8(0..5) {
                0 if submitted < requests => {
                    let off = rng.u64(0..size - 1);
                    let len = rng.u64(1..=(size - off).min(200_000));
                    let req = if rng.bool() {
                        Request::Read { off, len }
                    } else {
                        let mut data = vec![0; len as usize];
                        rng.fill(&mut data);
                        Request::Write { off, data }
                    };
                    new.submit(submitted, req.clone()).unwrap();
                    pending.push_back(req);
                    submitted += 1;
                }
                1 => to_new.extend(old.step(&mut tt).unwrap()),
                2 => {
                    if let Some(m) = to_new.pop_front() {
                        new.on_message(m, &mut uu).unwrap();
                    }
                }
                3 => {
                    if let Some(m) = to_old.pop_front() {
                        to_new.extend(old.on_message(m, &mut tt).unwrap());
                    }
                }
                _ => {
                    let p = new.poll(&mut uu).unwrap();
                    to_old.extend(p.to_old);
                    for (_, c) in p.completed {
                        match (pending.pop_front().unwrap(), c) {
                            (Request::Read { off, len }, Completion::Read(d)) => {
                                assert!(d == reference[off as usize..(off + len) as usize], "seed {seed}: stale read")
                            }
                            (Request::Write { off, data }, Completion::Write) => {
                                reference[off as usize..off as usize + data.len()].copy_from_slice(&data)
                            }
                            (r, c) => panic!("seed {seed}: {r:?} -> {c:?}"),
                        }
                    }
                }
            }
        }
        ud.flush().unwrap();
        assert!(read_all(&ud) == reference, "seed {seed}: U over B is not the disk");
        assert!(read_all(&td) == at_switch, "seed {seed}: T over B is not the disk at the switch");
        assert_eq!(td.own_clusters().unwrap().1, own, "seed {seed}: T was written");
        drop((td, ud));
        qemu_img(&["check", "-q", u.to_str().unwrap()]);
        qemu_img(&["check", "-q", t.to_str().unwrap()]);
    }

    #[test]
    fn integration_and_guest_io_interleaved_on_qcow2_files() {
        let base = time_seed();
        for i in 0..12 {
            run(base + i);
        }
    }
}

/// The hand-over drivers (`integration`): the old side on one thread over T, the
/// new side's message pump on another, and the guest's requests on a third,
/// against real qcow2 files, with the old side ending normally or going away
/// half way.
mod integration_threads {
    use std::sync::mpsc;
    use std::sync::Arc;

    use crate::integration::{overlay_path, run_old_side, serve_new_side, FromOld, Outbox};
    use crate::GuestDisk;

    use super::*;

    fn read_all(read: impl Fn(&mut [u8], u64), size: u64) -> Vec<u8> {
        let mut v = vec![0; size as usize];
        read(&mut v, 0);
        v
    }

    /// `stop_after`: the old side goes away after sending this many messages.
    fn run(seed: u64, stop_after: Option<usize>) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().unwrap();
        let (b, t) = (dir.path().join("b.qcow2"), dir.path().join("disk.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "4M"]);
        qemu_io("write -P 0xab 0 3M", &b);
        Disk::create_overlay(&t, Path::new("b.qcow2")).unwrap();
        {
            let td = Disk::open(&t, true).unwrap();
            for _ in 0..rng.usize(1..12) {
                let mut data = vec![0; rng.usize(1..300_000)];
                rng.fill(&mut data);
                td.write(&data, rng.u64(0..(4 << 20) - data.len() as u64)).unwrap();
            }
            td.flush().unwrap();
        }
        // What the checkpoint keeps: T under a second name, before anything runs.
        let kept = dir.path().join("checkpoint-disk.qcow2");
        std::fs::hard_link(&t, &kept).unwrap();
        let t_old = Disk::open(&t, false).unwrap();
        let size = t_old.size();
        let at_switch = read_all(|b, o| t_old.read(b, o).unwrap(), size);

        let gd = Arc::new(GuestDisk::for_integration(&t).unwrap());
        assert!(overlay_path(&t).exists() && gd.integrating());
        let (to_new, from_old) = mpsc::sync_channel::<FromOld>(4);
        let (to_old, from_new) = mpsc::channel();
        gd.connect(Box::new(move |m| to_old.send(m).map_err(|e| e.to_string())));
        let mut sent = 0usize;
        let outbox: Outbox<FromOld> = Box::new(move |m| {
            sent += 1;
            if stop_after.is_some_and(|n| sent > n) {
                return Err("old side stopped by the test".into());
            }
            to_new.send(m).map_err(|e| e.to_string())
        });
        let old = std::thread::spawn(move || run_old_side(&t_old, from_new, outbox));
        let pump = {
            let gd = gd.clone();
            std::thread::spawn(move || serve_new_side(&gd, from_old))
        };
        // The guest, meanwhile.
        let mut reference = at_switch.clone();
        for _ in 0..rng.usize(0..40) {
            let off = rng.u64(0..size - 1);
            let len = rng.u64(1..=(size - off).min(200_000)) as usize;
            if rng.bool() {
                let mut got = vec![0; len];
                gd.read(&mut got, off).unwrap();
                assert!(got == reference[off as usize..off as usize + len], "seed {seed}: stale read");
            } else {
                let mut data = vec![0; len];
                rng.fill(&mut data);
                gd.write(&data, off).unwrap();
                reference[off as usize..off as usize + len].copy_from_slice(&data);
            }
        }
        let old_result = old.join().unwrap();
        let pump_result = pump.join().unwrap();
        // Every run has at least four messages (Begin, a cluster, IntegrateEnd,
        // UpdateDone), so a stop after at most two always cuts the protocol short.
        match old_result {
            Ok(r) => {
                assert!(stop_after.is_none_or(|n| n > 2), "seed {seed}: the old side was not stopped");
                pump_result.unwrap_or_else(|e| panic!("seed {seed}: new side: {e}"));
                assert!(r.clusters > 0, "seed {seed}: T held clusters");
            }
            Err(e) => {
                assert!(stop_after.is_some(), "seed {seed}: old side: {e}");
                let e = pump_result.expect_err("the new side saw the old side go");
                assert!(e.to_string().contains("read from T directly"), "seed {seed}: {e}");
            }
        }
        assert!(!gd.integrating(), "seed {seed}: the integration ended");
        assert_eq!(gd.current_path(), t, "seed {seed}: U took the guest disk's name");
        assert!(!overlay_path(&t).exists(), "seed {seed}: U's temporary name is gone");
        assert!(read_all(|b, o| gd.read(b, o).unwrap(), size) == reference, "seed {seed}: the guest's disk");
        gd.flush().unwrap();
        drop(gd);
        let now = Disk::open(&t, false).unwrap();
        assert!(
            read_all(|b, o| now.read(b, o).unwrap(), size) == reference,
            "seed {seed}: the file at the disk's path"
        );
        assert_eq!(crate::backing_file(&t).unwrap().as_deref(), Some("b.qcow2"), "seed {seed}: U's backing is B");
        let k = Disk::open(&kept, false).unwrap();
        assert!(read_all(|b, o| k.read(b, o).unwrap(), size) == at_switch, "seed {seed}: T is the disk at the switch");
        drop((now, k));
        qemu_img(&["check", "-q", t.to_str().unwrap()]);
        qemu_img(&["check", "-q", kept.to_str().unwrap()]);
    }

    #[test]
    fn the_guest_keeps_its_disk_and_t_stays_the_disk_at_the_switch() {
        let base = time_seed();
        for i in 0..8 {
            run(base + i, None);
        }
    }

    #[test]
    fn when_the_old_side_goes_away_the_new_side_finishes_from_t() {
        let base = time_seed();
        for (i, stop) in [0, 1, 2, 5, 17].into_iter().enumerate() {
            run(base + 100 + i as u64, Some(stop));
        }
    }

    #[test]
    fn a_disk_that_is_no_overlay_or_has_a_leftover_u_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("r.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let e = GuestDisk::for_integration(&raw).err().unwrap().to_string();
        assert!(e.contains("qcow2 overlay"), "{e}");
        let (b, t) = (dir.path().join("b.qcow2"), dir.path().join("t.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"]);
        Disk::create_overlay(&t, Path::new("b.qcow2")).unwrap();
        std::fs::write(overlay_path(&t), b"left over").unwrap();
        let e = GuestDisk::for_integration(&t).err().unwrap().to_string();
        assert!(e.contains("left over"), "{e}");
        assert_eq!(std::fs::read(overlay_path(&t)).unwrap(), b"left over", "not touched");
    }
}
