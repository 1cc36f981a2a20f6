//! DreamBooth fine-tuning of the transformer, step for step as diffusers'
//! `examples/dreambooth/train_dreambooth_lora_sd3.py` (LoRA) and `train_dreambooth_sd3.py` (every parameter) do it
//! (text encoders frozen, prompt embedded once): instance images → VAE latents `(z - shift)·scale`; per step a
//! noise level from the weighting scheme, the noisy latents `(1-σ)·x0 + σ·noise`, the transformer, the
//! preconditioned loss, gradients, clipping and AdamW ([`super::trainee`]). Writes
//! `pytorch_lora_weights.safetensors`, or a pipeline folder with the trained transformer, in diffusers' layout.

use super::checkpoint::RunState;
use super::data::{Draws, ImageLatents, InstanceImages, LatentsOptions};
use super::objective::{noisy_latents, prior_preserving_loss, training_sigma, TimestepSampling};
use super::optim::{AdamWConfig, LrSchedule};
use super::text_encoders::TextEncoders;
use super::trainee::{Gradients, TextStep, Trainee};
pub use super::trainee::{Method, LORA_FILE};
use crate::models::mmdit::train::TrainingBatch;
use crate::models::mmdit::Sd3Transformer2DModel;
use crate::models::vae_encoder::VaeEncoder;
use crate::pipeline::{GenerationRequest, PipelineOptions, StableDiffusion3Pipeline};
use crate::scheduler::SchedulerConfig;
use anyhow::{bail, Context};
use sd3_core::{Backend, DType, Tensor};
use std::path::PathBuf;
use std::time::Instant;

/// What to train; the defaults are the script's (`Default`), but the instance data and output.
#[derive(Clone, Debug)]
pub struct DreamBoothConfig {
    pub model_dir: PathBuf,
    pub instance_dir: PathBuf,
    pub instance_prompt: String,
    pub output_dir: PathBuf,
    pub resolution: usize,
    /// Centre crops; otherwise a random crop each time an image is used.
    pub center_crop: bool,
    pub random_flip: bool,
    pub train_batch_size: usize,
    pub max_train_steps: usize,
    pub gradient_accumulation_steps: usize,
    /// AdamW's settings; `lr` is the base rate the schedule scales.
    pub optimizer: AdamWConfig,
    pub lr_schedule: LrSchedule,
    pub lr_warmup_steps: usize,
    pub method: Method,
    pub sampling: TimestepSampling,
    pub max_grad_norm: f32,
    pub seed: u64,
    /// The transformer's compute dtype (adapters and optimizer stay f32 on the host; the VAE runs in f32).
    pub dtype: DType,
    pub max_sequence_length: usize,
    /// Save `checkpoint-<step>/pytorch_lora_weights.safetensors` every this many steps.
    pub checkpointing_steps: Option<usize>,
    /// Encode each image once (one crop and no flip for the whole run) instead of every time it is used.
    pub cache_latents: bool,
    /// Keep each block's inputs only and recompute its activations in the backward.
    pub gradient_checkpointing: bool,
    /// Class images trained beside the instance images (`--with_prior_preservation`).
    pub prior: Option<PriorPreservation>,
    /// A checkpoint folder of an earlier run with the same settings to go on from, exactly where it stopped.
    pub resume_from: Option<PathBuf>,
    /// Each instance image this many times per epoch (`--repeats`).
    pub repeats: usize,
    /// Every this many epochs (after the first), [`TrainEvent::Validate`] with the result so far.
    pub validation_epochs: Option<usize>,
    /// `--train-text-encoder`: LoRA adapters on both CLIPs too, with these optimizer settings (the script's
    /// `--text_encoder_lr` 5e-6 and `--adam_weight_decay_text_encoder` 1e-3 by default).
    pub train_text_encoder: Option<AdamWConfig>,
}

/// Prior preservation: each batch also holds class images ("a photo of a dog") with their own prompt, and the
/// loss adds their loss times `prior_loss_weight`, so the model keeps what the class looks like. Missing class
/// images (fewer than `num_class_images` in `class_dir`) are generated with the base model first, as the script
/// does.
#[derive(Clone, Debug)]
pub struct PriorPreservation {
    pub class_dir: PathBuf,
    pub class_prompt: String,
    pub num_class_images: usize,
    pub prior_loss_weight: f32,
}

