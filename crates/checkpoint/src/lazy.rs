//! Lazy verified restore: the guest runs before its memory is read.
//!
//! Guest memory starts empty and registered with a userfaultfd
//! ([`crate::uffd`]). One thread (`cevm-lazy`) serves it: a page the guest
//! (or KVM, or a device) touches first faults, and the thread reads the
//! chunk holding it (2 MiB) from the checkpoint (a chain of incremental
//! checkpoints: the root's chunk with each link's pages over it), checks it
//! against its checksum in memory.chunks, and only then copies it in, which
//! wakes whoever waited. Between faults the same thread loads the other
//! chunks in address order (at most `bandwidth` bytes a second if asked),
//! so the whole memory is soon in place and the userfaultfd goes away.
//!
//! Integrity is not given up: nothing of a chunk reaches guest memory before
//! its checksum matched. A chunk that does not match stops the VM (the
//! caller's `on_fail`, which ends the VMM): the faulting vCPU never gets the
//! page, so the guest never reads damaged memory. The userfaultfd is then
//! kept open, never closed: closing it would let the waiting accesses go on
//! and read zeros.
//!
//! Chunks that are zeros in every link (their checksum is that of zeros and
//! the files hold no data there) are not copied: a fault there gets the zero
//! page, and the pages stay unallocated, as in the original guest.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::ChunkReader;
use vmm_sys_util::eventfd::EventFd;

use crate::uffd::Uffd;
use crate::{Error, Result};

/// The guest's page size (what one fault asks for).
const PAGE: u64 = 4096;

/// How the memory not yet touched is loaded in the background.
#[derive(Clone, Copy, Debug, Default)]
pub struct LazyOptions {
    /// At most this many bytes of the checkpoint read a second in the
    /// background (faults are served at once, always); `None`: as fast as
    /// the disk goes; `Some(0)`: none, pages come only when touched (until a
    /// checkpoint or a migration, which need all of memory, asks for the rest).
    pub bandwidth: Option<u64>,
}

/// How far a lazy restore is (the API's status shows it).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LazyStatus {
    /// Bytes of guest memory in place (chunks copied in, or known to be zeros).
    pub loaded_bytes: u64,
    /// Bytes of guest memory in all.
    pub total_bytes: u64,
    /// Chunks loaded because something touched them first.
    pub on_demand_chunks: u64,
    /// Every chunk is in place and the userfaultfd is gone.
    pub done: bool,
}

#[derive(Debug)]
enum Phase {
    Loading,
    Done,
    Failed(String),
}

struct Shared {
    phase: Mutex<Phase>,
    changed: Condvar,
    loaded: AtomicU64,
    demanded: AtomicU64,
    total: u64,
    /// Load everything now, at full speed (a checkpoint waits for it).
    hurry: AtomicBool,
    stop: AtomicBool,
}

