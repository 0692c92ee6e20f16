//! The disk hand-over of a CEVM checkpoint over the migration connection: after
//! the switch, `Disk` frames carry the messages of `disk::integration` both ways.
//! Each side gets a channel of the messages that arrive (a thread reads the
//! connection) and an outbox that sends.

use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use disk::integration::{FromOld, Outbox};
use integrate::ToOld;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::FrameKind;
use crate::transport::Transport;
use crate::{Error, Result};

/// Silence after which a peer counts as gone. Both sides talk without pause
/// until the hand-over ends (clusters one way, their requests and the ending
/// the other), so this is only reached when the peer is stuck or unreachable.
const SILENCE: Duration = Duration::from_secs(120);

/// Splits `t` into a channel of arriving messages and an outbox.
fn link<In, Out>(t: Box<dyn Transport>) -> Result<(Receiver<In>, Outbox<Out>)>
where
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
{
    let (mut tx_half, mut rx_half) = t.split()?;
    let (to_me, inbound) = mpsc::channel();
    std::thread::Builder::new()
        .name("disk-handover-rx".into())
        .spawn(move || {
            // Any end of the connection (closed, silent, an Error frame, a damaged
            // frame) ends the channel; the side reading it says what that means.
            while let Ok(f) = rx_half.recv(Some(SILENCE)) {
                if f.kind != FrameKind::Disk {
                    if f.kind == FrameKind::Error {
                        let e = Error::from_error_frame(rx_half.peer(), &f.payload);
                        tracing::warn!("disk hand-over: {e}");
                    }
                    break;
                }
                let Ok(m) = postcard::from_bytes::<In>(&f.payload) else { break };
                if to_me.send(m).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| Error::Thread { what: "disk hand-over receiver", source })?;
    let outbox: Outbox<Out> = Box::new(move |m: Out| {
        let b = postcard::to_stdvec(&m).map_err(|e| e.to_string())?;
        tx_half.send_owned(FrameKind::Disk, b).map_err(|e| e.to_string())
    });
    Ok((inbound, outbox))
}

/// The old instance's end: what the new instance asks, and a way to answer.
pub fn old_side_link(t: Box<dyn Transport>) -> Result<(Receiver<ToOld>, Outbox<FromOld>)> {
    link(t)
}

/// The new instance's side of the hand-over, on a thread of its own: serves the
/// old side's messages over `t` until the integration ends, then logs how it
/// ended. Nothing to do when `inst` has no integration under way.
///
/// If the hand-over cannot start, the new instance reads what it needs from T
/// itself at once, so the guest is never left waiting for its disk; the error
/// ([`Error::HandoverNotStarted`]) says so. Either way the guest runs on in `inst`.
pub fn serve_new_side(t: Box<dyn Transport>, inst: &vmm::Instance) -> Result<()> {
    let Some(disk) = inst.disk().filter(|d| d.integrating()) else { return Ok(()) };
    let d = disk.clone();
    let started = link::<FromOld, ToOld>(t).and_then(|(inbound, outbox)| {
        disk.connect(outbox);
        std::thread::Builder::new()
            .name("disk-handover".into())
            .spawn(move || {
                if let Err(e) = disk::integration::serve_new_side(&disk, inbound) {
                    tracing::warn!("disk integration: {e}");
                }
            })
            .map(|_| ())
            .map_err(|source| Error::Thread { what: "disk hand-over", source })
    });
    if let Err(e) = started {
        let fallback = d.finish_from_t().err();
        return Err(Error::HandoverNotStarted { error: Box::new(e), fallback });
    }
    Ok(())
}

/// Whether a CEVM checkpoint's migration of a guest of `config` hands its disk
/// over: a writable disk does (a read-only one is simply shared).
pub fn hands_over_disk(config: &vmm::InstanceConfig) -> bool {
    config.disk.as_ref().is_some_and(|d| !d.read_only)
}
