//! Replays the kept fuzz corpus (`fuzz/corpus/TARGET/*`, found and minimized by
//! cargo-fuzz on nightly) through every target on stable, in every test run: an
//! input that once made a target panic stays fixed. Seeds that drive the
//! targets' deep paths are written here too, so that the replay always covers
//! a well-formed stream and a well-formed virtio request.

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

#[test]
fn every_kept_input_runs_through_its_target_without_a_panic() {
    let mut total = 0;
    for (name, target) in cevm_fuzz::TARGETS {
        let dir = corpus_dir(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut n = 0;
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| target(&data));
            assert!(r.is_ok(), "{name}: {} panics", path.display());
            n += 1;
        }
        assert!(n > 0, "{name}: the corpus {} is empty", dir.display());
        total += n;
    }
    eprintln!("replayed {total} corpus inputs");
}

#[test]
fn the_seeds_reach_the_deep_paths() {
    // A well-formed stream decodes frame by frame, and a well-formed read
    // request is served: the seeds in the corpus are what these build.
    for (name, seed) in cevm_fuzz::seeds::all() {
        let target = cevm_fuzz::TARGETS.iter().find(|(n, _)| *n == name).unwrap().1;
        target(&seed);
    }
    assert!(cevm_fuzz::seeds::virtio_read_is_served());
    assert!(cevm_fuzz::seeds::virtio_net_seed_is_served());
    assert!(cevm_fuzz::seeds::migration_stream_decodes() >= 3);
    assert!(cevm_fuzz::checkpoint_dir::verified(&cevm_fuzz::seeds::checkpoint_dir(true)));
    assert!(!cevm_fuzz::checkpoint_dir::verified(&cevm_fuzz::seeds::checkpoint_dir(false)));
    for r in cevm_fuzz::seeds::api_requests() {
        assert!(matches!(cevm::api::http::parse(&r), Ok(cevm::api::http::Parsed::Complete(_))));
    }
}
