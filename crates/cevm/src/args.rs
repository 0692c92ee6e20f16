//! Checks of command-line values beyond their syntax ([`crate::size`]), so that
//! every bad command line is refused as one (exit 2) before anything is created:
//! `--mem` against the VMM's rules and the host, a built-in guest's arguments
//! against what it reads and the memory it fills, `--checkpoint-every`, and the
//! kind of file `--checkpoint-dir` names. Paths given on the command line are
//! made absolute here, at the edge, because they are stored (in the guest's
//! configuration, which travels in checkpoints and migrations).

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::layout::{FREE_START, LOW_RAM_END, MEM_ALIGN, MIN_MEM_SIZE};

/// `--mem`: a size the VMM can map (at least 8 MiB, whole 2 MiB pages). Whether
/// this host can hold it is [`check_host_mem`]'s question, after parsing
/// (`--overcommit` lifts it).
pub fn parse_mem(s: &str) -> Result<u64, String> {
    check_mem(crate::size::parse_size(s)?)
}

/// [`parse_mem`] of a size already parsed.
pub fn check_mem(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_MEM_SIZE {
        return Err(format!(
            "a guest needs at least {} MiB (the first {} MiB hold its boot tables, image and vCPU stacks)",
            MIN_MEM_SIZE >> 20,
            FREE_START >> 20
        ));
    }
    if bytes % MEM_ALIGN != 0 {
        let down = bytes - bytes % MEM_ALIGN;
        let up = down + MEM_ALIGN;
        let other = if down >= MIN_MEM_SIZE { format!("{}M or ", down >> 20) } else { String::new() };
        return Err(format!(
            "not a multiple of {} MiB (guest memory comes in {0} MiB pages): {other}{}M would do",
            MEM_ALIGN >> 20,
            up >> 20
        ));
    }
    Ok(bytes)
}

/// Refuses `--mem` of `bytes` that a host of `limit` cannot hold. Guest memory
/// is mapped without reserving it, so the kernel would let such a guest start
/// and kill it (or the VMM) only once the guest had touched more than there is.
pub fn check_host_mem(bytes: u64, limit: Option<crate::host::MemoryLimit>) -> Result<(), String> {
    match limit.and_then(|l| l.refusal(bytes)) {
        Some(why) => {
            let size =
                if bytes % (1 << 30) == 0 { format!("{} GiB", bytes >> 30) } else { format!("{} MiB", bytes >> 20) };
            Err(format!(
                "--mem {size}: {why} (--overcommit starts it anyway, for a guest that touches little of its memory)"
            ))
        }
        None => Ok(()),
    }
}

/// `--checkpoint-every`: a duration longer than zero.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let d = crate::size::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// `--keep`: how many periodic checkpoints to keep, at least one.
pub fn parse_keep(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (a series always keeps its newest checkpoint)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of checkpoints: {e}")),
    }
}

/// Parses `--control tcp:HOST:PORT` into HOST:PORT.
pub fn parse_control(s: &str) -> Result<String, String> {
    let a = s.strip_prefix("tcp:").ok_or("give tcp:HOST:PORT (e.g. tcp:0.0.0.0:7000)")?;
    crate::api::client::check_host_port(a)?;
    Ok(a.to_string())
}

/// `--checkpoint-dir`: a directory, or a path where one can be made: neither it
/// nor any directory above it may be something else (a regular file...).
pub fn parse_checkpoint_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("give a directory".into());
    }
    let p = anchored(Path::new(s)).map_err(|e| e.to_string())?;
    for a in p.ancestors() {
        match std::fs::metadata(a) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", a.display())),
            Err(_) => continue,
        }
    }
    Ok(p)
}

