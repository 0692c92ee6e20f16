//! The report of `cevm bench all`: markdown tables and plots (SVG and PNG, with
//! `plotters`), and the README's headline table, all computed from one results
//! file. Nothing here is typed in by hand: every figure is a median (with
//! min-max) of that run's samples, and every comparison a ratio within it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::compare::{Method, QemuMethod, Sample, Workload};
use crate::results::{AllResults, LinuxPart, TurnaroundPart};
use crate::stats::median_min_max;
use checkpoint::Method as Cevm;

const MIB: f64 = 1048576.0;
const BEGIN: &str = "<!-- bench:headline:begin -->";
const END: &str = "<!-- bench:headline:end -->";

/// Writes `STEM.md` and the plots in `STEM/`; replaces the README's headline.
pub fn write(r: &AllResults, stem: &Path, readme: Option<&Path>) -> Result<(), String> {
    let plots_dir = stem.to_path_buf();
    std::fs::create_dir_all(&plots_dir).map_err(|e| format!("{}: {e}", plots_dir.display()))?;
    let plots = plot_all(r, &plots_dir)?;
    let name = |p: &Path| p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let md_path = format!("{}.md", stem.display());
    let md = markdown(r, &name(stem), &plots);
    std::fs::write(&md_path, md).map_err(|e| format!("{md_path}: {e}"))?;
    println!("bench all: report in {md_path}, plots in {}", plots_dir.display());
    if let (Some(readme), Some(l)) = (readme, &r.linux) {
        let text = std::fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
        let rel = Path::new(&md_path)
            .strip_prefix(readme.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| md_path.clone());
        let intro = format!(
            "From [{}]({rel}) ({} run of `cevm bench all`, {}; {}):\n\n",
            name(Path::new(&md_path)),
            if r.quick { "quick" } else { "full" },
            r.started,
            l.environment.split(':').next().unwrap_or_default()
        );
        let new = replace_headline(&text, &(intro + &headline(l)))
            .ok_or_else(|| format!("{} has no {BEGIN} ... {END} markers for the headline", readme.display()))?;
        std::fs::write(readme, new).map_err(|e| format!("{}: {e}", readme.display()))?;
        println!("bench all: headline table in {}", readme.display());
    }
    Ok(())
}

/// `text` with what lies between the headline markers replaced by `block`.
fn replace_headline(text: &str, block: &str) -> Option<String> {
    let a = text.find(BEGIN)?;
    let b = a + text[a..].find(END)?;
    Some(format!("{}{BEGIN}\n{block}{}", &text[..a], &text[b..]))
}

fn med(v: &[f64]) -> (f64, f64, f64) {
    median_min_max(v)
}

/// "median (min-max)" with `p` decimals.
fn mmm(v: &[f64], p: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, a, b) = med(v);
    if v.len() == 1 {
        return format!("{m:.p$}");
    }
    format!("{m:.p$} ({a:.p$}-{b:.p$})")
}

fn samples(l: &LinuxPart, m: Method, mem: u64, w: Workload) -> Vec<&Sample> {
    l.results.samples.iter().filter(|s| s.method == m && s.mem_mib == mem && s.workload == w).collect()
}

fn methods(l: &LinuxPart) -> Vec<Method> {
    let mut all: Vec<Method> = Method::CEVM.iter().chain(Method::QEMU.iter()).copied().collect();
    all.retain(|m| l.results.samples.iter().any(|s| s.method == *m));
    all
}

fn sizes(l: &LinuxPart) -> Vec<u64> {
    l.results.samples.iter().map(|s| s.mem_mib).collect::<BTreeSet<_>>().into_iter().collect()
}

/// The dirty rate measured at the most sizes (the headline's "dirtying").
fn main_rate(l: &LinuxPart) -> Option<u64> {
    let rates: BTreeSet<u64> = l.results.samples.iter().map(|s| s.workload.rate()).filter(|&r| r > 0).collect();
    rates.into_iter().max_by_key(|&r| {
        l.results.samples.iter().filter(|s| s.workload.rate() == r).map(|s| s.mem_mib).collect::<BTreeSet<_>>().len()
    })
}

