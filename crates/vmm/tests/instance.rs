//! Boots the built-in guests on this machine's /dev/kvm and checks what they print.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::{Boot, Instance, InstanceConfig, MemoryBackend, VmEvent};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);
impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn config(guest: &str, args: &str, vcpus: u32, backend: MemoryBackend) -> InstanceConfig {
    InstanceConfig {
        boot: Boot::Builtin { guest: guest.into(), args: args.into() },
        mem_size: 32 << 20,
        vcpus,
        memory_backend: backend,
        disk: None,
        nics: vec![],
    }
}

/// The image of the built-in guest `cfg` boots, from the `guests` crate.
fn image_of(cfg: &InstanceConfig) -> &'static [u8] {
    match &cfg.boot {
        Boot::Builtin { guest, .. } => guests::find(guest).expect("a built-in guest"),
        Boot::Linux { .. } => panic!("these tests boot built-in guests"),
    }
}

fn run_to_end(cfg: InstanceConfig) -> (VmEvent, String) {
    let console = Console::default();
    let (tx, rx) = mpsc::channel();
    let image = image_of(&cfg);
    let mut inst = Instance::new(cfg, Some(image), Box::new(console.clone()), tx).expect("create instance");
    inst.start().unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(120)).expect("guest did not finish in 120 s");
    inst.shutdown();
    (ev, console.text())
}

#[test]
fn hello_reports_its_exit_status_on_every_vcpu_count() {
    for (vcpus, backend) in [(1, MemoryBackend::Shared), (3, MemoryBackend::Private)] {
        let (ev, out) = run_to_end(config("hello", "code=7", vcpus, backend));
        assert_eq!(ev, VmEvent::GuestExit { status: 7 }, "output: {out}");
        assert!(out.contains(&format!("hello from cevm: vcpus={vcpus} mem_mib=32 args=\"code=7\"")), "{out}");
    }
}

#[test]
fn a_triple_fault_is_reported_as_shutdown() {
    let (ev, out) = run_to_end(config("hello", "crash=1", 1, MemoryBackend::Shared));
    assert!(matches!(ev, VmEvent::Shutdown { id: 0, .. }), "{ev:?}, output: {out}");
}

#[test]
fn a_built_in_guest_without_its_image_is_a_clear_error() {
    let (tx, _rx) = mpsc::channel();
    let err = Instance::new(config("hello", "", 1, MemoryBackend::Shared), None, Box::new(Console::default()), tx)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("the built-in guest `hello` was given no image"), "{err}");
}

fn digest_line(out: &str) -> String {
    out.lines().find(|l| l.starts_with("digest=")).unwrap_or_else(|| panic!("no digest in: {out}")).to_string()
}

#[test]
fn digest_is_the_same_on_one_and_two_vcpus_and_depends_on_its_arguments() {
    let (ev1, out1) = run_to_end(config("digest", "mib=1 rounds=2", 1, MemoryBackend::Shared));
    let (ev2, out2) = run_to_end(config("digest", "mib=1 rounds=2", 2, MemoryBackend::Private));
    let (ev3, out3) = run_to_end(config("digest", "mib=1 rounds=3", 2, MemoryBackend::Shared));
    for (ev, out) in [(&ev1, &out1), (&ev2, &out2), (&ev3, &out3)] {
        assert_eq!(*ev, VmEvent::GuestExit { status: 0 }, "{out}");
    }
    assert!(out1.contains("round 2/2"), "{out1}");
    assert_eq!(digest_line(&out1), digest_line(&out2));
    assert_ne!(digest_line(&out2), digest_line(&out3));
}
