//! An instance: KVM VM, memory, devices and vCPU threads, with start, pause,
//! resume, save and restore.

use std::io::Write;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::persist::Persist;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioResources, MmioTransport};
use devices::virtio::VirtioDevice;
use devices::{AcpiPower, ExitPort, Serial, SerialResources};
use kvm_bindings::{kvm_msr_entry, kvm_pit_config, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::bus::lock;
use crate::config::{Boot, InstanceConfig};
use crate::error::{Error, Result};
use crate::event::VmEvent;
use crate::layout::{
    VirtioMmioSlot, ACPI_SLEEP_CONTROL_PORT, COM1_BASE, COM1_IRQ, COM1_LEN, EXIT_PORT, KVM_TSS_ADDR, PAGE_SIZE,
    VIRTIO_BLK_SLOT,
};
use crate::memory::GuestMemory;
use crate::nics::{self, NicStatus, Nics};
use crate::persist::{device_ids, DeviceSet, KvmVm};
use crate::state::{DeviceStates, InstanceState, VcpuState};
use crate::vcpu::{self, kick_signal, Buses, FreshVcpu, RunControl, Vcpu, VcpuCommand};
use crate::{acpi, boot, linux};

/// How long a pause may take before it is reported as a failure.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pause re-sends the kick while waiting.
const KICK_INTERVAL: Duration = Duration::from_millis(20);

struct VcpuThread {
    handle: JoinHandle<()>,
    commands: Sender<VcpuCommand>,
}

/// What a vCPU thread made in advance needs to run its vCPU.
struct VcpuStart {
    vcpu: Vcpu,
    ctl: Arc<RunControl>,
    buses: Arc<Buses>,
    commands: mpsc::Receiver<VcpuCommand>,
    events: Sender<VmEvent>,
}

/// A vCPU thread made with its [`Shell`], waiting for its [`VcpuStart`]; it
/// ends if the sender goes away first (a shell dropped unused leaves it to end
/// by itself; an instance joins it). Making threads early keeps their
/// creation (a stack mapping, a clone; milliseconds under nested
/// virtualization) out of a migration's switch.
struct ParkedThread {
    handle: JoinHandle<()>,
    start: Sender<VcpuStart>,
}

impl ParkedThread {
    fn new(id: u32) -> Result<Self> {
        let (start, rx) = mpsc::channel::<VcpuStart>();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // The guest drives this thread: it gets the narrowest filter
                // (KVM's ioctls, memory, eventfds, the console) before it runs
                // a guest instruction. If that fails the thread ends, and so
                // does the start of its instance (its channel is closed).
                if let Err(e) = sandbox::confine(sandbox::Kind::Vcpu) {
                    tracing::error!("vcpu{id}: {e}");
                    return;
                }
                if let Ok(s) = rx.recv() {
                    vcpu::run_vcpu_thread(s.vcpu, s.ctl, s.buses, s.commands, s.events)
                }
            })
            .map_err(Error::Thread)?;
        Ok(ParkedThread { handle, start })
    }

    /// Lets the thread end without running anything, and waits for it.
    fn dismiss(self) {
        drop(self.start);
        let _ = self.handle.join();
    }
}

/// The thread that kicks every vCPU each [`vcpu::THROTTLE_SLICE`] while a
/// throttle is set, so that each sleeps its share (see `RunControl::set_throttle`).
struct Throttler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<()>,
}

/// Run state of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created, vCPUs not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused at an instruction boundary.
    Paused,
}

/// A KVM VM with its interrupt controllers, timer, memory and vCPUs (CPUID set),
/// but no devices and no guest state yet: what takes time to make, and needs
/// nothing from the guest's state. Becomes an [`Instance`] by
/// [`Instance::restore_into`].
pub struct Shell {
    vm: VmFd,
    memory: GuestMemory,
    vcpus: Vec<Vcpu>,
    threads: Vec<ParkedThread>,
    /// The guest's disk, when prepared ahead (a CEVM switch's overlay U); else
    /// the instance opens the configuration's disk.
    disk: Option<Arc<disk::GuestDisk>>,
    /// What each NIC needs from the host, made with the VM.
    nics: Vec<nics::Prepared>,
    // Declared last: the KVM system fd outlives the VM's.
    kvm: Kvm,
}