/// Checks the argument string of built-in guest `guest` and that the memory it
/// fills fits in `mem` bytes of guest memory; the message says what it needs.
pub fn check_guest(guest: &str, args: &str, mem: u64) -> Result<(), String> {
    if args.len() >= vmm::boot::GUEST_ARGS_MAX {
        return Err(format!(
            "--guest-args: {} bytes, but a built-in guest gets at most {}",
            args.len(),
            vmm::boot::GUEST_ARGS_MAX - 1
        ));
    }
    let parsed = guests::GuestArgs::parse(guest, args).map_err(|e| format!("--guest-args: {e}"))?;
    let Some((mib, arg)) = parsed.working_set_mib() else { return Ok(()) };
    let needed = mib.checked_mul(1 << 20).and_then(|b| b.checked_add(FREE_START)).unwrap_or(u64::MAX);
    if needed > LOW_RAM_END {
        return Err(format!(
            "--guest-args {arg}: {guest} fills memory below 3 GiB only, where {} MiB are free at most",
            (LOW_RAM_END - FREE_START) >> 20
        ));
    }
    if needed > mem {
        let want = needed.next_multiple_of(MEM_ALIGN).max(MIN_MEM_SIZE);
        return Err(format!(
            "--guest-args {arg}: {guest} needs {} MiB of guest memory ({} MiB for its boot tables, image and stacks, \
             then {mib} MiB): give --mem {}M or more",
            needed >> 20,
            FREE_START >> 20,
            want >> 20
        ));
    }
    Ok(())
}

/// `--net tap=NAME[,mac=MAC]`: a NIC on a host tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetArg {
    pub tap: String,
    pub mac: Option<devices::virtio::net::MacAddr>,
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetArg, String> {
    let (mut tap, mut mac) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() => {
                devices::virtio::net::tap::check_name(name).map_err(|e| e.to_string())?;
                tap = Some(name.to_string());
            }
            Some(("mac", m)) if mac.is_none() => mac = Some(m.parse()?),
            Some(("tap" | "mac", _)) => return Err(format!("`{part}`: given twice in `{s}`")),
            _ => return Err(format!("`{part}` is not tap=NAME or mac=MAC (the form is tap=NAME[,mac=MAC])")),
        }
    }
    let tap = tap.ok_or_else(|| format!("`{s}` names no tap (the form is tap=NAME[,mac=MAC])"))?;
    Ok(NetArg { tap, mac })
}

/// The NICs of a new guest: each `--net` in order, a NIC without a MAC given
/// one made from its tap's name (the same on every run), no MAC twice, at
/// most [`vmm::layout::MAX_NICS`].
pub fn nics(nets: &[NetArg]) -> Result<Vec<vmm::NicConfig>, String> {
    if nets.len() > vmm::layout::MAX_NICS {
        return Err(format!("{} --net given: at most {} NICs are supported", nets.len(), vmm::layout::MAX_NICS));
    }
    let mut out: Vec<vmm::NicConfig> = Vec::new();
    for n in nets {
        // FNV-1a of the name: a stable, locally administered address.
        let h = n.tap.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        let mac = n.mac.unwrap_or_else(|| devices::virtio::net::MacAddr::local(h));
        if out.iter().any(|o| o.mac == mac) {
            return Err(format!("two NICs would have the MAC address {mac}: give each its own with mac="));
        }
        if out.iter().any(|o| o.tap == n.tap) {
            return Err(format!("tap `{}` is given twice: each NIC needs a tap of its own", n.tap));
        }
        out.push(vmm::NicConfig { tap: n.tap.clone(), mac });
    }
    Ok(out)
}

/// The taps `--net` gives a guest that keeps its NICs (a restore or an
/// arriving migration): NIC i is bound to the i-th; a MAC cannot change.
pub fn tap_overrides(nets: &[NetArg]) -> Result<Vec<String>, String> {
    nets.iter()
        .map(|n| match n.mac {
            Some(_) => Err(format!(
                "`--net tap={},mac=...`: a restored or arriving guest keeps its NICs' MAC addresses; give only tap=NAME",
                n.tap
            )),
            None => Ok(n.tap.clone()),
        })
        .collect()
}

