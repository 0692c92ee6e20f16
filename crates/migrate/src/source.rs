//! The source side: pre-copy rounds under dirty logging, auto-converge, the switch.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::instance::RunState;
use vmm::vm_memory::{Bytes, GuestAddress};
use vmm::Instance;

use crate::barrier::{Barrier, Heard};
use crate::protocol::{encode_page_table, encode_state, monotonic_us, FrameKind, Hello, PageEntry, Resumed, PAGE_SIZE};
use crate::transport::{send_error, Transport};
use crate::{Error, Failure, GuestAt, Params, Phase, Placement, Progress, Report, Result, SwitchParts};

/// Pages per `Pages` frame (1 MiB of data at most).
const BATCH_PAGES: usize = 256;
/// Bytes of the page table of a full `Pages` frame (see `encode_page_table`).
const FULL_TABLE: usize = 8 + 8 * BATCH_PAGES;
/// Auto-converge: first throttle, step, ceiling (percent of time the vCPUs are held).
const THROTTLE_START: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;

/// Body of the `Done` frame.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct DoneMsg {
    /// Whether the guest was running at the source (a paused guest stays paused).
    pub running: bool,
    /// A migration held for a group's cut: the destination makes the new
    /// instance paused, answers `Resumed`, and runs the guest (if it ran) only
    /// at the source's `Release`.
    #[serde(default)]
    pub hold: bool,
}

/// A RAM range of the guest: where it starts, how long it is.
#[derive(Clone, Copy)]
struct Ram {
    gpa: u64,
    len: usize,
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: about as fast as memcmp against a zero page, without one.
    let (pre, words, post) = {
        // SAFETY: reading u64s from a byte slice through align_to is sound for any
        // bit pattern; unaligned head and tail bytes are checked separately.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Sends pages in frames of up to [`BATCH_PAGES`], paced to the bandwidth cap.
/// Pages are read through vm-memory's volatile accessors, on a handle of the
/// instance's guest memory of its own (the mappings are shared and live as long
/// as any handle does), so that the engine can read pages while it also pauses
/// and resumes the instance (which needs `&mut Instance`).
struct PageSender<'t> {
    t: &'t mut dyn Transport,
    mem: vmm::memory::GuestMemoryMmap,
    entries: Vec<PageEntry>,
    /// The next frame's payload: room for a full page table, then the data of
    /// its non-zero pages, copied out of guest memory once, as they are queued.
    payload: Vec<u8>,
    pages_sent: u64,
    zero_pages: u64,
    bytes_sent: u64,
    /// Bandwidth cap in bytes/s (0: none), and the pacing clock: when the bytes
    /// sent since `pace_start` are due at that rate.
    cap: f64,
    pace_start: Instant,
    pace_bytes: u64,
    /// Round trip of the last `Sync`: the link's latency, for the downtime estimate.
    sync_rtt: Duration,
}

impl<'t> PageSender<'t> {
    fn new(t: &'t mut dyn Transport, mem: vmm::memory::GuestMemoryMmap, cap_mib_s: f64) -> Self {
        PageSender {
            t,
            mem,
            entries: Vec::with_capacity(BATCH_PAGES),
            payload: new_payload(),
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            cap: cap_mib_s.max(0.0) * (1 << 20) as f64,
            pace_start: Instant::now(),
            pace_bytes: 0,
            sync_rtt: Duration::ZERO,
        }
    }