/// A lazy restore's loader; dropped, it stops (after the VM's threads, which
/// the caller stops first: a fault is served until then).
pub struct LazyMemory {
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// One RAM range: guest address, host address, size.
#[derive(Clone, Copy)]
struct Region {
    guest: u64,
    host: usize,
    size: u64,
}

/// Chunk states.
const PENDING: u8 = 0;
const LOADED: u8 = 1;
const ZERO: u8 = 2;

impl LazyMemory {
    /// Registers guest memory (empty: nothing of it was touched) with a new
    /// userfaultfd and starts serving it from `reader`. `on_fail` is called,
    /// once, with the error that stops the VM. The loader keeps a handle of
    /// the memory's mappings: they stay mapped until it has stopped, whatever
    /// the order the instance and the loader are dropped in.
    pub fn start(
        reader: ChunkReader,
        memory: &vmm::GuestMemory,
        opts: LazyOptions,
        on_fail: Box<dyn FnOnce(String) + Send>,
    ) -> Result<LazyMemory> {
        let uffd = Uffd::new().map_err(|e| {
            Error::Unsupported(format!(
                "a lazy restore needs userfaultfd, which this kernel refuses: {e} (it needs CAP_SYS_PTRACE, or \
                 vm.unprivileged_userfaultfd=1); restore without --lazy"
            ))
        })?;
        let regions: Vec<Region> =
            memory.host_ranges().into_iter().map(|(guest, host, size)| Region { guest, host, size }).collect();
        for r in &regions {
            let ioctls = uffd
                .register(r.host, r.size)
                .map_err(|e| Error::Unsupported(format!("cannot register guest memory with userfaultfd: {e}")))?;
            if !crate::uffd::can_copy_and_zero(ioctls) {
                return Err(Error::Unsupported(
                    "this kernel cannot fill this kind of guest memory through userfaultfd (no UFFDIO_COPY and \
                     UFFDIO_ZEROPAGE for it); restore without --lazy"
                        .into(),
                ));
            }
        }
        let shared = Arc::new(Shared {
            phase: Mutex::new(Phase::Loading),
            changed: Condvar::new(),
            loaded: AtomicU64::new(0),
            demanded: AtomicU64::new(0),
            total: regions.iter().map(|r| r.size).sum(),
            hurry: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Unsupported(format!("eventfd: {e}")))?);
        let server = Server::new(memory.mmap().clone(), uffd, reader, regions, opts, shared.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("cevm-lazy".into())
            .spawn(move || server.run(on_fail))
            .map_err(|e| Error::Unsupported(format!("cannot start the lazy restore's thread: {e}")))?;
        Ok(LazyMemory { shared, wake, thread: Some(thread) })
    }

    /// How far it is.
    pub fn status(&self) -> LazyStatus {
        let s = &self.shared;
        LazyStatus {
            loaded_bytes: s.loaded.load(Ordering::Relaxed),
            total_bytes: s.total,
            on_demand_chunks: s.demanded.load(Ordering::Relaxed),
            done: matches!(*s.phase.lock().unwrap_or_else(|p| p.into_inner()), Phase::Done),
        }
    }

    /// Loads all that is left at full speed and waits until it is in place:
    /// what a checkpoint or a migration, which read all of memory, do first.
    pub fn finish(&self) -> Result<()> {
        self.shared.hurry.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let mut phase = self.shared.phase.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*phase {
                Phase::Loading => phase = self.shared.changed.wait(phase).unwrap_or_else(|p| p.into_inner()),
                Phase::Done => return Ok(()),
                Phase::Failed(e) => return Err(Error::Unsupported(e.clone())),
            }
        }
    }
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory").field("status", &self.status()).finish()
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The loader thread's own state.
struct Server {
    /// A handle of the guest memory's mappings, held only so that they stay
    /// mapped while this serves them.
    _mappings: vmm::memory::GuestMemoryMmap,
    uffd: Uffd,
    reader: ChunkReader,
    regions: Vec<Region>,
    opts: LazyOptions,
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    state: Vec<u8>,
    /// The chunks inside guest RAM, in address order, and the next to load.
    order: Vec<u64>,
    next: usize,
    left: usize,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// Background bytes read, since `since`.
    background: u64,
    since: Instant,
}

impl Server {
    fn new(
        mappings: vmm::memory::GuestMemoryMmap,
        uffd: Uffd,
        reader: ChunkReader,
        regions: Vec<Region>,
        opts: LazyOptions,
        shared: Arc<Shared>,
        wake: Arc<EventFd>,
    ) -> Self {
        let c = reader.chunk_size();
        let n = snapshot::chunk_count(reader.image_size(), c);
        let order: Vec<u64> =
            (0..n).filter(|&k| regions.iter().any(|r| r.guest < (k + 1) * c && k * c < r.guest + r.size)).collect();
        let left = order.len();
        Server {
            _mappings: mappings,
            uffd,
            reader,
            regions,
            opts,
            shared,
            wake,
            state: vec![PENDING; n as usize],
            order,
            next: 0,
            left,
            buf: Vec::new(),
            scratch: Vec::new(),
            background: 0,
            since: Instant::now(),
        }
    }

    fn run(mut self, on_fail: Box<dyn FnOnce(String) + Send>) {
        let t0 = Instant::now();
        // A panic must not unwind past here: dropping the descriptor would let
        // every waiting access go on and read zeros.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve()))
            .unwrap_or_else(|_| Err(Error::Unsupported("the loader failed (a panic, above)".into())));
        match served {
            Ok(true) => {
                tracing::info!(
                    "lazy restore: all {} MiB of guest memory in place and verified after {} ms ({} chunks loaded \
                     on demand)",
                    self.shared.total >> 20,
                    t0.elapsed().as_millis(),
                    self.shared.demanded.load(Ordering::Relaxed)
                );
                self.set(Phase::Done);
            }
            // Stopped before the end: the VM is gone; the descriptor stays
            // open with the process, so nothing waiting on it reads zeros.
            Ok(false) => std::mem::forget(self.uffd),
            Err(e) => {
                let msg = format!("lazy restore: {e}; the VM is stopped before the guest could read that memory");
                self.set(Phase::Failed(msg.clone()));
                on_fail(msg);
                // Never resolve the faults that wait: keep the descriptor.
                std::mem::forget(self.uffd);
            }
        }
    }

    fn set(&self, p: Phase) {
        *self.shared.phase.lock().unwrap_or_else(|p| p.into_inner()) = p;
        self.shared.changed.notify_all();
    }