impl Shell {
    /// Makes the VM for `config`, on `memory` or on new zeroed memory.
    pub fn new(config: &InstanceConfig, memory: Option<GuestMemory>) -> Result<Self> {
        crate::persist::check_config(config)?;
        vcpu::install_kick_handler()?;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm.create_vm().map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        // The i8254 timer, in the kernel like the interrupt controllers (Linux uses it
        // to calibrate); its speaker port is a dummy.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        let memory = match memory {
            Some(m) => m,
            None => GuestMemory::new(config.mem_size, config.memory_backend)?,
        };
        memory.register(&vm)?;
        let cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        let mut msr_indices = Arc::new(Vec::new());
        for id in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(id)).map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&vcpu_cpuid(&cpuid, id)?)
                .map_err(|e| Error::Vcpu { id, msg: format!("KVM_SET_CPUID2: {e}") })?;
            if id == 0 {
                msr_indices = Arc::new(saveable_msrs(&kvm, &fd)?);
            }
            vcpus.push(Vcpu::new(id, fd, msr_indices.clone()));
        }
        let threads = (0..config.vcpus).map(ParkedThread::new).collect::<Result<Vec<_>>>()?;
        let nics =
            config.nics.iter().enumerate().map(|(i, n)| nics::Prepared::new(&vm, i, n)).collect::<Result<_>>()?;
        Ok(Shell { vm, memory, vcpus, threads, disk: None, nics, kvm })
    }

    /// The guest memory, to fill before the state is loaded.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Gives the instance this disk instead of opening the configuration's.
    pub fn set_disk(&mut self, disk: Arc<disk::GuestDisk>) {
        self.disk = Some(disk);
    }

    /// Sets on each NIC's tap the offloads its source has on its own
    /// ([`Instance::nic_offloads`]; `None` or a NIC beyond the list: left
    /// as is), so that the restored NIC finds them set (see
    /// `nics::Prepared::preset_offload`).
    pub fn preset_nic_offloads(&self, offloads: &[Option<u32>]) {
        for (i, (nic, offload)) in self.nics.iter().zip(offloads).enumerate() {
            if let Some(o) = offload {
                nic.preset_offload(i, *o);
            }
        }
    }
}

/// Epochs of dirty page tracking (see [`Instance::dirty_epoch`]).
static DIRTY_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The tracking after a harvest that failed part way: KVM may have cleared
/// some slots' logs, so the pages kept are no longer all that was written.
/// The epoch ends (the next checkpoint holds all of memory and starts another);
/// the log stays on.
fn lost_harvest() -> Tracking {
    Tracking::LogAhead
}

/// What an instance keeps of the pages written, for incremental checkpoints.
enum Tracking {
    /// Nothing (KVM's dirty log is off, or a live migration's own).
    Off,
    /// KVM's dirty log turned on while the guest ran, ahead of the pause in
    /// which the tracking starts ([`Instance::prepare_dirty_pages`]).
    LogAhead,
    /// The pages written since `epoch` began (one bitmap per RAM range),
    /// as far as they were harvested.
    Since { epoch: u64, pages: Vec<Vec<u64>> },
}

/// One KVM VM and everything that belongs to it.
pub struct Instance {
    config: InstanceConfig,
    vm: VmFd,
    memory: GuestMemory,
    /// Every device, for saving and restoring them.
    devices: DeviceSet,
    buses: Arc<Buses>,
    block: Option<Arc<Mutex<MmioTransport<Block>>>>,
    nics: Nics,
    ctl: Arc<RunControl>,
    idle_vcpus: Vec<Vcpu>,
    /// Threads waiting to run `idle_vcpus`, one each (see [`ParkedThread`]).
    parked: Vec<ParkedThread>,
    threads: Vec<VcpuThread>,
    throttler: Option<Throttler>,
    events: Sender<VmEvent>,
    state: RunState,
    /// Incremental checkpoints: what is kept of the pages written since the
    /// last checkpoint ([`track_dirty_pages`](Self::track_dirty_pages)).
    dirty: Mutex<Tracking>,
    // Declared last: the KVM system fd outlives the VM's.
    _kvm: Kvm,
}

