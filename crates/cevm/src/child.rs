//! Child processes whose output is read line by line: [`pipe_lines`] is the one
//! reader (stamped lines on a channel), [`spawn_piped`] starts any program with
//! it, [`CevmChild`] drives a `cevm` process (spawn, wait for a console line,
//! kill). Used by `cevm demo`, the benchmarks and the integration tests.

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
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Self::spawn_cmd(cmd, echo)
    }

    /// As [`CevmChild::spawn`], of a command the caller prepared (e.g. with its
    /// own working directory); its stdin and stdout are set here.
    pub fn spawn_cmd(mut cmd: Command, echo: Option<&str>) -> std::io::Result<Self> {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        let (tx, stamped) = mpsc::channel::<Stamped>();
        let (line_tx, lines) = mpsc::channel();
        pipe_lines(out, tx);
        let echo = echo.map(str::to_string);
        std::thread::spawn(move || {
            for (_, line) in stamped {
                if let Some(prefix) = &echo {
                    println!("{prefix}{line}");
                }
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(CevmChild { child, lines, seen: Vec::new() })
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

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// A line of a child's output with the instant it was read.
pub type Stamped = (Instant, String);

/// Sends every line of `out` to `tx`, stamped when read, from a thread of its
/// own; ends at the end of `out` or when nobody receives any more.
pub fn pipe_lines(out: impl std::io::Read + Send + 'static, tx: mpsc::Sender<Stamped>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
}

/// Starts `cmd` with its stdout lines going, stamped, to `tx` and its stderr
/// appended to `log`.
pub fn spawn_piped(mut cmd: Command, tx: &mpsc::Sender<Stamped>, log: &Path) -> Result<Child, String> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    pipe_lines(child.stdout.take().ok_or("no stdout pipe")?, tx.clone());
    Ok(child)
}

/// Whether `child` (a `what` process) has ended, as a message quoting the end of
/// its log.
pub fn child_ended(child: &mut Child, what: &str, log: &Path) -> Option<String> {
    let st = child.try_wait().ok().flatten()?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(5).collect();
    tail.reverse();
    Some(format!("{what} ended ({st}); the end of {}: {tail:?}", log.display()))
}