/// `p` as an absolute path, its directory canonical (symlinks and `..`
/// resolved, when it exists) and its last component kept as given: what a
/// process in another directory (a migration's destination, a restore) can
/// open, and what the VMM will create when `p` does not exist yet.
pub fn anchored(p: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(p)?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else { return Ok(abs) };
    Ok(match dir.canonicalize() {
        Ok(dir) => dir.join(name),
        // A missing directory: the open that follows names it.
        Err(_) => abs.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::MemoryLimit;

    #[test]
    fn memory_sizes_follow_the_vmms_rules_and_the_hosts_limit() {
        assert_eq!(check_mem(8 << 20), Ok(8 << 20));
        assert_eq!(check_mem(1 << 40), Ok(1 << 40));
        for small in [0, 1, 3 << 20, (8 << 20) - 4096] {
            assert!(check_mem(small).unwrap_err().contains("at least 8 MiB"), "{small}");
        }
        assert_eq!(
            check_mem(9 << 20).unwrap_err(),
            "not a multiple of 2 MiB (guest memory comes in 2 MiB pages): 8M or 10M would do"
        );
        assert!(check_mem(4097 << 20).unwrap_err().contains("4096M or 4098M"));
        let host = Some(MemoryLimit { bytes: 16 << 30, ram: 16 << 30, swap: 0, strict: false });
        assert_eq!(check_host_mem(16 << 30, host), Ok(()));
        let e = check_host_mem((16 << 30) + (2 << 20), host).unwrap_err();
        assert!(e.starts_with("--mem 16386 MiB: this host has 16.0 GiB of RAM") && e.contains("--overcommit"), "{e}");
        assert!(check_host_mem(1 << 40, host).unwrap_err().starts_with("--mem 1024 GiB: "));
        assert_eq!(check_host_mem(1 << 40, None), Ok(()));
    }

    #[test]
    fn periods_must_be_longer_than_zero() {
        assert_eq!(parse_period("0s").unwrap_err(), "must be longer than zero");
        assert_eq!(parse_period("0ms").unwrap_err(), "must be longer than zero");
        assert_eq!(parse_period("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn a_series_keeps_at_least_one_checkpoint() {
        assert_eq!(parse_keep("3"), Ok(3));
        assert!(parse_keep("0").unwrap_err().contains("at least 1"));
        assert!(parse_keep("-1").unwrap_err().contains("not a number"));
    }

    #[test]
    fn a_guest_must_fit_its_working_set() {
        assert_eq!(check_guest("digest", "mib=4", 8 << 20), Ok(()));
        let e = check_guest("digest", "mib=5", 8 << 20).unwrap_err();
        assert!(e.contains("mib=5") && e.contains("needs 9 MiB") && e.contains("--mem 10M"), "{e}");
        // dirtier's default working set is 16 MiB.
        assert!(check_guest("dirtier", "", 16 << 20).unwrap_err().contains("mib=16"));
        assert!(check_guest("dirtier", "mib=1 data=4000", 8 << 30).unwrap_err().contains("below 3 GiB"));
        assert!(check_guest("digest", "mib=99999999999999999", 8 << 30).unwrap_err().contains("below 3 GiB"));
        assert!(check_guest("hello", "cod=3", 8 << 20).unwrap_err().contains("`cod`"));
        assert!(check_guest("hello", &"code=1 ".repeat(40), 8 << 20).unwrap_err().contains("at most 255"));
    }

    #[test]
    fn checkpoint_dirs_must_be_directories() {
        let d = std::env::temp_dir().join(format!("cevm-args-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(parse_checkpoint_dir(d.join("new/deeper").to_str().unwrap()), Ok(d.join("new/deeper")));
        assert!(!d.join("new").exists(), "checking creates nothing");
        let e = parse_checkpoint_dir(file.to_str().unwrap()).unwrap_err();
        assert_eq!(e, format!("{} is not a directory", file.display()));
        assert!(parse_checkpoint_dir(file.join("x").to_str().unwrap()).unwrap_err().contains("is not a directory"));
        assert!(parse_checkpoint_dir("").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn anchored_paths_are_absolute_with_a_canonical_directory() {
        let d = std::env::temp_dir().join(format!("cevm-anchored-{}", std::process::id()));
        std::fs::create_dir_all(d.join("real")).unwrap();
        let _ = std::os::unix::fs::symlink(d.join("real"), d.join("link"));
        let real = d.join("real").canonicalize().unwrap();
        assert_eq!(anchored(&d.join("link/disk.qcow2")).unwrap(), real.join("disk.qcow2"));
        assert_eq!(anchored(&d.join("real/../real/x")).unwrap(), real.join("x"));
        let rel = anchored(Path::new("some-file")).unwrap();
        assert!(rel.is_absolute() && rel.ends_with("some-file"), "{}", rel.display());
        assert_eq!(anchored(Path::new("/nonexistent/x")).unwrap(), Path::new("/nonexistent/x"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
