//! Built-in guests run in this process (the in-process benchmarks), their
//! console coming back line by line.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use vmm::{Boot, Instance, InstanceConfig};

/// A console that hands the guest's output to a channel, line by line.
struct LineSink {
    buf: Vec<u8>,
    tx: Sender<String>,
}

impl Write for LineSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        for &c in b {
            if c == b'\n' {
                let _ = self.tx.send(String::from_utf8_lossy(&self.buf).into_owned());
                self.buf.clear();
            } else {
                self.buf.push(c);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Creates and starts an instance of `config` whose console comes back line by line.
pub fn start_guest(config: InstanceConfig) -> Result<(Instance, Receiver<String>), String> {
    let (line_tx, lines) = mpsc::channel();
    // The benchmarks end their instances themselves; guest events are not watched.
    let (ev_tx, _events) = mpsc::channel();
    // The image of a built-in guest comes from crate `guests`; the VMM takes it from its caller.
    let image = match &config.boot {
        Boot::Builtin { guest, .. } => Some(guests::find(guest).map_err(|e| e.to_string())?),
        Boot::Linux { .. } => None,
    };
    let console = Box::new(LineSink { buf: Vec::new(), tx: line_tx });
    let mut inst = Instance::new(config, image, console, ev_tx).map_err(|e| e.to_string())?;
    inst.start().map_err(|e| e.to_string())?;
    Ok((inst, lines))
}

/// Waits for a console line for which `pred` holds; returns it.
pub fn wait_line(lines: &Receiver<String>, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).map_err(|_| "the guest did not print what was expected in time")?;
        if pred(&line) {
            return Ok(line);
        }
    }
}

/// Waits for the dirtier's per-second line showing at least `pages` pages written.
pub fn wait_dirtied(lines: &Receiver<String>, pages: u64, timeout: Duration) -> Result<(), String> {
    let covered =
        |l: &str| l.split("total=").nth(1).and_then(|t| t.trim().parse::<u64>().ok()).is_some_and(|t| t >= pages);
    wait_line(lines, timeout, covered)
        .map(drop)
        .map_err(|_| "the dirtier guest did not cover its working set in time".to_string())
}
