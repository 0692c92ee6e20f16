//! The checkpoint file system fills up during a checkpoint: the API reports the
//! error, the guest keeps running, and the previous checkpoint stays intact.

use cevm_testkit::*;

#[test]
fn a_full_disk_fails_the_checkpoint_but_not_the_guest_nor_the_previous_checkpoint() {
    let base = workdir("full");
    let fs = SmallFs::mount(base.join("fs"), "12m");
    let sock = base.join("api.sock");
    let ckpt = fs.0.join("ckpt");
    // 8 MiB of dirty pages: one checkpoint fits in 12 MiB, a second one beside it does not.
    let mut vm = run_guest("dirtier", "mib=8 seconds=0", "16M", 1, Some(&sock));
    vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("dirtier runs");
    checkpoint(&sock, &ckpt, false).expect("first checkpoint fits");
    let first = created(&ckpt);

    let err = checkpoint(&sock, &ckpt, false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("No space left on device") && msg.contains("the guest goes on"), "{msg}");

    // The guest goes on, and the VMM still serves it.
    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest keeps running after the failed checkpoint");
    assert!(vm.seen.len() > seen);
    let st = api(&sock).status().unwrap();
    assert_eq!((st.state.as_str(), st.checkpoints), ("running", 1));

    // The previous checkpoint is untouched, alone, and restores.
    assert_eq!(created(&ckpt), first);
    let names: Vec<_> = std::fs::read_dir(&fs.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")], "the failed attempt left files behind");
    verify_ok(&ckpt);
    quit(&sock, &mut vm);

    let mut restored = restore(&ckpt, Some(&sock));
    restored.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("restored dirtier runs");
    quit(&sock, &mut restored);
    drop(fs);
    let _ = std::fs::remove_dir_all(&base);
}
