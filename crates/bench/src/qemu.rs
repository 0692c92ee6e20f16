//! QEMU, driven over QMP, for side-by-side figures: the same guest kernel,
//! initramfs and command line as cevm's, on the same /dev/kvm.
//!
//! QMP is a line-oriented JSON protocol on a unix socket; its needs here (a
//! handful of commands, reading replies and skipping asynchronous events) are a
//! few lines over serde_json, so no QMP crate is pulled in for them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QEMU process with its QMP connection.
pub struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    qmp_path: PathBuf,
}

/// The guest QEMU runs (what cevm's `Boot::Linux` runs).
pub struct Guest<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// More arguments (e.g. a machine type and devices), after the rest.
    pub extra: &'a [String],
}

/// Where the guest's console (COM1) goes.
pub enum Console<'a> {
    /// Into this file.
    File(&'a Path),
    /// Line by line into this channel, each stamped when it was read.
    Lines(Sender<(Instant, String)>),
}

impl Qemu {
    /// Starts `bin` (KVM, no default devices, the guest's console as `console`
    /// says, QEMU's own messages appended to `log`), `-incoming URI` when given,
    /// and connects to its QMP socket.
    pub fn start(
        bin: &str,
        guest: &Guest<'_>,
        console: Console<'_>,
        incoming: Option<&str>,
        dir: &Path,
        log: &Path,
    ) -> Result<Self, String> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let qmp_path = dir.join(format!("qmp-{}-{}.sock", std::process::id(), STARTED.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&qmp_path);
        let mut cmd = Command::new(bin);
        cmd.args(["-accel", "kvm", "-cpu", "host", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-m", &format!("{}M", guest.mem_mib), "-smp", &guest.vcpus.to_string()])
            .arg("-kernel")
            .arg(guest.kernel)
            .arg("-initrd")
            .arg(guest.initrd)
            .args(["-append", guest.cmdline])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
            .args(guest.extra);
        match &console {
            Console::File(p) => cmd.args(["-serial", &format!("file:{}", p.display())]).stdout(Stdio::null()),
            Console::Lines(_) => cmd.args(["-serial", "stdio"]).stdout(Stdio::piped()),
        };
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = cmd.stdin(Stdio::null()).stderr(err).spawn().map_err(|e| format!("cannot start {bin}: {e}"))?;
        if let (Console::Lines(tx), Some(out)) = (console, child.stdout.take()) {
            cevm::child::pipe_lines(out, tx);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("{bin} exited ({status}) before its QMP socket opened"));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        return Err(format!("{bin}: no QMP socket at {} within 60 s: {e}", qmp_path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let mut q = Qemu { child, qmp: BufReader::new(stream), qmp_path };
        q.read_message()?; // the greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self.qmp.read_line(&mut line).map_err(|e| format!("QMP: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the connection".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}"))
    }

    /// Runs a QMP command and returns its `return` value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg =
            serde_json::to_vec(&json!({ "execute": command, "arguments": arguments })).map_err(|e| e.to_string())?;
        msg.push(b'\n');
        self.qmp.get_mut().write_all(&msg).map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }

    /// Whether QEMU has ended, as a message pointing at its log.
    pub fn ended(&mut self, log: &Path) -> Option<String> {
        cevm::child::child_ended(&mut self.child, "QEMU", log)
    }

    /// Ends the process.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

/// Waits until `file` holds `marker` (a guest's console written by QEMU).
pub fn wait_for_marker(file: &Path, marker: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(file).is_ok_and(|t| t.contains(marker)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            return Err(format!("the QEMU guest did not print `{marker}` within {timeout:?}: {text}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What QEMU reports for one finished migration (`query-migrate`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MigrationResult {
    /// QEMU's own downtime figure (whole milliseconds).
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub setup_ms: f64,
    pub bytes_sent: u64,
    /// Dirty-bitmap syncs: QEMU's pre-copy rounds.
    pub rounds: u64,
    /// Auto-converge's highest throttle seen.
    pub throttle_pct: u64,
}

/// Waits until a QEMU started with `-incoming` has loaded its state.
pub fn wait_loaded(q: &mut Qemu) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = q.execute("query-status", json!({}))?;
        match st["status"].as_str() {
            Some("inmigrate") => {}
            Some(_) => return Ok(()),
            None => return Err(format!("QMP query-status: {st}")),
        }
        if Instant::now() > deadline {
            return Err("QEMU did not load its state within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `bin --version`'s first line.
pub fn version(bin: &str) -> Result<String, String> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| format!("cannot run {bin}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

/// Live-migrates `src` to the QEMU listening at `uri` and waits for the end.
pub fn migrate(
    src: &mut Qemu,
    uri: &str,
    downtime_limit_ms: u64,
    auto_converge: bool,
) -> Result<MigrationResult, String> {
    src.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "auto-converge", "state": auto_converge }] }),
    )?;
    src.execute("migrate-set-parameters", json!({ "downtime-limit": downtime_limit_ms }))?;
    migrate_to(src, uri)
}

/// Starts a migration of `src` to `uri` with the capabilities and parameters
/// already set, and waits for its end.
pub fn migrate_to(src: &mut Qemu, uri: &str) -> Result<MigrationResult, String> {
    src.execute("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut throttle = 0;
    loop {
        let info = src.execute("query-migrate", json!({}))?;
        // Present only while auto-converge throttles.
        throttle = throttle.max(info["cpu-throttle-percentage"].as_u64().unwrap_or(0));
        match info["status"].as_str() {
            // QEMU marks the migration completed a moment before it fills in the
            // times (they read 0 until then): wait for them.
            Some("completed") if info["total-time"].as_f64().is_some_and(|t| t > 0.0) => {
                let num = |v: &Value| v.as_f64().unwrap_or(0.0);
                return Ok(MigrationResult {
                    downtime_ms: num(&info["downtime"]),
                    total_ms: num(&info["total-time"]),
                    setup_ms: num(&info["setup-time"]),
                    bytes_sent: info["ram"]["transferred"].as_u64().unwrap_or(0),
                    rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                    throttle_pct: throttle,
                });
            }
            Some("failed") | Some("cancelled") => return Err(format!("QEMU's migration failed: {info}")),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("QEMU's migration did not end within 600 s: {info}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
