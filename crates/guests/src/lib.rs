//! cevm's built-in test guests: small freestanding C programs (in `c/`) compiled
//! by this crate's build script and embedded in the binary.
//!
//! Every guest is a flat binary loaded at [`LOAD_ADDR`] and entered at its first
//! byte in 64-bit long mode. The ABI (boot info block, serial port, exit port) is
//! described in `c/cevm_guest.h` and set up by the `vmm` crate.

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// Guest-physical address every built-in guest is linked for (`c/guest.ld`).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The flat binary of the built-in guest `name`, if there is one.
pub fn image(name: &str) -> Option<&'static [u8]> {
    IMAGES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of all built-in guests.
pub fn names() -> impl Iterator<Item = &'static str> {
    IMAGES.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_built_and_starts_with_a_call() {
        for name in ["digest", "dirtier", "hello"] {
            let img = image(name).unwrap_or_else(|| panic!("{name} missing"));
            // start.S begins with `call guest_main` (opcode e8).
            assert_eq!(img[0], 0xe8, "{name} does not start at _start");
            assert!(img.len() < 0x10_0000, "{name} is larger than 1 MiB");
        }
        assert!(image("nope").is_none());
    }
}
