//! `cevm bench incremental`: how big incremental checkpoints are against what
//! the guest wrote. The dirtier fills part of its memory with data, then
//! rewrites a working set at a set rate; a full checkpoint is taken, then
//! `n` incremental ones `every` apart (each into its own directory, its
//! parent the one before), by stop-and-save or cow. For each: the pages it
//! holds (its page map), the bytes it takes on disk (the memory image's
//! allocated blocks, the page map, the state and the manifest), their ratio
//! to the bytes of the pages it holds, the guest's pause and the time to the
//! commit.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cevm::api::{CheckpointRequest, Client};
use cevm::child::CevmChild;
use serde::Serialize;

use crate::stats::median_min_max;

/// What to measure.
#[derive(clap::Args)]
pub struct Args {
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = cevm::size::parse_size)]
    mem: u64,
    /// MiB of guest memory holding data (filled first).
    #[arg(long, default_value_t = 768)]
    data_mib: u64,
    /// MiB the guest keeps rewriting.
    #[arg(long, default_value_t = 64)]
    ws_mib: u64,
    /// Pages the guest writes per second.
    #[arg(long, default_value_t = 4000)]
    rate: u64,
    /// Incremental checkpoints after the full one.
    #[arg(long, default_value_t = 5)]
    n: usize,
    /// Time between checkpoints, ms.
    #[arg(long, default_value_t = 1000)]
    every_ms: u64,
    /// stop-and-save or cow.
    #[arg(long, default_value = "cow", value_parser = ["stop-and-save", "cow"])]
    strategy: String,
    /// Directory for the checkpoints and the socket.
    #[arg(long, default_value = "bench-work")]
    dir: PathBuf,
    /// Also write every sample as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Sample {
    k: usize,
    incremental: bool,
    held_pages: u64,
    disk_bytes: u64,
    pause_ms: f64,
    durable_ms: f64,
}

const T: Duration = Duration::from_secs(600);

/// Bytes the checkpoint at `dir` takes on disk.
fn disk_bytes(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let m = e.and_then(|e| e.metadata()).map_err(|e| format!("{}: {e}", dir.display()))?;
        total += m.blocks() * 512;
    }
    Ok(total)
}

/// Pages the page map of the checkpoint at `dir` marks (all of them when it
/// has none: a full checkpoint holds every page that holds data).
fn held_pages(dir: &Path) -> Result<Option<u64>, String> {
    match std::fs::read(dir.join(snapshot::PAGES_FILE)) {
        Ok(b) => Ok(Some(b.iter().map(|x| u64::from(x.count_ones())).sum())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

pub fn run(o: &Args) -> Result<(), String> {
    let every = Duration::from_millis(o.every_ms);
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let sock = o.dir.join("incremental.sock");
    let _ = std::fs::remove_file(&sock);
    let args = format!("mib={} rate={} data={} seconds=0", o.ws_mib, o.rate, o.data_mib);
    let mem = format!("{}M", o.mem >> 20);
    let a = [
        "run",
        "--guest",
        "dirtier",
        "--guest-args",
        &args,
        "--mem",
        &mem,
        "--memory-backend",
        "private",
        "--api-sock",
        sock.to_str().unwrap_or_default(),
    ];
    let mut vm = CevmChild::spawn(&crate::cevm_bin()?, &a, None).map_err(|e| e.to_string())?;
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).ok_or("the dirtier did not fill its memory")?;
    std::thread::sleep(every);
    println!(
        "incremental: the dirtier in {} MiB ({} MiB of data), rewriting {} MiB at {} pages/s; a full {} checkpoint, then {} incremental ones {:?} apart",
        o.mem >> 20,
        o.data_mib,
        o.ws_mib,
        o.rate,
        o.strategy,
        o.n,
        every
    );
    let api = Client::new(&sock, T);
    let mut samples = Vec::new();
    for k in 0..=o.n {
        let out = o.dir.join(format!("inc-{k}"));
        let _ = std::fs::remove_dir_all(&out);
        let req = CheckpointRequest { incremental: true, ..CheckpointRequest::new(out.clone(), &o.strategy) };
        let t = Instant::now();
        let r = api.checkpoint(&req).map_err(|e| format!("checkpoint {k}: {e}"))?;
        let durable_ms = t.elapsed().as_secs_f64() * 1e3;
        let held = held_pages(&out)?;
        samples.push(Sample {
            k,
            incremental: held.is_some(),
            held_pages: held.unwrap_or(r.memory.data_pages),
            disk_bytes: disk_bytes(&out)?,
            pause_ms: r.pause_ms,
            durable_ms,
        });
        std::thread::sleep(every);
    }
    let _ = api.quit();
    let _ = vm.finish(T);
    println!();
    println!("| checkpoint | pages held | bytes of those pages MiB | on disk MiB | on disk / pages' bytes | pause ms | to commit ms |");
    println!("|---|---|---|---|---|---|---|");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for s in &samples {
        let bytes = s.held_pages * snapshot::PAGE_SIZE;
        println!(
            "| {} {} | {} | {:.1} | {:.1} | {:.3} | {:.2} | {:.0} |",
            s.k,
            if s.incremental { "incremental" } else { "full" },
            s.held_pages,
            mib(bytes),
            mib(s.disk_bytes),
            s.disk_bytes as f64 / bytes.max(1) as f64,
            s.pause_ms,
            s.durable_ms
        );
    }
    let inc: Vec<&Sample> = samples.iter().filter(|s| s.incremental).collect();
    if !inc.is_empty() {
        let ratio: Vec<f64> =
            inc.iter().map(|s| s.disk_bytes as f64 / (s.held_pages * snapshot::PAGE_SIZE).max(1) as f64).collect();
        let (m, a, b) = median_min_max(&ratio);
        let full = samples.iter().find(|s| !s.incremental).map_or(0, |s| s.disk_bytes);
        let size: Vec<f64> = inc.iter().map(|s| s.disk_bytes as f64).collect();
        println!(
            "incremental checkpoints on disk / bytes of the pages they hold: median {m:.3} ({a:.3}-{b:.3}); each {:.1} % of the full one's size (median)",
            median_min_max(&size).0 / full.max(1) as f64 * 100.0
        );
    }
    if let Some(p) = &o.json {
        std::fs::write(p, serde_json::to_string_pretty(&samples).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    for k in 0..=o.n {
        let _ = std::fs::remove_dir_all(o.dir.join(format!("inc-{k}")));
    }
    Ok(())
}