fn dirty(rate: u64) -> Workload {
    Workload::Dirty(rate)
}

fn downtimes(v: &[&Sample]) -> Vec<f64> {
    v.iter().map(|s| s.downtime_ms).collect()
}

fn totals(v: &[&Sample]) -> Vec<f64> {
    v.iter().map(|s| s.total_ms).collect()
}

/// "Medians of 5 runs"; a plan of one run has no median to speak of.
fn medians_of(runs: usize) -> String {
    if runs == 1 {
        "One run each".into()
    } else {
        format!("Medians of {runs} runs")
    }
}

/// Downtime and checkpoint time of every method, per size, idle and dirtying.
fn headline(l: &LinuxPart) -> String {
    let mut s = String::new();
    let rate = main_rate(l);
    let works: Vec<Workload> = std::iter::once(Workload::Idle).chain(rate.map(dirty)).collect();
    let _ = writeln!(
        s,
        "Linux guest, 1 vCPU, {}% of memory filled with data; dirtying = {} pages/s rewritten over {} MiB. \
         Downtime: the guest's pause as each VMM reports it (stop-and-save: the whole pause). \
         Time: request to the checkpoint on storage (migrations: to the guest running at the destination). \
         {}, ms.\n",
        l.results.fill_pct,
        rate.map(|r| r.to_string()).unwrap_or("-".into()),
        l.results.ws_mib,
        medians_of(l.results.runs)
    );
    // The two largest sizes: a README-wide table.
    let all_sizes = sizes(l);
    let sz = &all_sizes[all_sizes.len().saturating_sub(2)..];
    let _ = write!(s, "| method |");
    for &mem in sz {
        for w in &works {
            let _ = write!(s, " {mem} MiB {} downtime | time |", if *w == Workload::Idle { "idle" } else { "dirty" });
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|---|".repeat(sz.len() * works.len()));
    for m in methods(l) {
        let _ = write!(s, "| {} |", m.label());
        for &mem in sz {
            for &w in &works {
                let v = samples(l, m, mem, w);
                let fmt = |x: f64| if x < 10.0 { format!("{x:.2}") } else { format!("{x:.0}") };
                if v.is_empty() {
                    let _ = write!(s, " - | - |");
                } else {
                    let _ = write!(s, " {} | {} |", fmt(med(&downtimes(&v)).0), fmt(med(&totals(&v)).0));
                }
            }
        }
        let _ = writeln!(s);
    }
    s
}

/// Ratios within the run: CEVM against QEMU's methods, per case.
fn ratios(l: &LinuxPart) -> String {
    let mut s = String::new();
    let cases: BTreeSet<(u64, u64)> = l.results.samples.iter().map(|x| (x.mem_mib, x.workload.rate())).collect();
    for (mem, rate) in cases {
        let w = if rate == 0 { Workload::Idle } else { Workload::Dirty(rate) };
        let d = |m: Method| {
            let v = samples(l, m, mem, w);
            (!v.is_empty()).then(|| (med(&downtimes(&v)).0, med(&totals(&v)).0))
        };
        let Some((cd, _)) = d(Method::Cevm(Cevm::CevmThread)) else { continue };
        let mut parts = Vec::new();
        for q in Method::QEMU {
            if let Some((qd, _)) = d(q) {
                parts.push(format!("{:.3}× {}'s", cd / qd.max(1e-9), q.label()));
            }
        }
        if let Some((sd, _)) = d(Method::Cevm(Cevm::StopAndSave)) {
            parts.push(format!("{:.4}× cevm stop-and-save's", cd / sd.max(1e-9)));
        }
        if !parts.is_empty() {
            let _ = writeln!(s, "- {mem} MiB, {w}: CEVM (thread) downtime = {}.", parts.join(", "));
        }
    }
    s
}

fn case_table(l: &LinuxPart, mem: u64, w: Workload) -> String {
    let lim = &l.results.limits;
    let mut s = String::new();
    let _ = writeln!(s, "| method | downtime ms | QEMU's own downtime ms | guest-visible pause ms | quiet-stream jitter ms | request to answer ms | on storage MiB | memory MiB/s (% of limit) | restore ms |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for m in methods(l) {
        let v = samples(l, m, mem, w);
        if v.is_empty() {
            continue;
        }
        let pause: Vec<f64> = v.iter().map(|x| x.guest_pause_ms).collect();
        let quiet: Vec<f64> = v.iter().map(|x| x.quiet_gap_ms).collect();
        let size: Vec<f64> = v.iter().filter_map(|x| x.size_bytes).map(|b| b as f64 / MIB).collect();
        let thr: Vec<f64> =
            v.iter().filter_map(|x| x.memory_bytes.map(|b| b as f64 / MIB / (x.total_ms / 1e3))).collect();
        let restore: Vec<f64> = v.iter().filter_map(|x| x.restore_ms).collect();
        let qemu_own: Vec<f64> = v.iter().filter_map(|x| x.qemu_reported_downtime_ms).collect();
        // A checkpoint goes to storage; a migration from memory to memory.
        let (limit, what) = if m.writes_checkpoint() { (lim.write(), "write") } else { (lim.memcpy(), "memcpy") };
        let t = med(&thr).0;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.label(),
            mmm(&downtimes(&v), 2),
            mmm(&qemu_own, 0),
            mmm(&pause, 1),
            mmm(&quiet, 1),
            mmm(&totals(&v), 0),
            mmm(&size, 0),
            if thr.is_empty() { "-".into() } else { format!("{t:.0} ({:.0} % of {what})", t / limit * 100.0) },
            mmm(&restore, 0),
        );
    }
    s
}

struct Plots {
    files: Vec<(String, String)>,
}

fn markdown(r: &AllResults, stem_name: &str, plots: &Plots) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# cevm benchmark report: {}, {}\n", r.started, r.machine.host);
    let _ = writeln!(
        s,
        "`cevm bench all{}` ran for {:.1} min. Every figure below was measured in this run and computed from \
         its samples in [`{stem_name}.json`]({stem_name}.json): medians with (min-max), comparisons as ratios \
         within the run.{}\n",
        if r.quick { " --quick" } else { "" },
        r.duration_s / 60.0,
        if r.quick {
            " **Quick plan**: fewer guests and runs than the full plan; for a smoke check, not for conclusions."
        } else {
            ""
        }
    );
    for f in &r.not_measured {
        let _ = writeln!(s, "**Not measured**: {f}\n");
    }
    if !r.not_reached.is_empty() {
        let _ = writeln!(
            s,
            "**Not finished**: when this report was written, the run had not reached {} (it was still running, or was stopped); what follows is what it had measured until then.\n",
            r.not_reached.join(", ")
        );
    }
    let m = &r.machine;
    let v = &r.versions;
    let _ = writeln!(s, "## Machine and versions\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| host | {} |", m.host);
    let _ = writeln!(s, "| CPU | {} ({} CPUs), {:.1} GiB RAM |", m.cpu, m.cpus, m.mem_gib);
    let _ = writeln!(s, "| /dev/kvm | {} |", m.kvm);
    let _ = writeln!(s, "| host kernel | {} |", m.kernel);
    let _ = writeln!(s, "| cevm | {} (git {}) |", v.cevm, v.git);
    let _ = writeln!(s, "| rustc | {} |", v.rustc);
    let _ = writeln!(s, "| QEMU | {} |", v.qemu.as_deref().unwrap_or("not measured"));
    let _ = writeln!(s, "| placement | {} |\n", r.placement);

    let _ = writeln!(s, "## Physical limits (same run)\n");
    let _ = writeln!(
        s,
        "| where | checkpoint file system | memcpy MiB/s | sequential write + fdatasync MiB/s |\n|---|---|---|---|"
    );
    let lim = |s: &mut String, w: &str, l: &crate::host::Limits| {
        let _ = writeln!(s, "| {w} | {} | {} | {} |", l.fs, mmm(&l.memcpy_mib_s, 0), mmm(&l.write_fdatasync_mib_s, 0));
    };
    lim(&mut s, "this host", &r.host_limits);
    if let Some(l) = &r.linux {
        lim(&mut s, "where the Linux guests ran", &l.results.limits);
    }
    let _ = writeln!(s);

    if let Some(l) = &r.linux {
        let _ = writeln!(s, "## cevm and QEMU on the same Linux guest\n");
        let _ = writeln!(s, "- Environment: {}.", l.environment);
        let _ = writeln!(s, "- Guest: {}, 1 vCPU, the initramfs of `scripts/nested/guest-initrd.sh` running `cevm-work` (guest-linux/work.c): it fills {}% of guest memory with data, then rewrites one word per page of a {} MiB working set at the set rate (idle: no writes), and prints a heartbeat every {} ms. Both VMMs boot the same kernel, initramfs and command line.", l.guest_kernel, l.results.fill_pct, l.results.ws_mib, l.results.beat_ms);
        let _ = writeln!(s, "- cevm: driven through its API as a user drives it (`cevm run`, `cevm checkpoint`, `cevm migrate`, `cevm run --incoming`), default settings (1 ms page budget, no bandwidth cap, nothing pinned).");
        let _ = writeln!(s, "- QEMU ({}): over QMP, `downtime-limit` 1 ms and `max-bandwidth` 1 TiB/s (no cap, as cevm) for every method, auto-converge on for the live migration (as cevm); files are written through `exec:cat` (QEMU 7.2 has no `file:` URI). Stop-and-save = `stop`, `migrate` to a file, `cont`; live migration = to a second QEMU over a unix socket, the guest then runs on there; background-snapshot = `migrate` to a file with the `background-snapshot` capability.", r.versions.qemu.as_deref().unwrap_or("?"));
        let _ = writeln!(s, "- Downtime: as each VMM reports it (cevm's `pause_ms` / `downtime_ms`; QEMU's `downtime` from `query-migrate`, whole ms); for QEMU's stop-and-save, from `stop` to `cont` returning. Guest-visible pause: the longest gap between the guest's heartbeats as they arrived at the benchmark, from the request to 0.5 s after the answer, less one beat; the quiet-stream jitter is the same in the second before the request. Restore: from starting the VMM on the checkpoint to the restored guest's first heartbeat (stop-and-save checkpoints; cevm's checkpoints of every strategy have the same format).");
        let _ = writeln!(
            s,
            "- {} run{} per method and guest; per guest, the methods take turns within each run.\n",
            l.results.runs,
            if l.results.runs == 1 { "" } else { "s" }
        );
        for f in &l.failed {
            let _ = writeln!(s, "**Not measured** (the nested harness failed at every attempt): {f}\n");
        }
        let _ = writeln!(s, "### Headline\n");
        s.push_str(&headline(l));
        let _ = writeln!(s, "\nWithin the run:\n");
        s.push_str(&ratios(l));
        let cases: BTreeSet<(u64, u64)> = l.results.samples.iter().map(|x| (x.mem_mib, x.workload.rate())).collect();
        for (mem, rate) in cases {
            let w = if rate == 0 { Workload::Idle } else { Workload::Dirty(rate) };
            let _ = writeln!(s, "\n### {mem} MiB, {w}\n");
            s.push_str(&case_table(l, mem, w));
        }
        let _ = writeln!(s, "\n(memory MiB/s: guest memory bytes the checkpoint or migration carried, per second of request to answer; as % of the write + fdatasync limit for checkpoints, of memcpy for migrations.)\n");
    }
    if let Some(t) = &r.turnaround {
        s.push_str(&turnaround_md(t));
    }
    let _ = writeln!(s, "## Plots\n");
    for (title, file) in &plots.files {
        let _ = writeln!(s, "### {title}\n\n![{title}]({stem_name}/{file}.svg)\n\n([PNG]({stem_name}/{file}.png))\n");
    }
    s
}

