//! `cevm group restore`: every member of a group checkpoint restored in a VMM
//! of its own (`cevm restore --paused`), all verified and ready before any
//! guest runs, then all let run at once; the command stays with them,
//! printing each member's console lines behind its name, and ends when they
//! all have.
//!
//! A member restored on another host (`--at NAME=tcp:HOST:PORT`) is started
//! there by whoever places the job (a batch script's `srun`): `cevm restore
//! GROUP/NAME --paused --control tcp:HOST:PORT --control-secret FILE`. The
//! group restore then waits for it at that endpoint, checks that it restored
//! this group checkpoint's member (the checksum of its manifest) and lets it
//! run with the others.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use checkpoint::group::{self, GroupManifest};

use crate::api::remote::Secret;
use crate::api::{Addr, Client, ClientError};

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
    /// Members restored on other hosts: NAME and the HOST:PORT of their
    /// `--control` endpoint.
    pub at: &'a [(String, String)],
    /// The job's secret, for the members `at` other hosts.
    pub secret: Option<Secret>,
}

/// One member of the restore: a VMM started here, or one on another host.
struct Started {
    name: String,
    client: Client,
    /// The VMM this restore started (none: on another host).
    child: Option<Child>,
    /// Its checkpoint's manifest checksum, as the group manifest records it.
    crc: String,
}

/// Where a member is restored.
enum Place {
    /// Here, serving its API at the socket, its NICs on these taps (or its own).
    Here { sock: PathBuf, taps: Vec<String> },
    /// On another host, reached at this `--control` endpoint.
    There(String),
}

/// The group checkpoint `dir` names: itself, or a series' `latest`.
pub fn resolve(dir: &Path) -> Result<PathBuf, String> {
    let latest = dir.join(checkpoint::series::LATEST);
    let dir = if !group::is_group(dir) && latest.exists() { latest } else { dir.to_path_buf() };
    dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))
}

