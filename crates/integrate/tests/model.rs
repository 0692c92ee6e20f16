//! The two disk protocols against a reference model: random interleavings of
//! guest reads and writes (whole clusters, partial clusters, spanning clusters),
//! flushes, integration steps and message deliveries delayed at random. At every
//! step the disk the new instance presents (U over B, and T for the clusters
//! still only in T) must equal the reference disk; every read must return the
//! reference's bytes; T must never change; at the end U over B alone must be the
//! reference and T over B the disk at the switch.

use std::collections::{BTreeMap, HashMap, VecDeque};

use integrate::{Completion, FrozenOverlay, NewOverlay, NewSide, OldSide, Polled, Request, Result, ToNew, ToOld};

const CS: u64 = 64;
const CLUSTERS: u64 = 12;
const SIZE: u64 = CS * CLUSTERS;

/// U over B: whole clusters U holds, B below.
struct ModelU {
    b: Vec<u8>,
    held: HashMap<u64, Vec<u8>>,
}

impl ModelU {
    fn byte(&self, off: u64) -> u8 {
        self.cluster(off / CS)[(off % CS) as usize]
    }

    fn cluster(&self, c: u64) -> &[u8] {
        match self.held.get(&c) {
            Some(d) => d,
            None => &self.b[(c * CS) as usize..((c + 1) * CS) as usize],
        }
    }
}

