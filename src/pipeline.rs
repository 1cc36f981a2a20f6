//! `StableDiffusion3Pipeline` (diffusers `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`), stage by
//! stage (reference §2; data flow with shapes in `docs/pipeline.md`):
//!
//! 1. tokenise prompt (and negative prompt under CFG): CLIP-L/CLIP-G 77 ids, T5 `max_sequence_length` ids;
//! 2. text encoders, each loaded, run and **dropped** before the next (CLIP-L, CLIP-G, T5; `--no-t5` or a model
//!    without T5 gives zeros as diffusers does); assembly to `[B, 77+T, joint_dim]` (CLIP channels zero-padded or
//!    cropped to `joint_dim`) and pooled `[B, proj_L + proj_G]`;
//! 3. initial noise (host Philox, or `--init-noise`), flow-match Euler loop with classifier-free guidance (batch
//!    order uncond, cond; none when guidance ≤ 1) and skip-layer guidance;
//! 4. VAE decode of `z/scaling + shift`, `(x/2+0.5).clamp(0,1)`, `round(x·255)`.
//!
//! LoRA deltas are registered on each component's [`Weights`] before its model is built.

// One error type for every stage; built once per failure, so its size does not matter.
#![allow(clippy::result_large_err)]

use crate::image_out::{to_rgb8, RgbImage};
use crate::lora::{LoraError, LoraSet};
use crate::models::clip::ClipTextModel;
use crate::models::mmdit::parallel::TensorParallelTransformer;
use crate::models::mmdit::{MmditError, Sd3TransformerConfig};
use crate::models::t5::T5EncoderModel;
use crate::models::vae::AutoencoderKL;
use crate::noise::{load_init_noise, seeded_latents, InitNoiseError};
use crate::scheduler::{FlowMatchEulerDiscreteScheduler, SchedulerConfig, SchedulerError};
use crate::tokenizer::{Sd3Tokenizers, TokenizerError};
use crate::weights::{read_config, Weights, WeightsError};
use sd3_core::{Backend, DType, DeviceTimer, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Transformer(#[from] MmditError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    InitNoise(#[from] InitNoiseError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("{0:#}")]
    Encoder(anyhow::Error),
    #[error(transparent)]
    Core(#[from] sd3_core::Error),
}

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Skip-layer guidance (SD3.5-medium): at steps `i` with `N·start < i < N·stop` (strict), add
/// `scale · (v_cond − v_skip)` where `v_skip` is the conditional prediction with `layers` skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f32,
    pub start: f64,
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// diffusers' defaults, recommended for SD3.5-medium with layers 7, 8, 9.
    pub fn with_layers(layers: Vec<usize>) -> Self {
        SkipLayerGuidance { layers, scale: 2.8, start: 0.01, stop: 0.2 }
    }
    pub fn active_at(&self, step: usize, steps: usize) -> bool {
        let i = step as f64;
        i > steps as f64 * self.start && i < steps as f64 * self.stop
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: String,
    /// `None` = `""` (diffusers' default).
    pub negative_prompt: Option<String>,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f32,
    pub max_sequence_length: usize,
    pub seed: u64,
    pub init_noise: Option<PathBuf>,
    pub num_images: usize,
    pub slg: Option<SkipLayerGuidance>,
    /// Time stages and steps on the device too (`--benchmark`): device markers at each boundary, where the device
    /// has them. Off, no marker is recorded.
    pub device_timing: bool,
}

impl GenerationRequest {
    pub fn new(prompt: impl Into<String>, height: usize, width: usize) -> Self {
        GenerationRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            height,
            width,
            steps: 28,
            guidance: 7.0,
            max_sequence_length: 256,
            seed: 0,
            init_noise: None,
            num_images: 1,
            slg: None,
            device_timing: false,
        }
    }
    /// Classifier-free guidance is on iff guidance > 1.
    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// How the pipeline is built.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub dtype: DType,
    /// Use zeros instead of the T5 encoder (as diffusers does without `text_encoder_3`).
    pub no_t5: bool,
    /// LoRA files and their scales.
    pub loras: Vec<(PathBuf, f32)>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions { dtype: DType::F32, no_t5: false, loras: Vec::new() }
    }
}

