//! The destination side: receives memory and state, builds the new instance, and
//! runs it only when the source said everything was sent and all of it checked.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::vm_memory::{Bytes, GuestAddress};
use vmm::{GuestMemory, Instance, InstanceState, Shell, VmEvent};

use crate::protocol::{decode_pages, decode_state, monotonic_us, FrameKind, Hello, Resumed, PAGE_SIZE};
use crate::source::DoneMsg;
use crate::transport::{send_error, Transport};
use crate::{Error, Result};

/// Writes one received page into the new instance's memory (bounds-checked by vm-memory).
fn write_page(mem: &GuestMemory, gpa: u64, data: &[u8]) -> Result<()> {
    mem.mmap().write_slice(data, GuestAddress(gpa)).map_err(|e| Error::PageOutside { gpa, reason: e.to_string() })
}

/// A guest that arrived: its instance, running, and what the source said of it.
pub struct Arrived {
    pub instance: Instance,
    pub hello: Hello,
    /// The source.
    pub peer: String,
    /// A CEVM checkpoint's migration whose disk link could not start: the new
    /// instance completed its disk from T by itself (see
    /// [`crate::disk_link::serve_new_side`]); the guest runs on.
    pub disk_link_error: Option<Error>,
}

/// What this host gives an arriving guest: the CPUs its vCPU threads run on
/// (empty: anywhere), and the taps its NICs bind: NIC i binds `taps[i]`, a NIC
/// beyond the list the tap the source named (the same name on this host).
#[derive(Clone, Debug, Default)]
pub struct HostBinding {
    pub vcpu_cpus: Vec<usize>,
    pub taps: Vec<String>,
}

impl HostBinding {
    /// The arriving guest's configuration with this host's taps.
    pub fn apply(&self, config: &mut vmm::InstanceConfig) -> std::result::Result<(), String> {
        if self.taps.len() > config.nics.len() {
            return Err(format!("{} taps were given for a guest with {} NICs", self.taps.len(), config.nics.len()));
        }
        for (nic, tap) in config.nics.iter_mut().zip(&self.taps) {
            nic.tap = tap.clone();
        }
        Ok(())
    }
}

/// The new side's one entry point: receives a migration on `t` ([`migrate_in`])
/// and, for a CEVM checkpoint, serves the new instance's side of the disk
/// hand-over over the same connection ([`crate::disk_link::serve_new_side`]).
pub fn accept_guest(
    mut t: Box<dyn Transport>,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    host: &HostBinding,
) -> Result<Arrived> {
    let (instance, hello) = migrate_in(t.as_mut(), console, events, host)?;
    let peer = t.peer();
    // The guest runs in `instance` from here on, whatever the hand-over does.
    let disk_link_error = if hello.cevm { crate::disk_link::serve_new_side(t, &instance).err() } else { None };
    Ok(Arrived { instance, hello, peer, disk_link_error })
}

/// How the destination waits for the source between frames.
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// Receives a migration on `t` and returns the new instance, running (or paused,
/// if the guest was paused at the source). Nothing of the guest runs unless the
/// whole state arrived: a connection lost, a damaged frame or an `Error` from the
/// source ends here with an error, and the partial state is dropped.
///
/// `host` places the new vCPU threads (see `Instance::place_vcpus`) and names
/// the taps the guest's NICs bind here.
pub fn migrate_in(
    t: &mut dyn Transport,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    host: &HostBinding,
) -> Result<(Instance, Hello)> {
    let r = receive(t, console, events, host);
    if let Err(e) = &r {
        // Tell the source why, if it still listens (it then keeps the guest).
        if !matches!(e, Error::Peer { .. } | Error::Closed { .. }) {
            send_error(t, format!("the destination refuses the migration: {e}"));
        }
    }
    r
}

