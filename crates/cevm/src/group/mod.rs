//! Jobs of several VMs: `cevm group checkpoint` takes a checkpoint of every
//! member VMM of a group at one consistent cut and commits it as one group
//! checkpoint ([`take`]; the format is `checkpoint::group`), once or
//! periodically with retention; `cevm group restore` restores a whole group
//! and lets all of its guests run at once ([`restore`]). Both are plain
//! commands over the members' API sockets, usable from a batch script; a
//! member on another host is reached at its `--control` endpoint with the
//! job's secret (`crate::api::remote`).

pub mod cut;
pub mod restore;
pub mod take;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum, ValueHint};

use crate::api::remote::Secret;
use crate::api::{Addr, Client};
use crate::exit_code::{ERROR, OK, USAGE};

/// A member of a group: its name (its directory in a group checkpoint) and
/// where its VMM's API is.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub name: String,
    /// Its API socket on this host, or its `--control` endpoint elsewhere.
    pub api: Addr,
    /// The job's secret, for a member at a `--control` endpoint.
    pub secret: Option<Secret>,
    /// A CEVM group checkpoint's process-based new instance for this member:
    /// the endpoint of a `cevm run --incoming` (none: thread-based).
    pub to: Option<String>,
}

impl MemberSpec {
    /// A member at `api`, to be named by [`name_members`] if `name` is empty.
    pub fn new(name: &str, api: Addr) -> MemberSpec {
        MemberSpec { name: name.into(), api, secret: None, to: None }
    }

    /// Its VMM's API; each call waits up to `timeout`.
    pub fn client(&self, timeout: Duration) -> Client {
        Client::at(self.api.clone(), self.secret.clone(), timeout)
    }
}

/// Parses `NAME=SOCKET`, `NAME=tcp:HOST:PORT` (a member on another host, at
/// its `--control` endpoint), or either alone (named by [`name_members`]).
pub fn parse_member(s: &str) -> Result<MemberSpec, String> {
    let (name, api) = match s.split_once('=') {
        Some((n, p)) => (n, p),
        None => ("", s),
    };
    if api.is_empty() {
        return Err("give the member's API socket or control endpoint (NAME=SOCKET, NAME=tcp:HOST:PORT)".into());
    }
    if !name.is_empty() {
        checkpoint::group::check_member_name(name).map_err(|e| e.to_string())?;
    }
    Ok(MemberSpec::new(name, api.parse()?))
}

/// Reads the job's secret for the members at `--control` endpoints: needed
/// if there is one, and then given to each of them.
pub fn attach_secret(members: &mut [MemberSpec], file: Option<&Path>) -> Result<(), String> {
    let remote = members.iter().find(|m| matches!(m.api, Addr::Tcp(_)));
    let secret = match (remote, file) {
        (None, _) => return Ok(()),
        (Some(m), None) => {
            return Err(format!("member {} is at {}: give the job's secret (--secret FILE)", m.name, m.api));
        }
        (Some(_), Some(f)) => Secret::load(f).map_err(|e| e.to_string())?,
    };
    for m in members.iter_mut().filter(|m| matches!(m.api, Addr::Tcp(_))) {
        m.secret = Some(secret.clone());
    }
    Ok(())
}

/// Names the unnamed members `m0`, `m1`, ... by their place; refuses a name
/// given twice.
pub fn name_members(mut members: Vec<MemberSpec>) -> Result<Vec<MemberSpec>, String> {
    for (i, m) in members.iter_mut().enumerate() {
        if m.name.is_empty() {
            m.name = format!("m{i}");
        }
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i].iter().any(|o| o.name == m.name) {
            return Err(format!("member {} is given twice", m.name));
        }
    }
    if members.is_empty() {
        return Err("give the group's members (--member NAME=SOCKET, once per member)".into());
    }
    Ok(members)
}

