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

/// A name that is none of the built-in guests.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown guest `{name}` (built-in guests: {})", names().collect::<Vec<_>>().join(", "))]
pub struct UnknownGuest {
    /// The name asked for.
    pub name: String,
}

/// The flat binary of the built-in guest `name`, or an error that lists the
/// guests there are.
pub fn find(name: &str) -> Result<&'static [u8], UnknownGuest> {
    image(name).ok_or_else(|| UnknownGuest { name: name.to_string() })
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

    #[test]
    fn an_unknown_guest_is_refused_with_the_names_of_the_built_in_ones() {
        assert_eq!(find("hello"), Ok(image("hello").unwrap()));
        let e = find("nope").unwrap_err();
        assert_eq!(e.to_string(), "unknown guest `nope` (built-in guests: digest, dirtier, hello)");
    }
}