/// One strategy at one n, a sample per round.
struct TurnRow {
    strategy: Cevm,
    n: usize,
    /// Per checkpoint, ms, against the round's own baseline.
    cost: Vec<f64>,
    t_o: Vec<f64>,
    /// Job time + T_o, s.
    turnaround: Vec<f64>,
    downtimes: Vec<f64>,
}

/// T_comp (median) and the rows.
fn turnaround_rows(t: &TurnaroundPart) -> (f64, Vec<TurnRow>) {
    let base: Vec<&crate::turnaround::Run> = t.runs.iter().filter(|r| r.strategy.is_none()).collect();
    let t_comp = med(&base.iter().map(|r| r.t_run).collect::<Vec<_>>()).0;
    let mut rows = Vec::new();
    let ns: BTreeSet<usize> = t.runs.iter().filter(|r| r.strategy.is_some()).map(|r| r.n).collect();
    for s in [Cevm::StopAndSave, Cevm::MigrateThread, Cevm::CevmThread, Cevm::CevmProcess] {
        for &n in &ns {
            let mine: Vec<&crate::turnaround::Run> =
                t.runs.iter().filter(|r| r.strategy == Some(s) && r.n == n).collect();
            if mine.is_empty() {
                continue;
            }
            let b = |r: &crate::turnaround::Run| base.iter().find(|b| b.round == r.round).map_or(t_comp, |b| b.t_run);
            let cost: Vec<f64> = mine.iter().map(|r| (r.t_run - b(r)) * 1e3 / n as f64).collect();
            let t_o: Vec<f64> = mine.iter().map(|r| r.t_o * 1e3).collect();
            let turn: Vec<f64> = mine.iter().map(|r| r.t_run + r.t_o).collect();
            let down: Vec<f64> = mine.iter().flat_map(|r| r.downtimes_ms.clone()).collect();
            rows.push(TurnRow { strategy: s, n, cost, t_o, turnaround: turn, downtimes: down });
        }
    }
    (t_comp, rows)
}

