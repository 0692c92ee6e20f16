//! `cevm inspect`: what a checkpoint holds, for humans (or `--json`).

use std::fmt::Write;
use std::path::Path;

use serde_json::json;

/// Describes the checkpoint at `dir` (after checking its manifest and state).
pub fn describe(dir: &Path, as_json: bool) -> Result<String, checkpoint::Error> {
    let open = checkpoint::open(dir)?;
    let m = &open.checkpoint.manifest;
    let cfg = &open.config;
    if as_json {
        let vcpus: Vec<_> = open
            .state
            .vcpus
            .iter()
            .map(|v| {
                json!({ "id": v.id, "rip": v.regs.rip, "rsp": v.regs.rsp, "mp_state": v.mp_state.mp_state,
                              "msrs": v.msrs.len(), "tsc_khz": v.tsc_khz })
            })
            .collect();
        let v = json!({ "dir": dir, "manifest": m, "vcpus": vcpus, "serial": open.state.devices.section("serial") });
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(s, "checkpoint     {}", dir.display());
    let _ = writeln!(s, "format         version {} (written by cevm {})", m.format_version, m.cevm_version);
    let _ = writeln!(s, "strategy       {}", m.strategy);
    let _ = writeln!(s, "created        {} ms after the Unix epoch", m.created_unix_ms);
    if !m.id.is_empty() {
        let _ = writeln!(s, "id             {}", m.id);
    }
    if let Some(p) = &m.parent {
        let chain: Vec<String> = open.ancestors.iter().rev().map(|a| a.dir.display().to_string()).collect();
        let _ = writeln!(s, "incremental    on {} (id {}); the chain behind it: {}", p.dir, p.id, chain.join(" <- "));
    }
    let backend = serde_json::to_value(cfg.memory_backend).ok().and_then(|v| v.as_str().map(str::to_string));
    let _ = writeln!(s, "guest          {}", cfg.boot);
    let _ = writeln!(
        s,
        "machine        {} vCPU(s), {:.0} MiB RAM ({} memory)",
        cfg.vcpus,
        mib(cfg.mem_size),
        backend.unwrap_or_default()
    );
    for r in &m.memory.regions {
        let _ = writeln!(
            s,
            "memory region  {:#012x} .. {:#012x} ({:.0} MiB)",
            r.guest_addr,
            r.guest_addr + r.size,
            mib(r.size)
        );
    }
    let st = &m.memory_stats;
    let _ = writeln!(
        s,
        "memory image   {} data pages ({:.1} MiB written), {} zero pages left as holes",
        st.data_pages,
        mib(st.data_bytes),
        st.zero_pages
    );
    for v in &open.state.vcpus {
        let _ = writeln!(
            s,
            "vcpu {:<3}       rip {:#x} rsp {:#x} cr3 {:#x} mp_state {} ({} MSRs, TSC {} kHz)",
            v.id,
            v.regs.rip,
            v.regs.rsp,
            v.sregs.cr3,
            v.mp_state.mp_state,
            v.msrs.len(),
            v.tsc_khz.map(|k| k.to_string()).unwrap_or_else(|| "?".into())
        );
    }
    let _ = writeln!(s, "files");
    for f in &m.files {
        let _ = writeln!(s, "  {:<14} {:>14} bytes  crc32 {}", f.name, f.size, f.crc32);
    }
    Ok(s)
}