    /// Queues the page at guest address `gpa`. `skip_zero`: a zero page needs no
    /// marker (the destination's page is known to be zero).
    fn push(&mut self, gpa: u64, skip_zero: bool) -> Result<()> {
        // A volatile copy straight into the frame: the guest may write the page
        // while it is read, and a torn copy is harmless, because such a write is
        // in KVM's dirty log and the page is sent again later (the last time with
        // every vCPU paused). The frame's checksum then covers exactly the bytes
        // sent.
        let start = self.payload.len();
        self.mem
            .write_all_volatile_to(GuestAddress(gpa), &mut self.payload, PAGE_SIZE)
            .map_err(|source| Error::GuestMemory { gpa, source })?;
        if is_zero(&self.payload[start..]) {
            self.payload.truncate(start);
            self.zero_pages += 1;
            if skip_zero {
                return Ok(());
            }
            self.entries.push(PageEntry { gpa, zero: true });
        } else {
            self.entries.push(PageEntry { gpa, zero: false });
        }
        if self.entries.len() == BATCH_PAGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Waits until the destination has put every page sent so far into its
    /// memory. A round then ends when its pages are really there: the link rate
    /// it measures includes the destination's work, and the switch does not
    /// wait behind pages still queued from the last round.
    fn sync(&mut self, params: &Params) -> Result<()> {
        let t = Instant::now();
        self.t.send(FrameKind::Sync, &[])?;
        expect(self.t, FrameKind::Synced, "Synced", params)?;
        self.sync_rtt = t.elapsed();
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        // The table goes right before the data: a frame of fewer pages than a
        // full one (the last of a round) moves its data down to meet it.
        let table = encode_page_table(&self.entries);
        let mut payload = std::mem::replace(&mut self.payload, new_payload());
        if table.len() < FULL_TABLE {
            payload.copy_within(FULL_TABLE.., table.len());
            payload.truncate(payload.len() - (FULL_TABLE - table.len()));
        }
        payload[..table.len()].copy_from_slice(&table);
        let bytes = payload.len() as u64;
        self.t.send_owned(FrameKind::Pages, payload)?;
        self.pages_sent += self.entries.len() as u64;
        self.bytes_sent += bytes;
        if self.cap > 0.0 {
            self.pace_bytes += bytes;
            let due = self.pace_start + Duration::from_secs_f64(self.pace_bytes as f64 / self.cap);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        self.entries.clear();
        Ok(())
    }
}

/// An empty `Pages` payload: room for a full page table (filled in when the
/// frame is sent), and capacity for a full frame's data.
fn new_payload() -> Vec<u8> {
    let mut payload = Vec::with_capacity(FULL_TABLE + BATCH_PAGES * PAGE_SIZE);
    payload.resize(FULL_TABLE, 0);
    payload
}

/// Publishes a change to the migration's progress.
type Publish<'a> = dyn Fn(&dyn Fn(&mut Progress)) + 'a;

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

/// Queues every page set in `bitmaps` (one per RAM range).
fn push_dirty(s: &mut PageSender<'_>, ram: &[Ram], bitmaps: &[Vec<u64>]) -> Result<()> {
    for (r, bits) in ram.iter().zip(bitmaps) {
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let page = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                let off = page * PAGE_SIZE;
                if off + PAGE_SIZE <= r.len {
                    s.push(r.gpa + off as u64, false)?;
                }
            }
        }
    }
    s.flush()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Live-migrates `inst` through `t`. On success the guest runs at the destination
/// and `inst` stays paused, its memory and state intact (frozen at the switch).
/// On failure the [`Failure`] says in which phase, why, and where the guest is:
/// before the switch completed, `inst` runs on as before (or stays paused if it
/// was, [`GuestAt::Source`]). One case is different: if the destination got
/// everything but its answer never came, the guest may be running there, so
/// `inst` stays paused ([`GuestAt::Undecided`]).
pub fn migrate_out(
    inst: &mut Instance,
    t: &mut dyn Transport,
    params: &Params,
    progress: &Mutex<Progress>,
) -> std::result::Result<Report, Failure> {
    let phase = Cell::new(Phase::Connect);
    migrate_out_in_phases(inst, t, params, progress, &phase).map_err(|error| {
        if let Some(b) = &params.barrier {
            b.failed(format!("the migration failed: {error}"));
        }
        let guest = match (&error, phase.get()) {
            (Error::GuestEnded, _) => GuestAt::Ended,
            // A destination that refused the state does not run the guest; any
            // other end of the wait leaves it undecided.
            (Error::Peer { .. }, Phase::Resume) => GuestAt::Source,
            (_, Phase::Resume) => GuestAt::Undecided,
            _ => GuestAt::Source,
        };
        Failure { phase: phase.get(), guest, error }
    })
}

/// [`migrate_out`], keeping `phase` up to date as the migration moves on.
fn migrate_out_in_phases(
    inst: &mut Instance,
    t: &mut dyn Transport,
    params: &Params,
    progress: &Mutex<Progress>,
    phase: &Cell<Phase>,
) -> Result<Report> {
    let t0 = Instant::now();
    let update = |f: &dyn Fn(&mut Progress)| {
        if let Ok(mut p) = progress.lock() {
            f(&mut p);
            p.elapsed_ms = ms(t0.elapsed());
        }
    };
    update(&|p| p.phase = "connecting".into());
    if inst.guest_ended() {
        return Err(Error::GuestEnded);
    }
    let was_running = inst.run_state() == RunState::Running;
    let source_vcpus = inst.vcpu_placement();
    let hello = Hello {
        cevm_version: env!("CARGO_PKG_VERSION").into(),
        config: inst.config().clone(),
        cevm: params.cevm,
        nic_offloads: inst.nic_offloads(),
    };
    let hello = serde_json::to_vec(&hello).map_err(|source| Error::Encode { what: "Hello", source })?;
    t.send(FrameKind::Hello, &[&hello])?;
    expect(t, FrameKind::Ready, "Ready", params)?;

    inst.set_dirty_log(true)?;
    phase.set(Phase::Precopy);
    let r = precopy_and_switch(inst, t, params, &update, t0, was_running, phase).map(|mut r| {
        r.placement.source_vcpus = source_vcpus;
        r.placement.migration_thread = vmm::placement::affinity(vmm::placement::this_thread());
        r
    });
    // The source's log is of no more use, whatever happened (a later migration
    // starts a fresh one).
    let _ = inst.set_dirty_log(false);
    match &r {
        Ok(_) => update(&|p| p.phase = "done".into()),
        Err(e) => {
            send_error(t, format!("the source gives up: {e}"));
            update(&|p| p.phase = "failed".into());
        }
    }
    r
}

/// The pre-copy rounds, then the switch; the report of a migration that ended
/// with the guest running at the destination.
fn precopy_and_switch(
    inst: &mut Instance,
    t: &mut dyn Transport,
    params: &Params,
    update: &Publish<'_>,
    t0: Instant,
    was_running: bool,
    phase: &Cell<Phase>,
) -> Result<Report> {
    // Writes the VMM made before now (boot loaders) are covered by the full pass.
    inst.harvest_dirty_pages()?;
    let ram: Vec<Ram> =
        inst.memory().ranges().iter().map(|r| Ram { gpa: r.guest_addr, len: r.size as usize }).collect();
    let memory = MemoryToSend { ram, data_extents: inst.memory().data_extents(), pages: inst.memory().pages() };
    let mut s = PageSender::new(t, inst.memory().mmap().clone(), params.max_bandwidth_mib_s);
    let result = precopy(inst, &mut s, &memory, params, update);
    // The switch pauses the vCPUs anyway; after a failure the guest runs at full speed.
    let _ = inst.set_throttle(0);
    let precopied = result?;

    // The switch: stop the vCPUs, send what they dirtied last, the state and the
    // disk hand-over, and wait for the destination to run.
    update(&|p| p.phase = "switch".into());
    phase.set(Phase::Switch);
    let t_switch = Instant::now();
    let t_switch_us = monotonic_us();
    let before_switch = s.pages_sent;
    let mut parts = SwitchParts::default();
    let sent = send_last_pages_and_state(inst, &mut s, &memory.ram, precopied.pending, &mut parts);
    let state_bytes = resume_here_on_error(inst, was_running, sent)?;
    let hold = params.barrier.is_some();
    let done = serde_json::to_vec(&DoneMsg { running: was_running, hold })
        .map_err(|source| Error::Encode { what: "Done", source })?;
    let sent = s.t.send(FrameKind::Done, &[&done]);
    resume_here_on_error(inst, was_running, sent)?;
    let done_sent = t_switch.elapsed();
    phase.set(Phase::Resume);
    let resumed = wait_resumed(inst, s.t, params, was_running)?;
    let held_ms = match &params.barrier {
        Some(b) => release(b, s.t)?,
        None => 0.0,
    };
    let round_trip = ms(t_switch.elapsed());
    // Closing a tap waits for the kernel to detach it (an RCU grace period):
    // done now that the guest runs, out of its downtime.
    inst.close_released_network();
    let resumed: Resumed = serde_json::from_slice(&resumed).map_err(|source| Error::BadMessage {
        peer: s.t.peer(),
        what: "Resumed",
        source,
    })?;
    // The guest was paused until the destination started its vCPUs: read on the
    // common clock when the destination is on this host, else estimated as the
    // source's part, the one-way latency of `Done` (half a round trip) and the
    // destination's restore. Either way no more than the round trip.
    // A held guest ran only at the `Release`, sent a moment ago.
    let exact = hold || (s.t.shares_clock() && resumed.started_at_us >= t_switch_us);
    let downtime_ms = if hold {
        round_trip
    } else if exact {
        (resumed.started_at_us - t_switch_us) as f64 / 1e3
    } else {
        ms(done_sent) + ms(s.sync_rtt) / 2.0 + resumed.restore_ms
    };
    Ok(Report {
        to: s.t.peer(),
        downtime_ms: downtime_ms.min(round_trip),
        downtime_exact: exact,
        switch_round_trip_ms: round_trip,
        dest_restore_ms: resumed.restore_ms,
        dest_state_decode_ms: resumed.state_decode_ms,
        switch: parts,
        total_ms: ms(t0.elapsed()),
        rounds: precopied.rounds,
        pages_sent: s.pages_sent,
        zero_pages: s.zero_pages,
        bytes_sent: s.bytes_sent,
        switch_pages: s.pages_sent - before_switch,
        max_throttle_pct: precopied.max_throttle_pct,
        state_bytes,
        held_ms,
        paused_at_us: t_switch_us,
        placement: Placement { destination_vcpus: resumed.vcpu_cpus, ..Default::default() },
    })
}

/// The guest memory a migration sends, taken before the pre-copy starts.
struct MemoryToSend {
    /// The RAM ranges.
    ram: Vec<Ram>,
    /// Per RAM range, the parts that may hold data (see `GuestMemory::data_extents`).
    data_extents: Vec<Vec<std::ops::Range<u64>>>,
    /// Pages of guest memory, for the progress.
    pages: u64,
}

/// What the pre-copy rounds leave for the switch and the report.
struct Precopied {
    /// The pages dirtied during the last round, still to send.
    pending: Vec<Vec<u64>>,
    /// Rounds sent, the full pass included.
    rounds: u32,
    /// The highest throttle auto-converge set (it only ever raises it, so its
    /// last value).
    max_throttle_pct: u32,
}

/// Round 0, every page that may hold data, then rounds of the pages dirtied
/// meanwhile until what is left fits in the downtime limit (or `max_rounds`
/// is reached: [`Error::NoConvergence`]); throttles the guest when it dirties
/// faster than the link moves pages, if auto-converge is on.
fn precopy(
    inst: &mut Instance,
    s: &mut PageSender<'_>,
    memory: &MemoryToSend,
    params: &Params,
    update: &Publish<'_>,
) -> Result<Precopied> {
    update(&|p| {
        p.phase = "precopy".into();
        p.pages_total = memory.pages;
    });
    let mut last_harvest = Instant::now();
    send_data_pages(s, memory, update)?;
    s.sync(params)?;
    let mut sent_in_round = s.bytes_sent;
    let mut round_time = last_harvest.elapsed();
    let mut rounds = 1;
    let mut throttle = 0u32;
    loop {
        let dirty = inst.harvest_dirty_pages()?;
        let since = last_harvest.elapsed();
        last_harvest = Instant::now();
        let n = count(&dirty);
        let bytes_per_s = sent_in_round as f64 / round_time.as_secs_f64().max(1e-6);
        let dirty_per_s = n as f64 / since.as_secs_f64().max(1e-6);
        let expected_ms = (n as f64 * PAGE_SIZE as f64) / bytes_per_s.max(1.0) * 1e3;
        let (ps, bs, th) = (s.pages_sent, s.bytes_sent, throttle);
        update(&|p| {
            p.round = rounds;
            p.pages_sent = ps;
            p.bytes_sent = bs;
            p.dirty_pages = n;
            p.dirty_pages_per_s = dirty_per_s;
            p.mib_per_s = bytes_per_s / (1 << 20) as f64;
            p.expected_downtime_ms = expected_ms;
            p.throttle_pct = th;
        });
        if expected_ms <= params.max_downtime_ms {
            let pending = match &params.barrier {
                Some(b) => hold_for_cut(inst, s, &memory.ram, params, update, b, dirty)?,
                None => dirty,
            };
            return Ok(Precopied { pending, rounds, max_throttle_pct: throttle });
        }
        if rounds >= params.max_rounds {
            return Err(Error::NoConvergence {
                rounds,
                dirty_pages_per_s: dirty_per_s,
                link_pages_per_s: bytes_per_s / PAGE_SIZE as f64,
                remaining: n,
                expected_ms,
                limit_ms: params.max_downtime_ms,
            });
        }
        // The guest dirtied more than half of what the link moved: throttle it.
        if params.auto_converge && rounds >= 2 && (n * PAGE_SIZE as u64) as f64 > 0.5 * sent_in_round as f64 {
            throttle = match throttle {
                0 => THROTTLE_START,
                p => (p + THROTTLE_STEP).min(THROTTLE_MAX),
            };
            inst.set_throttle(throttle)?;
        }
        let before = s.bytes_sent;
        let start = Instant::now();
        push_dirty(s, &memory.ram, &dirty)?;
        s.sync(params)?;
        sent_in_round = s.bytes_sent - before;
        round_time = start.elapsed();
        rounds += 1;
    }
}

/// How often a migration held for a group's cut copies what its guest
/// dirtied meanwhile (at most; a cut is heard at once).
const HOLD_ROUND: Duration = Duration::from_millis(2);

/// The pre-copy could switch now, but waits for the group's cut (guest
/// running): tells the coordinator it is ready and keeps sending what the
/// guest dirties, so that the switch stays as short, until the cut (then
/// returns the pages still to send) or a no ([`Error::NotCut`]).
fn hold_for_cut(
    inst: &mut Instance,
    s: &mut PageSender<'_>,
    ram: &[Ram],
    params: &Params,
    update: &Publish<'_>,
    b: &Barrier,
    mut pending: Vec<Vec<u64>>,
) -> Result<Vec<Vec<u64>>> {
    update(&|p| p.phase = "ready".into());
    b.ready();
    loop {
        match b.wait_cut(HOLD_ROUND) {
            Heard::Yes => return Ok(pending),
            Heard::No(why) => return Err(Error::NotCut(why)),
            Heard::NotYet => {}
        }
        if inst.guest_ended() {
            return Err(Error::GuestEnded);
        }
        vmm::memory::union_dirty(&mut pending, inst.harvest_dirty_pages()?);
        if count(&pending) > 0 {
            push_dirty(s, ram, &pending)?;
            s.sync(params)?;
            pending.iter_mut().for_each(|b| b.fill(0));
        }
    }
}

/// The switch of a held migration is done (the destination holds the guest,
/// paused): waits for the coordinator's go (or its abort, or the lease's
/// end), then lets the destination run the guest. Returns how long it waited.
fn release(b: &Barrier, t: &mut dyn Transport) -> Result<f64> {
    let waited = Instant::now();
    if let Heard::No(why) = b.switched_wait_go() {
        tracing::warn!("{why}; this checkpoint belongs to no group checkpoint");
    }
    let held_ms = ms(waited.elapsed());
    t.send(FrameKind::Release, &[])?;
    Ok(held_ms)
}

/// Sends every page that may hold data (the memory's data extents). The
/// destination's memory starts zeroed, so zero pages need not even be marked.
/// Publishes the pages sent so far every [`PROGRESS_EVERY`] pages, so that a
/// long first pass shows its progress as it goes.
fn send_data_pages(s: &mut PageSender<'_>, memory: &MemoryToSend, update: &Publish<'_>) -> Result<()> {
    let mut queued = 0u64;
    for (r, ext) in memory.ram.iter().zip(&memory.data_extents) {
        for e in ext {
            let mut off = (e.start as usize) & !(PAGE_SIZE - 1);
            while off < e.end as usize && off + PAGE_SIZE <= r.len {
                s.push(r.gpa + off as u64, true)?;
                off += PAGE_SIZE;
                queued += 1;
                if queued % PROGRESS_EVERY == 0 {
                    let (ps, bs) = (s.pages_sent, s.bytes_sent);
                    update(&|p| (p.pages_sent, p.bytes_sent) = (ps, bs));
                }
            }
        }
    }
    s.flush()
}

/// Pages between two progress updates of the first pass (4 MiB).
const PROGRESS_EVERY: u64 = 1024;

/// The switch's part at the source: pauses the vCPUs, sends the pages dirtied
/// since the last round (`pending` and what the final harvest finds), flushes
/// the disk and sends the state. Returns the state's size in bytes.
fn send_last_pages_and_state(
    inst: &mut Instance,
    s: &mut PageSender<'_>,
    ram: &[Ram],
    mut pending: Vec<Vec<u64>>,
    parts: &mut SwitchParts,
) -> Result<u64> {
    let t = Instant::now();
    inst.pause()?;
    parts.pause_ms = ms(t.elapsed());
    // A guest that ended during the pre-copy stays here, where its end is
    // heard; moved, it would sit past its end in the new instance.
    if inst.guest_ended() {
        return Err(Error::GuestEnded);
    }
    let t = Instant::now();
    vmm::memory::union_dirty(&mut pending, inst.harvest_dirty_pages()?);
    push_dirty(s, ram, &pending)?;
    parts.last_pages_ms = ms(t.elapsed());
    let t = Instant::now();
    // Every write the guest's disk completed reaches the image before the
    // destination opens it.
    inst.flush_disk()?;
    let state = inst.save_state()?;
    // The guest's NICs are the destination's from here: it may bind the same
    // taps (a tap takes one reader). They stay open until the guest runs there
    // (a destination in this process takes them over; one elsewhere on this
    // host binds the same tap once it is closed, below); if the switch fails,
    // the resume binds them again.
    inst.release_network()?;
    let state = encode_state(&state)?;
    s.t.send(FrameKind::State, &[&state])?;
    parts.state_ms = ms(t.elapsed());
    Ok(state.len() as u64)
}

/// Lets the guest run here again (if it ran before the migration) when a step
/// of the switch failed before the destination could run it.
fn resume_here_on_error<T>(inst: &mut Instance, was_running: bool, step: Result<T>) -> Result<T> {
    if step.is_err() && was_running {
        inst.resume()?;
    }
    step
}

/// Waits for the destination's `Resumed`. If the destination refused the
/// state, the guest is still only here and runs on (if it ran); if the answer
/// never comes, the destination may be running the guest, so the source stays
/// paused (`migrate_out` says so). Returns the frame's body.
fn wait_resumed(inst: &mut Instance, t: &mut dyn Transport, params: &Params, was_running: bool) -> Result<Vec<u8>> {
    match expect(t, FrameKind::Resumed, "Resumed", params) {
        Err(e @ Error::Peer { .. }) => resume_here_on_error(inst, was_running, Err(e)),
        r => r,
    }
}

/// Waits for a frame of `kind`; an `Error` frame becomes [`Error::Peer`].
fn expect(t: &mut dyn Transport, kind: FrameKind, name: &'static str, params: &Params) -> Result<Vec<u8>> {
    let f = t.recv(Some(params.peer_timeout()))?;
    if f.kind == kind {
        return Ok(f.payload);
    }
    if f.kind == FrameKind::Error {
        return Err(Error::from_error_frame(t.peer(), &f.payload));
    }
    Err(Error::Unexpected { peer: t.peer(), got: f.kind, expected: name })
}
