//! `cevm group restore`: every member of a group checkpoint restored in a VMM
//! of its own (`cevm restore --paused`), all verified and ready before any
//! guest runs, then all let run at once; the command stays with them,
//! printing each member's console lines behind its name, and ends when they
//! all have.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint::group::{self, GroupManifest};

use crate::api::Client;

/// How long a member may take to restore and verify its checkpoint.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// What a group restore is given.
pub struct Options<'a> {
    /// A group checkpoint, or a series of them (its `latest` is restored).
    pub dir: &'a Path,
    /// Member NAME's NICs bound to these taps instead of the ones it had.
    pub taps: &'a [(String, Vec<String>)],
    /// Each member's API socket at DIR/NAME.sock instead of where it was.
    pub sock_dir: Option<&'a Path>,
    /// Each member with a disk gets its restored disk here, as NAME.disk.qcow2
    /// (default: beside the group checkpoint).
    pub disk_dir: Option<&'a Path>,
}

/// One member VMM started by the restore.
struct Started {
    name: String,
    sock: PathBuf,
    child: Child,
}

/// The group checkpoint `dir` names: itself, or a series' `latest`.
pub fn resolve(dir: &Path) -> Result<PathBuf, String> {
    let latest = dir.join(checkpoint::series::LATEST);
    let dir = if !group::is_group(dir) && latest.exists() { latest } else { dir.to_path_buf() };
    dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))
}

/// Checks the group checkpoint and the options against each other: every
/// member has a socket to serve, taps are given only for members there are.
fn plan(m: &GroupManifest, o: &Options<'_>) -> Result<Vec<(String, PathBuf, Vec<String>)>, String> {
    for (name, _) in o.taps {
        if !m.members.iter().any(|x| &x.name == name) {
            let names: Vec<&str> = m.members.iter().map(|x| x.name.as_str()).collect();
            return Err(format!(
                "--net {name}:...: the group checkpoint has no member {name} (it has {})",
                names.join(", ")
            ));
        }
    }
    m.members
        .iter()
        .map(|x| {
            let sock = match (o.sock_dir, &x.api_sock) {
                (Some(d), _) => d.join(format!("{}.sock", x.name)),
                (None, Some(s)) => s.clone(),
                (None, None) => return Err(format!("member {}: no API socket recorded; give --api-sock-dir", x.name)),
            };
            let taps = o.taps.iter().find(|(n, _)| n == &x.name).map(|(_, t)| t.clone()).unwrap_or_default();
            Ok((x.name.clone(), sock, taps))
        })
        .collect()
}

/// Prints the lines of `from` behind `name: ` on stdout or stderr.
fn forward(name: &str, from: impl std::io::Read + Send + 'static, to_stderr: bool) {
    let prefix = format!("{name}: ");
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    });
}

fn spawn(
    cevm: &Path,
    dir: &Path,
    name: &str,
    sock: &Path,
    taps: &[String],
    disk: Option<PathBuf>,
) -> Result<Started, String> {
    let mut cmd = Command::new(cevm);
    cmd.arg("restore").arg(dir.join(name)).arg("--paused").arg("--api-sock").arg(sock);
    for t in taps {
        cmd.arg("--net").arg(format!("tap={t}"));
    }
    if let Some(d) = disk {
        cmd.arg("--overlay").arg(d);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("member {name}: cannot start {}: {e}", cevm.display()))?;
    if let Some(o) = child.stdout.take() {
        forward(name, o, false);
    }
    if let Some(e) = child.stderr.take() {
        forward(name, e, true);
    }
    Ok(Started { name: name.into(), sock: sock.into(), child })
}

/// Waits until every member's VMM answers that its guest waits paused; a
/// member whose VMM ended first fails the restore.
fn wait_ready(started: &mut [Started]) -> Result<(), String> {
    let t0 = Instant::now();
    let mut ready = vec![false; started.len()];
    while !ready.iter().all(|r| *r) {
        for (s, r) in started.iter_mut().zip(&mut ready) {
            if *r {
                continue;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!("member {} could not be restored ({st})", s.name));
            }
            *r = Client::new(&s.sock, Duration::from_secs(5)).status().is_ok_and(|st| st.state == "paused");
        }
        if t0.elapsed() > READY_TIMEOUT {
            return Err(format!("the members were not all ready within {} s", READY_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Restores the group and serves it until every member has ended; returns
/// the exit code (0 when every member's is, else the first other one).
pub fn run(cevm: &Path, o: &Options<'_>) -> Result<i32, String> {
    let dir = resolve(o.dir)?;
    let manifest = group::open(&dir).map_err(|e| format!("not a complete group checkpoint: {e}"))?;
    let plan = plan(&manifest, o)?;
    let ckpt = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let disk_dir = o.disk_dir.map(Path::to_path_buf).or_else(|| dir.parent().map(Path::to_path_buf));
    let mut started: Vec<Started> = Vec::new();
    let fail = |started: &mut Vec<Started>, e: String| {
        for s in started.iter_mut() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        Err(format!("{e}; no member of the group runs"))
    };
    for (name, sock, taps) in &plan {
        // Where its disk goes if it has one (a restore without a disk has no
        // use for the path): the member's own restore opens its checkpoint.
        let disk = disk_dir.as_ref().map(|d| d.join(format!("{ckpt}.{name}.disk.qcow2")));
        match spawn(cevm, &dir, name, sock, taps, disk) {
            Ok(s) => started.push(s),
            Err(e) => return fail(&mut started, e),
        }
    }
    if let Err(e) = wait_ready(&mut started) {
        return fail(&mut started, e);
    }
    // Every member verified and waiting: all of them run from now on.
    let t0 = Instant::now();
    let resumed: Vec<Result<(), String>> = std::thread::scope(|s| {
        let h: Vec<_> = started
            .iter()
            .map(|m| {
                s.spawn(|| Client::new(&m.sock, Duration::from_secs(30)).resume().map(drop).map_err(|e| e.to_string()))
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("panicked".into()))).collect()
    });
    let not_resumed = started.iter().zip(&resumed).find_map(|(m, r)| r.as_ref().err().map(|e| (m.name.clone(), e)));
    if let Some((name, e)) = not_resumed {
        let e = format!("member {name}: cannot be resumed: {e}");
        return fail(&mut started, e);
    }
    tracing::info!(
        "group restored from {}: {} members running (resumed within {:.1} ms)",
        dir.display(),
        started.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut code = 0;
    for s in &mut started {
        let st = s.child.wait().map_err(|e| format!("member {}: {e}", s.name))?;
        let c = st.code().unwrap_or(crate::exit_code::ERROR);
        if c != 0 {
            tracing::warn!("member {} ended with {st}", s.name);
            if code == 0 {
                code = c;
            }
        }
    }
    Ok(code)
}
