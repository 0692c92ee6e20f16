//! The migration stream as a destination reads it from its peer.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use migrate::protocol::{decode_pages, decode_state, ErrorMsg, FrameKind, Hello, Resumed};
use migrate::transport::StreamTransport;
use migrate::Transport;

/// Frames read from a real unix socket whose peer wrote `data` and hung up:
/// every frame that passes its header and checksum checks is decoded as the
/// receiving side decodes its kind.
pub fn stream(data: &[u8]) {
    decoded(data);
}

/// [`stream`], counting the frames whose payload decoded.
pub fn decoded(data: &[u8]) -> usize {
    let (mut peer, ours) = UnixStream::pair().expect("socketpair");
    // A unix socket buffers about 200 KiB: inputs up to MAX_INPUT are written
    // whole before anyone reads (the fuzzer's -max_len is smaller still).
    peer.write_all(&data[..data.len().min(MAX_INPUT)]).expect("write into the socket buffer");
    drop(peer);
    let mut t = StreamTransport::new(ours, "fuzz".into());
    let mut n = 0;
    while let Ok(f) = t.recv(Some(Duration::from_secs(5))) {
        let ok = match f.kind {
            FrameKind::Hello => serde_json::from_slice::<Hello>(&f.payload).is_ok(),
            FrameKind::Resumed => serde_json::from_slice::<Resumed>(&f.payload).is_ok(),
            FrameKind::Error => serde_json::from_slice::<ErrorMsg>(&f.payload).is_ok(),
            FrameKind::Pages => decode_pages(&f.payload).is_ok(),
            FrameKind::State => decode_state(&f.payload).is_ok(),
            FrameKind::Disk => {
                postcard::from_bytes::<disk::integration::FromOld>(&f.payload).is_ok()
                    | postcard::from_bytes::<integrate::ToOld>(&f.payload).is_ok()
            }
            FrameKind::Ready | FrameKind::Done | FrameKind::Sync | FrameKind::Synced | FrameKind::Release => true,
        };
        n += usize::from(ok);
    }
    n
}

/// The longest input this target reads.
const MAX_INPUT: usize = 128 << 10;