/// Progress reported while generating. `seconds` is wall time; `device_seconds` is device time from device
/// markers, `None` unless [`GenerationRequest::device_timing`] is on and the device has markers.
#[derive(Clone, Debug)]
pub enum Event {
    /// A stage finished (`tokenize`, `clip_l`, `clip_g`, `t5`, `transformer_load`, `denoise`, `vae`, ...).
    Stage { name: &'static str, seconds: f64, device_seconds: Option<f64> },
    /// Denoising step `index` (0-based) of `total` finished.
    Step { index: usize, total: usize, seconds: f64, device_seconds: Option<f64> },
}

/// Timings and memory of one generation (what `--benchmark` prints).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub stages: Vec<(&'static str, f64)>,
    pub steps: Vec<f64>,
    pub total_seconds: f64,
    /// Device seconds of each stage and step (same order as `stages` / `steps`) and of the whole generation,
    /// from device markers; `None` unless device timing was asked for and the device has markers.
    pub stage_device_seconds: Vec<Option<f64>>,
    pub step_device_seconds: Vec<Option<f64>>,
    pub total_device_seconds: Option<f64>,
    /// Peak resident memory of this process (`VmHWM`), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Ops that ran on the host instead of the device, by op name.
    pub fallbacks: BTreeMap<String, u64>,
}

pub struct Generation {
    pub images: Vec<RgbImage>,
    pub report: Report,
}

/// Text conditioning of a batch: `[B, 77+T, joint_dim]` and `[B, pooled_dim]`, uncond rows first under CFG.
pub struct Conditioning {
    pub prompt_embeds: Tensor,
    pub pooled: Tensor,
}

/// A prompt's CLIP token ids and T5 output ([`StableDiffusion3Pipeline::text_inputs`]).
pub struct TextInputs {
    pub clip_l: Vec<i64>,
    pub clip_g: Vec<i64>,
    pub t5: Tensor,
}

/// One prompt's encoder outputs, `[1, …]`.
struct PromptEmbeds {
    embeds: Tensor,
    pooled: Tensor,
}

#[derive(serde::Deserialize)]
struct VaeSizes {
    block_out_channels: Vec<usize>,
    latent_channels: usize,
}

pub struct StableDiffusion3Pipeline {
    model_dir: PathBuf,
    backend: Backend,
    options: PipelineOptions,
    tokenizers: Sd3Tokenizers,
    scheduler: SchedulerConfig,
    pub transformer_config: Sd3TransformerConfig,
    /// `2^(len(block_out_channels) − 1)`.
    pub vae_scale_factor: usize,
    lora: LoraSet,
    /// Tensor-parallel denoising: more devices that each hold a slice of the transformer beside the pipeline's own
    /// (the seed's `--mp_size`; `models::mmdit::parallel`). Empty: the transformer on one device.
    tp_backends: Vec<Backend>,
    /// CFG-parallel denoising: the devices that run the conditional half of the guidance batch while the
    /// pipeline's own run the unconditional half (the seed's `--dp_size 2`), as many as the unconditional half has.
    cfg_backends: Vec<Backend>,
}

impl StableDiffusion3Pipeline {
    /// Read the model folder's configs, tokenizers and LoRA files (cheap); models are loaded per generation
    /// stage and released after it.
    pub fn new(model_dir: &Path, backend: Backend, options: PipelineOptions) -> Result<Self> {
        if !model_dir.is_dir() {
            return Err(PipelineError::Input(format!("model folder {} does not exist", model_dir.display())));
        }
        for component in ["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"] {
            if !model_dir.join(component).is_dir() {
                return Err(PipelineError::Input(format!(
                    "{} has no `{component}/` folder: expected a diffusers StableDiffusion3Pipeline layout",
                    model_dir.display()
                )));
            }
        }
        let transformer_config = Sd3TransformerConfig::load(&model_dir.join("transformer"))?;
        let vae: VaeSizes = read_config(&model_dir.join("vae"))?;
        if vae.latent_channels != transformer_config.in_channels {
            return Err(PipelineError::Input(format!(
                "the VAE has {} latent channels but the transformer takes {}",
                vae.latent_channels, transformer_config.in_channels
            )));
        }
        let lora = LoraSet::load(&options.loras)?;
        Ok(StableDiffusion3Pipeline {
            tokenizers: Sd3Tokenizers::load(model_dir)?,
            scheduler: SchedulerConfig::load(&model_dir.join("scheduler"))?,
            transformer_config,
            vae_scale_factor: 1 << vae.block_out_channels.len().saturating_sub(1),
            model_dir: model_dir.to_path_buf(),
            backend,
            options,
            lora,
            tp_backends: Vec::new(),
            cfg_backends: Vec::new(),
        })
    }

