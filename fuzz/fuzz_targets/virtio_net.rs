#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cevm_fuzz::virtio::net(data));