/// Checks the group checkpoint and the options against each other: every
/// member has a socket to serve or a host it is restored on, taps and
/// hosts are given only for members there are.
fn plan(m: &GroupManifest, o: &Options<'_>) -> Result<Vec<(String, Place)>, String> {
    let names: Vec<&str> = m.members.iter().map(|x| x.name.as_str()).collect();
    let given = o.taps.iter().map(|(n, _)| ("--net", n)).chain(o.at.iter().map(|(n, _)| ("--at", n)));
    for (flag, name) in given {
        if !names.contains(&name.as_str()) {
            return Err(format!(
                "{flag} {name}...: the group checkpoint has no member {name} (it has {})",
                names.join(", ")
            ));
        }
    }
    m.members
        .iter()
        .map(|x| {
            let taps = o.taps.iter().find(|(n, _)| n == &x.name).map(|(_, t)| t.clone());
            if let Some((_, at)) = o.at.iter().find(|(n, _)| n == &x.name) {
                if taps.is_some() {
                    return Err(format!("member {} is restored on its host: give --net to its `cevm restore` there", x.name));
                }
                return Ok((x.name.clone(), Place::There(at.clone())));
            }
            let sock = match (o.sock_dir, &x.api_sock) {
                (Some(d), _) => d.join(format!("{}.sock", x.name)),
                (None, Some(s)) => s.clone(),
                (None, None) => {
                    return Err(format!(
                        "member {}: no API socket recorded; give --api-sock-dir, or --at {}=tcp:HOST:PORT if it is restored on another host",
                        x.name, x.name
                    ))
                }
            };
            Ok((x.name.clone(), Place::Here { sock, taps: taps.unwrap_or_default() }))
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
) -> Result<Child, String> {
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
    Ok(child)
}

/// Whether member `s` waits paused with its own checkpoint restored; an error
/// if it cannot ever be (its VMM ended, restored another checkpoint, or does
/// not take the job's secret).
fn ready(s: &mut Started) -> Result<bool, String> {
    if let Some(Ok(Some(st))) = s.child.as_mut().map(Child::try_wait) {
        return Err(format!("member {} could not be restored ({st})", s.name));
    }
    match s.client.status() {
        Ok(st) if st.state != "paused" => Ok(false),
        Ok(st) => match st.restored_from {
            Some(f) if f.manifest_crc32 == s.crc => Ok(true),
            Some(f) => Err(format!(
                "member {} at {} restored {} (manifest {}), not this group checkpoint's (manifest {})",
                s.name,
                s.client.addr(),
                f.dir.display(),
                f.manifest_crc32,
                s.crc
            )),
            None => Err(format!("member {} at {} runs a guest it did not restore", s.name, s.client.addr())),
        },
        Err(e @ ClientError::Auth { .. }) => Err(format!("member {}: {e}", s.name)),
        // Not there yet (still restoring, or its host has not started it).
        Err(_) => Ok(false),
    }
}

/// Waits until every member's VMM answers that its guest waits paused.
fn wait_ready(started: &mut [Started]) -> Result<(), String> {
    let t0 = Instant::now();
    let mut is_ready = vec![false; started.len()];
    while !is_ready.iter().all(|r| *r) {
        for (s, r) in started.iter_mut().zip(&mut is_ready) {
            if !*r {
                *r = ready(s)?;
            }
        }
        if t0.elapsed() > READY_TIMEOUT {
            let late: Vec<&str> =
                started.iter().zip(&is_ready).filter(|(_, r)| !**r).map(|(s, _)| s.name.as_str()).collect();
            return Err(format!("members {} were not ready within {} s", late.join(", "), READY_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Ends the members of a failed restore: the VMMs it started are killed,
/// those on other hosts told to quit (their guests never ran).
fn end_all(started: &mut [Started]) {
    for s in started.iter_mut() {
        match &mut s.child {
            Some(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None => {
                let _ = s.client.quit();
            }
        }
    }
}

/// Waits for member `s` to end: its exit code (0 for one on another host,
/// once its endpoint no longer answers).
fn wait_end(s: &mut Started) -> Result<i32, String> {
    match &mut s.child {
        Some(c) => {
            let st = c.wait().map_err(|e| format!("member {}: {e}", s.name))?;
            if !st.success() {
                tracing::warn!("member {} ended with {st}", s.name);
            }
            Ok(st.code().unwrap_or(crate::exit_code::ERROR))
        }
        None => {
            while !matches!(s.client.status(), Err(ClientError::Connect { .. })) {
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(0)
        }
    }
}

/// A restored group whose members run.
pub struct Running {
    started: Vec<Started>,
}

impl Running {
    /// Waits until every member has ended; returns the exit code (0 when
    /// every member's is, else the first other one).
    pub fn wait(mut self) -> Result<i32, String> {
        let mut code = 0;
        for s in &mut self.started {
            let c = wait_end(s)?;
            if code == 0 {
                code = c;
            }
        }
        Ok(code)
    }
}

/// Restores the group and serves it until every member has ended; returns
/// the exit code (0 when every member's is, else the first other one).
pub fn run(cevm: &Path, o: &Options<'_>) -> Result<i32, String> {
    start(cevm, o)?.wait()
}

/// Restores the group: every member restored and verified, then all resumed.
pub fn start(cevm: &Path, o: &Options<'_>) -> Result<Running, String> {
    let dir = resolve(o.dir)?;
    let manifest = group::open(&dir).map_err(|e| format!("not a complete group checkpoint: {e}"))?;
    let plan = plan(&manifest, o)?;
    let ckpt = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let disk_dir = o.disk_dir.map(Path::to_path_buf).or_else(|| dir.parent().map(Path::to_path_buf));
    let mut started: Vec<Started> = Vec::new();
    let fail = |started: &mut Vec<Started>, e: String| {
        end_all(started);
        Err(format!("{e}; no member of the group runs"))
    };
    for ((name, place), member) in plan.into_iter().zip(&manifest.members) {
        let crc = member.manifest_crc32.clone();
        let s = match place {
            Place::There(at) => {
                let client = Client::at(Addr::Tcp(at), o.secret.clone(), Duration::from_secs(30));
                Started { name, client, child: None, crc }
            }
            Place::Here { sock, taps } => {
                // Where its disk goes if it has one (a restore without a disk has no
                // use for the path): the member's own restore opens its checkpoint.
                let disk = disk_dir.as_ref().map(|d| d.join(format!("{ckpt}.{name}.disk.qcow2")));
                match spawn(cevm, &dir, &name, &sock, &taps, disk) {
                    Ok(c) => Started { name, client: Client::new(sock, Duration::from_secs(30)), child: Some(c), crc },
                    Err(e) => return fail(&mut started, e),
                }
            }
        };
        started.push(s);
    }
    if let Err(e) = wait_ready(&mut started) {
        return fail(&mut started, e);
    }
    // Every member verified and waiting: all of them run from now on.
    let t0 = Instant::now();
    let resumed: Vec<Result<(), String>> = std::thread::scope(|s| {
        let h: Vec<_> =
            started.iter().map(|m| s.spawn(|| m.client.resume().map(drop).map_err(|e| e.to_string()))).collect();
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
    Ok(Running { started })
}