impl Instance {
    /// A new instance booting what `config.boot` says; vCPUs not started yet.
    ///
    /// `builtin_image` is the flat binary of the built-in guest a
    /// [`Boot::Builtin`] names, `None` for a Linux boot. The configuration keeps
    /// only the guest's name and arguments (what a checkpoint manifest and a
    /// migration's Hello record); the bytes come from whoever creates the
    /// instance (the CLI and the tests look them up in the `guests` crate), so
    /// the VMM does not link the built-in test programs. A restore needs no
    /// image: the guest's memory comes from the saved state.
    pub fn new(
        config: InstanceConfig,
        builtin_image: Option<&[u8]>,
        console: Box<dyn Write + Send>,
        events: Sender<VmEvent>,
    ) -> Result<Self> {
        let inst = Self::create(config, console, None, None, events)?;
        boot::write_long_mode_tables(&inst.memory)?;
        match (&inst.config.boot, builtin_image) {
            (Boot::Builtin { args, .. }, Some(image)) => inst.boot_builtin(image, args)?,
            (Boot::Builtin { guest, .. }, None) => {
                return Err(Error::Config(format!("the built-in guest `{guest}` was given no image")))
            }
            (Boot::Linux { .. }, Some(_)) => {
                return Err(Error::Config("a Linux boot takes no built-in guest image".into()))
            }
            (Boot::Linux { kernel, initrd, cmdline }, None) => inst.boot_linux(kernel, initrd.as_deref(), cmdline)?,
        }
        Ok(inst)
    }

    /// Loads the built-in guest `image` with its arguments `args`; every vCPU
    /// enters it directly, with a stack of its own.
    fn boot_builtin(&self, image: &[u8], args: &str) -> Result<()> {
        let tsc_khz = self.idle_vcpus[0].fd().get_tsc_khz().unwrap_or(0);
        boot::load_builtin_guest(&self.memory, image, self.config.vcpus, tsc_khz, args)?;
        for v in &self.idle_vcpus {
            enter_long_mode(v, &boot::entry_regs(v.id))?;
            v.set_runnable()?;
        }
        Ok(())
    }

    /// Loads a Linux kernel (with its initramfs and command line) and the
    /// firmware tables; only the boot vCPU enters the kernel, the others wait
    /// for its INIT/SIPI.
    fn boot_linux(&self, kernel: &std::path::Path, initrd: Option<&std::path::Path>, cmdline: &str) -> Result<()> {
        let entry = linux::load(&self.memory, kernel, initrd, cmdline, self.config.vcpus, &self.virtio_slots())?;
        for v in &self.idle_vcpus {
            let err =
                |what: &'static str| move |e: kvm_ioctls::Error| Error::Vcpu { id: v.id, msg: format!("{what}: {e}") };
            let mut lapic = v.fd().get_lapic().map_err(err("KVM_GET_LAPIC"))?;
            linux::configure_lapic(&mut lapic);
            v.fd().set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        }
        enter_long_mode(&self.idle_vcpus[0], &linux::entry_regs(entry))
    }

    /// A new instance in the saved `state`. Guest memory is zeroed: the caller fills
    /// it (see [`Instance::memory`]) before [`Instance::start`].
    pub fn restore(
        config: InstanceConfig,
        state: &InstanceState,
        console: Box<dyn Write + Send>,
        events: Sender<VmEvent>,
    ) -> Result<Self> {
        let shell = Shell::new(&config, None)?;
        Self::restore_into(shell, config, state, console, events)
    }

    /// A new instance in the saved `state`, built on a [`Shell`] made earlier: a
    /// live migration's destination makes the KVM VM, its memory and vCPUs while
    /// the pages still arrive, and only loads the state here, during the switch.
    pub fn restore_into(
        shell: Shell,
        config: InstanceConfig,
        state: &InstanceState,
        console: Box<dyn Write + Send>,
        events: Sender<VmEvent>,
    ) -> Result<Self> {
        crate::persist::check_restorable(&config, state)?;
        if shell.vcpus.len() != config.vcpus as usize {
            return Err(Error::Config(format!(
                "the VM has {} vCPUs, the configuration {}",
                shell.vcpus.len(),
                config.vcpus
            )));
        }
        if shell.memory.size() != config.mem_size {
            return Err(Error::Config(format!(
                "the memory holds {} bytes, the configuration {}",
                shell.memory.size(),
                config.mem_size
            )));
        }
        let mut inst = Self::create(config, console, Some(&state.devices), Some(shell), events)?;
        KvmVm::restore(&inst.vm, &state.vm)?;
        let host_tsc_khz = inst.idle_vcpus[0].fd().get_tsc_khz().ok();
        let fresh = std::mem::take(&mut inst.idle_vcpus);
        inst.idle_vcpus = fresh
            .into_iter()
            .zip(&state.vcpus)
            .map(|(vcpu, saved)| Vcpu::restore(FreshVcpu { vcpu, host_tsc_khz }, saved))
            .collect::<Result<_>>()?;
        // Interrupts the devices hold and the guest has not taken, raised again now
        // that the irqchip is loaded: the saved irqchip can lack them (an irqfd is
        // delivered asynchronously), and loading it overwrote what the UART raised
        // while it was being restored.
        inst.devices.reassert_pending_interrupts()?;
        // The guest may be on another host or tap now: its NICs announce it.
        inst.nics.announce();
        Ok(inst)
    }