fn turnaround_md(t: &TurnaroundPart) -> String {
    let mut s = String::new();
    let (t_comp, rows) = turnaround_rows(t);
    let _ = writeln!(s, "## Turnaround with n checkpoints (the seed's formulas), this host's /dev/kvm\n");
    let _ = writeln!(s, "The job: the built-in dirtier guest, {} MiB, {} MiB of data, writing {} pages/s over a {} MiB working set for {} s of work (a pause is not made up: it delays the end). n checkpoints spread evenly, through the API of a real `cevm run`; baseline T_comp = {t_comp:.3} s (median). Cost per checkpoint = (job time - that round's T_comp) / n: the seed's T_cpt (stop-and-save), T_mg (migration only), T_cevm (CEVM); T_o = how long the last checkpoint was still being written after the job ended; turnaround = job time + T_o = T_comp + n·T_x + T_o. {} rounds.\n",
        t.mem_mib, t.data_mib, t.rate, t.ws_mib, t.seconds,
        t.runs.iter().map(|r| r.round).collect::<BTreeSet<_>>().len());
    let _ = writeln!(s, "| strategy | n | cost per checkpoint ms | T_o ms | turnaround s | downtime per checkpoint ms |\n|---|---|---|---|---|---|");
    for x in &rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            x.strategy,
            x.n,
            mmm(&x.cost, 1),
            mmm(&x.t_o, 1),
            mmm(&x.turnaround, 3),
            mmm(&x.downtimes, 2)
        );
    }
    let _ = writeln!(s, "\n(The job's pacing absorbs a pause shorter than 1 ms, so a cost below about 1 ms per checkpoint reads as 0: compare those by their downtime.)\n");
    s
}

