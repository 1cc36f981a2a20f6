//! Embeds the bundled tiny pipeline (`fixtures/sd3-tiny`) into the `sd3` library, so `sd3 --prompt …` works
//! without `--model` even when the binary is moved away from the source tree (see `src/bundled.rs`).

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("fixtures/sd3-tiny");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut list = Vec::new();
    files(&root, &mut list);
    list.sort();
    let mut code =
        String::from("/// (path relative to the model folder, contents)\npub static FILES: &[(&str, &[u8])] = &[\n");
    for p in &list {
        println!("cargo:rerun-if-changed={}", p.display());
        let rel = p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        writeln!(code, "    ({rel:?}, include_bytes!({:?})),", p.display().to_string()).unwrap();
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("bundled_tiny.rs");
    std::fs::write(out, code).unwrap();
}