    /// Devices on a [`Shell`] (made here if none is given): common to new and
    /// restored instances.
    fn create(
        config: InstanceConfig,
        console: Box<dyn Write + Send>,
        devices: Option<&DeviceStates>,
        shell: Option<Shell>,
        events: Sender<VmEvent>,
    ) -> Result<Self> {
        let Shell { kvm, vm, memory, vcpus: idle_vcpus, threads: parked, disk: prepared, nics: prepared_nics } =
            match shell {
                Some(s) => s,
                None => Shell::new(&config, None)?,
            };
        let mut set = DeviceSet::default();
        let mut buses = Buses::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("serial eventfd: {e}")))?;
        vm.register_irqfd(&irq, COM1_IRQ).map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let serial = set.add::<Serial>(device_ids::SERIAL, SerialResources { irq, out: console }, devices)?;
        buses.pio.insert(COM1_BASE, COM1_LEN, serial);
        buses.pio.insert(EXIT_PORT, 1, Arc::new(Mutex::new(ExitPort)));
        let power = AcpiPower { s5_sleep_type: acpi::S5_SLEEP_TYPE, reset_value: acpi::RESET_VALUE };
        buses.pio.insert(ACPI_SLEEP_CONTROL_PORT, 3, Arc::new(Mutex::new(power)));
        let block = match &config.disk {
            Some(d) => {
                let image = match prepared {
                    Some(p) => p,
                    None => Arc::new(disk::GuestDisk::plain(
                        disk::Disk::open(&d.path, !d.read_only).map_err(|e| Error::Device(e.to_string()))?,
                    )),
                };
                let block = Block::new(image, "cevm-disk0");
                let mut virtio = VirtioBuilder { set: &mut set, buses: &mut buses, vm: &vm, memory: &memory, devices };
                Some(virtio.add(device_ids::VIRTIO_BLK, block, VIRTIO_BLK_SLOT)?)
            }
            None => None,
        };
        let mut nics = Nics::default();
        for (i, (nic, prepared)) in config.nics.iter().zip(prepared_nics).enumerate() {
            let mut virtio = VirtioBuilder { set: &mut set, buses: &mut buses, vm: &vm, memory: &memory, devices };
            nics.add(nic, prepared, |net, slot, irq| virtio.add_on(device_ids::VIRTIO_NET[i], net, slot, irq))?;
        }
        if let Some(saved) = devices {
            set.check_all_restored(saved)?;
        }

        Ok(Instance {
            config,
            vm,
            memory,
            devices: set,
            buses: Arc::new(buses),
            block,
            nics,
            ctl: Arc::new(RunControl::default()),
            idle_vcpus,
            parked,
            threads: Vec::new(),
            throttler: None,
            events,
            state: RunState::Created,
            dirty: Mutex::new(Tracking::Off),
            _kvm: kvm,
        })
    }

    /// The virtio-mmio devices, for the firmware tables.
    pub fn virtio_slots(&self) -> Vec<VirtioMmioSlot> {
        self.block.iter().map(|_| VIRTIO_BLK_SLOT).chain(self.nics.slots()).collect()
    }

    /// The NICs: the tap each is bound to, and what it moved.
    pub fn nics(&self) -> Vec<NicStatus> {
        self.nics.status()
    }

    /// The offloads set on each NIC's tap (`TUN_F_*`; `None` without a tap),
    /// for a migration's destination to set on its taps ahead of the switch
    /// ([`Shell::preset_nic_offloads`]).
    pub fn nic_offloads(&self) -> Vec<Option<u32>> {
        self.nics.offloads()
    }

    /// Lets go of the NICs' taps: the paused guest goes on elsewhere (a
    /// migration's switch), where its NICs may bind the same taps. They stay
    /// open (a new instance of this process takes them over) until
    /// [`Instance::close_released_network`] or the instance's end. A resume
    /// binds them again.
    pub fn release_network(&mut self) -> Result<()> {
        if self.state == RunState::Running {
            return Err(Error::RunState("the instance must be paused to release its network"));
        }
        self.nics.release();
        Ok(())
    }

    /// Closes the taps [`Instance::release_network`] let go of that no new
    /// instance of this process took (the guest runs elsewhere now).
    pub fn close_released_network(&mut self) {
        self.nics.close_released();
    }

    /// A migration's destination: a NIC whose tap another process still holds
    /// (the source on this host, until the guest runs here) is bound as soon
    /// as that process lets go of it, the guest running meanwhile, instead of
    /// failing the start.
    pub fn bind_busy_taps_when_free(&mut self) {
        self.nics.wait_for_busy_taps();
    }

    /// Makes every write the guest's disk completed durable (flushes the image).
    pub fn flush_disk(&self) -> Result<()> {
        if let Some(b) = &self.block {
            lock(b).device().disk().flush().map_err(|e| Error::Device(format!("flushing the disk: {e}")))?;
        }
        Ok(())
    }

    /// Gives the paused instance's block device `disk` in place of its disk
    /// (which is returned): what the guest reads and writes from its resume on.
    pub fn replace_disk(&mut self, disk: Arc<disk::GuestDisk>) -> Result<Arc<disk::GuestDisk>> {
        if self.state != RunState::Paused {
            return Err(Error::RunState("the disk can only be replaced while the instance is paused"));
        }
        let block = self.block.as_ref().ok_or_else(|| Error::Device("the guest has no disk to replace".into()))?;
        lock(block).device_mut().replace_disk(disk).map_err(Error::Device)
    }

    /// The guest's disk, if it has one.
    pub fn disk(&self) -> Option<Arc<disk::GuestDisk>> {
        self.block.as_ref().map(|b| lock(b).device().disk().clone())
    }

    /// The guest configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Starts (`true`) or stops KVM's dirty page log on all guest memory (a
    /// live migration's). Either way the pages kept for incremental
    /// checkpoints are given up: the migration's harvests take them.
    pub fn set_dirty_log(&self, on: bool) -> Result<()> {
        *lock(&self.dirty) = Tracking::Off;
        self.memory.set_dirty_log(&self.vm, on)
    }

    /// Does, while the guest still runs, the part of an incremental
    /// checkpoint's dirty-log work that would otherwise fall in its pause.
    /// Tracking not started yet: turns KVM's dirty log on now (KVM then
    /// write-protects all of guest memory), and the pause's
    /// [`track_dirty_pages`](Self::track_dirty_pages) harvests and discards
    /// the pages written meanwhile (the checkpoint holds all of memory).
    /// Tracking under way: harvests the pages written so far (KVM
    /// write-protects each again), and the pause's
    /// [`dirty_pages`](Self::dirty_pages) harvests only those written since.
    /// If no incremental checkpoint follows, the log stays on until the next
    /// one, a migration or [`untrack_dirty_pages`](Self::untrack_dirty_pages),
    /// which costs the guest what tracking costs it.
    pub fn prepare_dirty_pages(&self) -> Result<()> {
        let mut d = lock(&self.dirty);
        match *d {
            Tracking::Off => {
                self.memory.set_dirty_log(&self.vm, true)?;
                *d = Tracking::LogAhead;
            }
            Tracking::LogAhead => {}
            Tracking::Since { .. } => self.harvest_into(&mut d)?,
        }
        Ok(())
    }

    /// Adds the pages written since the last harvest to those `d` keeps, if
    /// it keeps any; a harvest that fails part way ends the epoch
    /// ([`lost_harvest`]).
    fn harvest_into(&self, d: &mut Tracking) -> Result<()> {
        let Tracking::Since { pages, .. } = d else { return Ok(()) };
        match self.harvest_dirty_pages() {
            Ok(h) => {
                crate::memory::union_dirty(pages, h);
                Ok(())
            }
            Err(e) => {
                *d = lost_harvest();
                Err(e)
            }
        }
    }

    /// Starts keeping the pages written from now on (by the guest: KVM's
    /// dirty log, turned on with a clean log or emptied if it was on ahead;
    /// by the VMM: vm-memory's bitmap), for incremental checkpoints. The
    /// instance must be paused, so that no write falls between this and the
    /// checkpoint it follows.
    pub fn track_dirty_pages(&self) -> Result<()> {
        if self.state == RunState::Running {
            return Err(Error::RunState("dirty pages are tracked from a paused instance on"));
        }
        let mut d = lock(&self.dirty);
        if matches!(*d, Tracking::LogAhead) {
            // Written before this pause: in the checkpoint the tracking follows.
            self.memory.harvest_dirty_log(&self.vm)?;
        } else {
            self.memory.set_dirty_log(&self.vm, true)?;
        }
        self.memory.harvest_vmm_writes();
        let zero = self.memory.ranges().iter().map(|r| vec![0u64; (r.size / PAGE_SIZE).div_ceil(64) as usize]);
        let epoch = DIRTY_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *d = Tracking::Since { epoch, pages: zero.collect() };
        Ok(())
    }

    /// Which tracking of written pages is under way (unique in this
    /// process), if one is: a checkpoint taken in another cannot be the base
    /// of an incremental one.
    pub fn dirty_epoch(&self) -> Option<u64> {
        match &*lock(&self.dirty) {
            Tracking::Since { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// The paused instance's pages written since tracking started, less
    /// those [`forget_dirty_pages`](Self::forget_dirty_pages) was given; `None`
    /// when they are not tracked (never started, or a migration took them).
    pub fn dirty_pages(&self) -> Result<Option<Vec<Vec<u64>>>> {
        if self.state == RunState::Running {
            return Err(Error::RunState("dirty pages are read from a paused instance"));
        }
        let mut d = lock(&self.dirty);
        self.harvest_into(&mut d)?;
        let Tracking::Since { pages, .. } = &*d else { return Ok(None) };
        Ok(Some(pages.clone()))
    }

    /// These pages are in a committed checkpoint: later incremental ones need
    /// them only if written again.
    pub fn forget_dirty_pages(&self, saved: &[Vec<u64>]) {
        if let Tracking::Since { pages, .. } = &mut *lock(&self.dirty) {
            for (a, s) in pages.iter_mut().zip(saved) {
                for (x, y) in a.iter_mut().zip(s) {
                    *x &= !y;
                }
            }
        }
    }

    /// Stops keeping written pages (and KVM's dirty log).
    pub fn untrack_dirty_pages(&self) -> Result<()> {
        let was = std::mem::replace(&mut *lock(&self.dirty), Tracking::Off);
        if !matches!(was, Tracking::Off) {
            self.memory.set_dirty_log(&self.vm, false)?;
        }
        Ok(())
    }

    /// The pages written since the last harvest, one bitmap per RAM range (bit i of
    /// word j = page 64 j + i): the guest's writes (KVM's dirty log, which must be
    /// on) and the VMM's own (device DMA, virtqueue updates: vm-memory's bitmap).
    pub fn harvest_dirty_pages(&self) -> Result<Vec<Vec<u64>>> {
        let mut dirty = self.memory.harvest_dirty_log(&self.vm)?;
        crate::memory::union_dirty(&mut dirty, self.memory.harvest_vmm_writes());
        Ok(dirty)
    }

    /// Whether the guest ended (a vCPU reported its exit, power-off, reset or a
    /// failure; the event is on its way to the instance's event channel).
    pub fn guest_ended(&self) -> bool {
        self.ctl.ended()
    }

    /// The run state.
    pub fn run_state(&self) -> RunState {
        self.state
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<()> {
        self.start_as(false)
    }

    /// Starts the vCPU threads paused: not one guest instruction runs, and
    /// the NICs move no frame, until [`Instance::resume`] (a group's members
    /// are restored so, then let run together).
    pub fn start_paused(&mut self) -> Result<()> {
        self.start_as(true)
    }

    fn start_as(&mut self, paused: bool) -> Result<()> {
        if self.state != RunState::Created {
            return Err(Error::RunState("the instance was already started"));
        }
        // The taps first: a NIC that cannot have its tap stops the start before
        // any guest instruction runs.
        self.nics.start(!paused)?;
        if paused {
            // Seen by each vCPU thread before its first KVM_RUN: it parks.
            self.ctl.request_pause();
        }
        for (vcpu, parked) in self.idle_vcpus.drain(..).zip(self.parked.drain(..)) {
            let (tx, commands) = mpsc::channel();
            let (ctl, buses, events) = (self.ctl.clone(), self.buses.clone(), self.events.clone());
            let id = vcpu.id;
            parked
                .start
                .send(VcpuStart { vcpu, ctl, buses, commands, events })
                .map_err(|_| Error::Vcpu { id, msg: "its thread ended before it started".into() })?;
            self.threads.push(VcpuThread { handle: parked.handle, commands: tx });
        }
        if paused {
            if !self.ctl.wait_paused(self.threads.len() as u32, PAUSE_TIMEOUT) {
                return Err(Error::RunState("vCPUs did not park within 5 s"));
            }
            self.state = RunState::Paused;
            tracing::debug!("instance started paused: {} vCPU threads parked", self.threads.len());
            return Ok(());
        }
        self.state = RunState::Running;
        tracing::debug!("instance started: {} vCPU threads running", self.threads.len());
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary.
    pub fn pause(&mut self) -> Result<()> {
        match self.state {
            RunState::Paused => return Ok(()),
            RunState::Created => return Err(Error::RunState("the instance has not started")),
            RunState::Running => {}
        }
        // The NICs' threads stop while the vCPUs do (each handshake waits for
        // a thread to be scheduled: milliseconds on a busy host, not to be
        // spent one after the other).
        self.nics.request_pause();
        self.ctl.request_pause();
        let n = self.threads.len() as u32;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            for t in &self.threads {
                // A thread that already ended cannot be signalled; it no longer runs either.
                let _ = t.handle.kill(kick_signal());
            }
            if self.ctl.wait_paused(n, KICK_INTERVAL) {
                break;
            }
            if Instant::now() > deadline {
                self.ctl.clear_pause();
                self.nics.resume();
                return Err(Error::RunState("vCPUs did not pause within 5 s"));
            }
        }
        // A paused instance changes no guest memory: the NICs' threads have
        // stopped too.
        self.nics.wait_paused();
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<()> {
        match self.state {
            RunState::Running => return Ok(()),
            RunState::Created => return Err(Error::RunState("the instance has not started")),
            RunState::Paused => {}
        }
        self.nics.resume();
        self.ctl.clear_pause();
        for t in &self.threads {
            let _ = t.commands.send(VcpuCommand::Resume);
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// The whole state of the paused instance (vCPUs, VM, devices; not memory).
    pub fn save_state(&mut self) -> Result<InstanceState> {
        if self.state != RunState::Paused {
            return Err(Error::RunState("the instance must be paused to save its state"));
        }
        let mut vcpus: Vec<VcpuState> = Vec::with_capacity(self.threads.len());
        for (id, t) in self.threads.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let gone = || Error::Vcpu { id: id as u32, msg: "the vCPU thread has ended".into() };
            t.commands.send(VcpuCommand::Save(tx)).map_err(|_| gone())?;
            vcpus.push(rx.recv().map_err(|_| gone())??);
        }
        let vm = KvmVm::new(&self.vm).save()?;
        let devices = self.devices.save()?;
        Ok(InstanceState { vm, vcpus, devices })
    }

    /// Makes every vCPU sleep `pct` % of its time (0 ends it): live migration's
    /// auto-converge, when the guest dirties memory faster than the link moves it.
    pub fn set_throttle(&mut self, pct: u32) -> Result<()> {
        self.ctl.set_throttle(pct);
        if pct == 0 {
            if let Some(t) = self.throttler.take() {
                t.stop.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = t.handle.join();
            }
            return Ok(());
        }
        if self.throttler.is_some() || self.threads.is_empty() {
            return Ok(());
        }
        use std::os::unix::thread::JoinHandleExt;
        let targets: Vec<libc::pthread_t> = self.threads.iter().map(|t| t.handle.as_pthread_t()).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    for &t in &targets {
                        // SAFETY: the vCPU threads outlive this thread: `set_throttle(0)`
                        // and `shutdown` join it before they join them.
                        unsafe { libc::pthread_kill(t, kick_signal()) };
                    }
                    std::thread::sleep(vcpu::THROTTLE_SLICE);
                }
            })
            .map_err(Error::Thread)?;
        self.throttler = Some(Throttler { stop, handle });
        Ok(())
    }

    /// Places the vCPU threads: vCPU i on `cpus[i % len]` (one CPU each, so that
    /// an instance's vCPUs do not fight over one core while others are free).
    pub fn place_vcpus(&self, cpus: &[usize]) -> Result<()> {
        if cpus.is_empty() {
            return Ok(());
        }
        use std::os::unix::thread::JoinHandleExt;
        for (i, t) in self.threads.iter().enumerate() {
            crate::placement::set_affinity(t.handle.as_pthread_t(), &[cpus[i % cpus.len()]])?;
        }
        Ok(())
    }

    /// The CPUs each vCPU thread may run on, in vCPU order.
    pub fn vcpu_placement(&self) -> Vec<Vec<usize>> {
        use std::os::unix::thread::JoinHandleExt;
        self.threads.iter().map(|t| crate::placement::affinity(t.handle.as_pthread_t())).collect()
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        let _ = self.set_throttle(0);
        if self.state == RunState::Running {
            // A vCPU that does not pause still gets Exit below and ends with the process.
            let _ = self.pause();
        }
        for t in self.threads.drain(..) {
            let _ = t.commands.send(VcpuCommand::Exit);
            let _ = t.handle.join();
        }
        for p in self.parked.drain(..) {
            p.dismiss();
        }
        self.nics.shutdown();
        // A guest that ended during a CEVM disk hand-over: its last writes are in
        // the new overlay, which takes the disk's name only when the hand-over
        // ends; wait for that, so the disk left behind is the guest's.
        if let Some(d) = self.disk().filter(|d| d.integrating()) {
            tracing::info!("waiting for the disk hand-over to end");
            d.wait_integrated();
        }
        self.state = RunState::Created;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What adding a virtio device needs: the device set, the buses, the VM (for
/// the interrupt's irqfd), guest memory (for the queues) and the saved states.
pub(crate) struct VirtioBuilder<'a> {
    set: &'a mut DeviceSet,
    buses: &'a mut Buses,
    vm: &'a VmFd,
    memory: &'a GuestMemory,
    devices: Option<&'a DeviceStates>,
}

impl VirtioBuilder<'_> {
    /// Adds `device` behind a virtio-mmio transport at `slot`, its interrupt on
    /// an irqfd of the slot's GSI, restored from its section of the saved
    /// states if there are any.
    fn add<D: VirtioDevice + Send + 'static>(
        &mut self,
        id: &'static str,
        device: D,
        slot: VirtioMmioSlot,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("{id} eventfd: {e}")))?;
        self.vm.register_irqfd(&irq, slot.gsi).map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        self.add_on(id, device, slot, irq)
    }

    /// As [`VirtioBuilder::add`], its interrupt on `irq`, already registered
    /// as an irqfd of the slot's GSI.
    fn add_on<D: VirtioDevice + Send + 'static>(
        &mut self,
        id: &'static str,
        device: D,
        slot: VirtioMmioSlot,
        irq: EventFd,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>> {
        let resources = MmioResources { device, mem: self.memory.mmap().clone(), irq };
        let transport = self.set.add::<MmioTransport<D>>(id, resources, self.devices)?;
        self.buses.mmio.insert(slot.base, slot.size, transport.clone());
        Ok(transport)
    }
}