    /// Serves faults and loads chunks until every chunk is in place (true)
    /// or it is told to stop (false).
    fn serve(&mut self) -> Result<bool> {
        while self.left > 0 {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let timeout = self.background_wait();
            let mut fds = [
                libc::pollfd { fd: self.uffd.raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two pollfds, valid for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(self.io("poll", std::io::Error::last_os_error()));
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
            }
            // Faults first: a vCPU waits on each.
            while let Some(addr) = self.uffd.next_fault().map_err(|e| self.io("read", e))? {
                self.fault(addr)?;
            }
            if self.background_wait() == 0 {
                self.load_next()?;
            }
        }
        for r in &self.regions {
            self.uffd.unregister(r.host, r.size).map_err(|e| self.io("unregister", e))?;
        }
        Ok(true)
    }

    fn io(&self, op: &str, e: std::io::Error) -> Error {
        Error::Unsupported(format!("userfaultfd {op}: {e}"))
    }

    /// Milliseconds until the next background chunk may be read: 0 now, -1
    /// never (none left, or none in the background until asked).
    fn background_wait(&self) -> i32 {
        if self.next >= self.order.len() {
            return -1;
        }
        if self.shared.hurry.load(Ordering::SeqCst) {
            return 0;
        }
        match self.opts.bandwidth {
            None => 0,
            Some(0) => -1,
            Some(rate) => {
                let due = Duration::from_secs_f64(self.background as f64 / rate as f64);
                let elapsed = self.since.elapsed();
                if elapsed >= due {
                    0
                } else {
                    (due - elapsed).as_millis().clamp(1, i32::MAX as u128) as i32
                }
            }
        }
    }

    /// The next pending chunk in address order, loaded in the background.
    fn load_next(&mut self) -> Result<()> {
        while self.next < self.order.len() {
            let k = self.order[self.next];
            self.next += 1;
            if self.state[k as usize] == PENDING {
                let read = self.load(k)?;
                self.background += read;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Serves a fault at host address `addr`.
    fn fault(&mut self, addr: u64) -> Result<()> {
        let page = addr & !(PAGE - 1);
        let Some(r) = self.regions.iter().find(|r| page >= r.host as u64 && page < r.host as u64 + r.size).copied()
        else {
            return Ok(());
        };
        let k = (r.guest + (page - r.host as u64)) / self.reader.chunk_size();
        if self.state[k as usize] == PENDING {
            self.shared.demanded.fetch_add(1, Ordering::Relaxed);
            self.load(k)?;
        }
        match self.state[k as usize] {
            ZERO => match self.uffd.zero(page as usize, PAGE) {
                Ok(()) => Ok(()),
                // Served already (two faults on the page): wake the second.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.uffd.wake(page as usize, PAGE).map_err(|e| self.io("wake", e))
                }
                Err(e) => Err(self.io("zeropage", e)),
            },
            // Copied in since the fault was reported: the copy woke it, but
            // waking again is harmless and covers a fault that came between.
            _ => self.uffd.wake(page as usize, PAGE).map_err(|e| self.io("wake", e)),
        }
    }

    /// Loads chunk `k`: zeros are only noted; data is read, checked and copied
    /// in. Returns the bytes read from the checkpoint.
    fn load(&mut self, k: u64) -> Result<u64> {
        let range = self.reader.range(k);
        let in_ram: u64 = self.pieces(&range).iter().map(|(_, a, b)| b - a).sum();
        if self.reader.is_zero(k)? {
            self.state[k as usize] = ZERO;
            self.done_chunk(in_ram);
            return Ok(0);
        }
        self.reader.read(k, &mut self.buf, &mut self.scratch)?;
        for (host, a, b) in self.pieces(&range) {
            let src = &self.buf[(a - range.start) as usize..(b - range.start) as usize];
            let mut done = 0;
            while done < src.len() {
                match self.uffd.copy(host + done, &src[done..]) {
                    (n, None) => done += n,
                    // Interrupted after a part: go on from there.
                    (n, Some(e)) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        done += n;
                        if n == 0 {
                            std::thread::yield_now();
                        }
                    }
                    // Nothing but this loader fills a page of a chunk it has
                    // not loaded: one that is there is not the checkpoint's,
                    // and the guest must not go on with it.
                    (_, Some(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        return Err(Error::Unsupported(format!(
                            "a page of chunk {k} (guest address {:#x}) was in guest memory before its checked copy",
                            a + done as u64
                        )))
                    }
                    (_, Some(e)) => return Err(self.io("copy", e)),
                }
            }
        }
        self.state[k as usize] = LOADED;
        self.done_chunk(in_ram);
        Ok(range.end - range.start)
    }

    fn done_chunk(&mut self, bytes: u64) {
        self.left -= 1;
        self.shared.loaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Where the bytes `range` of the image are in guest RAM: (host address,
    /// image start, image end) for each region it meets.
    fn pieces(&self, range: &std::ops::Range<u64>) -> Vec<(usize, u64, u64)> {
        self.regions
            .iter()
            .filter_map(|r| {
                let (a, b) = (range.start.max(r.guest), range.end.min(r.guest + r.size));
                (a < b).then(|| (r.host + (a - r.guest) as usize, a, b))
            })
            .collect()
    }
}
