//! `cevm-bench stop-and-save`: pause time, checkpoint bytes and write throughput
//! against the checkpoint file system's own sequential write + fdatasync limit.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use vmm::{Boot, InstanceConfig, MemoryBackend};

use crate::guest::{start_guest, wait_dirtied};
use crate::host::{allocated_bytes, disk_limit};
use crate::stats::median_min_max;

#[derive(Serialize)]
struct Sample {
    pause_ms: f64,
    memory_write_mib_per_s: f64,
    data_bytes: u64,
    data_pages: u64,
    zero_pages: u64,
    image_allocated_bytes: u64,
    disk_limit_mib_per_s: f64,
}

#[derive(Serialize)]
struct SizeResult {
    mem_size: u64,
    working_set_mib: u64,
    samples: Vec<Sample>,
}
/// Runs the benchmark: `runs` checkpoints of a dirtier guest of each size.
pub fn run(
    sizes: &[u64],
    runs: usize,
    dir: &Path,
    json: Option<&Path>,
    memory_backend: MemoryBackend,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("stop-and-save benchmark: {runs} checkpoints per size, checkpoint file system at {}", dir.display());
    println!("guest: the dirtier, working set = guest memory - 8 MiB, one write per page, fully covered before the first checkpoint");
    let mut results = Vec::new();
    for &mem in sizes {
        let ws_mib = (mem >> 20).saturating_sub(8);
        let config = InstanceConfig {
            boot: Boot::Builtin { guest: "dirtier".into(), args: format!("mib={ws_mib} rate=0 seconds=0") },
            mem_size: mem,
            vcpus: 1,
            memory_backend,
            disk: None,
            nics: vec![],
        };
        let (mut inst, lines) = start_guest(config)?;
        wait_dirtied(&lines, ws_mib * 256, Duration::from_secs(600))?;
        let mut samples = Vec::new();
        let ckpt = dir.join(format!("ckpt-{}", mem >> 20));
        let limit_file = dir.join("limit.bin");
        // Warm-up: the first write into never-written blocks of a thin-provisioned
        // virtual disk runs several times slower than any later one. Give both
        // measurements blocks that have been written before, then alternate their
        // order so neither always gets the other's freshly freed blocks.
        disk_limit(&limit_file, 2 * mem)?;
        for i in 0..runs {
            let mut limit = 0.0;
            if i % 2 == 1 {
                limit = disk_limit(&limit_file, mem)?;
            }
            let r = checkpoint::stop_and_save(
                &mut inst,
                &ckpt,
                false,
                checkpoint::Pages::All,
                &checkpoint::Progress::default(),
            )
            .map_err(|e| e.to_string())?;
            let alloc = allocated_bytes(&ckpt.join(snapshot::MEMORY_FILE));
            let _ = std::fs::remove_dir_all(&ckpt);
            if i % 2 == 0 {
                limit = disk_limit(&limit_file, r.memory.data_bytes)?;
            }
            println!(
                "  {:>5} MiB run {}: pause {:.1} ms, {:.0} MiB data, memory write {:.0} MiB/s, disk limit {:.0} MiB/s",
                mem >> 20,
                i + 1,
                r.pause_ms,
                r.memory.data_bytes as f64 / (1 << 20) as f64,
                r.write_mib_per_s,
                limit
            );
            samples.push(Sample {
                pause_ms: r.pause_ms,
                memory_write_mib_per_s: r.write_mib_per_s,
                data_bytes: r.memory.data_bytes,
                data_pages: r.memory.data_pages,
                zero_pages: r.memory.zero_pages,
                image_allocated_bytes: alloc,
                disk_limit_mib_per_s: limit,
            });
        }
        inst.shutdown();
        results.push(SizeResult { mem_size: mem, working_set_mib: ws_mib, samples });
    }

    println!();
    println!("| guest | pause ms (median, min-max) | data written | zero pages (holes) | image allocated | effective MiB/s | disk limit MiB/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        let pause: Vec<f64> = r.samples.iter().map(|s| s.pause_ms).collect();
        let eff: Vec<f64> =
            r.samples.iter().map(|s| s.data_bytes as f64 / (1 << 20) as f64 / (s.pause_ms / 1e3)).collect();
        let lim: Vec<f64> = r.samples.iter().map(|s| s.disk_limit_mib_per_s).collect();
        let ratio: Vec<f64> = eff.iter().zip(&lim).map(|(e, l)| e / l).collect();
        let (pm, pmin, pmax) = median_min_max(&pause);
        let s0 = &r.samples[0];
        println!(
            "| {} MiB | {:.0} ({:.0}-{:.0}) | {:.0} MiB | {} | {:.0} MiB | {:.0} | {:.0} | {:.2} |",
            r.mem_size >> 20,
            pm,
            pmin,
            pmax,
            s0.data_bytes as f64 / (1 << 20) as f64,
            s0.zero_pages,
            s0.image_allocated_bytes as f64 / (1 << 20) as f64,
            median_min_max(&eff).0,
            median_min_max(&lim).0,
            median_min_max(&ratio).0
        );
    }
    println!("(effective = data bytes / whole guest pause; ratio = effective / disk limit, medians, same run)");
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
