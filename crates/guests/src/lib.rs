//! cevm's built-in test guests: small freestanding C programs (in `c/`) compiled
//! by this crate's build script and embedded in the binary.
//!
//! Every guest is a flat binary loaded at [`LOAD_ADDR`] and entered at its first
//! byte in 64-bit long mode. The ABI (boot info block, serial port, exit port) is
//! described in `c/cevm_guest.h` and set up by the `vmm` crate.

include!(concat!(env!("OUT_DIR"), "/images.rs"));

mod digest;
mod netring;
pub use digest::digest;
pub use netring::netring_digest;

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

/// One argument a built-in guest takes, `key=<decimal>` in its argument string
/// (parsed by `arg_u64` in `c/common.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// The key.
    pub key: &'static str,
    /// The value when the key is absent.
    pub default: u64,
    /// The smallest value the guest accepts (below it, it exits 1 at once).
    pub min: u64,
    /// The largest value the guest accepts (above it, it exits 1 at once).
    pub max: u64,
    /// What it sets.
    pub help: &'static str,
}

/// A built-in guest, as its C source's header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// Its name (`cevm run --guest NAME`).
    pub name: &'static str,
    /// What it does, in one line.
    pub about: &'static str,
    /// The arguments it takes.
    pub args: &'static [ArgSpec],
    /// The arguments that are MiB of memory the guest fills from the first free
    /// byte on: its working set is the largest of them.
    pub memory_args: &'static [&'static str],
    /// Pairs of arguments `(a, b)` where the guest accepts a value of `a` below
    /// that of `b` only.
    pub below: &'static [(&'static str, &'static str)],
}

const fn arg(key: &'static str, default: u64, min: u64, help: &'static str) -> ArgSpec {
    ArgSpec { key, default, min, max: u64::MAX, help }
}

impl ArgSpec {
    /// The same argument, with `max` the largest value the guest accepts.
    const fn at_most(self, max: u64) -> ArgSpec {
        ArgSpec { max, ..self }
    }
}

/// Every built-in guest: what each does and the arguments it takes (the header
/// comment of `c/NAME.c` says the same; a test checks the keys against the C).
pub const GUESTS: &[GuestSpec] = &[
    GuestSpec {
        name: "digest",
        about: "hash chain over a memory area, round after round; prints the digest",
        args: &[
            arg("mib", 1, 1, "MiB of memory the hash chain runs over"),
            arg("rounds", 8, 0, "rounds over the whole area"),
        ],
        memory_args: &["mib"],
        below: &[],
    },
    GuestSpec {
        name: "dirtier",
        about: "dirties a working set of pages at a given rate; prints pages/s each second",
        args: &[
            arg("mib", 16, 1, "MiB of the working set"),
            arg("rate", 0, 0, "pages written per second (0: as fast as it goes)"),
            arg("seconds", 10, 0, "seconds to run, 0: forever (with work=, 0 unless given)"),
            arg("fill", 0, 0, "1: write every page of the working set once first"),
            arg("idle", 0, 0, "1: after the fill, halt for good"),
            arg("data", 0, 0, "MiB of memory to fill with data first"),
            arg("work", 0, 0, "pages to write, then exit 0 (a job of fixed size)"),
        ],
        memory_args: &["mib", "data"],
        below: &[],
    },
    GuestSpec {
        name: "hello",
        about: "every vCPU checks in; prints its arguments and exits with `code`",
        args: &[arg("code", 0, 0, "the exit status"), arg("crash", 0, 0, "1: triple-fault instead of exiting")],
        memory_args: &[],
        below: &[],
    },
    GuestSpec {
        name: "netring",
        about: "one of `count` guests passing a token around a ring over virtio-net; prints the digest",
        args: &[
            arg("id", 0, 0, "this guest's place in the ring, below count (its MAC: 52:54:00:ce:00:0<id>)").at_most(7),
            arg("count", 2, 2, "guests in the ring, 2 to 8").at_most(8),
            arg("hops", 100, 1, "hops of the token around the ring in all"),
            arg("mib", 1, 1, "MiB of memory each guest's hops read and rewrite"),
            arg("work", 256, 0, "mixing rounds a hop"),
            arg(
                "strict",
                0,
                0,
                "1: fail on an inconsistent restore (an orphan or a lost message) instead of healing it",
            )
            .at_most(1),
        ],
        memory_args: &["mib"],
        below: &[("id", "count")],
    },
];