// ---- plots ----

type Series = Vec<(String, Vec<(f64, f64)>)>;

struct Chart<'a> {
    file: &'a str,
    title: &'a str,
    x: &'a str,
    y: &'a str,
    log_y: bool,
    series: Series,
}

fn font() -> Result<(), String> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // plotters' ab_glyph text needs a TrueType font; Debian's fonts-dejavu-core
        // (installed by scripts/setup.sh) has one.
        let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
        let bytes =
            std::fs::read(path).map_err(|e| format!("{path}: {e} (install fonts-dejavu-core: scripts/setup.sh)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Chart<'_>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("plot {}: {e:?}", c.file);
    root.fill(&WHITE).map_err(e)?;
    let pts = c.series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        if !c.log_y || y > 0.0 {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.1, 1.0);
    }
    if x0 == x1 {
        (x0, x1) = (x0 * 0.5, x1 * 1.5 + 1.0);
    }
    let pad = (x1 - x0) * 0.03;
    let mut b = ChartBuilder::on(&root);
    b.caption(c.title, ("sans-serif", 22)).margin(12).x_label_area_size(45).y_label_area_size(70);
    let style = |i: usize| Palette99::pick(i).stroke_width(2);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc(c.x).y_desc(c.y).label_style(("sans-serif", 14)).draw().map_err(e)?;
            for (i, (name, p)) in c.series.iter().enumerate() {
                let p: Vec<(f64, f64)> = p.iter().copied().filter(|&(_, y)| !c.log_y || y > 0.0).collect();
                chart
                    .draw_series(LineSeries::new(p.clone(), style(i)))
                    .map_err(e)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style(i)));
                if p.len() < 40 {
                    chart.draw_series(p.iter().map(|&q| Circle::new(q, 3, style(i).filled()))).map_err(e)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(e)?;
        }};
    }
    if c.log_y {
        let (lo, hi) = (y0.max(1e-3) / 1.5, y1 * 3.0);
        body!(b.build_cartesian_2d((x0 - pad)..(x1 + pad), (lo..hi).log_scale()).map_err(e)?);
    } else {
        let (lo, hi) = (y0.min(0.0), y1 + (y1 - y0.min(0.0)).abs() * 0.35 + 1e-9);
        body!(b.build_cartesian_2d((x0 - pad)..(x1 + pad), lo..hi).map_err(e)?);
    }
    root.present().map_err(e)?;
    Ok(())
}

