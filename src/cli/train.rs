//! `sd3 train-lora` and `sd3 train-dreambooth`: DreamBooth fine-tuning of the transformer with a LoRA or of every
//! parameter (diffusers' `train_dreambooth_lora_sd3.py` and `train_dreambooth_sd3.py`; the flags keep their names,
//! with dashes). See `docs/training.md`.

use anyhow::{bail, Context};
use clap::Args;
use sd3::pipeline::{GenerationRequest, PipelineOptions, StableDiffusion3Pipeline};
use sd3::train::dreambooth::{train_dreambooth, DreamBoothConfig, Method, PriorPreservation, TrainEvent};
use sd3::train::objective::TimestepSampling;
use sd3::train::optim::LrSchedule;
use sd3_core::DType;
use std::path::PathBuf;
use std::process::ExitCode;

/// `sd3 train-lora`: the shared flags and the LoRA's rank.
#[derive(Args, Debug)]
pub struct TrainLoraArgs {
    #[command(flatten)]
    pub common: DreamBoothArgs,
    /// LoRA rank (alpha equals it, as in the script).
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
}

/// The flags both methods take.
#[derive(Args, Debug)]
pub struct DreamBoothArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    /// diffusers model folder (StableDiffusion3Pipeline layout). Without it, the bundled tiny model is used.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Folder of the subject's images (PNG or JPEG), e.g. 3–5 photos.
    #[arg(long = "instance-data-dir", value_name = "DIR")]
    pub instance_data_dir: PathBuf,
    /// The prompt with the subject's identifier, e.g. "a photo of sks dog".
    #[arg(long = "instance-prompt")]
    pub instance_prompt: String,
    /// Where the result (pytorch_lora_weights.safetensors, or a pipeline folder with the trained transformer),
    /// checkpoints and validation.png go [default: sd3-dreambooth-lora, or sd3-dreambooth].
    #[arg(long = "output-dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Training images are resized and cropped to this square size.
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Centre crops instead of random ones.
    #[arg(long = "center-crop")]
    pub center_crop: bool,
    /// Mirror images at random.
    #[arg(long = "random-flip")]
    pub random_flip: bool,
    #[arg(long = "train-batch-size", default_value_t = 1)]
    pub train_batch_size: usize,
    #[arg(long = "max-train-steps", default_value_t = 500)]
    pub max_train_steps: usize,
    #[arg(long = "gradient-accumulation-steps", default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long = "learning-rate", default_value_t = 1e-4)]
    pub learning_rate: f32,
    /// The learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts or
    /// polynomial (diffusers' get_scheduler).
    #[arg(long = "lr-scheduler", default_value = "constant")]
    pub lr_scheduler: String,
    #[arg(long = "lr-warmup-steps", default_value_t = 500)]
    pub lr_warmup_steps: usize,
    /// Cosine waves of cosine_with_restarts.
    #[arg(long = "lr-num-cycles", default_value_t = 1.0)]
    pub lr_num_cycles: f32,
    /// The power of polynomial.
    #[arg(long = "lr-power", default_value_t = 1.0)]
    pub lr_power: f32,
    #[arg(long = "adam-weight-decay", default_value_t = 1e-4)]
    pub adam_weight_decay: f32,
    /// How noise levels are drawn: logit_normal, mode or none (uniform).
    #[arg(long = "weighting-scheme", default_value = "logit_normal")]
    pub weighting_scheme: String,
    #[arg(long = "logit-mean", default_value_t = 0.0)]
    pub logit_mean: f32,
    #[arg(long = "logit-std", default_value_t = 1.0)]
    pub logit_std: f32,
    #[arg(long = "mode-scale", default_value_t = 1.29)]
    pub mode_scale: f32,
    #[arg(long = "max-grad-norm", default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// T5 tokens of the instance prompt.
    #[arg(long = "max-sequence-length", default_value_t = 77)]
    pub max_sequence_length: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The transformer's compute dtype: f32, f16 or bf16 (the trained values and the optimizer stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Go on from a checkpoint folder of an earlier run with the same settings (`latest`: the output folder's
    /// last `checkpoint-N`), exactly where it stopped.
    #[arg(long = "resume-from-checkpoint", value_name = "DIR|latest")]
    pub resume_from_checkpoint: Option<String>,
    /// Save a checkpoint (the result so far, and the state to resume from) every N steps.
    #[arg(long = "checkpointing-steps", value_name = "N")]
    pub checkpointing_steps: Option<usize>,
    /// Encode each image with the VAE once (one crop, no flips) rather than at every use.
    #[arg(long = "cache-latents")]
    pub cache_latents: bool,
    /// Train class images beside the instance images (prior preservation, against language drift).
    #[arg(long = "with-prior-preservation")]
    pub with_prior_preservation: bool,
    /// Folder of class images; missing ones (below --num-class-images) are generated there first.
    #[arg(long = "class-data-dir", value_name = "DIR")]
    pub class_data_dir: Option<PathBuf>,
    /// The class's prompt, e.g. "a photo of dog".
    #[arg(long = "class-prompt")]
    pub class_prompt: Option<String>,
    #[arg(long = "num-class-images", default_value_t = 100)]
    pub num_class_images: usize,
    #[arg(long = "prior-loss-weight", default_value_t = 1.0)]
    pub prior_loss_weight: f32,
    /// Recompute each block's activations in the backward instead of keeping them (less memory, about a third
    /// more time).
    #[arg(long = "gradient-checkpointing")]
    pub gradient_checkpointing: bool,
    /// After training, generate this prompt with the LoRA into OUTPUT_DIR/validation.png.
    #[arg(long = "validation-prompt")]
    pub validation_prompt: Option<String>,
    /// Also a validation image every this many epochs (after the first), `validation-epoch-<e>.png`.
    #[arg(long = "validation-epochs", value_name = "E")]
    pub validation_epochs: Option<usize>,
    /// Each instance image this many times per epoch.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Skip the final validation image even with --validation-prompt (the seed's --not_validation_final).
    #[arg(long = "not-validation-final")]
    pub not_validation_final: bool,
    /// LoRA adapters on both CLIP text encoders too (train-lora only).
    #[arg(long = "train-text-encoder")]
    pub train_text_encoder: bool,
    /// The text encoders' learning rate.
    #[arg(long = "text-encoder-lr", default_value_t = 5e-6)]
    pub text_encoder_lr: f32,
    #[arg(long = "adam-weight-decay-text-encoder", default_value_t = 1e-3)]
    pub adam_weight_decay_text_encoder: f32,
    /// Train a LoRA data-parallel on N devices (`--device` and the next N−1 of the backend), each taking
    /// --train-batch-size rows of every batch, as `accelerate launch --num_processes N`.
    #[arg(long = "data-parallel", default_value_t = 1, value_name = "N")]
    pub data_parallel: usize,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run_lora(args: TrainLoraArgs) -> anyhow::Result<ExitCode> {
    run(args.common, Method::Lora { rank: args.rank })
}

