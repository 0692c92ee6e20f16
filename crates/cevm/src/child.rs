//! Drives `cevm` child processes: spawn with stdout captured line by line, wait for
//! a line, kill. Used by `cevm demo`, and by the integration tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running `cevm` process whose stdout (the guest console) is read line by line.
pub struct CevmChild {
    child: Child,
    lines: Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl CevmChild {
    /// Starts `bin` with `args`; stderr goes to ours. With `echo`, each console line
    /// is printed with that prefix as soon as it arrives.
    pub fn spawn(bin: &Path, args: &[&str], echo: Option<&str>) -> std::io::Result<Self> {
        let mut child = Command::new(bin).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        let echo = echo.map(str::to_string);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = &echo {
                    println!("{prefix}{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(CevmChild { child, lines: rx, seen: Vec::new() })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a console line for which `pred` holds and returns it.
    /// `None` if the timeout passes or the process closes its console first.
    pub fn wait_line(&mut self, timeout: Duration, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Reads the console to its end (up to `timeout`) and waits for the exit status.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_line(timeout, |_| false);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CevmChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The value of `digest=<hex>` in a console line.
pub fn digest_of(line: &str) -> Option<&str> {
    line.strip_prefix("digest=").map(str::trim)
}