fn plot(dir: &Path, c: &Chart<'_>, out: &mut Plots) -> Result<(), String> {
    if c.series.iter().all(|(_, p)| p.is_empty()) {
        return Ok(());
    }
    let svg = dir.join(format!("{}.svg", c.file));
    draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), c)?;
    let png = dir.join(format!("{}.png", c.file));
    draw(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), c)?;
    out.files.push((c.title.to_string(), c.file.to_string()));
    Ok(())
}

/// Median of `f` per size, for one method and workload.
fn per_size(l: &LinuxPart, m: Method, w: Workload, f: impl Fn(&Sample) -> Option<f64>) -> Vec<(f64, f64)> {
    sizes(l)
        .into_iter()
        .filter_map(|mem| {
            let v: Vec<f64> = samples(l, m, mem, w).into_iter().filter_map(&f).collect();
            (!v.is_empty()).then(|| (mem as f64, med(&v).0))
        })
        .collect()
}

fn plot_all(r: &AllResults, dir: &Path) -> Result<Plots, String> {
    font()?;
    let mut out = Plots { files: Vec::new() };
    if let Some(l) = &r.linux {
        plot_against_memory(l, dir, &mut out)?;
        plot_downtime_vs_rate(l, dir, &mut out)?;
        plot_progress_around_checkpoint(l, dir, &mut out)?;
    }
    if let Some(t) = &r.turnaround {
        plot_turnaround(t, dir, &mut out)?;
    }
    Ok(out)
}

