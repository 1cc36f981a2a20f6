//! LoRA fine-tuning against diffusers + PEFT (`fixtures/training/`, made by `scripts/make_training_golden.py`):
//! one step of `train_dreambooth_lora_sd3.py` with fixed inputs: the prediction, the loss, every adapter's
//! gradient, and the adapters after the clipped AdamW step; and the VAE encoder's latent distribution.

mod common;

use safetensors::SafeTensors;
use sd3::models::mmdit::train::{Adapters, LoraPair, TrainingBatch};
use sd3::models::mmdit::Sd3Transformer2DModel;
use sd3::models::vae_encoder::VaeEncoder;
use sd3::train::golden::{relative_error, TrainingGolden};
use sd3::train::lora_params::{HostLora, LoraParams};
use sd3::train::objective::{noisy_latents, preconditioned_loss};
use sd3::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use sd3_core::{Backend, DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    relative_error(a, b)
}

/// The golden step on one tiny transformer: prediction, loss and gradients (f32 on both sides), then the AdamW
/// step from the golden gradients (so that it is judged alone).
fn lora_step_matches_diffusers(model: &str) {
    let g = TrainingGolden::load(&fixtures(), model).unwrap();
    let d = g.run(&common::cpu()).unwrap();
    eprintln!("{model} on cpu: {d}");
    assert!(d.prediction < 1e-5 && d.loss < 1e-5, "{model}: {d}");
    assert!(d.gradients < 5e-5, "{model}: {d}");
    // Gradient checkpointing recomputes the same ops: the same numbers.
    let recomputed = g.run_with(&common::cpu(), DType::F32, true).unwrap();
    assert_eq!((recomputed.prediction, recomputed.gradients), (d.prediction, d.gradients), "{model}: checkpointing");

    let modules = g.modules();
    let targets = sd3::models::mmdit::train::LORA_TARGETS.to_vec();
    let mut params =
        LoraParams { component: "transformer".into(), targets, rank: 4, alpha: 4.0, modules: BTreeMap::new() };
    for m in &modules {
        let (a, a_shape) = g.get(&format!("lora.{m}.lora_A.weight")).unwrap();
        let (b, b_shape) = g.get(&format!("lora.{m}.lora_B.weight")).unwrap();
        let lora = HostLora { in_features: a_shape[1], out_features: b_shape[0], a, b };
        params.modules.insert(m.clone(), lora);
    }
    let mut golden_grads: Vec<Vec<f32>> = modules
        .iter()
        .flat_map(|m| ["A", "B"].map(|w| g.get(&format!("grad.{m}.lora_{w}.weight")).unwrap().0))
        .collect();
    clip_grad_norm(&mut golden_grads, 1.0);
    let mut adam = AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }, &params.flat_sizes());
    let mut flat = params.take_flat();
    adam.step(&mut flat, &golden_grads);
    params.put_flat(flat);
    for (m, lora) in &params.modules {
        for (v, which) in [(&lora.a, "A"), (&lora.b, "B")] {
            let golden = g.get(&format!("step.{m}.lora_{which}.weight")).unwrap().0;
            let err = v.iter().zip(&golden).fold(0f32, |e, (x, y)| e.max((x - y).abs()));
            assert!(err < 1e-6, "{model}: {which} of {m} after the AdamW step off by {err}");
        }
    }
}

#[test]
fn sd3_lora_step_matches_diffusers() {
    lora_step_matches_diffusers("sd3-tiny");
}

/// SD3.5: q/k RMS norms and a dual-attention block (whose `attn2` has no adapter but passes the gradient).
#[test]
fn sd35_lora_step_matches_diffusers() {
    lora_step_matches_diffusers("sd35-tiny");
}

/// The step with the transformer in bf16 and f16: its distance from diffusers' f32 step within twice diffusers'
/// own distance in that dtype (the golden's `bf16.*`/`f16.*`, the script under `--mixed_precision`).
#[test]
fn half_precision_lora_steps_stay_within_diffusers_own_distance() {
    let cpu = common::cpu();
    for model in ["sd3-tiny", "sd35-tiny"] {
        let g = TrainingGolden::load(&fixtures(), model).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let ours = g.run_in(&cpu, dtype).unwrap();
            let reference = g.reference_distance(dtype).unwrap();
            eprintln!("{model} {dtype}: ours {ours}; diffusers {reference}");
            assert!(
                ours.prediction <= 2.0 * reference.prediction,
                "{model} {dtype}: {ours} against diffusers' {reference}"
            );
            assert!(
                ours.gradients <= 2.0 * reference.gradients,
                "{model} {dtype}: {ours} against diffusers' {reference}"
            );
        }
    }
}