/// The description of the built-in guest `name`.
pub fn spec(name: &str) -> Result<&'static GuestSpec, UnknownGuest> {
    GUESTS.iter().find(|g| g.name == name).ok_or_else(|| UnknownGuest { name: name.to_string() })
}

/// An argument string a built-in guest would misread.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// There is no such guest.
    #[error(transparent)]
    UnknownGuest(#[from] UnknownGuest),
    /// A word without `=`.
    #[error("`{word}` is not key=value (arguments of {guest}: {known})")]
    NotKeyValue { guest: &'static str, word: String, known: String },
    /// A key the guest does not read: it would be ignored.
    #[error("`{key}` is not an argument of {guest}, which would ignore it (it takes: {known})")]
    UnknownKey { guest: &'static str, key: String, known: String },
    /// A value that is not a decimal number (the guest would read its leading digits, or 0).
    #[error("`{word}`: the value must be a whole number (decimal digits only)")]
    NotNumber { word: String },
    /// A key given twice (the guest would read the first only).
    #[error("`{key}` is given twice")]
    Twice { key: String },
    /// A value below what the guest accepts.
    #[error("`{word}`: {key} must be at least {min}")]
    TooSmall { word: String, key: &'static str, min: u64 },
    /// A value above what the guest accepts.
    #[error("`{word}`: {key} must be at most {max}")]
    TooLarge { word: String, key: &'static str, max: u64 },
    /// A value not below that of another argument, as the guest requires.
    #[error("{key}={value} must be less than {than}={limit}")]
    NotBelow { key: &'static str, value: u64, than: &'static str, limit: u64 },
}

/// Arguments of a built-in guest, checked: each key one the guest reads, once,
/// with a decimal value it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArgs {
    guest: &'static GuestSpec,
    given: Vec<(&'static str, u64)>,
}

impl GuestArgs {
    /// Checks the argument string `args` (`key=value` words separated by
    /// spaces) of guest `name`.
    pub fn parse(name: &str, args: &str) -> Result<Self, ArgsError> {
        let guest = spec(name)?;
        let known = || guest.args.iter().map(|a| a.key).collect::<Vec<_>>().join(", ");
        let mut given: Vec<(&'static str, u64)> = Vec::new();
        for word in args.split(' ').filter(|w| !w.is_empty()) {
            let Some((key, value)) = word.split_once('=') else {
                return Err(ArgsError::NotKeyValue { guest: guest.name, word: word.into(), known: known() });
            };
            let Some(a) = guest.args.iter().find(|a| a.key == key) else {
                return Err(ArgsError::UnknownKey { guest: guest.name, key: key.into(), known: known() });
            };
            let number = value.bytes().all(|b| b.is_ascii_digit()).then(|| value.parse::<u64>().ok()).flatten();
            let v = number.ok_or_else(|| ArgsError::NotNumber { word: word.into() })?;
            if v < a.min {
                return Err(ArgsError::TooSmall { word: word.into(), key: a.key, min: a.min });
            }
            if v > a.max {
                return Err(ArgsError::TooLarge { word: word.into(), key: a.key, max: a.max });
            }
            if given.iter().any(|(k, _)| *k == a.key) {
                return Err(ArgsError::Twice { key: key.into() });
            }
            given.push((a.key, v));
        }
        let parsed = GuestArgs { guest, given };
        for &(key, than) in guest.below {
            let (value, limit) = (parsed.get(key).unwrap_or(0), parsed.get(than).unwrap_or(0));
            if value >= limit {
                return Err(ArgsError::NotBelow { key, value, than, limit });
            }
        }
        Ok(parsed)
    }

    /// The value of `key`: given, or the guest's default.
    pub fn get(&self, key: &str) -> Option<u64> {
        let given = self.given.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        given.or_else(|| self.guest.args.iter().find(|a| a.key == key).map(|a| a.default))
    }

    /// The MiB of memory the guest fills beyond its first free byte, and the
    /// argument that asks for them (`mib=16`); `None` for a guest that fills none.
    pub fn working_set_mib(&self) -> Option<(u64, String)> {
        let mib = |k: &str| self.get(k).unwrap_or(0);
        let key = self.guest.memory_args.iter().copied().max_by_key(|k| mib(k))?;
        Some((mib(key), format!("{key}={}", mib(key))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_built_and_starts_with_a_call() {
        for name in ["digest", "dirtier", "hello", "netring"] {
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
        assert_eq!(e.to_string(), "unknown guest `nope` (built-in guests: digest, dirtier, hello, netring)");
    }

    #[test]
    fn the_table_describes_every_guest_and_every_key_its_c_source_reads() {
        let mut described: Vec<_> = GUESTS.iter().map(|g| g.name).collect();
        described.sort_unstable();
        assert_eq!(described, names().collect::<Vec<_>>());
        for g in GUESTS {
            let path = format!("{}/c/{}.c", env!("CARGO_MANIFEST_DIR"), g.name);
            let src = std::fs::read_to_string(&path).unwrap();
            let mut read: Vec<&str> =
                src.split("arg_u64(bi, \"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
            read.sort_unstable();
            read.dedup();
            let mut table: Vec<&str> = g.args.iter().map(|a| a.key).collect();
            table.sort_unstable();
            assert_eq!(read, table, "{path} reads other keys than GUESTS lists");
            for m in g.memory_args.iter().chain(g.below.iter().flat_map(|(a, b)| [a, b])) {
                assert!(table.contains(m), "{}: {m} is not an argument", g.name);
            }
        }
    }

    #[test]
    fn guest_arguments_are_checked_against_what_the_guest_reads() {
        let a = GuestArgs::parse("dirtier", "  mib=8 data=32  rate=100 ").unwrap();
        assert_eq!((a.get("mib"), a.get("seconds"), a.get("nope")), (Some(8), Some(10), None));
        assert_eq!(a.working_set_mib(), Some((32, "data=32".into())));
        assert_eq!(GuestArgs::parse("dirtier", "").unwrap().working_set_mib(), Some((16, "mib=16".into())));
        assert_eq!(GuestArgs::parse("hello", "code=3").unwrap().working_set_mib(), None);
        let err = |g: &str, s: &str| GuestArgs::parse(g, s).unwrap_err().to_string();
        assert_eq!(
            err("hello", "cod=3"),
            "`cod` is not an argument of hello, which would ignore it (it takes: code, crash)"
        );
        assert_eq!(err("hello", "code"), "`code` is not key=value (arguments of hello: code, crash)");
        assert!(err("hello", "code=-1").contains("whole number"));
        assert!(err("hello", "code=").contains("whole number"));
        assert!(err("digest", "mib=0x10").contains("whole number"));
        assert!(err("digest", "mib=99999999999999999999").contains("whole number"));
        assert_eq!(err("digest", "mib=0"), "`mib=0`: mib must be at least 1");
        assert_eq!(err("digest", "rounds=1 rounds=2"), "`rounds` is given twice");
        assert!(err("nope", "").contains("unknown guest `nope`"));
    }

    #[test]
    fn netring_arguments_are_checked_against_each_other() {
        let a = GuestArgs::parse("netring", "id=7 count=8 hops=1").unwrap();
        assert_eq!((a.get("id"), a.get("count"), a.get("mib"), a.get("work")), (Some(7), Some(8), Some(1), Some(256)));
        assert_eq!(a.working_set_mib(), Some((1, "mib=1".into())));
        assert!(GuestArgs::parse("netring", "").is_ok(), "the defaults make a ring of two");
        let err = |s: &str| GuestArgs::parse("netring", s).unwrap_err().to_string();
        assert_eq!(err("id=2 count=2"), "id=2 must be less than count=2");
        assert_eq!(err("id=2"), "id=2 must be less than count=2");
        assert_eq!(err("count=9"), "`count=9`: count must be at most 8");
        assert_eq!(err("id=8 count=8"), "`id=8`: id must be at most 7");
        assert_eq!(err("count=1"), "`count=1`: count must be at least 2");
        assert_eq!(err("hops=0"), "`hops=0`: hops must be at least 1");
    }
}
