//! cevm's diagnostics on stderr: levels chosen by `--log-level` or `RUST_LOG`,
//! a timestamp and a level on every line, JSON lines on request.

use std::process::{Command, Output};

use cevm_testkit::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `cevm ARGS` with RUST_LOG set to `rust_log` (or unset).
fn cevm_env(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG");
    if let Some(v) = rust_log {
        c.env("RUST_LOG", v);
    }
    c.output().unwrap()
}

/// `cevm man --dir DIR` reports each page it writes at level info.
fn man_into(dir: &std::path::Path, extra: &[&str], rust_log: Option<&str>) -> String {
    let mut args = extra.to_vec();
    args.extend(["man", "--dir", dir.to_str().unwrap()]);
    let o = cevm_env(&args, rust_log);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stderr)
}

#[test]
fn debug_events_show_only_at_level_debug() {
    let run = |extra: &[&str], rust_log| {
        let mut args = extra.to_vec();
        args.extend(["run", "--guest", "hello"]);
        let o = cevm_env(&args, rust_log);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let event = "DEBUG cevm: instance started: 1 vCPU threads running";
    assert!(!run(&[], None).contains(event), "the default level (info) shows debug events");
    assert!(run(&["--log-level", "debug"], None).contains(event), "--log-level debug hides debug events");
    assert!(run(&[], Some("debug")).contains(event), "RUST_LOG=debug hides debug events");
    // The flag is global: after the command too.
    let o = cevm_env(&["run", "--guest", "hello", "--log-level", "debug"], None);
    assert!(text(&o.stderr).contains(event), "{}", text(&o.stderr));
}

#[test]
fn rust_log_warn_hides_info_and_the_flag_wins_over_it() {
    let dir = workdir("logs-levels");
    let wrote = format!(" INFO cevm: wrote {}", dir.join("cevm.1").display());
    let e = man_into(&dir, &[], None);
    assert!(e.contains(&wrote), "the default level hides info: {e}");
    let e = man_into(&dir, &[], Some("warn"));
    assert!(e.is_empty(), "RUST_LOG=warn shows: {e}");
    let e = man_into(&dir, &["--log-level", "error"], None);
    assert!(e.is_empty(), "--log-level error shows: {e}");
    let e = man_into(&dir, &["--log-level", "info"], Some("warn"));
    assert!(e.contains(&wrote), "--log-level info does not win over RUST_LOG=warn: {e}");
    // A RUST_LOG that does not parse is said, and the default applies.
    let e = man_into(&dir, &[], Some("cevm=loud"));
    assert!(e.contains("WARN cevm: RUST_LOG=\"cevm=loud\" ignored") && e.contains(&wrote), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line's leading RFC 3339 UTC timestamp, e.g. `2026-12-03T08:55:01.123456Z`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() >= 20
        && s.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit)
}

#[test]
fn text_lines_carry_a_timestamp_a_level_and_the_words_cevm_said() {
    let o = cevm_env(&["verify", "/nonexistent/ckpt"], None);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    let line = e.lines().next().unwrap_or_default();
    let (ts, rest) = line.split_once(' ').unwrap_or_default();
    assert!(is_timestamp(ts), "no timestamp: {line}");
    assert!(rest.starts_with("ERROR cevm: verify failed: /nonexistent/ckpt"), "{line}");
}

#[test]
fn json_format_writes_one_object_a_line_with_timestamp_level_and_message() {
    let o = cevm_env(&["--log-format", "json", "--log-level", "debug", "run", "--guest", "hello"], None);
    assert!(o.status.success());
    let f = cevm_env(&["verify", "/nonexistent/ckpt", "--log-format", "json"], None);
    assert_eq!(f.status.code(), Some(1));
    let stderr = text(&o.stderr) + &text(&f.stderr);
    let lines: Vec<_> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    let mut seen = Vec::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(is_timestamp(v["timestamp"].as_str().unwrap_or_default()), "{l}");
        let level = v["level"].as_str().unwrap_or_else(|| panic!("no level: {l}"));
        let message = v["message"].as_str().unwrap_or_else(|| panic!("no message: {l}"));
        seen.push((level.to_string(), message.to_string()));
    }
    assert!(seen.contains(&("DEBUG".into(), "instance started: 1 vCPU threads running".into())), "{seen:?}");
    assert!(seen.iter().any(|(l, m)| l == "ERROR" && m.starts_with("verify failed: /nonexistent/ckpt")), "{seen:?}");
}

#[test]
fn bad_log_level_or_format_is_a_usage_error_listing_the_values() {
    for (args, lists) in [
        (&["--log-level", "loud", "verify", "/x"][..], "off, error, warn, info, debug, trace"),
        (&["verify", "/x", "--log-format", "xml"], "text, json"),
    ] {
        let o = cevm_env(args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o.stderr).contains(lists), "{args:?}: {}", text(&o.stderr));
    }
}