/// Full fine-tuning (`train_dreambooth_sd3.py`): every parameter's gradient against diffusers', with and without
/// gradient checkpointing. Bound 1e-4: every tensor lands within 3.4e-6 but the timestep embedder's first weight
/// (2.7e-5), whose input is the timestep sinusoid, where f32 arguments up to 850 rad put diffusers' and ours 1e-5
/// apart.
#[test]
fn full_fine_tuning_gradients_match_diffusers() {
    let cpu = common::cpu();
    for model in ["sd3-tiny", "sd35-tiny"] {
        let g = TrainingGolden::load(&fixtures(), model).unwrap();
        let d = g.run_full(&cpu, false).unwrap();
        eprintln!("{model} full step on cpu: {d}");
        assert!(d.prediction < 1e-5 && d.loss < 1e-5 && d.gradients < 1e-4, "{model}: {d}");
        let recomputed = g.run_full(&cpu, true).unwrap();
        assert_eq!(
            (recomputed.prediction, recomputed.gradients),
            (d.prediction, d.gradients),
            "{model}: checkpointing"
        );
    }
}

/// `--train_text_encoder`: adapters on the transformer and both CLIPs, the prompt encoded with them; every
/// adapter's gradient against diffusers + PEFT's.
#[test]
fn text_encoder_lora_gradients_match_diffusers() {
    let g = TrainingGolden::load(&fixtures(), "sd3-tiny").unwrap();
    let d = g.run_text_encoders(&common::cpu()).unwrap();
    eprintln!("sd3-tiny with the text encoders on cpu: {d}");
    assert!(d.prediction < 1e-5 && d.loss < 1e-5 && d.gradients < 5e-5, "{d}");
}

#[test]
fn vae_encoder_matches_diffusers() {
    let cpu = common::cpu();
    let g = TrainingGolden::load(&fixtures(), "sd3-tiny").unwrap();
    let encoder = VaeEncoder::load(&fixtures().join("sd3-tiny/vae"), &cpu, DType::F32).unwrap();
    let (image, shape) = g.get("vae.image").unwrap();
    let dist = encoder.encode(&cpu.from_f32(&image, &shape, DType::F32).unwrap()).unwrap();
    for (t, name) in [(&dist.mean, "vae.mean"), (&dist.logvar, "vae.logvar")] {
        let (golden, shape) = g.get(name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let err = rel_err(&t.to_f32_vec().unwrap(), &golden);
        assert!(err < 1e-4, "{name} off by {err} (relative to its largest value)");
    }
    let bad = cpu.zeros(&[1, 3, 60, 48], DType::F32).unwrap();
    let msg = encoder.encode(&bad).err().expect("60 rows is no multiple of 8").to_string();
    assert!(msg.contains("[1, 3, 60, 48]") && msg.contains("multiples of 8"), "{msg}");
}

/// A fresh folder of instance images copied from the golden cases' images (`fixtures/golden/<case>/image.png`).
fn instance_images(name: &str, cases: &[&str]) -> PathBuf {
    let dir = common::scratch(name);
    for (i, case) in cases.iter().enumerate() {
        std::fs::copy(fixtures().join(format!("golden/{case}/image.png")), dir.join(format!("{i}.png"))).unwrap();
    }
    dir
}

/// A safetensors file's tensors by name, as bytes (the files' headers may list metadata in any order).
fn tensors_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    tensors.sort();
    tensors
}

/// The adapters `<component>.<module>.lora_{A,B}.weight` of a saved LoRA file for `modules`, on `cpu` (scale 1:
/// alpha equals the rank).
fn adapters_of<'m>(file: &Path, component: &str, modules: impl Iterator<Item = &'m String>, cpu: &Backend) -> Adapters {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let load = |name: String| {
        let t = st.tensor(&name).unwrap();
        let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        cpu.from_f32(&v, t.shape(), DType::F32).unwrap()
    };
    modules
        .map(|m| {
            let (a, b) =
                (load(format!("{component}.{m}.lora_A.weight")), load(format!("{component}.{m}.lora_B.weight")));
            (m.clone(), LoraPair { a, b, scale: 1.0 })
        })
        .collect()
}

