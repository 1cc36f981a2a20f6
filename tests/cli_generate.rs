//! The `sd3` binary's generation contract: the flags external scripts use, the bundled default model, the
//! golden image through the CLI, seeds, and a clear error for each kind of bad input.

mod common;
use common::*;
use sd3::image_out::read_png;
use sd3_core::DType;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn sd3(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd3")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must_fail(args: &[&str], expect: &[&str]) {
    let (ok, text) = sd3(args);
    assert!(!ok, "sd3 {args:?} should fail:\n{text}");
    for e in expect {
        assert!(text.contains(e), "sd3 {args:?}: expected `{e}` in:\n{text}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn golden_case_through_the_cli() {
    let dir = scratch("cli-golden");
    let out = dir.join("cat.png");
    let golden = fixtures().join("golden/sd3-cfg");
    let (ok, text) = sd3(&[
        "--backend",
        "cpu",
        "--model",
        s(&fixtures().join("sd3-tiny")),
        "--prompt",
        "A cat holding a sign that says hello world",
        "--steps",
        "3",
        "--guidance",
        "5.0",
        "--height",
        "64",
        "--width",
        "64",
        "--init-noise",
        s(&golden.join("init_noise.safetensors")),
        "--max-sequence-length",
        "256",
        "--dtype",
        "f32",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{text}");
    let (img, meta) = read_png(&out).unwrap();
    let (want, _) = read_png(&golden.join("image.png")).unwrap();
    let worst = img.pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "CLI image differs from diffusers' by {worst}/255");
    for key in ["prompt", "negative_prompt", "seed", "steps", "guidance", "model", "backend", "sd3_version"] {
        assert!(meta.iter().any(|(k, _)| k == key), "PNG text chunk `{key}` missing: {meta:?}");
    }
    assert!(meta.contains(&("steps".into(), "3".into())));
}

#[test]
fn bundled_model_and_seeds() {
    let dir = scratch("cli-bundled");
    let (a, b, c) = (dir.join("a.png"), dir.join("b.png"), dir.join("c.png"));
    let (ok, text) = sd3(&["--prompt", "a red apple", "--steps", "2", "--seed", "7", "--out", s(&a)]);
    assert!(ok, "{text}");
    assert!(text.contains("bundled tiny SD3 pipeline"), "the output must say the bundled model is used:\n{text}");
    assert!(sd3(&["--prompt", "a red apple", "--steps", "2", "--seed", "7", "--quiet", "--out", s(&b)]).0);
    assert!(sd3(&["--prompt", "a red apple", "--steps", "2", "--seed", "8", "--quiet", "--out", s(&c)]).0);
    let (ia, _) = read_png(&a).unwrap();
    let (ib, _) = read_png(&b).unwrap();
    let (ic, _) = read_png(&c).unwrap();
    assert_eq!((ia.width, ia.height), (64, 64), "the tiny model's own default size");
    assert_eq!(ia, ib, "one seed, one image");
    assert_ne!(ia, ic, "another seed, another image");
}

#[test]
fn several_images_and_benchmark() {
    let dir = scratch("cli-batch");
    let (ok, text) = sd3(&[
        "--prompt",
        "x",
        "--steps",
        "1",
        "--seed",
        "3",
        "--num-images",
        "2",
        "--no-t5",
        "--benchmark",
        "--out",
        s(&dir.join("img.png")),
    ]);
    assert!(ok, "{text}");
    for needle in
        ["tokenize", "clip_l", "clip_g", "denoise", "vae", "step 0", "total", "peak host memory", "host fallbacks"]
    {
        assert!(text.contains(needle), "--benchmark output lacks `{needle}`:\n{text}");
    }
    assert!(!text.contains("\nt5 "), "--no-t5 must not run T5:\n{text}");
    let (i0, _) = read_png(&dir.join("img_0.png")).unwrap();
    let (i1, _) = read_png(&dir.join("img_1.png")).unwrap();
    assert_ne!(i0, i1, "images of a batch use seeds seed+n");
}

#[test]
fn bad_sizes() {
    must_fail(&["--prompt", "x", "--height", "100"], &["--height 100", "multiple of 16"]);
    // sd3-tiny: pos_embed_max_size 16, patch 2, VAE 8 → at most 256 pixels.
    must_fail(&["--prompt", "x", "--width", "272"], &["--width 272", "positional table", "256"]);
    must_fail(&["--prompt", "x", "--max-sequence-length", "600"], &["--max-sequence-length 600"]);
    must_fail(&["--prompt", "x", "--steps", "0"], &["--steps"]);
    must_fail(&["--prompt", "x", "--dtype", "f8"], &["--dtype", "f8"]);
    must_fail(&["--steps", "2"], &["--prompt"]);
    must_fail(&["--prompt", "x", "--slg-layers", "5"], &["--slg-layers", "layer 5", "2 layers"]);
}

#[test]
fn bad_cfg_parallel() {
    must_fail(&["--prompt", "x", "--dp-size", "3"], &["--dp-size 3", "1 or 2"]);
    must_fail(&["--prompt", "x", "--dp-size", "2", "--guidance", "1"], &["--dp-size 2", "--guidance 1"]);
    // The CPU backend has one device: the second one does not exist.
    must_fail(&["--prompt", "x", "--dp-size", "2"], &["--dp-size 2", "device 1"]);
}

#[test]
fn bad_tensor_parallel() {
    must_fail(&["--prompt", "x", "--mp-size", "0"], &["--mp-size 0"]);
    // The CPU backend has one device: --mp-size 2 needs device 1; with --dp-size 2 as well, devices 1 to 3.
    must_fail(&["--prompt", "x", "--mp-size", "2"], &["--mp-size", "device 1"]);
    must_fail(&["--prompt", "x", "--mp-size", "2", "--dp-size", "2"], &["--mp-size", "device 1"]);
}

#[test]
fn bad_model_folders() {
    let dir = scratch("cli-model");
    must_fail(&["--prompt", "x", "--model", s(&dir.join("nowhere"))], &["nowhere", "does not exist"]);
    // A copy of sd3-tiny without its transformer folder.
    let model = dir.join("model");
    copy_dir(&fixtures().join("sd3-tiny"), &model);
    std::fs::remove_dir_all(model.join("transformer")).unwrap();
    must_fail(&["--prompt", "x", "--model", s(&model)], &["transformer"]);
    // ... and with a corrupt transformer file.
    copy_dir(&fixtures().join("sd3-tiny/transformer"), &model.join("transformer"));
    let f = model.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    must_fail(
        &["--prompt", "x", "--steps", "1", "--model", s(&model)],
        &["diffusion_pytorch_model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn bad_init_noise() {
    let dir = scratch("cli-noise");
    must_fail(
        &["--prompt", "x", "--init-noise", s(&dir.join("missing.safetensors"))],
        &["--init-noise", "missing.safetensors"],
    );
    let wrong_shape = dir.join("wrong.safetensors");
    write_safetensors(&wrong_shape, &[t("latents", DType::F32, &[1, 16, 4, 4], vec![0.0; 256])], None);
    must_fail(&["--prompt", "x", "--init-noise", s(&wrong_shape)], &["--init-noise", "[1, 16, 8, 8]", "[1, 16, 4, 4]"]);
    let wrong_name = dir.join("name.safetensors");
    write_safetensors(&wrong_name, &[t("latent", DType::F32, &[1, 16, 8, 8], vec![0.0; 1024])], None);
    must_fail(&["--prompt", "x", "--init-noise", s(&wrong_name)], &["`latents` not found"]);
}

#[test]
fn bad_lora() {
    let dir = scratch("cli-lora");
    let wrong_module = dir.join("module.safetensors");
    write_safetensors(
        &wrong_module,
        &[
            t("transformer.transformer_blocks.9.attn.to_q.lora_A.weight", DType::F32, &[2, 64], vec![0.1; 128]),
            t("transformer.transformer_blocks.9.attn.to_q.lora_B.weight", DType::F32, &[64, 2], vec![0.1; 128]),
        ],
        None,
    );
    must_fail(
        &["--prompt", "x", "--steps", "1", "--lora", s(&wrong_module)],
        &[
            "transformer.transformer_blocks.9.attn.to_q.lora_A.weight",
            "does not fit",
            "transformer_blocks.9.attn.to_q.weight",
        ],
    );
    let wrong_shape = dir.join("shape.safetensors");
    write_safetensors(
        &wrong_shape,
        &[
            t(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                DType::F32,
                &[2, 48],
                vec![0.1; 96],
            ),
            t(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
                DType::F32,
                &[48, 2],
                vec![0.1; 96],
            ),
        ],
        None,
    );
    must_fail(&["--prompt", "x", "--steps", "1", "--lora", s(&wrong_shape)], &["q_proj", "[48, 48]", "[32, 32]"]);
    let not_lora = dir.join("plain.safetensors");
    write_safetensors(&not_lora, &[t("transformer.proj_out.weight", DType::F32, &[1], vec![0.0])], None);
    must_fail(&["--prompt", "x", "--lora", s(&not_lora)], &["transformer.proj_out.weight", "not a LoRA key"]);
    must_fail(&["--prompt", "x", "--lora-scale", "0.5"], &["--lora-scale given without --lora"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn embedded_copy_of_the_bundled_model_is_complete() {
    // What a moved binary uses when the source tree is gone: the files embedded by build.rs.
    let dir = scratch("bundled-unpack").join("sd3-tiny");
    sd3::bundled::unpack_to(&dir).unwrap();
    let pipe = sd3::pipeline::StableDiffusion3Pipeline::new(&dir, cpu(), Default::default()).unwrap();
    assert_eq!(pipe.default_size(), 64);
    let mut r = sd3::pipeline::GenerationRequest::new("a cat", 64, 64);
    r.steps = 1;
    let g = pipe.generate(&r, &mut |_| {}).unwrap();
    assert_eq!(g.images.len(), 1);
}

/// `sd3 train-lora` on the bundled model: the LoRA file, a validation image made with it, and flag errors.
#[test]
fn train_lora_through_the_cli() {
    let (dir, images) = instance_folder("cli-train-lora");
    let out = dir.join("out");
    let more = ["--max-train-steps", "4", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1"];
    let validation = ["--validation-prompt", "a photo of sks dog", "--validation-epochs", "2"];
    let (ok, text) = sd3(&[&train_args("train-lora", &images, &out)[..], &more, &validation].concat());
    assert!(ok, "{text}");
    assert!(text.contains("step 4/4: loss"), "{text}");
    // One image, batch 1: an epoch per step; epochs 0 and 2 end before the last step.
    for e in [0, 2] {
        assert!(out.join(format!("validation-epoch-{e}.png")).is_file(), "{text}");
        assert!(!out.join(format!("validation-epoch-{e}")).exists(), "the validation's LoRA is removed");
    }
    assert!(!out.join("validation-epoch-1.png").exists());
    assert!(out.join("pytorch_lora_weights.safetensors").is_file());
    assert!(out.join("checkpoint-2/pytorch_lora_weights.safetensors").is_file());
    // With the text encoders' adapters too.
    let text_out = dir.join("out-text");
    let text = [&train_args("train-lora", &images, &text_out)[..], &["--max-train-steps", "2", "--train-text-encoder"]]
        .concat();
    let (ok, text_log) = sd3(&text);
    assert!(ok && text_log.contains("step 2/2"), "{text_log}");
    let bytes = std::fs::read(text_out.join("pytorch_lora_weights.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().join(" ");
    assert!(names.contains("text_encoder.text_model") && names.contains("text_encoder_2.text_model"), "{names}");
    // Going on from the last checkpoint to step 6.
    let resume = [
        &train_args("train-lora", &images, &out)[..],
        &["--max-train-steps", "6", "--resume-from-checkpoint", "latest"],
    ]
    .concat();
    let (ok, text) = sd3(&resume);
    assert!(ok && text.contains("step 6/6") && !text.contains("step 1/6"), "{text}");
    let (image, meta) = read_png(&out.join("validation.png")).unwrap();
    assert_eq!((image.width, image.height), (64, 64));
    assert!(meta.iter().any(|(k, v)| k == "trained" && v.ends_with("pytorch_lora_weights.safetensors")));
    // The LoRA also loads through generation's --lora.
    let (ok, text) = sd3(&[
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "2",
        "--lora",
        s(&out.join("pytorch_lora_weights.safetensors")),
        "--out",
        s(&dir.join("with-lora.png")),
    ]);
    assert!(ok, "{text}");
    let train = ["train-lora", "--instance-data-dir", s(&images), "--instance-prompt", "sks", "--resolution", "64"];
    must_fail(&[&train[..], &["--weighting-scheme", "cosmic"]].concat(), &["--weighting-scheme cosmic"]);
    must_fail(&[&train[..], &["--learning-rate", "0"]].concat(), &["--learning-rate 0"]);
    must_fail(&[&train[..], &["--dtype", "i32"]].concat(), &["--dtype i32"]);
    must_fail(&[&train[..], &["--class-prompt", "a dog"]].concat(), &["--with-prior-preservation"]);
    must_fail(&[&train[..], &["--lr-scheduler", "sawtooth"]].concat(), &["--lr-scheduler sawtooth", "cosine"]);
    let full =
        ["train-dreambooth", "--instance-data-dir", s(&images), "--instance-prompt", "sks", "--resolution", "64"];
    must_fail(&[&full[..], &["--train-text-encoder"]].concat(), &["--train-text-encoder", "train-lora"]);
    must_fail(&[&train[..], &["--with-prior-preservation"]].concat(), &["--class-data-dir and --class-prompt"]);
}

/// `sd3 train-dreambooth` (every parameter) on the bundled model: a pipeline folder that generation opens.
#[test]
fn train_dreambooth_through_the_cli() {
    let (dir, images) = instance_folder("cli-train-dreambooth");
    let out = dir.join("out");
    let more = ["--max-train-steps", "2", "--gradient-checkpointing", "--validation-prompt", "a photo of sks dog"];
    let (ok, text) = sd3(&[&train_args("train-dreambooth", &images, &out)[..], &more].concat());
    assert!(ok, "{text}");
    assert!(text.contains("every parameter of the transformer") && text.contains("step 2/2: loss"), "{text}");
    assert!(out.join("transformer/diffusion_pytorch_model.safetensors").is_file());
    assert!(out.join("validation.png").is_file());
    let (ok, text) =
        sd3(&["--model", s(&out), "--prompt", "a photo of sks dog", "--steps", "2", "--out", s(&dir.join("g.png"))]);
    assert!(ok, "{text}");
}

/// A scratch folder `name` with an `instance/` folder of one image: `(folder, instance folder)`.
fn instance_folder(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let images = dir.join("instance");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(fixtures().join("golden/sd3-cfg/image.png"), images.join("dog.png")).unwrap();
    (dir, images)
}

/// The flags of a short run of `command` (`train-lora`, `train-dreambooth`) on the bundled model, 64², a
/// checkpoint every 2 steps.
fn train_args<'a>(command: &'a str, images: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        command,
        "--instance-data-dir",
        s(images),
        "--instance-prompt",
        "a photo of sks dog",
        "--resolution",
        "64",
        "--checkpointing-steps",
        "2",
        "--output-dir",
        s(out),
    ]
}
