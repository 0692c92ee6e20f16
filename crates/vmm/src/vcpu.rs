//! vCPUs: one thread each, the run loop, the pause/kick mechanism, and the save and
//! restore of a vCPU's KVM state.
//!
//! Pausing: the controller sets [`RunControl`]'s pause flag and sends the kick signal
//! to every vCPU thread. The signal handler sets `immediate_exit` in the thread's
//! `kvm_run`, so `KVM_RUN` returns `EINTR` at once whether the thread was inside it or
//! about to enter it; the thread then lets KVM finish any pending I/O instruction
//! (so the saved registers are at an instruction boundary), reports itself paused and
//! waits for commands.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Once};

use devices::IoAction;
use kvm_bindings::{kvm_mp_state, kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::{lock, MmioBus, PioBus};
use crate::error::{Error, Result};
use crate::event::VmEvent;
use crate::state::VcpuState;
use devices::persist::Persist;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
        // before it first enters KVM_RUN and valid until the thread ends; a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler, once per process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| Error::Vcpu { id: 0, msg: format!("cannot install the kick signal handler: {e}") });
    });
    res
}

/// The I/O port and MMIO buses every vCPU dispatches its exits to.
#[derive(Default)]
pub struct Buses {
    pub pio: PioBus,
    pub mmio: MmioBus,
}

/// Commands a paused vCPU thread takes.
pub enum VcpuCommand {
    /// Run again.
    Resume,
    /// Save the vCPU's state and send it back.
    Save(Sender<Result<VcpuState>>),
    /// End the thread.
    Exit,
}

/// Pause handshake shared by the controller and all vCPU threads of an instance.
#[derive(Default)]
pub struct RunControl {
    pause: AtomicBool,
    paused: Mutex<u32>,
    cv: Condvar,
    /// Share of time (percent) each vCPU sleeps: live migration's auto-converge.
    throttle_pct: AtomicU32,
    /// A vCPU reported an event that ends the guest (exit, power-off, reset,
    /// failure). Its state may already be past that point, so the guest must
    /// not be moved to another instance: the event would be lost with it.
    ended: AtomicBool,
}

/// Running time between two throttle sleeps of a vCPU (the throttle thread kicks
/// every vCPU this often while a throttle is set).
pub const THROTTLE_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

impl RunControl {
    /// Whether a vCPU reported an event that ends the guest.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Sets the throttle: each vCPU, when kicked, sleeps `pct` % of its time.
    pub fn set_throttle(&self, pct: u32) {
        self.throttle_pct.store(pct.min(99), Ordering::SeqCst);
    }

    /// The current throttle, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle_pct.load(Ordering::SeqCst)
    }

    /// A kicked vCPU's throttle sleep: `slice · p / (100 − p)` after a running
    /// slice, in steps of 1 ms so that a pause request is never held up.
    fn throttle_sleep(&self) {
        let p = self.throttle();
        if p == 0 {
            return;
        }
        let total = THROTTLE_SLICE * p / (100 - p);
        let end = std::time::Instant::now() + total;
        while !self.pause_requested() {
            let now = std::time::Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(std::time::Duration::from_millis(1)));
        }
    }

    /// Asks every vCPU to pause (the caller then kicks the threads).
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Withdraws the pause request (the caller then sends `Resume`).
    pub fn clear_pause(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Waits until `n` vCPU threads are paused, up to `timeout`; returns whether they are.
    pub fn wait_paused(&self, n: u32, timeout: std::time::Duration) -> bool {
        let g = lock(&self.paused);
        let (g, _) = self.cv.wait_timeout_while(g, timeout, |p| *p < n).unwrap_or_else(|p| p.into_inner());
        *g >= n
    }

    fn set_paused(&self, paused: bool) {
        let mut g = lock(&self.paused);
        if paused {
            *g += 1;
        } else {
            *g -= 1;
        }
        self.cv.notify_all();
    }
}

/// One vCPU: its KVM file descriptor and the MSRs its state includes.
pub struct Vcpu {
    pub id: u32,
    fd: VcpuFd,
    msr_indices: Arc<Vec<u32>>,
}

fn kvm(id: u32, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Vcpu { id, msg: format!("{what}: {e}") }
}

impl Vcpu {
    pub fn new(id: u32, fd: VcpuFd, msr_indices: Arc<Vec<u32>>) -> Self {
        Vcpu { id, fd, msr_indices }
    }

