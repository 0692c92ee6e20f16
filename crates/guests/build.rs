//! Builds the freestanding test guests in `c/` with the machine's gcc into flat
//! binaries that `src/lib.rs` embeds. No prebuilt blobs: every build compiles them.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests, each one C file linked with `start.S` and `common.c`.
const GUESTS: &[&str] = &["digest", "dirtier", "hello", "netring"];

/// Flags that keep the guests simple enough for KVM's instruction emulator:
/// no SSE/AVX (`-mgeneral-regs-only`), no red zone (no interrupt may clobber it),
/// static absolute addresses (loaded at 1 MiB, see `guest.ld`).
const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-m64",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-vectorize",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is gcc/binutils installed? run scripts/setup.sh)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let src = Path::new("c");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=c");
    let mut table =
        String::from("/// Every built-in guest: (name, flat binary).\npub const IMAGES: &[(&str, &[u8])] = &[\n");
    for name in GUESTS {
        let elf = out.join(format!("{name}.elf"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("gcc")
            .args(CFLAGS)
            .arg("-T")
            .arg(src.join("guest.ld"))
            .arg("-I")
            .arg(src)
            .arg(src.join("start.S"))
            .arg(src.join("common.c"))
            .arg(src.join(format!("{name}.c")))
            .arg("-o")
            .arg(&elf));
        run(Command::new("objcopy").args(["-O", "binary"]).arg(&elf).arg(&bin));
        table.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", bin.display().to_string()));
    }
    table.push_str("];\n");
    std::fs::write(out.join("images.rs"), table).expect("write images.rs");
}