/// The Linux-guest comparison against guest memory: downtime (idle and
/// dirtying), checkpoint time and size, restore time.
fn plot_against_memory(l: &LinuxPart, dir: &Path, out: &mut Plots) -> Result<(), String> {
    let ms = methods(l);
    let rate = main_rate(l);
    for (w, tag) in [(Some(Workload::Idle), "idle"), (rate.map(dirty), "dirty")] {
        let Some(w) = w else { continue };
        let title = format!("Downtime vs guest memory, Linux guest, {w}");
        plot(
            dir,
            &Chart {
                file: &format!("downtime-vs-memory-{tag}"),
                title: &title,
                x: "guest memory (MiB)",
                y: "downtime (ms, log)",
                log_y: true,
                series: ms
                    .iter()
                    .map(|&m| (m.label().to_string(), per_size(l, m, w, |s| Some(s.downtime_ms))))
                    .collect(),
            },
            out,
        )?;
    }
    if let Some(w) = rate.map(dirty) {
        let title = format!(
            "Checkpoint time vs guest memory, {w} (request to on storage; migrations: to running at the destination)"
        );
        plot(
            dir,
            &Chart {
                file: "time-vs-memory",
                title: &title,
                x: "guest memory (MiB)",
                y: "request to answer (ms, log)",
                log_y: true,
                series: ms.iter().map(|&m| (m.label().to_string(), per_size(l, m, w, |s| Some(s.total_ms)))).collect(),
            },
            out,
        )?;
        plot(
            dir,
            &Chart {
                file: "size-vs-memory",
                title: &format!("Checkpoint size vs guest memory, {w}"),
                x: "guest memory (MiB)",
                y: "on storage (MiB)",
                log_y: false,
                series: ms
                    .iter()
                    .filter(|m| m.writes_checkpoint())
                    .map(|&m| (m.label().to_string(), per_size(l, m, w, |s| s.size_bytes.map(|b| b as f64 / MIB))))
                    .collect(),
            },
            out,
        )?;
    }
    plot(
        dir,
        &Chart {
            file: "restore-vs-memory",
            title: "Restore: VMM start to the guest's first heartbeat, idle guest",
            x: "guest memory (MiB)",
            y: "ms",
            log_y: false,
            series: [Method::Cevm(Cevm::StopAndSave), Method::Qemu(QemuMethod::StopAndSave)]
                .iter()
                .map(|&m| (m.label().to_string(), per_size(l, m, Workload::Idle, |s| s.restore_ms)))
                .collect(),
        },
        out,
    )?;
    Ok(())
}

/// Downtime against the dirty rate, at the size with the most rates (when it
/// has more than two).
fn plot_downtime_vs_rate(l: &LinuxPart, dir: &Path, out: &mut Plots) -> Result<(), String> {
    let ms = methods(l);
    // Downtime against the dirty rate, at the size with the most rates.
    let sz = sizes(l);
    let rates_at = |mem: u64| {
        l.results.samples.iter().filter(|s| s.mem_mib == mem).map(|s| s.workload.rate()).collect::<BTreeSet<_>>()
    };
    if let Some(&mem) = sz.iter().max_by_key(|&&m| (rates_at(m).len(), m)) {
        let rates = rates_at(mem);
        if rates.len() > 2 {
            let series = ms
                .iter()
                .map(|&m| {
                    let p = rates
                        .iter()
                        .filter_map(|&rt| {
                            let w = if rt == 0 { Workload::Idle } else { Workload::Dirty(rt) };
                            let v = downtimes(&samples(l, m, mem, w));
                            (!v.is_empty()).then(|| (rt as f64, med(&v).0))
                        })
                        .collect();
                    (m.label().to_string(), p)
                })
                .collect();
            plot(
                dir,
                &Chart {
                    file: "downtime-vs-rate",
                    title: &format!("Downtime vs dirty rate, Linux guest, {mem} MiB"),
                    x: "pages written per second (0 = idle)",
                    y: "downtime (ms, log)",
                    log_y: true,
                    series,
                },
                out,
            )?;
        }
    }
    Ok(())
}

