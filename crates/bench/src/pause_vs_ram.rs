//! `cevm-bench pause-vs-ram`: the pause of a stop-and-save checkpoint of a guest
//! holding little data (1 MiB by default) at several memory sizes. A checkpoint
//! should cost what the guest holds, not what it was given: never-touched
//! memory is neither read nor written, and its checksum costs O(log n).
//!
//! It drives `cevm` binaries through their control API, several at once, so
//! that a build of another commit (main's, say) is measured in the same run on
//! the same host: their checkpoints alternate, run by run, and the table gives
//! each one's medians and the ratios between them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cevm::api::{CheckpointRequest, Client};
use cevm::child::CevmChild;
use serde::Serialize;

use crate::stats::median_min_max;

/// A `cevm` binary to measure, and its label in the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Binary {
    pub label: String,
    pub path: PathBuf,
}

impl Binary {
    /// The `cevm` at `path`, labelled `cevm`.
    pub fn beside(path: PathBuf) -> Binary {
        Binary { label: "cevm".into(), path }
    }
}

/// `LABEL=PATH`, or a bare PATH (its own label).
pub fn parse_binary(s: &str) -> Result<Binary, String> {
    let (label, path) = match s.split_once('=') {
        Some((l, p)) if !l.is_empty() && !p.is_empty() => (l.to_string(), PathBuf::from(p)),
        Some(_) => return Err(format!("`{s}`: give LABEL=PATH")),
        None => (s.to_string(), PathBuf::from(s)),
    };
    if !path.is_file() {
        return Err(format!("{}: no such cevm binary", path.display()));
    }
    Ok(Binary { label, path })
}

/// What to measure.
pub struct Options {
    pub mems: Vec<u64>,
    pub data_mib: u64,
    pub runs: usize,
    pub binaries: Vec<Binary>,
    pub dir: PathBuf,
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Case {
    binary: String,
    mem_size: u64,
    data_mib: u64,
    pause_ms: Vec<f64>,
    data_pages: u64,
}

/// Generous: a guest of 1 TiB takes seconds to start on these machines.
const T: Duration = Duration::from_secs(600);

/// A VMM running the dirtier, idle once it filled `data_mib` MiB.
fn start(b: &Binary, mem: u64, data_mib: u64, sock: &Path) -> Result<CevmChild, String> {
    let _ = std::fs::remove_file(sock);
    let args = format!("mib={} fill=1 idle=1", data_mib.max(1));
    let mem_arg = format!("{}M", mem >> 20);
    let a = [
        "run",
        "--guest",
        "dirtier",
        "--guest-args",
        &args,
        "--mem",
        &mem_arg,
        "--api-sock",
        sock.to_str().unwrap_or(""),
    ];
    // Sizes beyond this host's memory need --overcommit (the guest touches only
    // its data); binaries older than that flag take them without it.
    let knows_overcommit = std::process::Command::new(&b.path)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--overcommit"));
    let a: Vec<&str> = a.iter().copied().chain(knows_overcommit.then_some("--overcommit")).collect();
    let mut vm = CevmChild::spawn(&b.path, &a, None).map_err(|e| format!("{}: {e}", b.path.display()))?;
    vm.wait_line(T, |l| l.starts_with("dirtier: filled"))
        .ok_or_else(|| format!("{} --mem {mem_arg}: the guest did not fill its memory: {:?}", b.label, vm.seen))?;
    Ok(vm)
}

/// Runs the benchmark and prints its table.
pub fn run(o: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    println!(
        "pause-vs-ram: stop-and-save of an idle guest holding {} MiB, {} checkpoints per binary and size (after one warm-up), checkpoints in {}",
        o.data_mib,
        o.runs,
        o.dir.display()
    );
    let mut cases: Vec<Case> = Vec::new();
    for &mem in &o.mems {
        let mut vms = Vec::new();
        for (i, b) in o.binaries.iter().enumerate() {
            let sock = o.dir.join(format!("pause-vs-ram-{i}.sock"));
            vms.push((start(b, mem, o.data_mib, &sock)?, Client::new(&sock, T)));
            cases.push(Case {
                binary: b.label.clone(),
                mem_size: mem,
                data_mib: o.data_mib,
                pause_ms: Vec::new(),
                data_pages: 0,
            });
        }
        let first = cases.len() - o.binaries.len();
        // Each binary checkpoints into one directory again and again, as a
        // periodic checkpoint to a fixed name does: the commit replaces the last.
        for run in 0..=o.runs {
            for k in 0..o.binaries.len() {
                // Alternate who goes first, so neither always follows the other.
                let i = if run % 2 == 0 { k } else { o.binaries.len() - 1 - k };
                let out = o.dir.join(format!("pause-vs-ram-ckpt-{i}"));
                let r =
                    vms[i].1.checkpoint(&CheckpointRequest::new(out, "stop-and-save")).map_err(|e| e.to_string())?;
                if run > 0 {
                    let c = &mut cases[first + i];
                    c.pause_ms.push(r.pause_ms);
                    c.data_pages = r.memory.data_pages;
                    println!(
                        "  {:>8} MiB {:>10} run {run}: pause {:.1} ms",
                        mem >> 20,
                        o.binaries[i].label,
                        r.pause_ms
                    );
                }
            }
        }
        for (mut vm, client) in vms {
            let _ = client.quit();
            let _ = vm.finish(T);
        }
    }
    for i in 0..o.binaries.len() {
        let _ = std::fs::remove_dir_all(o.dir.join(format!("pause-vs-ram-ckpt-{i}")));
    }
    print_table(o, &cases);
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&cases).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn print_table(o: &Options, cases: &[Case]) {
    let median = |c: &Case| median_min_max(&c.pause_ms).0;
    let find = |label: &str, mem: u64| cases.iter().find(|c| c.binary == label && c.mem_size == mem);
    println!();
    println!("| binary | guest memory | data pages | pause ms (median, min-max) | vs the smallest guest |");
    println!("|---|---|---|---|---|");
    for c in cases {
        let (m, lo, hi) = median_min_max(&c.pause_ms);
        let base = o.mems.first().and_then(|&m0| find(&c.binary, m0)).map(median).unwrap_or(f64::NAN);
        println!(
            "| {} | {} MiB | {} | {m:.1} ({lo:.1}-{hi:.1}) | {:.2}x |",
            c.binary,
            c.mem_size >> 20,
            c.data_pages,
            m / base
        );
    }
    if let Some(first) = o.binaries.first() {
        for b in &o.binaries[1..] {
            println!();
            println!("median pause of {} / median pause of {}, same run:", b.label, first.label);
            for &mem in &o.mems {
                if let (Some(x), Some(y)) = (find(&b.label, mem), find(&first.label, mem)) {
                    println!("  {} MiB: {:.2}", mem >> 20, median(x) / median(y));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_label_eq_path_or_a_path() {
        let me = std::env::current_exe().unwrap();
        let p = me.to_str().unwrap();
        assert_eq!(parse_binary(&format!("main={p}")).unwrap(), Binary { label: "main".into(), path: me.clone() });
        assert_eq!(parse_binary(p).unwrap().path, me);
        assert!(parse_binary("main=").is_err());
        assert!(parse_binary("=x").is_err());
        assert!(parse_binary("main=/nonexistent/cevm").unwrap_err().contains("no such cevm binary"));
    }
}