impl DreamBoothConfig {
    pub fn new(model_dir: PathBuf, instance_dir: PathBuf, instance_prompt: String, output_dir: PathBuf) -> Self {
        DreamBoothConfig {
            model_dir,
            instance_dir,
            instance_prompt,
            output_dir,
            resolution: 512,
            center_crop: false,
            random_flip: false,
            train_batch_size: 1,
            max_train_steps: 500,
            gradient_accumulation_steps: 1,
            optimizer: AdamWConfig::default(),
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 500,
            method: Method::Lora { rank: 4 },
            sampling: TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
            max_grad_norm: 1.0,
            seed: 0,
            dtype: DType::F32,
            max_sequence_length: 77,
            checkpointing_steps: None,
            cache_latents: false,
            gradient_checkpointing: false,
            prior: None,
            resume_from: None,
            train_text_encoder: None,
            repeats: 1,
            validation_epochs: None,
        }
    }
}

/// Progress of a training run.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// Prompt embedded, models loaded: `tensors` trained (adapters, or parameters) of `values` values in all.
    Ready {
        images: usize,
        tensors: usize,
        values: usize,
        seconds: f64,
    },
    /// Optimizer step `step` (1-based) of `total`: the mean loss of its micro-batches and the gradient norm
    /// before clipping.
    Step {
        step: usize,
        total: usize,
        loss: f32,
        grad_norm: f32,
        seconds: f64,
    },
    Saved {
        path: PathBuf,
    },
    /// Epoch `epoch` (0-based) ended and a validation is due: the result so far is at `trained` (a LoRA file or a
    /// pipeline folder, to be removed after use).
    Validate {
        epoch: usize,
        trained: PathBuf,
    },
    /// Class image `index` of `total` generated for prior preservation.
    ClassImage {
        index: usize,
        total: usize,
        path: PathBuf,
    },
}

/// A finished run.
pub struct TrainReport {
    pub losses: Vec<f32>,
    /// The LoRA file, or the pipeline folder with the trained transformer.
    pub output: PathBuf,
}