pub fn run_full(args: DreamBoothArgs) -> anyhow::Result<ExitCode> {
    run(args, Method::Full)
}

fn run(args: DreamBoothArgs, method: Method) -> anyhow::Result<ExitCode> {
    let say = |s: String| {
        if !args.quiet {
            eprintln!("{s}");
        }
    };
    let dtype: DType = args.dtype.parse().map_err(|e: String| anyhow::anyhow!("--dtype: {e}"))?;
    let sampling = match args.weighting_scheme.as_str() {
        "logit_normal" => TimestepSampling::LogitNormal { mean: args.logit_mean, std: args.logit_std },
        "mode" => TimestepSampling::Mode { scale: args.mode_scale },
        "none" => TimestepSampling::Uniform,
        other => bail!("--weighting-scheme {other}: logit_normal, mode or none"),
    };
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            say(format!("no --model given: using {}", sd3::bundled::DESCRIPTION));
            sd3::bundled::tiny_model_dir().context("unpacking the bundled tiny model")?
        }
    };
    let output_dir = args.output_dir.clone().unwrap_or_else(|| match method {
        Method::Lora { .. } => "sd3-dreambooth-lora".into(),
        Method::Full => "sd3-dreambooth".into(),
    });
    let mut cfg = DreamBoothConfig::new(
        model_dir.clone(),
        args.instance_data_dir.clone(),
        args.instance_prompt.clone(),
        output_dir.clone(),
    );
    cfg.method = method;
    cfg.resolution = args.resolution;
    cfg.center_crop = args.center_crop;
    cfg.random_flip = args.random_flip;
    cfg.train_batch_size = args.train_batch_size;
    cfg.max_train_steps = args.max_train_steps;
    cfg.gradient_accumulation_steps = args.gradient_accumulation_steps;
    cfg.optimizer.lr = args.learning_rate;
    cfg.lr_schedule =
        LrSchedule::from_name(&args.lr_scheduler, args.lr_num_cycles, args.lr_power).with_context(|| {
            format!(
                "--lr-scheduler {}: constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial",
                args.lr_scheduler
            )
        })?;
    cfg.lr_warmup_steps = args.lr_warmup_steps;
    cfg.optimizer.weight_decay = args.adam_weight_decay;
    cfg.sampling = sampling;
    cfg.max_grad_norm = args.max_grad_norm;
    cfg.max_sequence_length = args.max_sequence_length;
    cfg.seed = args.seed;
    cfg.dtype = dtype;
    cfg.checkpointing_steps = args.checkpointing_steps;
    cfg.cache_latents = args.cache_latents;
    cfg.gradient_checkpointing = args.gradient_checkpointing;
    cfg.repeats = args.repeats;
    if args.validation_epochs.is_some() && args.validation_prompt.is_none() {
        bail!("--validation-epochs needs --validation-prompt");
    }
    cfg.validation_epochs = args.validation_epochs;
    if args.train_text_encoder {
        cfg.train_text_encoder = Some(sd3::train::optim::AdamWConfig {
            lr: args.text_encoder_lr,
            weight_decay: args.adam_weight_decay_text_encoder,
            ..cfg.optimizer
        });
    }
    cfg.resume_from = match args.resume_from_checkpoint.as_deref() {
        None => None,
        Some("latest") => Some(latest_checkpoint(&output_dir)?),
        Some(dir) => Some(PathBuf::from(dir)),
    };
    if args.with_prior_preservation {
        let (Some(class_dir), Some(class_prompt)) = (&args.class_data_dir, &args.class_prompt) else {
            bail!("--with-prior-preservation needs --class-data-dir and --class-prompt");
        };
        cfg.prior = Some(PriorPreservation {
            class_dir: class_dir.clone(),
            class_prompt: class_prompt.clone(),
            num_class_images: args.num_class_images,
            prior_loss_weight: args.prior_loss_weight,
        });
    } else if args.class_data_dir.is_some() || args.class_prompt.is_some() {
        bail!("--class-data-dir and --class-prompt take effect with --with-prior-preservation");
    }

    let backend = sd3::runtime::open_backend(&args.backend.request())?;
    say(format!("backend: {} ({})", backend.name(), backend.info().name));
    let validation = Validation {
        model_dir: &model_dir,
        method,
        backend: &backend,
        dtype,
        resolution: args.resolution,
        seed: args.seed,
    };
    let every = (args.max_train_steps / 20).max(1);
    let mut on_event = |e: &TrainEvent| match e {
        TrainEvent::Ready { images, tensors, values, seconds } => say(format!(
            "{images} instance images; training {}: {values} values in {tensors} tensors; ready in {seconds:.1} s",
            match method {
                Method::Lora { rank } => format!("a rank-{rank} LoRA"),
                Method::Full => "every parameter of the transformer".into(),
            }
        )),
        TrainEvent::Step { step, total, loss, grad_norm, seconds } => {
            if step % every == 0 || step == total || *step == 1 {
                say(format!("step {step}/{total}: loss {loss:.4}, grad norm {grad_norm:.3}, {seconds:.2} s/step"));
            }
        }
        TrainEvent::Saved { path } => say(format!("wrote {}", path.display())),
        TrainEvent::ClassImage { index, total, path } => {
            say(format!("class image {}/{total}: {}", index + 1, path.display()))
        }
        TrainEvent::Validate { epoch, trained } => {
            let path = output_dir.join(format!("validation-epoch-{epoch}.png"));
            let prompt = args.validation_prompt.as_deref().unwrap_or_default();
            // A failed validation image does not stop the training; it is reported.
            match validation.image(prompt, trained, &path) {
                Ok(()) => say(format!("epoch {epoch}: wrote {}", path.display())),
                Err(e) => eprintln!("epoch {epoch}: no validation image: {e:#}"),
            }
            // The result so far was written for this image only (`<output>/validation-epoch-<e>/`).
            let _ = std::fs::remove_dir_all(output_dir.join(format!("validation-epoch-{epoch}")));
        }
    };
    if args.data_parallel == 0 {
        bail!("--data-parallel 0: at least one device trains");
    }
    let mut backends = vec![backend.clone()];
    for i in 1..args.data_parallel {
        let mut req = args.backend.request();
        req.device += i;
        let be = sd3::runtime::open_backend(&req)
            .with_context(|| format!("--data-parallel: opening device {} of `{}`", req.device, req.backend))?;
        backends.push(be);
    }
    if backends.len() > 1 {
        say(format!(
            "data-parallel over devices {}..={}",
            args.backend.device,
            args.backend.device + backends.len() - 1
        ));
    }
    // SD3_PROFILE=1: every op bracketed by synchronisations, the time per op printed at the end.
    let profile = std::env::var("SD3_PROFILE").is_ok_and(|v| v == "1");
    if profile {
        backend.enable_profiling();
    }
    let started = std::time::Instant::now();
    let report = train_dreambooth(&cfg, &backends, &mut on_event)?;
    if profile {
        let ops = backend.profile();
        say(format!("profile: {:.1} s in ops", ops.iter().map(|p| p.2).sum::<f64>()));
        for (name, n, secs) in ops.iter().take(15) {
            say(format!("{:>9.3} s {n:>7}x  {name}", secs));
        }
    }
    // What the run cost: the device's own counters (peak memory, and on CUDA the allocator's cache and driver
    // allocations), and any op that ran on the host fallback instead of the device.
    let fallbacks: Vec<String> = backend.fallback_counts().iter().map(|(op, n)| format!("{op} ×{n}")).collect();
    say(format!(
        "trained in {:.1} s; host fallbacks: {}; device: {}",
        started.elapsed().as_secs_f64(),
        if fallbacks.is_empty() { "none".to_string() } else { fallbacks.join(", ") },
        backend.stats().join(", ")
    ));

    if let (Some(prompt), false) = (&args.validation_prompt, args.not_validation_final) {
        let path = output_dir.join("validation.png");
        validation.image(prompt, &report.output, &path)?;
        say(format!("wrote {}", path.display()));
    }
    Ok(ExitCode::SUCCESS)
}

