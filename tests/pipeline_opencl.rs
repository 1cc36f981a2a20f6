//! The tiny diffusers golden pipelines through `sd3 --backend opencl --strict` (every op on the OpenCL device,
//! no host fallback), each image within 3/255 of diffusers'. Needs the plugin built beside the binary
//! (`cargo build --workspace`, as scripts/test.sh does); skips, printing why, only when the machine has no
//! OpenCL platform.

use sd3::image_out::read_png;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run_case(case: &str, extra: &[&str]) {
    let golden = fixtures().join("golden").join(case);
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("params.json")).unwrap()).unwrap();
    let num = |k: &str| p[k].to_string();
    let dir = std::env::temp_dir().join(format!("sd3-opencl-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{case}.png"));
    let (model, prompt) = (fixtures().join(p["model"].as_str().unwrap()), p["prompt"].as_str().unwrap());
    let (steps, guidance, height, width, msl) =
        (num("steps"), num("guidance"), num("height"), num("width"), num("max_sequence_length"));
    let mut args = vec!["--backend", "opencl", "--strict", "--model", s(&model), "--prompt", prompt];
    args.extend(["--steps", &steps, "--guidance", &guidance, "--height", &height, "--width", &width]);
    let noise = golden.join("init_noise.safetensors");
    args.extend(["--init-noise", s(&noise), "--max-sequence-length", &msl, "--dtype", "f32", "--out", s(&out)]);
    args.extend(extra);
    let result = Command::new(env!("CARGO_BIN_EXE_sd3")).args(&args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&result.stdout), String::from_utf8_lossy(&result.stderr));
    if !result.status.success() && text.contains("no OpenCL platform found") {
        eprintln!("SKIPPED: {case}: no OpenCL platform on this machine:\n{text}");
        return;
    }
    assert!(
        result.status.success(),
        "sd3 {args:?} failed (is libsd3_backend_opencl built beside the binary?):\n{text}"
    );
    let (img, meta) = read_png(&out).unwrap();
    let backend = meta.iter().find(|(k, _)| k == "backend").map(|(_, v)| v.as_str());
    assert!(backend.is_some_and(|b| b.starts_with("opencl")), "{case}: PNG says backend {backend:?}");
    let (want, _) = read_png(&golden.join("image.png")).unwrap();
    assert_eq!((img.width, img.height), (want.width, want.height));
    let worst = img.pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    eprintln!("{case}: OpenCL image max |diff| vs diffusers {worst}/255");
    assert!(worst <= 3, "{case}: the OpenCL image differs from diffusers' by {worst}/255");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn sd3_cfg_on_opencl() {
    run_case("sd3-cfg", &[]);
}

#[test]
fn sd35_slg_on_opencl() {
    // SD3.5: qk RMS norm inside attention, and skip-layer guidance (flags from the golden's params).
    let golden = fixtures().join("golden/sd35-slg/params.json");
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let slg = &p["slg"];
    let layers: Vec<String> = slg["skip_guidance_layers"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let layers = layers.join(",");
    let f = |k: &str| slg[k].to_string();
    let (scale, start, stop) =
        (f("skip_layer_guidance_scale"), f("skip_layer_guidance_start"), f("skip_layer_guidance_stop"));
    run_case("sd35-slg", &["--slg-layers", &layers, "--slg-scale", &scale, "--slg-start", &start, "--slg-stop", &stop]);
}