/// Parses `NAME:tap=TAP[,tap=TAP...]` (member NAME's NICs onto these taps).
pub fn parse_member_net(s: &str) -> Result<(String, Vec<String>), String> {
    let (name, rest) = s.split_once(':').ok_or("give MEMBER:tap=NAME (e.g. m1:tap=tap7)")?;
    checkpoint::group::check_member_name(name).map_err(|e| e.to_string())?;
    let taps = rest
        .split(',')
        .map(|p| match p.strip_prefix("tap=") {
            Some(t) => devices::virtio::net::tap::check_name(t).map(|_| t.to_string()).map_err(|e| e.to_string()),
            None => Err(format!("`{p}`: give tap=NAME")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), taps))
}

/// `cevm group ...`.
#[derive(Subcommand)]
pub enum GroupCmd {
    /// Checkpoint every member of a group at one consistent cut, into the next
    /// group checkpoint of a series (DIR/ckpt-N, DIR/latest), once or every
    /// --every.
    Checkpoint(CheckpointArgs),
    /// Restore every member of a group checkpoint (DIR, or a series' newest),
    /// each in a VMM of its own; all are verified before any guest runs, then
    /// all run at once. Ends when every member has ended.
    Restore(RestoreArgs),
    /// Check a group checkpoint completely: its manifest and every member's
    /// checkpoint, every checksum.
    Verify {
        /// A group checkpoint, or a series of them (its newest is checked).
        #[arg(value_hint = ValueHint::DirPath)]
        dir: PathBuf,
    },
    /// Make a new job secret in FILE (which must not exist; mode 0600): for
    /// the VMMs' --control-secret and the group commands' --secret.
    Secret {
        /// Where the secret goes (a new file; shared storage the job's hosts see).
        #[arg(value_hint = ValueHint::FilePath)]
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct CheckpointArgs {
    /// A member: NAME=SOCKET (its VMM's API socket), NAME=tcp:HOST:PORT (the
    /// `--control` endpoint of its VMM on another host; needs --secret), or
    /// either alone (named m0, m1, ... by its place). Once per member.
    #[arg(long = "member", value_name = "NAME=SOCKET", required = true, value_parser = parse_member)]
    members: Vec<MemberSpec>,
    /// The job's secret (a file of mode 0600), for members at tcp: endpoints:
    /// the one their VMMs were given with --control-secret.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    secret: Option<PathBuf>,
    /// The series of group checkpoints (made if missing).
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath, value_parser = crate::args::parse_checkpoint_dir)]
    dir: PathBuf,
    /// How many group checkpoints to keep (at least 1); older ones are removed
    /// once a newer one is committed.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = crate::args::parse_keep)]
    keep: usize,
    /// Take one every DURATION (e.g. 90s, 10m) until the members have ended,
    /// instead of one.
    #[arg(long, value_name = "DURATION", value_parser = crate::args::parse_period)]
    every: Option<Duration>,
    /// How each member checkpoints: stop-and-save (each guest stopped while
    /// all members write) or cevm (each guest stopped only for its switch;
    /// the members' pre-copies run first, all at once).
    #[arg(long, value_enum, default_value_t = Strategy::StopAndSave)]
    strategy: Strategy,
    /// With --strategy cevm, process-based: member NAME's guest goes on in
    /// the `cevm run --incoming` at ENDPOINT (unix:PATH or tcp:HOST:PORT),
    /// and its VMM ends once it has written its checkpoint. Once per member
    /// (all of them, or none); not with --every.
    #[arg(long = "to", value_name = "NAME=ENDPOINT", value_parser = parse_member_to)]
    to: Vec<(String, String)>,
}

/// Parses `NAME=ENDPOINT`.
fn parse_member_to(s: &str) -> Result<(String, String), String> {
    let (name, to) = s.split_once('=').ok_or("give NAME=ENDPOINT (e.g. m1=unix:/run/job/m1.next.sock)")?;
    checkpoint::group::check_member_name(name).map_err(|e| e.to_string())?;
    to.parse::<migrate::Endpoint>().map_err(|e| format!("{to}: {e}"))?;
    Ok((name.to_string(), to.to_string()))
}

