//! The `cevm` binary's diagnostics: one `tracing` subscriber writing to stderr.
//!
//! Every crate of the VMM reports through `tracing` events (`tracing::info!` and
//! so on); this module installs the one subscriber that prints them: a level
//! filter from `--log-level` or `RUST_LOG`, a timestamp on every line, and
//! either text (the default, for people) or JSON lines (for log shippers).
//! Dependencies that log through the `log` crate (virtio-queue does) come
//! through too: `try_init` installs `tracing-log`'s bridge.
//!
//! The guest console (stdout) is no log and does not pass through here.

use std::fmt;

use clap::ValueEnum;
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The most detailed level printed (`--log-level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// nothing at all
    Off,
    /// only errors
    Error,
    /// errors and warnings (a checkpoint skipped, a repair made)
    Warn,
    /// what the VMM does: checkpoints committed, restores, migrations (default)
    Info,
    /// details for a bug report
    Debug,
    /// everything, dependencies' chatter included
    Trace,
}

impl Level {
    fn directive(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// How each line looks (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `TIMESTAMP LEVEL cevm: message` (default)
    #[default]
    Text,
    /// one JSON object a line: timestamp, level, target, message and the event's fields
    Json,
}

/// The filter: `--log-level` when given decides alone; otherwise `RUST_LOG`
/// when set (its full syntax, e.g. `warn,checkpoint=debug`); otherwise `info`.
/// The second value is a warning to print once the subscriber runs (a bad
/// `RUST_LOG`, whose valid parts still apply).
fn filter(level: Option<Level>) -> (EnvFilter, Option<String>) {
    if let Some(l) = level {
        return (EnvFilter::new(l.directive()), None);
    }
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(Level::Info.directive()), Some(format!("RUST_LOG={spec:?} ignored: {e}"))),
        },
        _ => (EnvFilter::new(Level::Info.directive()), None),
    }
}

/// Installs the subscriber for the rest of the process. A second call (or a
/// subscriber already set) changes nothing.
pub fn init(level: Option<Level>, format: Format) {
    install(level, format, std::io::stderr);
}

/// [`init`], writing to `writer` (stderr, or a test's buffer).
fn install<W>(level: Option<Level>, format: Format, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let (filter, warning) = filter(level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let installed = match format {
        Format::Text => builder.event_format(Text).try_init(),
        Format::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    if installed.is_ok() {
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
    }
}

/// The crates of cevm: their events read `cevm: message`, a dependency's
/// `cevm: TARGET: message`.
const OURS: [&str; 9] = ["cevm", "vmm", "checkpoint", "migrate", "disk", "snapshot", "devices", "sandbox", "guests"];

/// The text format: `2026-12-03T08:55:01.123456Z  INFO cevm: checkpoint 1
/// committed to /ckpt`. Hand-written (a dozen lines) because the stock formats
/// print the event's module path (`cevm::controller:`) where scripts and tests
/// that read cevm's stderr look for the words `cevm: ...`.
struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // A `log` record's own target (virtio_queue::queue), not the bridge's (`log`).
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        SystemTime.format_time(&mut w)?;
        write!(w, " {:>5} cevm: ", meta.level())?;
        let target = meta.target();
        let crate_name = target.split("::").next().unwrap_or(target);
        if !OURS.contains(&crate_name) {
            write!(w, "{target}: ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A buffer the subscriber writes into.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A dependency logging through the `log` crate (as virtio-queue does) is
    /// printed like cevm's own events, its target named, at the level chosen.
    /// (The only test here that installs the process-wide subscriber.)
    #[test]
    fn log_crate_records_of_dependencies_come_through_the_subscriber() {
        let buf = Buffer::default();
        let b = buf.clone();
        install(Some(Level::Info), Format::Text, move || b.clone());
        log::warn!(target: "virtio_queue::queue", "a descriptor chain is too long");
        log::debug!(target: "virtio_queue::queue", "details nobody asked for");
        tracing::info!("cevm's own");
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].ends_with(" WARN cevm: virtio_queue::queue: a descriptor chain is too long"), "{out}");
        assert!(lines[1].ends_with(" INFO cevm: cevm's own"), "{out}");
    }
}
