//! Writes the targets' seeds into a corpus directory:
//! `cargo run -p cevm-fuzz --example seeds -- fuzz/corpus`.

fn main() {
    let Some(root) = std::env::args_os().nth(1) else {
        eprintln!("usage: seeds CORPUS_DIR");
        std::process::exit(2);
    };
    for (i, (target, seed)) in cevm_fuzz::seeds::all().into_iter().enumerate() {
        let dir = std::path::Path::new(&root).join(target);
        let path = dir.join(format!("seed-{i}"));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &seed)) {
            eprintln!("{}: {e}", path.display());
            std::process::exit(1);
        }
        println!("{}: {} bytes", path.display(), seed.len());
    }
}