/// `mean((v·(-σ) + noisy - x0)²)` of the transformer's prediction on a fixed evaluation batch.
fn eval_loss(transformer: &Sd3Transformer2DModel, e: &EvalBatch, backend: &Backend) -> f32 {
    let noisy = backend.from_f32(&e.noisy, &e.shape, DType::F32).unwrap();
    let pred = transformer.forward(&noisy, &e.embeds, &e.pooled, &e.timesteps, &[]).unwrap();
    preconditioned_loss(&pred, &e.noisy, &e.x0, &e.sigmas).unwrap().0
}

struct EvalBatch {
    x0: Vec<f32>,
    noisy: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    shape: Vec<usize>,
    embeds: Tensor,
    pooled: Tensor,
}

impl EvalBatch {
    /// The first instance image's latent mean (64×64, centre crop) at four noise levels with fixed noise, under
    /// the prompt's `embeds` and `pooled` (`[1, …]`, repeated to the 4 rows).
    fn new(model: &Path, instance_dir: &Path, embeds: &Tensor, pooled: &Tensor, cpu: &Backend) -> EvalBatch {
        let encoder = VaeEncoder::load(&model.join("vae"), cpu, DType::F32).unwrap();
        let pixels = sd3::train::data::InstanceImages::load(instance_dir).unwrap().prepared(0, 64, (0.5, 0.5), false);
        let dist = encoder.encode(&cpu.from_f32(&pixels, &[1, 3, 64, 64], DType::F32).unwrap()).unwrap();
        let (shift, scale) = (encoder.config().shift_factor.unwrap(), encoder.config().scaling_factor);
        let mean: Vec<f32> = dist.mean.to_f32_vec().unwrap().iter().map(|m| (m - shift) * scale).collect();
        let sigmas = vec![0.2, 0.4, 0.6, 0.8];
        let x0: Vec<f32> = sigmas.iter().flat_map(|_| mean.clone()).collect();
        let noise = sd3::noise::standard_normal(99, x0.len());
        let rows = |t: &Tensor| {
            let mut shape = t.shape().to_vec();
            shape[0] = 4;
            t.broadcast_to(&shape).unwrap().contiguous().unwrap()
        };
        EvalBatch {
            noisy: noisy_latents(&x0, &noise, &sigmas),
            timesteps: sigmas.iter().map(|s| s * 1000.0).collect(),
            x0,
            sigmas,
            shape: vec![4, 16, 8, 8],
            embeds: rows(embeds),
            pooled: rows(pooled),
        }
    }
}