/// Runs the fine-tuning and writes the result (and the state to resume from) under `cfg.output_dir`.
///
/// With more than one backend, a LoRA trains data-parallel, as `accelerate launch --num_processes N` runs the
/// script: each device holds the transformer and takes `train_batch_size` rows of every batch, the gradients are
/// averaged over the devices on the host, one optimizer updates the adapters.
pub fn train_dreambooth(
    cfg: &DreamBoothConfig,
    backends: &[Backend],
    on_event: &mut dyn FnMut(&TrainEvent),
) -> anyhow::Result<TrainReport> {
    let start = Instant::now();
    check(cfg)?;
    let backend = backends.first().context("no device to train on")?;
    if backends.len() > 1 && cfg.method == Method::Full {
        bail!("full fine-tuning runs on one device (data parallelism is for LoRA training)");
    }
    let images = InstanceImages::load(&cfg.instance_dir)?;
    let class_images = match &cfg.prior {
        Some(prior) => {
            super::prior::complete_class_images(cfg, prior, backend, on_event)?;
            Some(InstanceImages::load(&prior.class_dir)?)
        }
        None => None,
    };
    let (mut embeds, mut pooled) = embed_text(cfg, backend, &cfg.instance_prompt)?;
    let encoder = VaeEncoder::load(&cfg.model_dir.join("vae"), backend, DType::F32)?;
    let (f, res) = (encoder.scale_factor(), cfg.resolution);
    if res % f != 0 {
        bail!("--resolution {res}: not a multiple of the VAE's factor {f}");
    }
    let transformer = Sd3Transformer2DModel::load(&cfg.model_dir.join("transformer"), backend, cfg.dtype)
        .with_context(|| format!("loading the transformer of {}", cfg.model_dir.display()))?;
    transformer.check_latent_size(res / f, res / f).with_context(|| format!("--resolution {res}"))?;
    let scheduler = SchedulerConfig::load(&cfg.model_dir.join("scheduler"))?;
    // diffusers shifts the training schedule at construction only without dynamic shifting.
    let shift = if scheduler.use_dynamic_shifting { 1.0 } else { scheduler.shift as f32 };

    // --train-text-encoder: the CLIPs, and each prompt's token ids and frozen T5 output.
    let text_training = match cfg.train_text_encoder {
        Some(text_config) => {
            if backends.len() > 1 {
                bail!("--train-text-encoder runs on one device (data parallelism trains the transformer's LoRA only)");
            }
            let options = PipelineOptions { dtype: cfg.dtype, ..PipelineOptions::default() };
            let pipe = StableDiffusion3Pipeline::new(&cfg.model_dir, backend.clone(), options)?;
            let mut prompts = vec![pipe.text_inputs(&cfg.instance_prompt, cfg.max_sequence_length)?];
            if let Some(prior) = &cfg.prior {
                prompts.push(pipe.text_inputs(&prior.class_prompt, cfg.max_sequence_length)?);
            }
            let encoders = TextEncoders::load(&cfg.model_dir, backend, cfg.dtype)?;
            Some((pipe, prompts, encoders, text_config))
        }
        None => None,
    };
    let text_setup = text_training.as_ref().map(|(_, _, encoders, config)| (encoders, *config));
    let mut trainee = Trainee::new(cfg.method, cfg.optimizer, text_setup, cfg.seed, &transformer)?;
    // The other devices of a data-parallel run, each with the whole transformer.
    let mut replicas = Vec::with_capacity(backends.len() - 1);
    for be in &backends[1..] {
        let t = Sd3Transformer2DModel::load(&cfg.model_dir.join("transformer"), be, cfg.dtype)
            .with_context(|| format!("loading the transformer on {}", be.info().name))?;
        replicas.push(t);
    }
    let transformers: Vec<&Sd3Transformer2DModel> = std::iter::once(&transformer).chain(&replicas).collect();
    let mut draws = Draws::new(cfg.seed ^ 0x5eed_0fd7_eab0_0700);
    let options = LatentsOptions {
        resolution: res,
        center_crop: cfg.center_crop,
        random_flip: cfg.random_flip,
        cache: cfg.cache_latents,
        repeats: cfg.repeats,
    };
    let mut sets = vec![ImageLatents::new(&images, &encoder, backend, options, &mut draws)?];
    let b = cfg.train_batch_size;
    // The batch: the instance images' rows, then as many class images' rows under their own prompt.
    let (class_embeds, class_pooled) = match (&cfg.prior, &class_images) {
        (Some(prior), Some(class_images)) => {
            let options = LatentsOptions { repeats: 1, ..options };
            sets.push(ImageLatents::new(class_images, &encoder, backend, options, &mut draws)?);
            let (e, p) = embed_text(cfg, backend, &prior.class_prompt)?;
            (Some(e), Some(p))
        }
        _ => (None, None),
    };
    embeds = repeat_rows(&embeds, b)?;
    pooled = repeat_rows(&pooled, b)?;
    if let (Some(ce), Some(cp)) = (class_embeds, class_pooled) {
        // Both prompts' embeddings have 77 CLIP + max_sequence_length T5 tokens.
        embeds = Tensor::cat(&[&embeds, &repeat_rows(&ce, b)?], 0)?;
        pooled = Tensor::cat(&[&pooled, &repeat_rows(&cp, b)?], 0)?;
    }
    let texts = backends
        .iter()
        .map(|be| Ok((embeds.to_backend(be)?, pooled.to_backend(be)?)))
        .collect::<sd3_core::Result<Vec<_>>>()?;
    let (tensors, values) = trainee.size();
    on_event(&TrainEvent::Ready { images: images.len(), tensors, values, seconds: start.elapsed().as_secs_f64() });

    let rows = b * sets.len();
    let latent_len = transformer.config.in_channels * (res / f) * (res / f);
    let latent_shape = [rows, transformer.config.in_channels, res / f, res / f];
    let prior_weight = cfg.prior.as_ref().map(|p| p.prior_loss_weight);
    let mut losses = Vec::with_capacity(cfg.max_train_steps);
    let mut draw_index = 0u64;
    let mut first_step = 1;
    if let Some(dir) = &cfg.resume_from {
        let run = trainee.restore(dir)?;
        if run.passes.len() != sets.len() || run.step >= cfg.max_train_steps {
            bail!(
                "--resume-from-checkpoint {}: stopped after step {} with {} image sets; this run has {} steps and {}",
                dir.display(),
                run.step,
                run.passes.len(),
                cfg.max_train_steps,
                sets.len()
            );
        }
        for (set, pass) in sets.iter_mut().zip(run.passes) {
            set.set_pass_left(pass)?;
        }
        (draw_index, draws, first_step) = (run.draw_index, Draws::new(run.draws), run.step + 1);
    }
    let mut last_run = None;
    for step in first_step..=cfg.max_train_steps {
        let t0 = Instant::now();
        trainee.begin_step(backends, cfg.dtype)?;
        let mut summed: Option<Gradients> = None;
        let mut loss_sum = 0.0;
        for _ in 0..cfg.gradient_accumulation_steps {
            // One batch per device: the next images of a shuffled pass over each image set (the script's
            // DataLoader), drawn on the host in device order.
            let mut work = Vec::with_capacity(backends.len());
            for _ in backends {
                let mut x0 = Vec::with_capacity(rows * latent_len);
                for set in &mut sets {
                    for _ in 0..b {
                        draw_index += 1;
                        let noise = crate::noise::standard_normal(cfg.seed.wrapping_add(draw_index << 20), latent_len);
                        x0.extend(set.next_sample(&noise, &mut draws)?);
                    }
                }
                draw_index += 1;
                let noise = crate::noise::standard_normal(cfg.seed.wrapping_add(draw_index << 20), rows * latent_len);
                let normals = crate::noise::standard_normal(cfg.seed.wrapping_add((draw_index << 20) + 1), rows);
                let sigmas: Vec<f32> = normals
                    .iter()
                    .map(|&z| {
                        let u = cfg.sampling.density_sample(z, draws.unit());
                        training_sigma(u, scheduler.num_train_timesteps, shift)
                    })
                    .collect();
                work.push((noisy_latents(&x0, &noise, &sigmas), x0, sigmas));
            }
            // With --train-text-encoder, the prompts are encoded with the current adapters at every micro-batch.
            let encoded = match (&text_training, trainee.text_adapters()) {
                (Some((pipe, prompts, encoders, _)), Some(adapters)) => {
                    prompts.iter().map(|p| encoders.encode(pipe, p, adapters)).collect::<anyhow::Result<Vec<_>>>()?
                }
                _ => Vec::new(),
            };
            let step_texts = if encoded.is_empty() {
                texts.clone()
            } else {
                let e: Vec<Tensor> =
                    encoded.iter().map(|e| repeat_rows(&e.embeds, b)).collect::<sd3_core::Result<_>>()?;
                let p: Vec<Tensor> =
                    encoded.iter().map(|e| repeat_rows(&e.pooled, b)).collect::<sd3_core::Result<_>>()?;
                vec![(Tensor::cat(&e.iter().collect::<Vec<_>>(), 0)?, Tensor::cat(&p.iter().collect::<Vec<_>>(), 0)?)]
            };
            let text_step = text_training.as_ref().map(|(_, _, encoders, _)| (encoders, &encoded));
            let trainee = &trainee;
            let results: Vec<anyhow::Result<(Gradients, f32)>> = std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .iter()
                    .zip(backends)
                    .zip(&transformers)
                    .zip(&step_texts)
                    .enumerate()
                    .map(|(device, (((host, be), transformer), (embeds, pooled)))| {
                        scope.spawn(move || -> anyhow::Result<(Gradients, f32)> {
                            let (noisy_host, x0, sigmas) = host;
                            let noisy = be.from_f32(noisy_host, &latent_shape, DType::F32)?;
                            let n = scheduler.num_train_timesteps as f32;
                            let timesteps: Vec<f32> = sigmas.iter().map(|s| s * n).collect();
                            let batch = TrainingBatch {
                                hidden_states: &noisy,
                                encoder_hidden_states: embeds,
                                pooled,
                                timesteps: &timesteps,
                            };
                            let text =
                                text_step.map(|(encoders, encoded)| TextStep { encoders, encoded, rows_per_prompt: b });
                            let ckpt = cfg.gradient_checkpointing;
                            trainee.gradients(device, transformer, &batch, ckpt, text, |pred| {
                                let (loss, d) = prior_preserving_loss(pred, noisy_host, x0, sigmas, prior_weight)?;
                                Ok((d, loss))
                            })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("a training thread panicked")).collect()
            });
            for result in results {
                let (grads, loss) = result?;
                if !loss.is_finite() {
                    bail!("step {step}: the loss is {loss} (lower --learning-rate, or train in f32)");
                }
                loss_sum += loss;
                summed = Some(match summed {
                    None => grads,
                    Some(acc) => acc.add(grads)?,
                });
            }
        }
        let sum = summed.expect("at least one micro-batch");
        // The schedule's factor, the same for every parameter group (as LambdaLR applies one lambda to all).
        let lr = cfg.lr_schedule.rate(cfg.optimizer.lr, step - 1, cfg.lr_warmup_steps, cfg.max_train_steps);
        let lr_factor = lr / cfg.optimizer.lr;
        // The mean over the micro-batches and the devices.
        let parts = cfg.gradient_accumulation_steps * backends.len();
        let grad_norm =
            trainee.update(sum, parts, cfg.max_grad_norm, lr_factor).with_context(|| format!("step {step}"))?;
        let loss = loss_sum / parts as f32;
        losses.push(loss);
        let seconds = t0.elapsed().as_secs_f64();
        on_event(&TrainEvent::Step { step, total: cfg.max_train_steps, loss, grad_norm, seconds });
        let run = RunState {
            step,
            method: trainee.method_tag(),
            draw_index,
            draws: draws.state(),
            passes: sets.iter().map(|s| s.pass_left().to_vec()).collect(),
        };
        if cfg.checkpointing_steps.is_some_and(|n| step % n == 0 && step < cfg.max_train_steps) {
            let dir = cfg.output_dir.join(format!("checkpoint-{step}"));
            let path = trainee.save(&cfg.model_dir, &dir)?;
            trainee.save_state(&dir, &run)?;
            on_event(&TrainEvent::Saved { path });
        }
        // The script's epochs: its DataLoader's batches over the dataset (the instance images times --repeats, or
        // the class images if more), per device, in optimizer steps.
        let dataset = (images.len() * cfg.repeats.max(1)).max(class_images.as_ref().map_or(0, |c| c.len()));
        let per_epoch = dataset.div_ceil(b * backends.len()).div_ceil(cfg.gradient_accumulation_steps).max(1);
        if let Some(every) = cfg.validation_epochs.filter(|_| step % per_epoch == 0 && step < cfg.max_train_steps) {
            let epoch = step / per_epoch - 1;
            if epoch % every.max(1) == 0 {
                let trained =
                    trainee.save(&cfg.model_dir, &cfg.output_dir.join(format!("validation-epoch-{epoch}")))?;
                on_event(&TrainEvent::Validate { epoch, trained });
            }
        }
        last_run = Some(run);
    }
    let output = trainee.save(&cfg.model_dir, &cfg.output_dir)?;
    // The final result can be resumed too, to train further.
    trainee.save_state(&cfg.output_dir, &last_run.expect("at least one step ran"))?;
    on_event(&TrainEvent::Saved { path: output.clone() });
    Ok(TrainReport { losses, output })
}

fn check(cfg: &DreamBoothConfig) -> anyhow::Result<()> {
    let rank = match cfg.method {
        Method::Lora { rank } => rank,
        Method::Full => 1,
    };
    let positive = [
        (rank, "--rank"),
        (cfg.max_train_steps, "--max-train-steps"),
        (cfg.train_batch_size, "--train-batch-size"),
        (cfg.gradient_accumulation_steps, "--gradient-accumulation-steps"),
        (cfg.resolution, "--resolution"),
    ];
    if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
        bail!("{flag} 0: it must be at least 1");
    }
    if !(cfg.optimizer.lr > 0.0 && cfg.optimizer.lr.is_finite()) {
        bail!("--learning-rate {}: it must be a positive number", cfg.optimizer.lr);
    }
    if cfg.max_grad_norm.is_nan() || cfg.max_grad_norm <= 0.0 {
        bail!("--max-grad-norm {}: it must be positive", cfg.max_grad_norm);
    }
    if let Some(p) = &cfg.prior {
        if p.num_class_images == 0 || p.class_prompt.is_empty() || p.prior_loss_weight.is_nan() {
            bail!("--with-prior-preservation needs --class-prompt and at least one class image (--num-class-images)");
        }
    }
    if cfg.checkpointing_steps == Some(0) {
        bail!("--checkpointing-steps 0: it must be at least 1");
    }
    if !cfg.dtype.is_float() {
        bail!("--dtype {}: the transformer computes in f32, f16 or bf16", cfg.dtype);
    }
    Ok(())
}