/// Gives each member its `--to`: every member one, or none.
fn attach_destinations(members: &mut [MemberSpec], to: Vec<(String, String)>) -> Result<(), String> {
    for (name, endpoint) in to {
        let m = members.iter_mut().find(|m| m.name == name).ok_or(format!("--to {name}=...: no member {name}"))?;
        if m.to.replace(endpoint).is_some() {
            return Err(format!("--to names member {name} twice"));
        }
    }
    let given = members.iter().filter(|m| m.to.is_some()).count();
    if given != 0 && given != members.len() {
        return Err("--to: give every member its destination, or none (thread-based)".into());
    }
    Ok(())
}

/// A group checkpoint's strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    StopAndSave,
    Cevm,
}

impl Strategy {
    /// Takes one group checkpoint of `members` by this strategy into the next
    /// of `series`.
    pub fn take(
        self,
        members: &[MemberSpec],
        series: &mut checkpoint::series::Series,
    ) -> Result<take::GroupReport, take::GroupError> {
        match self {
            Strategy::StopAndSave => take::stop_and_save(members, series),
            Strategy::Cevm => cut::cevm(members, series),
        }
    }
}

#[derive(Args)]
pub struct RestoreArgs {
    /// A group checkpoint, or a series of them (its `latest` is restored).
    #[arg(value_hint = ValueHint::DirPath)]
    dir: PathBuf,
    /// Bind member NAME's NICs to these taps instead of the ones they had
    /// (MEMBER:tap=NAME[,tap=NAME...]). Repeatable.
    #[arg(long = "net", value_name = "MEMBER:tap=NAME", value_parser = parse_member_net)]
    nets: Vec<(String, Vec<String>)>,
    /// Serve each member's API at DIR/MEMBER.sock instead of where it was.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    api_sock_dir: Option<PathBuf>,
    /// Where members with a disk get their restored disks
    /// (CKPT.MEMBER.disk.qcow2; default beside the group checkpoint).
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    disk_dir: Option<PathBuf>,
    /// Member NAME is restored on another host, by a `cevm restore
    /// GROUP/NAME --paused --control tcp:HOST:PORT --control-secret FILE`
    /// started there: wait for it at that endpoint and let it run with the
    /// others. Repeatable; needs --secret.
    #[arg(long = "at", value_name = "NAME=tcp:HOST:PORT", value_parser = parse_member_at)]
    at: Vec<(String, String)>,
    /// The job's secret (a file of mode 0600), for the members --at other hosts.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    secret: Option<PathBuf>,
}

/// Parses `NAME=tcp:HOST:PORT` into the name and HOST:PORT.
fn parse_member_at(s: &str) -> Result<(String, String), String> {
    let (name, at) = s.split_once('=').ok_or("give NAME=tcp:HOST:PORT (e.g. m1=tcp:node2:7000)")?;
    checkpoint::group::check_member_name(name).map_err(|e| e.to_string())?;
    match at.parse::<Addr>()? {
        Addr::Tcp(a) => Ok((name.to_string(), a)),
        Addr::Unix(_) => Err(format!("{at}: give tcp:HOST:PORT, the member's --control endpoint")),
    }
}

/// Runs a `cevm group` command; returns the exit code.
pub fn run(cmd: GroupCmd) -> i32 {
    match cmd {
        GroupCmd::Checkpoint(a) => checkpoint(a),
        GroupCmd::Restore(a) => {
            if !a.at.is_empty() && a.secret.is_none() {
                tracing::error!("--at: give the job's secret (--secret FILE) to reach the members on other hosts");
                return USAGE;
            }
            let cevm = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => return failed(format!("cannot find this cevm binary: {e}")),
            };
            let secret = match a.secret.as_deref().map(Secret::load).transpose() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("{e}");
                    return USAGE;
                }
            };
            let o = restore::Options {
                dir: &a.dir,
                taps: &a.nets,
                sock_dir: a.api_sock_dir.as_deref(),
                disk_dir: a.disk_dir.as_deref(),
                at: &a.at,
                secret,
            };
            restore::run(&cevm, &o).unwrap_or_else(failed)
        }
        GroupCmd::Verify { dir } => verify(&dir),
        GroupCmd::Secret { file } => match Secret::generate(&file) {
            Ok(()) => OK,
            Err(e) => failed(e.to_string()),
        },
    }
}