/// A short DreamBooth run on the tiny model: the saved LoRA lowers the loss on fixed noise levels and noise, it
/// loads through `--lora`'s merge, and the merged transformer predicts what the adapters predict.
#[test]
fn dreambooth_lora_learns_and_loads() {
    use sd3::lora::LoraSet;
    use sd3::train::dreambooth::{embed_prompt, train_dreambooth, DreamBoothConfig};
    use sd3::weights::Weights;
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("fixtures/sd3-tiny");
    let instance = instance_images("dreambooth-instance", &["sd3-cfg"]);
    let out = common::scratch("dreambooth-out");
    let mut cfg = DreamBoothConfig::new(model.clone(), instance, "a photo of sks dog".into(), out.clone());
    (cfg.resolution, cfg.max_train_steps, cfg.center_crop, cfg.cache_latents) = (64, 60, true, true);
    cfg.optimizer.lr = 1e-2;
    let mut steps = 0;
    let report = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |e| {
        if let sd3::train::dreambooth::TrainEvent::Step { .. } = e {
            steps += 1
        }
    })
    .unwrap();
    assert_eq!((steps, report.losses.len()), (60, 60));
    assert!(report.losses.iter().all(|l| l.is_finite()));

    // The evaluation batch: the image's latent mean, four noise levels, fixed noise.
    let (embeds, pooled) = embed_prompt(&cfg, &cpu).unwrap();
    let e = EvalBatch::new(&model, &cfg.instance_dir, &embeds, &pooled, &cpu);
    let base = Sd3Transformer2DModel::load(&model.join("transformer"), &cpu, DType::F32).unwrap();
    let before = eval_loss(&base, &e, &cpu);

    // The saved file through the inference path's LoRA merge.
    let mut weights = Weights::open(&model.join("transformer")).unwrap();
    let set = LoraSet::load(&[(report.output.clone(), 1.0)]).unwrap();
    assert_eq!(set.module_count("transformer"), base.adapter_shapes().len());
    set.apply("transformer", &mut weights).unwrap();
    let config = sd3::models::mmdit::Sd3TransformerConfig::load(&model.join("transformer")).unwrap();
    let merged = Sd3Transformer2DModel::from_weights(&weights, config, &cpu, DType::F32).unwrap();
    let after = eval_loss(&merged, &e, &cpu);
    eprintln!("evaluation loss {before} before training, {after} after");
    assert!(after < 0.9 * before, "the LoRA should fit the subject: loss {before} before, {after} after");

    // The same LoRA as adapters on the base model predicts what the merged model predicts.
    let adapters = adapters_of(&report.output, "transformer", base.adapter_shapes().keys(), &cpu);
    let noisy = cpu.from_f32(&e.noisy, &e.shape, DType::F32).unwrap();
    let merged_pred = merged.forward(&noisy, &e.embeds, &e.pooled, &e.timesteps, &[]).unwrap().to_f32_vec().unwrap();
    let batch = TrainingBatch {
        hidden_states: &noisy,
        encoder_hidden_states: &e.embeds,
        pooled: &e.pooled,
        timesteps: &e.timesteps,
    };
    let (_, adapter_pred) =
        base.adapter_gradients(&batch, &adapters, true, |p| Ok((p.clone(), p.to_f32_vec()?))).unwrap();
    let err = rel_err(&adapter_pred, &merged_pred);
    assert!(err < 1e-5, "adapters and the merged LoRA disagree by {err}");
}

/// Full fine-tuning on the tiny model: the saved pipeline's transformer lowers the loss on fixed noise levels and
/// noise, holds every tensor of the original file (the buffer `pos_embed.pos_embed` unchanged), and the folder
/// opens as a pipeline.
#[test]
fn full_dreambooth_learns_and_saves_a_pipeline() {
    use sd3::train::dreambooth::{embed_prompt, train_dreambooth, DreamBoothConfig, Method};
    use sd3::weights::Weights;
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("fixtures/sd3-tiny");
    let instance = instance_images("dreambooth-full-instance", &["sd3-cfg"]);
    let out = common::scratch("dreambooth-full-out");
    let mut cfg = DreamBoothConfig::new(model.clone(), instance, "a photo of sks dog".into(), out.clone());
    (cfg.resolution, cfg.max_train_steps, cfg.center_crop, cfg.cache_latents) = (64, 30, true, true);
    (cfg.method, cfg.optimizer.lr) = (Method::Full, 1e-3);
    let report = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).unwrap();
    assert_eq!(report.output, out);
    assert!(report.losses.iter().all(|l| l.is_finite()));

    let (embeds, pooled) = embed_prompt(&cfg, &cpu).unwrap();
    let e = EvalBatch::new(&model, &cfg.instance_dir, &embeds, &pooled, &cpu);
    let base = Sd3Transformer2DModel::load(&model.join("transformer"), &cpu, DType::F32).unwrap();
    let trained = Sd3Transformer2DModel::load(&out.join("transformer"), &cpu, DType::F32).unwrap();
    let (before, after) = (eval_loss(&base, &e, &cpu), eval_loss(&trained, &e, &cpu));
    eprintln!("evaluation loss {before} before full fine-tuning, {after} after");
    assert!(after < 0.9 * before, "the fine-tuned model should fit the subject: loss {before} before, {after} after");

    let original = Weights::open(&model.join("transformer")).unwrap();
    let saved = Weights::open(&out.join("transformer")).unwrap();
    let mut names: Vec<&str> = original.names().collect();
    names.sort();
    let mut saved_names: Vec<&str> = saved.names().collect();
    saved_names.sort();
    assert_eq!(names, saved_names);
    let pos = "pos_embed.pos_embed";
    assert_eq!(original.host_f32(pos).unwrap(), saved.host_f32(pos).unwrap());
    sd3::pipeline::StableDiffusion3Pipeline::new(&out, cpu.clone(), Default::default()).unwrap();
}