/// Puts a vCPU in 64-bit long mode (identity map, flat GDT) at `regs`.
fn enter_long_mode(v: &Vcpu, regs: &kvm_bindings::kvm_regs) -> Result<()> {
    let fd = v.fd();
    let err = |what: &'static str| move |e: kvm_ioctls::Error| Error::Vcpu { id: v.id, msg: format!("{what}: {e}") };
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    fd.set_sregs(&boot::long_mode_sregs(sregs)).map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_fpu(&boot::reset_fpu()).map_err(err("KVM_SET_FPU"))
}

/// The CPUID of vCPU `id`: KVM's supported set with the vCPU's APIC ID filled in.
fn vcpu_cpuid(supported: &CpuId, id: u32) -> Result<CpuId> {
    let mut entries = supported.as_slice().to_vec();
    for e in &mut entries {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|e| Error::Vcpu { id, msg: format!("CPUID: {e:?}") })
}

/// The MSRs of KVM's index list that this vCPU can read: KVM lists some it then
/// refuses (depending on CPUID), and `KVM_GET_MSRS` stops at the first one.
fn saveable_msrs(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    let mut start = 0;
    while start < indices.len() {
        let end = (start + 256).min(indices.len());
        let entries: Vec<_> =
            indices[start..end].iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { id: 0, msg: format!("MSR list: {e:?}") })?;
        let n = vcpu.get_msrs(&mut m).map_err(|e| Error::Kvm("KVM_GET_MSRS", e))?;
        if n == entries.len() {
            start = end;
        } else {
            indices.remove(start + n);
            start += n;
        }
    }
    Ok(indices)
}