    /// Split classifier-free guidance over two devices: each denoising step runs the unconditional batch on the
    /// pipeline's backend and the conditional batch on `backend` at the same time, each holding its own copy of
    /// the transformer. Latents and velocities cross between the two through host memory (one latent tensor each
    /// way per step). Without guidance (`guidance ≤ 1`) the second device is not used.
    pub fn with_cfg_parallel(mut self, backend: Backend) -> Self {
        self.cfg_backends = vec![backend];
        self
    }

    /// Split the transformer over the pipeline's device and `more` (tensor parallelism: each device holds
    /// `1 / (1 + more.len())` of every block's big linears; see `models::mmdit::parallel`). With CFG-parallel too
    /// ([`Self::with_cfg_parallel_group`]), the conditional half gets a group of the same size.
    pub fn with_tensor_parallel(mut self, more: Vec<Backend>) -> Self {
        self.tp_backends = more;
        self
    }

    /// CFG-parallel with the conditional half on a tensor-parallel group of its own (`--dp-size 2 --mp-size N`):
    /// `group` has as many devices as the unconditional half (the pipeline's device and its tensor-parallel ones).
    pub fn with_cfg_parallel_group(mut self, group: Vec<Backend>) -> Self {
        self.cfg_backends = group;
        self
    }

    /// The devices of the unconditional (or only) half's transformer.
    fn transformer_group(&self) -> Vec<Backend> {
        std::iter::once(self.backend.clone()).chain(self.tp_backends.iter().cloned()).collect()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether the model has a T5 encoder that will be used.
    pub fn uses_t5(&self) -> bool {
        !self.options.no_t5 && self.tokenizers.t5.is_some() && self.model_dir.join("text_encoder_3").is_dir()
    }

    /// diffusers' default size: `sample_size · vae_scale_factor`.
    pub fn default_size(&self) -> usize {
        self.transformer_config.sample_size * self.vae_scale_factor
    }

    /// Check a request before any model is loaded; errors name the flag and the limit.
    pub fn validate(&self, r: &GenerationRequest) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Input(m));
        let c = &self.transformer_config;
        let multiple = self.vae_scale_factor * c.patch_size;
        for (flag, v) in [("--height", r.height), ("--width", r.width)] {
            if v == 0 || v % multiple != 0 {
                return bad(format!("{flag} {v} is not a positive multiple of {multiple} (VAE factor × patch size)"));
            }
            let max = c.pos_embed_max_size * multiple;
            if v > max {
                return bad(format!(
                    "{flag} {v} is beyond the transformer's positional table: at most {max} pixels \
                     (pos_embed_max_size {} × {multiple})",
                    c.pos_embed_max_size
                ));
            }
        }
        if r.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if !r.guidance.is_finite() {
            return bad(format!("--guidance {} is not a finite number", r.guidance));
        }
        if r.num_images == 0 {
            return bad("--num-images must be at least 1".into());
        }
        if r.max_sequence_length == 0 || r.max_sequence_length > 512 {
            return bad(format!("--max-sequence-length {} must be between 1 and 512", r.max_sequence_length));
        }
        if let Some(slg) = &r.slg {
            if let Some(l) = slg.layers.iter().find(|&&l| l >= c.num_layers) {
                return bad(format!(
                    "--slg-layers names layer {l}, but the transformer has {} layers (0 to {})",
                    c.num_layers,
                    c.num_layers - 1
                ));
            }
        }
        Ok(())
    }

    /// Generate `num_images` images. Text encoders, transformer and VAE are each loaded for their stage and
    /// dropped after it, so at most one of them is resident at a time.
    pub fn generate(&self, r: &GenerationRequest, on_event: &mut dyn FnMut(&Event)) -> Result<Generation> {
        self.validate(r)?;
        let start = self.clock(r)?;
        let mut report = Report::default();
        let mut emit = |e: Event, report: &mut Report| {
            match &e {
                Event::Stage { name, seconds, device_seconds } => {
                    report.stages.push((name, *seconds));
                    report.stage_device_seconds.push(*device_seconds);
                }
                Event::Step { seconds, device_seconds, .. } => {
                    report.steps.push(*seconds);
                    report.step_device_seconds.push(*device_seconds);
                }
            }
            on_event(&e);
        };
        let cond = self.encode(r, &mut |e| emit(e.clone(), &mut report))?;
        let latents = self.initial_latents(r)?;
        let latents = self.denoise(r, &cond, latents, &mut |e| emit(e.clone(), &mut report))?;
        drop(cond);
        let t = self.clock(r)?;
        let images = self.decode(&latents)?;
        emit(t.stage("vae")?, &mut report);
        (report.total_seconds, report.total_device_seconds) = start.stop()?;
        report.peak_rss_bytes = peak_rss_bytes();
        report.fallbacks = self.backend.fallback_counts();
        Ok(Generation { images, report })
    }

    /// The initial latents `[N, C, H/8, W/8]` (f32): from `--init-noise`, or the host generator.
    pub fn initial_latents(&self, r: &GenerationRequest) -> Result<Tensor> {
        let shape = [
            r.num_images,
            self.transformer_config.in_channels,
            r.height / self.vae_scale_factor,
            r.width / self.vae_scale_factor,
        ];
        Ok(match &r.init_noise {
            Some(path) => load_init_noise(path, shape, &self.backend)?,
            None => seeded_latents(r.seed, shape, &self.backend)?,
        })
    }

    /// Tokenise and run the text encoders: conditioning for `num_images` rows (twice that under CFG, uncond first).
    pub fn encode(&self, r: &GenerationRequest, on_event: &mut dyn FnMut(&Event)) -> Result<Conditioning> {
        let t = self.clock(r)?;
        let negative = r.negative_prompt.clone().unwrap_or_default();
        let mut prompts = vec![r.prompt.as_str()];
        if r.cfg() {
            prompts.insert(0, negative.as_str());
        }
        let ids =
            prompts.iter().map(|p| self.tokenizers.encode(p, r.max_sequence_length)).collect::<Result<Vec<_>, _>>()?;
        on_event(&t.stage("tokenize")?);

        let dtype = self.options.dtype;
        let mut clip = Vec::new(); // per encoder: per prompt (hidden, pooled)
        for (name, folder, component) in [("clip_l", "text_encoder", 0usize), ("clip_g", "text_encoder_2", 1)] {
            let t = self.clock(r)?;
            let dir = self.model_dir.join(folder);
            let weights = self.component_weights(folder)?;
            let model = ClipTextModel::load_with_weights(&dir, &weights, &self.backend, dtype)
                .map_err(PipelineError::Encoder)?;
            drop(weights);
            let mut outs = Vec::new();
            for id in &ids {
                let tokens = if component == 0 { &id.clip_l } else { &id.clip_g };
                let o = model.forward(tokens, None).map_err(PipelineError::Encoder)?;
                outs.push((o.penultimate, o.pooled));
            }
            drop(model);
            self.backend.synchronize()?;
            clip.push(outs);
            on_event(&t.stage(name)?);
        }

        let joint = self.transformer_config.joint_attention_dim;
        let t5_out: Vec<Tensor> = if self.uses_t5() {
            let t = self.clock(r)?;
            let dir = self.model_dir.join("text_encoder_3");
            let weights = self.component_weights("text_encoder_3")?;
            let model = T5EncoderModel::load_with_weights(&dir, &weights, &self.backend, dtype)
                .map_err(PipelineError::Encoder)?;
            drop(weights);
            let outs = ids
                .iter()
                .map(|id| model.forward(&id.t5))
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(PipelineError::Encoder)?;
            drop(model);
            self.backend.synchronize()?;
            on_event(&t.stage("t5")?);
            outs
        } else {
            let zeros = self.backend.zeros(&[1, r.max_sequence_length, joint], dtype)?;
            vec![zeros; ids.len()]
        };

        let per_prompt =
            (0..ids.len()).map(|i| self.assemble(&clip[0][i], &clip[1][i], &t5_out[i])).collect::<Result<Vec<_>>>()?;
        // Rows: [neg × N, pos × N] under CFG, [pos × N] otherwise.
        let mut embeds = Vec::new();
        let mut pooled = Vec::new();
        for p in &per_prompt {
            for _ in 0..r.num_images {
                embeds.push(&p.embeds);
                pooled.push(&p.pooled);
            }
        }
        Ok(Conditioning { prompt_embeds: Tensor::cat(&embeds, 0)?, pooled: Tensor::cat(&pooled, 0)? })
    }

    /// What training the CLIP encoders needs of a prompt: its CLIP token ids and the (frozen) T5 output
    /// `[1, T, joint]` (zeros without T5), as [`Self::encode`] computes them.
    pub fn text_inputs(&self, prompt: &str, max_sequence_length: usize) -> Result<TextInputs> {
        let ids = self.tokenizers.encode(prompt, max_sequence_length)?;
        let dtype = self.options.dtype;
        let t5 = if self.uses_t5() {
            let dir = self.model_dir.join("text_encoder_3");
            let weights = self.component_weights("text_encoder_3")?;
            let model = T5EncoderModel::load_with_weights(&dir, &weights, &self.backend, dtype)
                .map_err(PipelineError::Encoder)?;
            model.forward(&ids.t5).map_err(PipelineError::Encoder)?
        } else {
            self.backend.zeros(&[1, max_sequence_length, self.transformer_config.joint_attention_dim], dtype)?
        };
        Ok(TextInputs { clip_l: ids.clip_l, clip_g: ids.clip_g, t5 })
    }

    /// The prompt embeddings from the two CLIPs' `(penultimate, pooled)` and T5's output, as [`Self::encode`]
    /// assembles them: `([1, 77 + T, joint], [1, pooled_dim])`.
    pub fn assemble_text(&self, l: &(Tensor, Tensor), g: &(Tensor, Tensor), t5: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.assemble(l, g, t5)?;
        Ok((p.embeds, p.pooled))
    }

    /// `cat([pad_or_crop(cat([clip_l, clip_g], -1), joint), t5], -2)` and `cat([pooled_l, pooled_g], -1)`.
    fn assemble(&self, l: &(Tensor, Tensor), g: &(Tensor, Tensor), t5: &Tensor) -> Result<PromptEmbeds> {
        let c = &self.transformer_config;
        let joint = c.joint_attention_dim;
        if t5.rank() != 3 || t5.dim(2) != joint {
            return Err(PipelineError::Input(format!(
                "T5 output {:?} does not match the transformer's joint_attention_dim {joint}",
                t5.shape()
            )));
        }
        let clip = Tensor::cat(&[&l.0, &g.0], 2)?;
        let width = clip.dim(2);
        // F.pad(clip, (0, joint − width)): zero-pad, or crop when negative.
        let clip = if width < joint {
            let zeros = self.backend.zeros(&[clip.dim(0), clip.dim(1), joint - width], clip.dtype())?;
            Tensor::cat(&[&clip, &zeros], 2)?
        } else {
            clip.narrow(2, 0, joint)?
        };
        let embeds = Tensor::cat(&[&clip, &t5.to_dtype(clip.dtype())?], 1)?;
        let pooled = Tensor::cat(&[&l.1, &g.1], 1)?;
        if pooled.dim(1) != c.pooled_projection_dim {
            return Err(PipelineError::Input(format!(
                "pooled CLIP projections have {} channels but the transformer's pooled_projection_dim is {}",
                pooled.dim(1),
                c.pooled_projection_dim
            )));
        }
        Ok(PromptEmbeds { embeds, pooled })
    }

    /// The denoising loop on `latents [N, C, h, w]`; returns the final latents (f32).
    pub fn denoise(
        &self,
        r: &GenerationRequest,
        cond: &Conditioning,
        latents: Tensor,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Tensor> {
        let t = self.clock(r)?;
        let group = self.transformer_group();
        let parallel = Some(&self.cfg_backends).filter(|g| !g.is_empty() && r.cfg());
        if let Some(cond_group) = parallel {
            if cond_group.len() != group.len() {
                return Err(PipelineError::Input(format!(
                    "CFG-parallel: the conditional half has {} devices, the unconditional half {}",
                    cond_group.len(),
                    group.len()
                )));
            }
        }
        let (transformer, cond_transformer) = match parallel {
            // Both copies load at once, each on its own devices.
            Some(cond_group) => std::thread::scope(|s| {
                let second = s.spawn(|| self.load_transformer_group(cond_group));
                let first = self.load_transformer_group(&group);
                let second = second
                    .join()
                    .map_err(|_| sd3_core::Error::backend(cond_group[0].name(), "loading the transformer panicked"))?;
                Ok::<_, PipelineError>((first?, Some(second?)))
            })?,
            None => (self.load_transformer_group(&group)?, None),
        };
        self.backend.synchronize()?;
        on_event(&t.stage("transformer_load")?);
        let loop_start = self.clock(r)?;
        let sched = FlowMatchEulerDiscreteScheduler::new(self.scheduler.clone(), r.steps)?;
        let n = r.num_images;
        let (cond_embeds, cond_pooled) = if r.cfg() {
            (cond.prompt_embeds.narrow(0, n, n)?, cond.pooled.narrow(0, n, n)?)
        } else {
            (cond.prompt_embeds.clone(), cond.pooled.clone())
        };
        // Under CFG-parallel: the unconditional rows stay here, the conditional ones move to the second device.
        let split = match (parallel, &cond_transformer) {
            (Some(cond_group), Some(tr)) => Some(CfgHalf {
                transformer: tr,
                backend: &cond_group[0],
                embeds: cond_embeds.to_backend(&cond_group[0])?,
                pooled: cond_pooled.to_backend(&cond_group[0])?,
                uncond_embeds: cond.prompt_embeds.narrow(0, 0, n)?,
                uncond_pooled: cond.pooled.narrow(0, 0, n)?,
            }),
            _ => None,
        };
        let mut latents = latents.to_dtype(self.options.dtype)?;
        for (i, &timestep) in sched.timesteps.iter().enumerate() {
            let step_start = self.clock(r)?;
            let slg = r.slg.as_ref().filter(|s| r.cfg() && s.active_at(i, r.steps));
            let v = if let Some(half) = &split {
                let ts = vec![timestep; n];
                let (v_u, (v_c, v_skip)) = std::thread::scope(|s| {
                    let conditional = s.spawn(|| half.forward(&latents, &ts, slg, &self.backend));
                    let v_u = transformer.forward(&latents, &half.uncond_embeds, &half.uncond_pooled, &ts, &[]);
                    let cond = conditional.join().map_err(|_| {
                        sd3_core::Error::backend(half.backend.name(), "the conditional forward panicked")
                    })?;
                    Ok::<_, PipelineError>((v_u?, cond?))
                })?;
                guide(&v_u, &v_c, r.guidance, v_skip.as_ref().zip(slg.map(|s| s.scale)))?
            } else if r.cfg() {
                let x_in = Tensor::cat(&[&latents, &latents], 0)?;
                let ts = vec![timestep; 2 * n];
                let v = transformer.forward(&x_in, &cond.prompt_embeds, &cond.pooled, &ts, &[])?;
                let (v_u, v_c) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
                let v_skip = match slg {
                    Some(slg) => {
                        Some(transformer.forward(&latents, &cond_embeds, &cond_pooled, &ts[..n], &slg.layers)?)
                    }
                    None => None,
                };
                guide(&v_u, &v_c, r.guidance, v_skip.as_ref().zip(slg.map(|s| s.scale)))?
            } else {
                let ts = vec![timestep; n];
                transformer.forward(&latents, &cond.prompt_embeds, &cond.pooled, &ts, &[])?
            };
            latents = sched.step(i, &v, &latents)?;
            self.backend.synchronize()?;
            let (seconds, device_seconds) = step_start.stop()?;
            on_event(&Event::Step { index: i, total: sched.len(), seconds, device_seconds });
        }
        drop(split);
        drop(cond_transformer);
        drop(transformer);
        on_event(&loop_start.stage("denoise")?);
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// Start timing a stage or step: wall clock, and device markers when the request asks for device timing.
    fn clock(&self, r: &GenerationRequest) -> Result<Clock> {
        Ok(Clock { wall: Instant::now(), device: DeviceTimer::start_if(r.device_timing, self.backend.device())? })
    }

    /// The transformer on `group` (split over it when it has more than one device).
    fn load_transformer_group(&self, group: &[Backend]) -> Result<TensorParallelTransformer> {
        let weights = self.component_weights("transformer")?;
        let dtype = self.options.dtype;
        Ok(TensorParallelTransformer::load(&weights, &self.transformer_config, group, dtype)?)
    }

    /// VAE decode of final latents `[N, C, h, w]`: `z/scaling + shift` (in f32), decode, post-process to RGB8.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let dir = self.model_dir.join("vae");
        let vae = AutoencoderKL::load(&dir, &self.backend, self.options.dtype).map_err(PipelineError::Encoder)?;
        let z = latents.to_dtype(DType::F32)?;
        let scaling = self.backend.full(&[1], DType::F32, vae.scaling_factor())?;
        let z = z.div(&scaling)?.affine(1.0, vae.shift_factor())?;
        let decoded = vae.decode(&z.to_dtype(self.options.dtype)?).map_err(PipelineError::Encoder)?;
        drop(vae);
        let (n, h, w) = (decoded.dim(0), decoded.dim(2), decoded.dim(3));
        let values = decoded.to_f32_vec()?;
        Ok((0..n).map(|i| to_rgb8(&values[i * 3 * h * w..(i + 1) * 3 * h * w], h, w)).collect())
    }

    /// A component's weights with the LoRA deltas meant for it registered.
    fn component_weights(&self, component: &str) -> Result<Weights> {
        let mut w = Weights::open(&self.model_dir.join(component))?;
        if crate::lora::COMPONENTS.contains(&component) {
            self.lora.apply(component, &mut w)?;
        }
        Ok(w)
    }
}