fn failed(msg: String) -> i32 {
    tracing::error!("{msg}");
    ERROR
}

fn checkpoint(a: CheckpointArgs) -> i32 {
    let usage = |e: String| {
        tracing::error!("{e}");
        USAGE
    };
    let mut members = match name_members(a.members) {
        Ok(m) => m,
        Err(e) => return usage(e),
    };
    if !a.to.is_empty() && (a.strategy != Strategy::Cevm || a.every.is_some()) {
        return usage("--to is for one group checkpoint with --strategy cevm (a destination takes one guest)".into());
    }
    if let Err(e) =
        attach_destinations(&mut members, a.to).and_then(|()| attach_secret(&mut members, a.secret.as_deref()))
    {
        return usage(e);
    }
    let mut series = match checkpoint::series::Series::open(&a.dir, a.keep) {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    for r in series.repairs() {
        tracing::warn!("group checkpoint series {}: {r}", a.dir.display());
    }
    let Some(every) = a.every else {
        return match a.strategy.take(&members, &mut series) {
            Ok(r) => {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                report(&r);
                OK
            }
            Err(e) => failed(format!("group checkpoint aborted (the previous one stays the newest): {e}")),
        };
    };
    // Periodic: on until no member is left; a failed one is said, the next comes.
    let mut next = Instant::now() + every;
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += every;
        match a.strategy.take(&members, &mut series) {
            Ok(r) => report(&r),
            Err(e) => {
                let gone = |m: &MemberSpec| {
                    matches!(m.client(Duration::from_secs(5)).status(), Err(crate::api::ClientError::Connect { .. }))
                };
                if members.iter().all(gone) {
                    tracing::info!("no member of the group is left; periodic group checkpoints end");
                    return OK;
                }
                tracing::error!("group checkpoint aborted (the previous one stays the newest): {e}");
            }
        }
    }
}

pub(crate) fn report(r: &take::GroupReport) {
    tracing::info!(
        "group checkpoint committed to {} ({}: group paused {:.2} ms, of which coordination {:.2} ms; {:.0} ms in all)",
        r.dir.display(),
        r.method.name(),
        r.group_pause_ms,
        r.coordination_ms,
        r.total_ms
    );
    for old in &r.removed {
        tracing::info!("removed the older group checkpoint {}", old.display());
    }
}

fn verify(dir: &Path) -> i32 {
    let dir = match restore::resolve(dir) {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    match checkpoint::group::verify(&dir) {
        Ok((m, reports)) => {
            println!("{}: a complete group checkpoint of {} members ({})", dir.display(), m.members.len(), m.method);
            for (member, r) in m.members.iter().zip(reports) {
                println!("  {}: {} files, every checksum verified", member.name, r.files.len());
            }
            OK
        }
        Err(e) => failed(format!("{}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_named_by_place_unless_named_and_never_twice() {
        let m = |s: &str| parse_member(s).unwrap();
        let named = name_members(vec![m("/a.sock"), m("web=/b.sock"), m("/c.sock")]).unwrap();
        let names: Vec<&str> = named.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["m0", "web", "m2"]);
        assert!(name_members(vec![m("x=/a"), m("x=/b")]).unwrap_err().contains("x is given twice"));
        assert!(name_members(vec![m("/a"), m("m0=/b")]).is_err());
        assert!(name_members(vec![]).is_err());
        assert!(parse_member("a/b=/s").is_err());
        assert!(parse_member("m0=").is_err());
    }

    #[test]
    fn member_nets_name_a_member_and_taps() {
        assert_eq!(parse_member_net("m1:tap=t7,tap=t8").unwrap(), ("m1".into(), vec!["t7".into(), "t8".into()]));
        assert!(parse_member_net("tap=t7").is_err());
        assert!(parse_member_net("m1:t7").is_err());
        assert!(parse_member_net("m1:tap=a/b").is_err());
    }
}
