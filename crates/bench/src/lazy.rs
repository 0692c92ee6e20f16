//! `cevm bench lazy`: how soon a restored guest runs, restored whole (every
//! byte read and checked first) and lazily (`--lazy`: chunks read and checked
//! as they are touched, the rest in the background). For each size, the
//! dirtier fills part of its memory with data and halts; a stop-and-save
//! checkpoint of it is restored `runs` times each way, from the page cache
//! (warm) and with the checkpoint's memory image evicted from it first (cold,
//! `posix_fadvise(DONTNEED)` on that file only). Reported: the time from the
//! restore's start to the guest's first instruction (the VMM logs it when it
//! starts the vCPUs), and for lazy restores the time until all of memory is
//! in place.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cevm::api::{CheckpointRequest, Client};
use cevm::child::CevmChild;
use serde::Serialize;

use crate::stats::median_min_max;

/// What to measure.
#[derive(clap::Args)]
pub struct Args {
    /// Guest sizes, comma-separated.
    #[arg(long, default_value = "1G,4G", value_delimiter = ',', value_parser = cevm::size::parse_size)]
    sizes: Vec<u64>,
    /// Percent of guest memory holding data.
    #[arg(long, default_value_t = 60)]
    data_pct: u64,
    /// Restores per size, way and cache state (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Directory for the checkpoints and the sockets.
    #[arg(long, default_value = "bench-work")]
    dir: PathBuf,
    /// Also write every sample as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Sample {
    mem_mib: u64,
    lazy: bool,
    cold: bool,
    /// From the restore's start to the vCPUs running.
    first_instruction_ms: f64,
    /// A lazy restore: from its start until all of memory was in place.
    all_in_place_ms: Option<f64>,
}

const T: Duration = Duration::from_secs(600);

/// The number after `prefix` in `text` (ending at a space), if any.
fn number_after(text: &str, prefix: &str) -> Option<f64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    rest.split(' ').next()?.parse().ok()
}

/// Evicts `path` from the page cache (its pages only).
fn evict(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: advice on a descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(format!("{}: posix_fadvise: {}", path.display(), std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// One restore of `ck`: returns (first instruction ms, all in place ms).
fn restore_once(ck: &Path, sock: &Path, lazy: bool, log: &Path) -> Result<(f64, Option<f64>), String> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(crate::cevm_bin()?);
    cmd.args(["restore", ck.to_str().unwrap_or_default(), "--api-sock", sock.to_str().unwrap_or_default()]);
    if lazy {
        cmd.arg("--lazy");
    }
    cmd.stderr(Stdio::from(std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?));
    let mut vm = CevmChild::spawn_cmd(cmd, None).map_err(|e| e.to_string())?;
    let api = Client::new(sock, T);
    let deadline = std::time::Instant::now() + T;
    // Until the VMM answers (its guest runs), and a lazy restore until all
    // of its memory is in place (what a checkpoint would wait for).
    loop {
        match api.status() {
            Ok(st) if !lazy || st.lazy_restore.as_ref().is_some_and(|l| l.done) => break,
            _ if std::time::Instant::now() > deadline => return Err("the restored VMM never got ready".into()),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    api.quit().map_err(|e| format!("quit: {e}"))?;
    vm.finish(T).ok_or("the restored VMM did not end")?;
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let first = number_after(&text, "the guest runs ").ok_or_else(|| format!("no start time in {text}"))?;
    // Measured by the loader from its own start, just before the vCPUs'.
    let all = if lazy { number_after(&text, "verified after ") } else { None };
    Ok((first, all))
}

pub fn run(o: &Args) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let dir = std::path::absolute(&o.dir).map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    println!(
        "lazy: the dirtier with {} % of its memory holding data, halted; a stop-and-save checkpoint restored {} times each way (the time to the guest's first instruction from the restore's start)",
        o.data_pct, o.runs
    );
    for &mem in &o.sizes {
        let mib = mem >> 20;
        let sock = dir.join("lazy.sock");
        let ck = dir.join(format!("lazy-{mib}"));
        let _ = std::fs::remove_dir_all(&ck);
        let _ = std::fs::remove_file(&sock);
        let args = format!("mib=16 data={} idle=1", mib * o.data_pct / 100);
        let memarg = format!("{mib}M");
        let a = ["run", "--guest", "dirtier", "--guest-args", &args, "--mem", &memarg];
        let mut vm = CevmChild::spawn(
            &crate::cevm_bin()?,
            &[&a[..], &["--api-sock", sock.to_str().unwrap_or_default()]].concat(),
            None,
        )
        .map_err(|e| e.to_string())?;
        vm.wait_line(T, |l| l.starts_with("dirtier: filled")).ok_or("the dirtier did not fill its memory")?;
        Client::new(&sock, T)
            .checkpoint(&CheckpointRequest { stop: true, ..CheckpointRequest::new(ck.clone(), "stop-and-save") })
            .map_err(|e| format!("checkpoint: {e}"))?;
        let _ = vm.finish(T);
        for cold in [false, true] {
            for lazy in [false, true] {
                for _ in 0..o.runs {
                    if cold {
                        evict(&ck.join(snapshot::MEMORY_FILE))?;
                    }
                    let (first, all) = restore_once(&ck, &sock, lazy, &dir.join("lazy.log"))?;
                    samples.push(Sample {
                        mem_mib: mib,
                        lazy,
                        cold,
                        first_instruction_ms: first,
                        all_in_place_ms: all,
                    });
                }
            }
        }
        let _ = std::fs::remove_dir_all(&ck);
    }
    println!();
    println!("| guest | page cache | restore | to first instruction ms, median (min-max) | all memory in place ms |");
    println!("|---|---|---|---|---|");
    for &mem in &o.sizes {
        for cold in [false, true] {
            for lazy in [false, true] {
                let s: Vec<&Sample> =
                    samples.iter().filter(|s| s.mem_mib == mem >> 20 && s.lazy == lazy && s.cold == cold).collect();
                let first: Vec<f64> = s.iter().map(|s| s.first_instruction_ms).collect();
                let (m, a, b) = median_min_max(&first);
                let all: Vec<f64> = s.iter().filter_map(|s| s.all_in_place_ms).collect();
                let all = if all.is_empty() {
                    "(before it runs)".to_string()
                } else {
                    format!("{:.0}", median_min_max(&all).0)
                };
                println!(
                    "| {} MiB | {} | {} | {m:.2} ({a:.2}-{b:.2}) | {all} |",
                    mem >> 20,
                    if cold { "cold" } else { "warm" },
                    if lazy { "lazy" } else { "whole" }
                );
            }
        }
    }
    if let Some(p) = &o.json {
        std::fs::write(p, serde_json::to_string_pretty(&samples).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
