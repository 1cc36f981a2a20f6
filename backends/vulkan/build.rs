//! Compiles `shaders/*.comp` (GLSL) to SPIR-V with `glslc` into `$OUT_DIR/<name>.spv`, and writes
//! `$OUT_DIR/shaders.rs`: a table of every shader's name and SPIR-V (`include_bytes!`), which `src/pipelines.rs`
//! includes. `$GLSLC` overrides the compiler's path.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let shader_dir = Path::new("shaders");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let glslc = std::env::var("GLSLC").unwrap_or_else(|_| "glslc".to_string());
    println!("cargo:rerun-if-env-changed=GLSLC");
    println!("cargo:rerun-if-changed=shaders");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(shader_dir)
        .expect("backends/vulkan/shaders exists")
        .map(|e| e.expect("reading backends/vulkan/shaders").path())
        .collect();
    entries.sort();
    let mut table =
        String::from("/// Every compiled shader: (file stem, SPIR-V).\npub static SHADERS: &[(&str, &[u8])] = &[\n");
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().and_then(|e| e.to_str()) != Some("comp") {
            continue;
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("shader file names are UTF-8");
        let out = out_dir.join(format!("{stem}.spv"));
        let result = Command::new(&glslc)
            .args(["-fshader-stage=compute", "--target-env=vulkan1.2", "-O", "-I"])
            .arg(shader_dir)
            .arg(&path)
            .arg("-o")
            .arg(&out)
            .output();
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "sd3-backend-vulkan: the GLSL compiler `{glslc}` was not found; it compiles the compute shaders to \
                 SPIR-V at build time. Install it (Debian/Ubuntu: `apt-get install glslc`; or the LunarG Vulkan \
                 SDK), or point $GLSLC at it."
            ),
            Err(e) => panic!("sd3-backend-vulkan: running `{glslc}` failed: {e}"),
            Ok(o) if !o.status.success() => panic!(
                "sd3-backend-vulkan: `{glslc}` failed on {}:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(_) => {}
        }
        table.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", out.display().to_string()));
    }
    table.push_str("];\n");
    std::fs::write(out_dir.join("shaders.rs"), table).expect("writing $OUT_DIR/shaders.rs");
}