/// Prior preservation: the missing class images are generated once (a second run finds them), and training runs
/// on instance and class rows.
#[test]
fn prior_preservation_generates_class_images_once() {
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, PriorPreservation, TrainEvent};
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let instance = instance_images("prior-instance", &["sd3-cfg"]);
    let class_dir = common::scratch("prior-class").join("dogs");
    let mut cfg = DreamBoothConfig::new(
        root.join("fixtures/sd3-tiny"),
        instance,
        "a photo of sks dog".into(),
        common::scratch("prior-out"),
    );
    (cfg.resolution, cfg.max_train_steps, cfg.train_batch_size) = (64, 3, 2);
    cfg.prior = Some(PriorPreservation {
        class_dir: class_dir.clone(),
        class_prompt: "a photo of dog".into(),
        num_class_images: 2,
        prior_loss_weight: 1.0,
    });
    let mut generated = Vec::new();
    let report = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |e| {
        if let TrainEvent::ClassImage { path, .. } = e {
            generated.push(path.clone())
        }
    })
    .unwrap();
    assert_eq!(generated, vec![class_dir.join("class_0.png"), class_dir.join("class_1.png")]);
    assert!(report.losses.iter().all(|l| l.is_finite()) && report.losses.len() == 3);
    let mut again = 0;
    train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |e| {
        again += matches!(e, TrainEvent::ClassImage { .. }) as usize
    })
    .unwrap();
    assert_eq!(again, 0, "the class images are there already");
}

/// A run resumed from its checkpoint ends where the uninterrupted run ends, bit for bit (weights, optimizer,
/// data order, noise), for a LoRA and for full fine-tuning; a checkpoint of the other method is refused.
#[test]
fn resumed_runs_end_where_uninterrupted_ones_do() {
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, Method};
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let instance = instance_images("resume-instance", &["sd3-cfg", "sd35-cfg"]);
    let text = Some(sd3::train::optim::AdamWConfig::default());
    for (method, text, result) in [
        (Method::Lora { rank: 4 }, None, "pytorch_lora_weights.safetensors"),
        (Method::Lora { rank: 4 }, text, "pytorch_lora_weights.safetensors"),
        (Method::Full, None, "transformer/diffusion_pytorch_model.safetensors"),
    ] {
        let config = |out: &Path| {
            let mut cfg =
                DreamBoothConfig::new(root.join("fixtures/sd3-tiny"), instance.clone(), "sks".into(), out.into());
            (cfg.resolution, cfg.max_train_steps, cfg.random_flip, cfg.checkpointing_steps) = (64, 4, true, Some(2));
            (cfg.method, cfg.optimizer.lr, cfg.train_text_encoder) = (method, 1e-3, text);
            cfg
        };
        let whole = common::scratch("resume-whole");
        let straight = train_dreambooth(&config(&whole), std::slice::from_ref(&cpu), &mut |_| {}).unwrap();
        let resumed_dir = common::scratch("resume-resumed");
        let mut cfg = config(&resumed_dir);
        cfg.resume_from = Some(whole.join("checkpoint-2"));
        let resumed = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).unwrap();
        assert_eq!(resumed.losses, straight.losses[2..], "{method:?}: the resumed steps' losses");
        let same = tensors_of(&whole.join(result)) == tensors_of(&resumed_dir.join(result));
        assert!(same, "{method:?}: the resumed run's result differs");
        let other = match method {
            Method::Full => Method::Lora { rank: 4 },
            Method::Lora { .. } => Method::Full,
        };
        (cfg.method, cfg.train_text_encoder) = (other, None);
        let msg = format!("{:#}", train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).err().unwrap());
        assert!(msg.contains("a checkpoint of a"), "{msg}");
    }
}

