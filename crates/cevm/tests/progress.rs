//! Progress bars: drawn on a terminal (here a pseudo-terminal made by
//! util-linux `script`) and advancing through several states; never drawn
//! into a pipe.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use cevm_testkit::*;

/// Runs `cevm ARGS` with its stdout and stderr on a pseudo-terminal (`script`)
/// and returns the terminal's output once it ends.
fn on_terminal(args: &[&str]) -> Child {
    let line = std::iter::once(bin().to_str().unwrap()).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` runs")
}

fn output_of(c: Child) -> String {
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The numbers that end right before each `marker` in `out`, in order.
fn numbers_before(out: &str, marker: &str) -> Vec<u64> {
    let pieces: Vec<_> = out.split(marker).collect();
    pieces[..pieces.len().saturating_sub(1)]
        .iter()
        .filter_map(|p| {
            let digits = p.len() - p.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            p[p.len() - digits..].parse().ok()
        })
        .collect()
}

/// The distinct states of `values` in order; they must never go back.
fn states(values: &[u64], what: &str, out: &str) -> Vec<u64> {
    let mut s = values.to_vec();
    s.dedup();
    assert!(s.windows(2).all(|w| w[0] < w[1]), "{what} went back: {s:?}\n{out:?}");
    s
}

/// A VM whose memory holds `mib` MiB of data, idle; with its API at `sock`.
fn vm_with_data(mib: u32, mem: &str, sock: &Path) -> cevm::child::CevmChild {
    let args = format!("mib=1 data={mib} fill=1 idle=1");
    let mut vm = run_guest("dirtier", &args, mem, 1, Some(sock));
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).expect("the guest fills its memory");
    vm
}

#[test]
fn verify_and_restore_bars_advance_on_a_terminal_and_stay_out_of_pipes() {
    let dir = workdir("progress-verify");
    let (sock, ckpt) = (dir.join("api.sock"), dir.join("ckpt"));
    let mut vm = vm_with_data(256, "300M", &sock);
    checkpoint(&sock, &ckpt, true).unwrap();
    assert!(vm.finish(T).unwrap().success());

    let out = output_of(on_terminal(&["verify", ckpt.to_str().unwrap()]));
    assert!(out.contains("verifying") && out.contains(": OK"), "{out:?}");
    let pct = states(&numbers_before(&out, "%"), "verify's percentage", &out);
    assert!(pct.len() >= 3, "verify's bar did not advance: {pct:?}\n{out:?}");
    // In a pipe: the same answer, no bar.
    let piped = cevm(&["verify", ckpt.to_str().unwrap()]);
    assert!(piped.status.success() && piped.stderr.is_empty(), "{}", String::from_utf8_lossy(&piped.stderr));

    let sock2 = dir.join("restored.sock");
    let restored = on_terminal(&["restore", ckpt.to_str().unwrap(), "--api-sock", sock2.to_str().unwrap()]);
    wait_for_file(&sock2);
    // The API serves from before the restore: quit once the guest runs.
    let deadline = std::time::Instant::now() + T;
    while api(&sock2).status().map(|s| s.state).ok().as_deref() != Some("running") {
        assert!(std::time::Instant::now() < deadline, "the restored VM never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    api(&sock2).quit().unwrap();
    let out = output_of(restored);
    assert!(out.contains("restoring") && out.contains("cevm: restored"), "{out:?}");
    let before_restored = out.split("cevm: restored").next().unwrap();
    let pct = states(&numbers_before(before_restored, "%"), "restore's percentage", &out);
    assert!(pct.len() >= 3, "restore's bar did not advance: {pct:?}\n{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_migration_bar_counts_pages_sent_on_a_terminal() {
    let dir = workdir("progress-migrate");
    let sock = dir.join("api.sock");
    let mut vm = vm_with_data(64, "100M", &sock);
    // A bandwidth cap makes the copy take seconds, so that the bar shows it.
    let args = ["migrate", "--api-sock", sock.to_str().unwrap(), "--to", "local", "--max-bandwidth-mib-s", "16"];
    let out = output_of(on_terminal(&args));
    let pages = numbers_before(&out, "/25600 pages");
    let sent = states(&pages, "pages sent", &out);
    assert!(sent.len() >= 3, "the migration bar did not advance: {sent:?}\n{out:?}");
    assert!(out.contains("\"pages_sent\""), "no report: {out:?}");
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}