/// Wall and device time of one stage or step.
struct Clock {
    wall: Instant,
    device: DeviceTimer,
}

impl Clock {
    /// (wall seconds, device seconds); the device figure waits for the device to reach this point.
    fn stop(self) -> Result<(f64, Option<f64>)> {
        let wall = self.wall.elapsed().as_secs_f64();
        Ok((wall, self.device.stop()?))
    }
    fn stage(self, name: &'static str) -> Result<Event> {
        let (seconds, device_seconds) = self.stop()?;
        Ok(Event::Stage { name, seconds, device_seconds })
    }
}

/// Classifier-free guidance: `v_u + guidance·(v_c − v_u)`, plus skip-layer guidance `scale·(v_c − v_skip)`.
fn guide(v_u: &Tensor, v_c: &Tensor, guidance: f32, skip: Option<(&Tensor, f32)>) -> Result<Tensor> {
    let guided = v_c.sub(v_u)?.scale(guidance)?.add(v_u)?;
    Ok(match skip {
        Some((v_skip, scale)) => guided.add(&v_c.sub(v_skip)?.scale(scale)?)?,
        None => guided,
    })
}

/// The conditional half of CFG-parallel denoising: the second device's transformer and conditioning, and the
/// unconditional conditioning that stays on the first device.
struct CfgHalf<'a> {
    transformer: &'a TensorParallelTransformer,
    backend: &'a Backend,
    embeds: Tensor,
    pooled: Tensor,
    uncond_embeds: Tensor,
    uncond_pooled: Tensor,
}