/// Data parallelism over two devices (two CPU backend instances here) computes what one device computes
/// accumulating the same two micro-batches: the same losses and the same LoRA, bit for bit. Full fine-tuning is
/// refused on several devices.
#[test]
fn data_parallel_lora_equals_accumulation_on_one_device() {
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, Method};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let instance = instance_images("dp-instance", &["sd3-cfg", "sd35-cfg"]);
    let config = |out: &Path, accumulate: usize| {
        let mut cfg = DreamBoothConfig::new(root.join("fixtures/sd3-tiny"), instance.clone(), "sks".into(), out.into());
        (cfg.resolution, cfg.max_train_steps, cfg.random_flip, cfg.optimizer.lr) = (64, 3, true, 1e-3);
        cfg.gradient_accumulation_steps = accumulate;
        cfg
    };
    let (one_dir, two_dir) = (common::scratch("dp-one"), common::scratch("dp-two"));
    let one = train_dreambooth(&config(&one_dir, 2), &[common::cpu()], &mut |_| {}).unwrap();
    let two = train_dreambooth(&config(&two_dir, 1), &[common::cpu(), common::cpu()], &mut |_| {}).unwrap();
    assert_eq!(one.losses, two.losses);
    assert!(tensors_of(&one.output) == tensors_of(&two.output), "the data-parallel LoRA differs");
    let mut cfg = config(&two_dir, 1);
    cfg.method = Method::Full;
    let msg = format!("{:#}", train_dreambooth(&cfg, &[common::cpu(), common::cpu()], &mut |_| {}).err().unwrap());
    assert!(msg.contains("full fine-tuning runs on one device"), "{msg}");
}

/// `--train-text-encoder`: a short run's LoRA holds both CLIPs' adapters, `--lora` merges them (the merged
/// encoders give what the adapters give), and the pipeline with it fits the subject better than the base.
#[test]
fn text_encoder_lora_trains_and_loads() {
    use sd3::lora::LoraSet;
    use sd3::pipeline::{GenerationRequest, PipelineOptions, StableDiffusion3Pipeline};
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig};
    use sd3::train::optim::AdamWConfig;
    use sd3::weights::Weights;
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("fixtures/sd3-tiny");
    let instance = instance_images("text-lora-instance", &["sd3-cfg"]);
    let out = common::scratch("text-lora-out");
    let mut cfg = DreamBoothConfig::new(model.clone(), instance, "a photo of sks dog".into(), out.clone());
    (cfg.resolution, cfg.max_train_steps, cfg.center_crop, cfg.cache_latents) = (64, 60, true, true);
    cfg.optimizer.lr = 1e-2;
    cfg.train_text_encoder = Some(AdamWConfig { lr: 1e-2, weight_decay: 1e-3, ..AdamWConfig::default() });
    let report = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).unwrap();
    let set = LoraSet::load(&[(report.output.clone(), 1.0)]).unwrap();
    for (component, layers) in [("text_encoder", 3), ("text_encoder_2", 3)] {
        assert_eq!(set.module_count(component), 4 * layers, "{component}'s adapted modules in the file");
    }

    // The conditioning through the pipeline, with and without the LoRA (merged into the encoders at load).
    let encode = |loras: Vec<(std::path::PathBuf, f32)>| {
        let pipe = StableDiffusion3Pipeline::new(&model, cpu.clone(), PipelineOptions { loras, ..Default::default() })
            .unwrap();
        let mut req = GenerationRequest::new("a photo of sks dog", 64, 64);
        (req.guidance, req.max_sequence_length) = (1.0, 77);
        pipe.encode(&req, &mut |_| {}).unwrap()
    };
    let base_cond = encode(Vec::new());
    let tuned_cond = encode(vec![(report.output.clone(), 1.0)]);
    let moved =
        rel_err(&tuned_cond.prompt_embeds.to_f32_vec().unwrap(), &base_cond.prompt_embeds.to_f32_vec().unwrap());
    assert!(moved > 1e-3, "the text encoders' LoRA should change the prompt embeddings ({moved})");
    // The file's text adapters applied as adapters give what the merged encoders give.
    let encoders = sd3::train::text_encoders::TextEncoders::load(&model, &cpu, DType::F32).unwrap();
    let shapes = encoders.adapter_shapes();
    let adapters =
        [0, 1].map(|i| adapters_of(&report.output, ["text_encoder", "text_encoder_2"][i], shapes[i].keys(), &cpu));
    let pipe = StableDiffusion3Pipeline::new(&model, cpu.clone(), Default::default()).unwrap();
    let inputs = pipe.text_inputs("a photo of sks dog", 77).unwrap();
    let encoded = encoders.encode(&pipe, &inputs, [&adapters[0], &adapters[1]]).unwrap();
    let err = rel_err(&encoded.embeds.to_f32_vec().unwrap(), &tuned_cond.prompt_embeds.to_f32_vec().unwrap());
    let err_pooled = rel_err(&encoded.pooled.to_f32_vec().unwrap(), &tuned_cond.pooled.to_f32_vec().unwrap());
    assert!(err < 1e-5 && err_pooled < 1e-5, "adapters and merged text encoders disagree: {err}, {err_pooled}");

    let batch = |cond: &sd3::pipeline::Conditioning| {
        EvalBatch::new(&model, &cfg.instance_dir, &cond.prompt_embeds, &cond.pooled, &cpu)
    };
    let base = Sd3Transformer2DModel::load(&model.join("transformer"), &cpu, DType::F32).unwrap();
    let mut weights = Weights::open(&model.join("transformer")).unwrap();
    set.apply("transformer", &mut weights).unwrap();
    let config = sd3::models::mmdit::Sd3TransformerConfig::load(&model.join("transformer")).unwrap();
    let merged = Sd3Transformer2DModel::from_weights(&weights, config, &cpu, DType::F32).unwrap();
    let (before, after) = (eval_loss(&base, &batch(&base_cond), &cpu), eval_loss(&merged, &batch(&tuned_cond), &cpu));
    eprintln!("evaluation loss {before} before training with the text encoders, {after} after");
    assert!(after < 0.9 * before, "loss {before} before, {after} after");
}