    /// The KVM vCPU, for boot-time setup.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Marks the vCPU runnable (with an in-kernel LAPIC, KVM starts application
    /// processors waiting for INIT/SIPI; the built-in guests start all vCPUs directly).
    pub fn set_runnable(&self) -> Result<()> {
        self.fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm(self.id, "KVM_SET_MP_STATE"))
    }

    /// Lets KVM finish an instruction whose I/O the VMM already served, so that the
    /// registers are at an instruction boundary.
    fn complete_pending_io(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => {
                Err(Error::Vcpu { id: self.id, msg: format!("KVM_RUN (completing I/O): {e}") })
            }
            _ => Ok(()),
        }
    }
}

/// What a vCPU's state is restored into: a vCPU just made (CPUID set), and the
/// host's TSC frequency, to scale a TSC saved on another host.
pub struct FreshVcpu {
    pub vcpu: Vcpu,
    pub host_tsc_khz: Option<u32>,
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Resources = FreshVcpu;
    type Error = Error;

    /// Reads the whole KVM state of the vCPU. Call only while it does not run.
    fn save(&self) -> Result<VcpuState> {
        let id = self.id;
        let mut msrs = Vec::with_capacity(self.msr_indices.len());
        for chunk in self.msr_indices.chunks(256) {
            let entries: Vec<_> = chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut m =
                Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { id, msg: format!("MSR list: {e:?}") })?;
            let n = self.fd.get_msrs(&mut m).map_err(kvm(id, "KVM_GET_MSRS"))?;
            if n != entries.len() {
                return Err(Error::Vcpu { id, msg: format!("KVM_GET_MSRS stopped at MSR {:#x}", chunk[n]) });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        let tsc_khz = self.fd.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            cpuid: self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm(id, "KVM_GET_CPUID2"))?.as_slice().to_vec(),
            mp_state: self.fd.get_mp_state().map_err(kvm(id, "KVM_GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(kvm(id, "KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kvm(id, "KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(kvm(id, "KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(kvm(id, "KVM_GET_XCRS"))?,
            debug_regs: self.fd.get_debug_regs().map_err(kvm(id, "KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(kvm(id, "KVM_GET_LAPIC"))?,
            msrs,
            events: self.fd.get_vcpu_events().map_err(kvm(id, "KVM_GET_VCPU_EVENTS"))?,
            tsc_khz,
        })
    }

    /// Puts a saved state into a fresh vCPU. The order matters: CPUID before
    /// everything, special registers before MSRs, the LAPIC before pending events.
    fn restore(fresh: FreshVcpu, s: &VcpuState) -> Result<Vcpu> {
        let FreshVcpu { vcpu, host_tsc_khz } = fresh;
        let id = vcpu.id;
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| Error::Vcpu { id, msg: format!("CPUID: {e:?}") })?;
        vcpu.fd.set_cpuid2(&cpuid).map_err(kvm(id, "KVM_SET_CPUID2"))?;
        if let (Some(saved), Some(host)) = (s.tsc_khz, host_tsc_khz) {
            if saved != host {
                vcpu.fd.set_tsc_khz(saved).map_err(|e| Error::Vcpu {
                    id,
                    msg: format!("the checkpoint's TSC runs at {saved} kHz, this host at {host} kHz, and KVM cannot scale it: {e}"),
                })?;
            }
        }
        vcpu.fd.set_mp_state(s.mp_state).map_err(kvm(id, "KVM_SET_MP_STATE"))?;
        vcpu.fd.set_sregs(&s.sregs).map_err(kvm(id, "KVM_SET_SREGS"))?;
        vcpu.fd.set_regs(&s.regs).map_err(kvm(id, "KVM_SET_REGS"))?;
        // SAFETY: `s.xsave` is a complete kvm_xsave (4 KiB) as KVM_GET_XSAVE produced it;
        // KVM reads exactly that size.
        unsafe { vcpu.fd.set_xsave(&s.xsave) }.map_err(kvm(id, "KVM_SET_XSAVE"))?;
        vcpu.fd.set_xcrs(&s.xcrs).map_err(kvm(id, "KVM_SET_XCRS"))?;
        vcpu.fd.set_debug_regs(&s.debug_regs).map_err(kvm(id, "KVM_SET_DEBUGREGS"))?;
        vcpu.fd.set_lapic(&s.lapic).map_err(kvm(id, "KVM_SET_LAPIC"))?;
        for chunk in s.msrs.chunks(256) {
            let m = Msrs::from_entries(chunk).map_err(|e| Error::Vcpu { id, msg: format!("MSR list: {e:?}") })?;
            let n = vcpu.fd.set_msrs(&m).map_err(kvm(id, "KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(Error::Vcpu {
                    id,
                    msg: format!("KVM_SET_MSRS refused MSR {:#x} = {:#x}", chunk[n].index, chunk[n].data),
                });
            }
        }
        vcpu.fd.set_vcpu_events(&s.events).map_err(kvm(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(vcpu)
    }
}

/// Runs `vcpu` until told to exit. Terminal guest events (exit port, shutdown, KVM
/// errors) are sent to `events`; the thread then stays paused until `Exit`.
pub fn run_vcpu_thread(
    mut vcpu: Vcpu,
    ctl: Arc<RunControl>,
    buses: Arc<Buses>,
    commands: Receiver<VcpuCommand>,
    events: Sender<VmEvent>,
) {
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    let id = vcpu.id;
    let mut stopped = false;
    loop {
        if stopped || ctl.pause_requested() {
            if !stopped {
                if let Err(e) = vcpu.complete_pending_io() {
                    let _ = events.send(VmEvent::VcpuFailed { id, error: e.to_string() });
                    stopped = true;
                }
            }
            ctl.set_paused(true);
            loop {
                match commands.recv() {
                    Ok(VcpuCommand::Resume) if !stopped => break,
                    Ok(VcpuCommand::Resume) => {}
                    Ok(VcpuCommand::Save(reply)) => {
                        let _ = reply.send(vcpu.save());
                    }
                    Ok(VcpuCommand::Exit) | Err(_) => {
                        ctl.set_paused(false);
                        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
                        return;
                    }
                }
            }
            ctl.set_paused(false);
            continue;
        }
        let event = match vcpu.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match buses.pio.write(port, data) {
                IoAction::None => None,
                IoAction::GuestExit(status) => Some(VmEvent::GuestExit { status }),
                IoAction::PowerOff => Some(VmEvent::PowerOff),
                IoAction::Reboot => Some(VmEvent::Reboot),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                buses.pio.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => match buses.mmio.write(addr, data) {
                IoAction::None => None,
                IoAction::GuestExit(status) => Some(VmEvent::GuestExit { status }),
                IoAction::PowerOff => Some(VmEvent::PowerOff),
                IoAction::Reboot => Some(VmEvent::Reboot),
            },
            // With the in-kernel irqchip KVM handles HLT itself; a HLT exit means the
            // guest stopped for good (e.g. interrupts off).
            Ok(VcpuExit::Hlt) => Some(VmEvent::VcpuFailed { id, error: "guest halted with no way to wake up".into() }),
            Ok(VcpuExit::Shutdown) => {
                let regs = vcpu.fd.get_regs().ok();
                let sregs = vcpu.fd.get_sregs().ok();
                let at = match (regs, sregs) {
                    (Some(r), Some(s)) => format!(
                        "rip {:#x} rsp {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
                        r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
                    ),
                    _ => "registers unavailable".into(),
                };
                Some(VmEvent::Shutdown { id, at })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(VmEvent::SystemEvent { id, kind }),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union for this exit reason.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Some(VmEvent::VcpuFailed {
                    id,
                    error: format!(
                        "KVM internal error (suberror {}, data {:x?}): KVM could not emulate an instruction of the guest",
                        internal.suberror,
                        &internal.data[..n]
                    ),
                })
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmEvent::VcpuFailed {
                id,
                error: format!(
                    "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                ),
            }),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(other) => Some(VmEvent::VcpuFailed { id, error: format!("unexpected KVM exit: {other:?}") }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                ctl.throttle_sleep();
                None
            }
            Err(e) => Some(VmEvent::VcpuFailed { id, error: format!("KVM_RUN: {e}") }),
        };
        if let Some(ev) = event {
            // Marked before the event goes out: whoever hears of it (or pauses
            // this vCPU afterwards) sees the guest as ended.
            ctl.ended.store(true, Ordering::SeqCst);
            let _ = events.send(ev);
            stopped = true;
        }
    }
}