/// The instance prompt through the frozen text encoders, once: `[1, S, joint_dim]` and `[1, pooled_dim]`.
pub fn embed_prompt(cfg: &DreamBoothConfig, backend: &Backend) -> anyhow::Result<(Tensor, Tensor)> {
    embed_text(cfg, backend, &cfg.instance_prompt)
}

fn embed_text(cfg: &DreamBoothConfig, backend: &Backend, prompt: &str) -> anyhow::Result<(Tensor, Tensor)> {
    let options = PipelineOptions { dtype: cfg.dtype, ..PipelineOptions::default() };
    let pipe = StableDiffusion3Pipeline::new(&cfg.model_dir, backend.clone(), options)
        .with_context(|| format!("opening the model {}", cfg.model_dir.display()))?;
    let mut req = GenerationRequest::new(prompt.to_string(), cfg.resolution, cfg.resolution);
    req.guidance = 1.0;
    req.max_sequence_length = cfg.max_sequence_length;
    let cond = pipe.encode(&req, &mut |_| {})?;
    Ok((cond.prompt_embeds, cond.pooled))
}

/// `[1, …]` repeated to `[n, …]`.
fn repeat_rows(t: &Tensor, n: usize) -> sd3_core::Result<Tensor> {
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    t.broadcast_to(&shape)?.contiguous()
}
