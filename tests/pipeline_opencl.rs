//! The tiny diffusers golden pipelines (`sd3-cfg`, `sd35-slg`) on the OpenCL plugin, loaded through the C ABI as
//! `sd3 --backend opencl --strict` loads it (every op on the device, no host fallback), through the golden
//! runner every backend shares (`sd3::golden`): each image within 3/255 of diffusers'. Needs the plugin built
//! beside this test (`cargo build --workspace`, as scripts/test.sh does); skips, printing why, only when the
//! machine has no OpenCL platform.

use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};
use sd3::runtime::{open_backend, BackendRequest};
use sd3::train::golden::check_every_step;

const OPENCL: Tolerances = Tolerances { conditioning: None, initial_latents: None, final_latents: None, image: 3 };

fn run_case(case: &str) {
    let request = BackendRequest { strict: true, ..BackendRequest::named("opencl") };
    let be = match open_backend(&request) {
        Ok(be) => be,
        Err(e) if format!("{e:#}").contains("no OpenCL platform found") => {
            eprintln!("SKIPPED: {case}: no OpenCL platform on this machine: {e:#}");
            return;
        }
        Err(e) => panic!("opening the OpenCL plugin (is libsd3_backend_opencl built beside the test?): {e:#}"),
    };
    let d = GoldenCase::load(&fixtures_dir(), case).unwrap().run_and_check(&be, &OPENCL).unwrap();
    eprintln!("{case} on {} ({}): {d}", be.name(), be.info().name);
}

#[test]
fn sd3_cfg_on_opencl() {
    run_case("sd3-cfg");
}

#[test]
fn sd35_slg_on_opencl() {
    // SD3.5: qk RMS norm inside attention, and skip-layer guidance (from the golden's params).
    run_case("sd35-slg");
}

/// Every golden training step (`sd3::train::golden::check_every_step`: the LoRA and the full step on both tiny
/// models, the step with the text encoders) against diffusers + PEFT, f32, within the CPU backend's bounds.
#[test]
fn lora_training_step_on_opencl() {
    let request = BackendRequest { strict: true, ..BackendRequest::named("opencl") };
    let be = match open_backend(&request) {
        Ok(be) => be,
        Err(e) if format!("{e:#}").contains("no OpenCL platform found") => {
            eprintln!("SKIPPED: no OpenCL platform on this machine: {e:#}");
            return;
        }
        Err(e) => panic!("opening the OpenCL plugin (is libsd3_backend_opencl built beside the test?): {e:#}"),
    };
    for line in check_every_step(&fixtures_dir(), &be).unwrap_or_else(|e| panic!("{e:#}")) {
        eprintln!("{line} on opencl");
    }
}
