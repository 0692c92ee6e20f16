#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cevm_fuzz::checkpoint_dir::verify(data));