/// What a validation image is made with: the base model, how the result applies to it, the request's settings.
struct Validation<'a> {
    model_dir: &'a std::path::Path,
    method: Method,
    backend: &'a sd3_core::Backend,
    dtype: DType,
    resolution: usize,
    seed: u64,
}

impl Validation<'_> {
    /// `prompt` through the base model with `trained` (a LoRA file, or a pipeline folder), into `path`.
    fn image(&self, prompt: &str, trained: &std::path::Path, path: &std::path::Path) -> anyhow::Result<()> {
        let (model, loras) = match self.method {
            Method::Lora { .. } => (self.model_dir.to_path_buf(), vec![(trained.to_path_buf(), 1.0)]),
            Method::Full => (trained.to_path_buf(), Vec::new()),
        };
        let options = PipelineOptions { dtype: self.dtype, no_t5: false, loras };
        let pipe = StableDiffusion3Pipeline::new(&model, self.backend.clone(), options)?;
        let mut req = GenerationRequest::new(prompt.to_string(), self.resolution, self.resolution);
        req.seed = self.seed;
        let generation = pipe.generate(&req, &mut |_| {}).context("the validation image")?;
        let text = [("prompt", prompt.to_string()), ("trained", trained.display().to_string())];
        let text: Vec<(&str, String)> = text.iter().map(|(k, v)| (*k, v.clone())).collect();
        sd3::image_out::write_png(path, &generation.images[0], &text)?;
        Ok(())
    }
}

/// The `checkpoint-N` folder of `output_dir` with the largest N.
fn latest_checkpoint(output_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(output_dir)
        .with_context(|| format!("--resume-from-checkpoint latest: listing {}", output_dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((n, p))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .with_context(|| format!("--resume-from-checkpoint latest: no checkpoint-N folder in {}", output_dir.display()))
}