fn receive(
    t: &mut dyn Transport,
    console: Box<dyn Write + Send>,
    events: Sender<VmEvent>,
    host: &HostBinding,
) -> Result<(Instance, Hello)> {
    let f = t.recv(None)?;
    let hello: Hello = match f.kind {
        FrameKind::Hello => serde_json::from_slice(&f.payload).map_err(|source| Error::BadMessage {
            peer: t.peer(),
            what: "Hello",
            source,
        })?,
        FrameKind::Error => return Err(Error::from_error_frame(t.peer(), &f.payload)),
        got => return Err(Error::Unexpected { peer: t.peer(), got, expected: "Hello" }),
    };
    let mut config = hello.config.clone();
    host.apply(&mut config).map_err(Error::Binding)?;
    // The KVM VM, its memory and vCPUs are made now, while the source still runs
    // the guest, so that the switch only loads the state into them.
    let mut shell = Shell::new(&config, None)?;
    shell.preset_nic_offloads(&hello.nic_offloads);
    if let (true, Some(d)) = (hello.cevm && crate::disk_link::hands_over_disk(&config), &config.disk) {
        // A CEVM checkpoint: the old instance keeps T, the guest's writes go to a
        // new overlay U (made now, out of the downtime).
        shell.set_disk(Arc::new(disk::GuestDisk::for_integration(&d.path)?));
    }
    let memory = shell.memory();
    t.send(FrameKind::Ready, &[])?;
    let zero = [0u8; PAGE_SIZE];
    let mut state: Option<InstanceState> = None;
    let mut state_decode_ms = 0.0;
    loop {
        let f = t.recv(Some(FRAME_TIMEOUT))?;
        match f.kind {
            FrameKind::Pages => {
                let (entries, data) = decode_pages(&f.payload)?;
                let mut pages = data.chunks_exact(PAGE_SIZE);
                for e in entries {
                    let page = if e.zero { &zero[..] } else { pages.next().unwrap_or(&zero) };
                    write_page(memory, e.gpa, page)?;
                }
            }
            FrameKind::Sync => t.send(FrameKind::Synced, &[])?,
            FrameKind::State => {
                let t = Instant::now();
                state = Some(decode_state(&f.payload)?);
                state_decode_ms = t.elapsed().as_secs_f64() * 1e3;
            }
            FrameKind::Done => {
                let t_done = Instant::now();
                let done: DoneMsg = serde_json::from_slice(&f.payload).map_err(|source| Error::BadMessage {
                    peer: t.peer(),
                    what: "Done",
                    source,
                })?;
                let state = state.ok_or_else(|| Error::DoneBeforeState { peer: t.peer() })?;
                let mut inst = Instance::restore_into(shell, config, &state, console, events)?;
                inst.bind_busy_taps_when_free();
                // A guest paused at the source, or held for a group's cut,
                // runs not one instruction here yet.
                if done.running && !done.hold {
                    inst.start()?;
                } else {
                    inst.start_paused()?;
                }
                inst.place_vcpus(&host.vcpu_cpus)?;
                let started_at_us = monotonic_us();
                let r = Resumed {
                    restore_ms: t_done.elapsed().as_secs_f64() * 1e3,
                    state_decode_ms,
                    started_at_us,
                    vcpu_cpus: inst.vcpu_placement(),
                };
                let b = serde_json::to_vec(&r).map_err(|source| Error::Encode { what: "Resumed", source })?;
                if let Err(e) = t.send(FrameKind::Resumed, &[&b]) {
                    // The source never learns that the guest runs here; it keeps its
                    // copy paused. Running on is the only way not to lose the guest.
                    tracing::warn!("the guest runs here, but the source could not be told: {e}");
                }
                if done.hold {
                    wait_release(t);
                    if done.running {
                        inst.resume()?;
                    }
                }
                return Ok((inst, hello));
            }
            FrameKind::Error => return Err(Error::from_error_frame(t.peer(), &f.payload)),
            got => return Err(Error::Unexpected { peer: t.peer(), got, expected: "Pages, Sync, State or Done" }),
        }
    }
}

/// A switch held for a group's cut: the guest is here, whole and paused,
/// until the source's `Release`. Should it never come (the source died, or
/// the connection broke), the guest runs on all the same: this is its only
/// copy that may run, and the group checkpoint is aborted anyway without the
/// source's answer.
fn wait_release(t: &mut dyn Transport) {
    match t.recv(Some(FRAME_TIMEOUT)) {
        Ok(f) if f.kind == FrameKind::Release => {}
        Ok(f) => tracing::warn!("the source sent {:?} instead of Release after a held switch; the guest runs", f.kind),
        Err(e) => tracing::warn!("no Release from the source after a held switch ({e}); the guest runs"),
    }
}