/// `validation_epochs`: a validation is due after the first epoch and every `E` after, with the result so far;
/// with `--repeats 2` an epoch of two images at batch 1 is four steps.
#[test]
fn validations_come_at_epoch_ends() {
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, TrainEvent};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let instance = instance_images("validation-instance", &["sd3-cfg", "sd35-cfg"]);
    let out = common::scratch("validation-out");
    let mut cfg = DreamBoothConfig::new(root.join("fixtures/sd3-tiny"), instance, "sks".into(), out.clone());
    (cfg.resolution, cfg.max_train_steps, cfg.repeats, cfg.validation_epochs) = (64, 13, 2, Some(2));
    let mut seen = Vec::new();
    let mut step = 0;
    train_dreambooth(&cfg, &[common::cpu()], &mut |e| match e {
        TrainEvent::Step { step: s, .. } => step = *s,
        TrainEvent::Validate { epoch, trained } => {
            assert!(trained.is_file(), "{}", trained.display());
            seen.push((*epoch, step));
        }
        _ => {}
    })
    .unwrap();
    // Epochs of 4 steps end at steps 4, 8, 12: epochs 0 and 2 are validated.
    assert_eq!(seen, vec![(0, 4), (2, 12)]);
}

#[test]
fn dreambooth_rejects_bad_input() {
    use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, Method};
    let cpu = common::cpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let empty = common::scratch("dreambooth-empty");
    let out = common::scratch("dreambooth-bad-out");
    let cfg = DreamBoothConfig::new(root.join("fixtures/sd3-tiny"), empty.clone(), "sks".into(), out.clone());
    let msg = train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).err().unwrap().to_string();
    assert!(msg.contains(&empty.display().to_string()) && msg.contains("no .png"), "{msg}");
    let mut cfg = DreamBoothConfig::new(root.join("fixtures/sd3-tiny"), empty, "sks".into(), out);
    cfg.method = Method::Lora { rank: 0 };
    let msg = format!("{:#}", train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).err().unwrap());
    assert!(msg.contains("--rank 0"), "{msg}");
    std::fs::write(cfg.instance_dir.join("broken.png"), b"not a png").unwrap();
    cfg.method = Method::Lora { rank: 4 };
    let msg = format!("{:#}", train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).err().unwrap());
    assert!(msg.contains("broken.png"), "{msg}");
    cfg.resolution = 1000;
    std::fs::copy(fixtures().join("golden/sd3-cfg/image.png"), cfg.instance_dir.join("broken.png")).unwrap();
    let msg = format!("{:#}", train_dreambooth(&cfg, std::slice::from_ref(&cpu), &mut |_| {}).err().unwrap());
    assert!(msg.contains("--resolution 1000"), "{msg}");
}