/// The guest's progress around a checkpoint, per method: largest size,
/// dirtying at the main rate, first run.
fn plot_progress_around_checkpoint(l: &LinuxPart, dir: &Path, out: &mut Plots) -> Result<(), String> {
    let ms = methods(l);
    let rate = main_rate(l);
    let sz = sizes(l);
    // The guest's progress around a checkpoint: largest size, dirtying, first run.
    if let (Some(rate), Some(&mem)) = (rate, sz.last()) {
        let bin = 100.0;
        let series = ms
            .iter()
            .filter_map(|&m| {
                let s = samples(l, m, mem, dirty(rate)).into_iter().find(|s| s.run == 0)?;
                let mut p = Vec::new();
                let b = &s.beats;
                if b.is_empty() {
                    return None;
                }
                let mut t = b[0].ms;
                while t + bin <= b[b.len() - 1].ms {
                    // Pages written in [t, t + bin), by the beats' counts.
                    let at = |x: f64| {
                        let j = b.iter().rposition(|q| q.ms <= x).unwrap_or(0);
                        b[j].pages as f64
                    };
                    let pages = at(t + bin) - at(t);
                    p.push(((t + bin / 2.0) / 1e3, pages / (bin / 1e3) / rate as f64 * 100.0));
                    t += bin;
                }
                Some((m.label().to_string(), p))
            })
            .collect();
        plot(
            dir,
            &Chart {
                file: "progress-around-checkpoint",
                title: &format!("Guest progress around a checkpoint, {mem} MiB, {rate} pages/s (0 s = request)"),
                x: "seconds from the request",
                y: "pages written, % of the set rate (100 ms bins)",
                log_y: false,
                series,
            },
            out,
        )?;
    }
    Ok(())
}

/// The turnaround of a job against the number of checkpoints, per method.
fn plot_turnaround(t: &TurnaroundPart, dir: &Path, out: &mut Plots) -> Result<(), String> {
    let (t_comp, rows) = turnaround_rows(t);
    let mut series: Series = Vec::new();
    for st in [Cevm::StopAndSave, Cevm::MigrateThread, Cevm::CevmThread, Cevm::CevmProcess] {
        let mut p: Vec<(f64, f64)> = vec![(0.0, t_comp)];
        p.extend(rows.iter().filter(|x| x.strategy == st).map(|x| (x.n as f64, med(&x.turnaround).0)));
        if p.len() > 1 {
            series.push((st.to_string(), p));
        }
    }
    plot(
        dir,
        &Chart {
            file: "turnaround-vs-n",
            title: &format!(
                "Turnaround of a {} s job vs checkpoints n ({} MiB guest, this host)",
                t.seconds, t.mem_mib
            ),
            x: "checkpoints n",
            y: "turnaround (s)",
            log_y: false,
            series,
        },
        out,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_replaces_only_between_the_markers() {
        let text = format!("intro\n{BEGIN}\nold table\n{END}\noutro {END}\n");
        let new = replace_headline(&text, "| a |\n").expect("markers present");
        assert_eq!(new, format!("intro\n{BEGIN}\n| a |\n{END}\noutro {END}\n"));
        assert_eq!(replace_headline("no markers", "x"), None);
        assert_eq!(replace_headline(&format!("{END} then {BEGIN}"), "x"), None);
    }

    #[test]
    fn mmm_formats_median_and_range() {
        assert_eq!(mmm(&[3.0, 1.0, 2.0], 1), "2.0 (1.0-3.0)");
        assert_eq!(mmm(&[4.0, 1.0], 0), "2 (1-4)");
        assert_eq!(mmm(&[5.25], 2), "5.25");
        assert_eq!(mmm(&[], 2), "-");
    }
}
