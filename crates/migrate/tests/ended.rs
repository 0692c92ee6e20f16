//! A guest that ended (here: exited through the exit port) is never moved to
//! another instance: its end would be heard by nobody, and the new instance
//! would sit halted past it. (Found by periodic CEVM checkpoints that caught a
//! guest in its last instant.)

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use vmm::{Boot, Instance, InstanceConfig, MemoryBackend, VmEvent};

#[test]
fn a_guest_that_exited_is_not_migrated() {
    let config = InstanceConfig {
        boot: Boot::Builtin { guest: "hello".into(), args: "code=7".into() },
        mem_size: 32 << 20,
        vcpus: 1,
        memory_backend: MemoryBackend::Shared,
        disk: None,
        nics: vec![],
    };
    let (tx, events) = mpsc::channel();
    let image = guests::find("hello").unwrap();
    let mut inst = Instance::new(config, Some(image), Box::new(std::io::sink()), tx).unwrap();
    assert!(!inst.guest_ended());
    inst.start().unwrap();
    let ev = events.recv_timeout(Duration::from_secs(120)).expect("the guest did not exit");
    assert_eq!(ev, VmEvent::GuestExit { status: 7 });
    assert!(inst.guest_ended());
    let progress = Mutex::new(migrate::Progress::default());
    let (tx2, _events2) = mpsc::channel();
    let params = migrate::Params::default();
    let r = migrate::migrate_local(&mut inst, &params, &progress, Box::new(std::io::sink()), tx2, &[]);
    match r {
        Err(migrate::Failure { error: migrate::Error::GuestEnded, guest: migrate::GuestAt::Ended, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a guest that had exited was migrated"),
    }
    inst.shutdown();
}
