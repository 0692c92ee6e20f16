//! What cevm's integration tests share: they drive the real `cevm` binary
//! through its command line and its typed API client, and assert on what its
//! guests print.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cevm::api::{CheckpointRequest, Client, ClientError};
use cevm::child::{digest_of, CevmChild};
use serde_json::Value;

/// Generous timeout for anything a guest does (these machines emulate guest code).
pub const T: Duration = Duration::from_secs(240);

/// The cevm binary under test: the one cargo built beside the test program
/// (target/<profile>/cevm, the test being target/<profile>/deps/<test>).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test program's path");
        let profile = exe.parent().and_then(Path::parent).expect("a test program lives in target/<profile>/deps");
        let bin = profile.join("cevm");
        assert!(bin.is_file(), "{} is missing: the tests need the cevm binary (cargo test builds it)", bin.display());
        bin
    })
}

/// A fresh, empty work directory for one test.
pub fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cevm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `cevm run` of a built-in guest, console captured; with an API socket if given.
pub fn run_guest(guest: &str, args: &str, mem: &str, vcpus: u32, sock: Option<&Path>) -> CevmChild {
    let vcpus = vcpus.to_string();
    let mut a = vec!["run", "--guest", guest, "--guest-args", args, "--mem", mem, "--vcpus", &vcpus];
    if let Some(s) = sock {
        a.extend(["--api-sock", s.to_str().unwrap()]);
    }
    CevmChild::spawn(bin(), &a, None).unwrap()
}

/// `cevm restore DIR`, console captured; with an API socket if given.
pub fn restore(dir: &Path, sock: Option<&Path>) -> CevmChild {
    let mut a = vec!["restore", dir.to_str().unwrap()];
    if let Some(s) = sock {
        a.extend(["--api-sock", s.to_str().unwrap()]);
    }
    CevmChild::spawn(bin(), &a, None).unwrap()
}

/// Reads a guest's console to its `digest=` line and returns the digest; the run
/// must then exit 0.
pub fn digest_to_end(c: &mut CevmChild) -> String {
    let line = c.wait_line(T, |l| digest_of(l).is_some()).unwrap_or_else(|| panic!("no digest; console: {:?}", c.seen));
    let st = c.finish(T).expect("cevm did not exit");
    assert!(st.success(), "cevm exited with {st:?}; console: {:?}", c.seen);
    digest_of(&line).unwrap().to_string()
}

/// Waits until `path` exists (a socket a child process is about to create).
pub fn wait_for_file(path: &Path) {
    let deadline = std::time::Instant::now() + T;
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The API of the VMM at `sock`, waiting up to [`T`] for each answer.
pub fn api(sock: &Path) -> Client {
    Client::new(sock, T)
}

/// A stop-and-save checkpoint through the API (`stop` leaves the VM stopped).
pub fn checkpoint(sock: &Path, out: &Path, stop: bool) -> Result<checkpoint::CheckpointReport, ClientError> {
    api(sock).checkpoint(&CheckpointRequest { stop, ..CheckpointRequest::new(out.to_path_buf(), "stop-and-save") })
}

/// `PUT /v1/quit`, then the VMM must exit 0.
pub fn quit(sock: &Path, vm: &mut CevmChild) {
    api(sock).quit().unwrap();
    assert!(vm.finish(T).expect("VMM did not exit").success());
}

/// Runs `cevm ARGS` to its end.
pub fn cevm(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Asserts `cevm verify DIR` passes.
pub fn verify_ok(dir: &Path) {
    let o = cevm(&["verify", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{} must verify: {}", dir.display(), String::from_utf8_lossy(&o.stderr));
}

/// When the checkpoint at `dir` was created (tells two checkpoints apart).
pub fn created(dir: &Path) -> u64 {
    let m: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    m["created_unix_ms"].as_u64().unwrap()
}

/// A small tmpfs, unmounted when dropped.
pub struct SmallFs(pub PathBuf);
impl SmallFs {
    pub fn mount(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "cevm-test"])
            .arg(&path)
            .status();
        assert!(
            st.as_ref().is_ok_and(|s| s.success()),
            "cannot mount a tmpfs at {} ({st:?}): this test needs root, as /dev/kvm does here",
            path.display()
        );
        SmallFs(path)
    }
}
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub mod linux;
pub mod net;
pub mod slurm;