impl NewOverlay for ModelU {
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        for (i, x) in buf.iter_mut().enumerate() {
            *x = self.byte(off + i as u64);
        }
        Ok(())
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        for (i, &x) in data.iter().enumerate() {
            let o = off + i as u64;
            let c = o / CS;
            let b = &self.b;
            let cluster = self.held.entry(c).or_insert_with(|| b[(c * CS) as usize..((c + 1) * CS) as usize].to_vec());
            cluster[(o % CS) as usize] = x;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

struct ModelT(BTreeMap<u64, Vec<u8>>);

impl FrozenOverlay for ModelT {
    fn read_cluster(&mut self, cluster: u64, buf: &mut [u8]) -> Result<()> {
        let c = self.0.get(&cluster).ok_or_else(|| integrate::Error::Io(format!("T has no cluster {cluster}")))?;
        buf.copy_from_slice(c);
        Ok(())
    }
}

fn random_request(rng: &mut fastrand::Rng) -> Request {
    match rng.u8(0..10) {
        0 => Request::Flush,
        1..=4 => {
            let off = rng.u64(0..SIZE);
            let len = rng.u64(1..=(3 * CS).min(SIZE - off));
            Request::Read { off, len }
        }
        5..=6 => {
            // Whole clusters, aligned.
            let c = rng.u64(0..CLUSTERS);
            let n = rng.u64(1..=(CLUSTERS - c).min(2));
            let mut data = vec![0; (n * CS) as usize];
            rng.fill(&mut data);
            Request::Write { off: c * CS, data }
        }
        _ => {
            // Anywhere, partial or spanning clusters.
            let off = rng.u64(0..SIZE);
            let len = rng.u64(1..=(2 * CS).min(SIZE - off));
            let mut data = vec![0; len as usize];
            rng.fill(&mut data);
            Request::Write { off, data }
        }
    }
}

/// A random base image B, and a random T over it: each cluster in T or not.
fn random_disks(rng: &mut fastrand::Rng) -> (Vec<u8>, BTreeMap<u64, Vec<u8>>) {
    let mut b = vec![0u8; SIZE as usize];
    rng.fill(&mut b);
    let mut t_data = BTreeMap::new();
    for c in 0..CLUSTERS {
        if rng.bool() {
            let mut d = vec![0u8; CS as usize];
            rng.fill(&mut d);
            t_data.insert(c, d);
        }
    }
    (b, t_data)
}

/// Checks that request `id` completed as `completion`, in submission order (it
/// must be the oldest pending one) and with the data of `reference`, the disk
/// as the guest wrote it; a write takes effect on `reference`.
fn check_completion(
    seed: u64,
    pending: &mut VecDeque<(u64, Request)>,
    reference: &mut [u8],
    id: u64,
    completion: Completion,
) {
    let (want, req) = pending.pop_front().unwrap_or_else(|| panic!("seed {seed}: extra completion"));
    assert_eq!(id, want, "seed {seed}: completed out of order");
    match (req, completion) {
        (Request::Read { off, len }, Completion::Read(data)) => {
            let r = &reference[off as usize..(off + len) as usize];
            assert_eq!(data.as_slice(), r, "seed {seed}: read {off:#x}+{len:#x} returned stale data");
        }
        (Request::Write { off, data }, Completion::Write) => {
            reference[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        (Request::Flush, Completion::Flush) => {}
        (r, c) => panic!("seed {seed}: {r:?} completed as {c:?}"),
    }
}

/// One random schedule; panics with the seed on any divergence.
fn schedule(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (b, t_data) = random_disks(&mut rng);
    // The disk at the switch: T over B.
    let mut at_switch = b.clone();
    for (c, d) in &t_data {
        at_switch[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(d);
    }
    let mut reference = at_switch.clone();
    let t_before = t_data.clone();
    let mut t = ModelT(t_data);
    let mut u = ModelU { b: b.clone(), held: HashMap::new() };
    let keys: Vec<u64> = t.0.keys().copied().collect();
    let mut old = OldSide::new(keys.clone(), CS as usize);
    let mut new = NewSide::new(keys, CS, SIZE);
    let mut to_new: VecDeque<ToNew> = VecDeque::new();
    let mut to_old: VecDeque<ToOld> = VecDeque::new();
    let mut pending: VecDeque<(u64, Request)> = VecDeque::new();
    let requests = rng.u64(0..24);
    let mut submitted = 0;
    let mut steps = 0;

    let check_view = |new: &NewSide, u: &ModelU, t: &ModelT, reference: &[u8]| {
        for c in 0..CLUSTERS {
            let r = &reference[(c * CS) as usize..((c + 1) * CS) as usize];
            if new.is_t_only(c) {
                assert_eq!(t.0.get(&c).map(Vec::as_slice), Some(r), "seed {seed}: cluster {c} (T-only) differs");
            } else {
                assert_eq!(u.cluster(c), r, "seed {seed}: cluster {c} (U over B) differs");
            }
        }
    };

    loop {
        steps += 1;
        assert!(steps < 10_000, "seed {seed}: no progress");
        let finished = submitted == requests && pending.is_empty() && new.done() && old.done();
        if finished {
            break;
        }
        match rng.u8(0..6) {
            0 if submitted < requests => {
                let req = random_request(&mut rng);
                new.submit(submitted, req.clone()).unwrap();
                pending.push_back((submitted, req));
                submitted += 1;
            }
            1 => {
                if let Some(m) = old.step(&mut t).unwrap() {
                    to_new.push_back(m);
                }
            }
            2 => {
                for _ in 0..rng.usize(1..=3) {
                    if let Some(m) = to_new.pop_front() {
                        new.on_message(m, &mut u).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    }
                }
            }
            3 => {
                if let Some(m) = to_old.pop_front() {
                    if let Some(a) = old.on_message(m, &mut t).unwrap_or_else(|e| panic!("seed {seed}: {e}")) {
                        to_new.push_back(a);
                    }
                }
            }
            _ => {
                let polled = new.poll(&mut u).unwrap();
                to_old.extend(polled.to_old);
                for (id, completion) in polled.completed {
                    check_completion(seed, &mut pending, &mut reference, id, completion);
                }
            }
        }
        check_view(&new, &u, &t, &reference);
        assert_eq!(t.0, t_before, "seed {seed}: T changed after the switch");
    }
    // Integration over: U over B alone is the disk; T over B is the disk at the switch.
    let whole: Vec<u8> = (0..SIZE).map(|o| u.byte(o)).collect();
    assert_eq!(whole, reference, "seed {seed}: U over B is not the disk after integration");
    let mut t_over_b = b;
    for (c, d) in &t.0 {
        t_over_b[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(d);
    }
    assert_eq!(t_over_b, at_switch, "seed {seed}: T over B is not the disk at the switch");
}

#[test]
fn random_interleavings_keep_every_read_and_both_disks_right() {
    // Every CI run covers new interleavings; a failure names its seed.
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() << 20;
    for i in 0..100_000 {
        schedule(base + i);
    }
}

#[test]
fn a_write_that_covers_a_t_only_cluster_needs_nothing_from_t() {
    // T holds cluster 1; the guest overwrites it whole before integration reaches it.
    let mut u = ModelU { b: vec![0; SIZE as usize], held: HashMap::new() };
    let mut new = NewSide::new([1], CS, SIZE);
    new.submit(7, Request::Write { off: CS, data: vec![9; CS as usize] }).unwrap();
    let p = new.poll(&mut u).unwrap();
    assert_eq!(p, Polled { to_old: vec![], completed: vec![(7, Completion::Write)] });
    // Integration's copy of T's cluster 1 then must not overwrite the guest's data.
    new.on_message(ToNew::Cluster { cluster: 1, data: vec![5; CS as usize] }, &mut u).unwrap();
    assert_eq!(u.held[&1], vec![9; CS as usize]);
}

#[test]
fn a_partial_write_to_a_t_only_cluster_waits_for_t_and_merges() {
    let mut u = ModelU { b: vec![0; SIZE as usize], held: HashMap::new() };
    let mut new = NewSide::new([2], CS, SIZE);
    new.submit(1, Request::Write { off: 2 * CS + 8, data: vec![9; 8] }).unwrap();
    let p = new.poll(&mut u).unwrap();
    assert_eq!(p, Polled { to_old: vec![ToOld::ReadFrozen { cluster: 2 }], completed: vec![] });
    new.on_message(ToNew::FrozenData { cluster: 2, data: vec![5; CS as usize] }, &mut u).unwrap();
    assert_eq!(new.poll(&mut u).unwrap().completed, vec![(1, Completion::Write)]);
    let mut want = vec![5; CS as usize];
    want[8..16].fill(9);
    assert_eq!(u.held[&2], want);
}

#[test]
fn protocol_violations_are_refused() {
    let mut u = ModelU { b: vec![0; SIZE as usize], held: HashMap::new() };
    let mut new = NewSide::new([3], CS, SIZE);
    let e = new.on_message(ToNew::IntegrateEnd, &mut u).unwrap_err().to_string();
    assert!(e.contains("before cluster 3"), "{e}");
    let e = new.on_message(ToNew::FrozenData { cluster: 3, data: vec![1; 3] }, &mut u).unwrap_err().to_string();
    assert!(e.contains("3 bytes"), "{e}");
    assert!(new.submit(0, Request::Read { off: SIZE - 1, len: 2 }).is_err());
    let mut t = ModelT(BTreeMap::from([(3, vec![0; CS as usize])]));
    let mut old = OldSide::new(vec![3], CS as usize);
    assert!(old.on_message(ToOld::LastUpdate, &mut t).is_err());
}
