//! Compiles `shaders/*.comp` (GLSL) to SPIR-V into `$OUT_DIR/<name>.spv`, and writes `$OUT_DIR/shaders.rs`: a table
//! of every shader's name and SPIR-V (`include_bytes!`), which `src/pipelines.rs` includes.
//!
//! Two compilers: `glslc` (`$GLSLC` overrides its path) for most shaders, and glslang 15 (`glslangValidator`) for
//! the `*_cm2*.comp` shaders, which use `GL_NV_cooperative_matrix2`, and the `*_khr*.comp` ones, which use
//! `GL_KHR_cooperative_matrix`: the distributions' glslc (shaderc 2023, Debian 12) knows neither.
//! `scripts/build-glslang.sh` builds glslang 15.3 from the sources that the `shaderc-sys` crate vendors into
//! `<workspace>/.tools/glslang/`, where this script looks for it; `$SD3_GLSLANG` overrides the path. Without it
//! those shaders are left out, with a warning.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let shader_dir = Path::new("shaders");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let glslc = std::env::var("GLSLC").unwrap_or_else(|_| "glslc".to_string());
    let glslang = std::env::var("SD3_GLSLANG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/glslang/bin/glslangValidator"));
    println!("cargo:rerun-if-env-changed=GLSLC");
    println!("cargo:rerun-if-env-changed=SD3_GLSLANG");
    println!("cargo:rerun-if-changed={}", glslang.display());
    println!("cargo:rerun-if-changed=shaders");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(shader_dir)
        .expect("backends/vulkan/shaders exists")
        .map(|e| e.expect("reading backends/vulkan/shaders").path())
        .collect();
    entries.sort();
    let mut cm2_built = true;
    let mut table =
        String::from("/// Every compiled shader: (file stem, SPIR-V).\npub static SHADERS: &[(&str, &[u8])] = &[\n");
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().and_then(|e| e.to_str()) != Some("comp") {
            continue;
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("shader file names are UTF-8");
        let out = out_dir.join(format!("{stem}.spv"));
        if stem.contains("_cm2") || stem.contains("_khr") {
            if !glslang.exists() {
                cm2_built = false;
                continue;
            }
            compile_glslang(&glslang, shader_dir, &path, &out);
            table.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", out.display().to_string()));
            continue;
        }
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
    if !cm2_built {
        println!(
            "cargo:warning=sd3-backend-vulkan: glslang 15 not found at {} ($SD3_GLSLANG): built without the \
             cooperative-matrix-2 shaders (*_cm2*.comp), so NVIDIA GPUs run the slower subgroup-scope ones; run \
             scripts/build-glslang.sh",
            glslang.display()
        );
    }
    table.push_str(&format!(
        "/// The `*_cm2*.comp` and `*_khr*.comp` shaders were built (glslang 15 was found).\npub const CM2_SHADERS_BUILT: bool = {cm2_built};\n"
    ));
    std::fs::write(out_dir.join("shaders.rs"), table).expect("writing $OUT_DIR/shaders.rs");
}

/// Compiles `path` with glslang 15 (the cooperative-matrix-2 shaders). Where glslang is missing, those shaders are
/// left out with a warning (`CM2_SHADERS_BUILT` false) and the plugin runs the subgroup-scope ones.
fn compile_glslang(glslang: &Path, shader_dir: &Path, path: &Path, out: &Path) {
    let result = Command::new(glslang)
        .args(["-V", "--target-env", "vulkan1.3", "-S", "comp"])
        .arg(format!("-I{}", shader_dir.display()))
        .arg(path)
        .arg("-o")
        .arg(out)
        .output();
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "sd3-backend-vulkan: glslang 15 (`{}`) was not found; it compiles {}, which uses \
             GL_NV_cooperative_matrix2 (the distributions' glslc is too old for it). Run `scripts/build-glslang.sh` \
             (about a minute; it needs cmake and a C++ compiler), or point $SD3_GLSLANG at a glslangValidator of \
             version 15 or later.",
            glslang.display(),
            path.display()
        ),
        Err(e) => panic!("sd3-backend-vulkan: running `{}` failed: {e}", glslang.display()),
        Ok(o) if !o.status.success() => panic!(
            "sd3-backend-vulkan: `{}` failed on {}:\n{}{}",
            glslang.display(),
            path.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
}