impl CfgHalf<'_> {
    /// The conditional velocity (and the skip-layer one when `slg` is on) for `latents`, computed on the second
    /// device and returned on `home`.
    fn forward(
        &self,
        latents: &Tensor,
        ts: &[f32],
        slg: Option<&SkipLayerGuidance>,
        home: &Backend,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x = latents.to_backend(self.backend)?;
        let v_c = self.transformer.forward(&x, &self.embeds, &self.pooled, ts, &[])?;
        let v_skip = match slg {
            Some(slg) => {
                Some(self.transformer.forward(&x, &self.embeds, &self.pooled, ts, &slg.layers)?.to_backend(home)?)
            }
            None => None,
        };
        Ok((v_c.to_backend(home)?, v_skip))
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_layer_guidance_window_is_strict() {
        let slg = SkipLayerGuidance::with_layers(vec![7, 8, 9]);
        // 28 steps: 0.28 < i < 5.6.
        let active: Vec<usize> = (0..28).filter(|&i| slg.active_at(i, 28)).collect();
        assert_eq!(active, [1, 2, 3, 4, 5]);
        // The sd35-slg golden: 4 steps, start 0.01, stop 0.6 → 0.04 < i < 2.4.
        let slg = SkipLayerGuidance { stop: 0.6, ..slg };
        assert_eq!((0..4).filter(|&i| slg.active_at(i, 4)).collect::<Vec<_>>(), [1, 2]);
        // Bounds that land on an integer are excluded: 10 steps, stop 0.2 → i < 2.
        let slg = SkipLayerGuidance { start: 0.1, stop: 0.2, ..slg };
        assert!(!slg.active_at(1, 10) && !slg.active_at(2, 10));
    }
}
