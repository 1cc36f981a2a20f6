//! Generation, the default action: `sd3 --backend cpu --model DIR --prompt "…"`. The flag names are a contract
//! (external conformance scripts use them); see `docs/pipeline.md` for the full list.

use anyhow::{bail, Context};
use clap::Args;
use sd3::pipeline::{
    Event, Generation, GenerationRequest, PipelineOptions, SkipLayerGuidance, StableDiffusion3Pipeline,
};
use sd3_core::DType;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    /// diffusers model folder (StableDiffusion3Pipeline layout). Without it, the bundled tiny model is used.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// The negative prompt (default: empty, as diffusers).
    #[arg(long = "negative-prompt")]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Classifier-free guidance scale; guidance ≤ 1 turns it off.
    #[arg(long, default_value_t = 7.0)]
    pub guidance: f32,
    /// Image height in pixels, a multiple of 16 [default: the model's, 1024 for SD3/SD3.5, 64 for the tiny one].
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels, a multiple of 16 [default: as --height].
    #[arg(long)]
    pub width: Option<usize>,
    /// Seed of the host noise generator (Philox4x32-10); random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial latents from a safetensors file (tensor `latents`, [1, 16, H/8, W/8], f32) instead of the seed.
    #[arg(long = "init-noise", value_name = "FILE")]
    pub init_noise: Option<PathBuf>,
    /// T5 token count (at most 512).
    #[arg(long = "max-sequence-length", default_value_t = 256)]
    pub max_sequence_length: usize,
    /// Do not run T5: zeros in its place, as diffusers without text_encoder_3.
    #[arg(long = "no-t5")]
    pub no_t5: bool,
    /// Compute dtype of every model: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Output PNG; with several images, `NAME_0.png`, `NAME_1.png`, ...
    #[arg(long, default_value = "sd3.png")]
    pub out: PathBuf,
    /// Images per prompt (one batch).
    #[arg(long = "num-images", default_value_t = 1)]
    pub num_images: usize,
    /// Devices to split classifier-free guidance over: 2 runs the unconditional batch on `--device` and the
    /// conditional one on the next device of the same backend, at the same time (the seed's `--dp_size 2`)
    #[arg(long = "dp-size", default_value_t = 1, value_name = "N")]
    pub dp_size: usize,
    /// Devices to split the transformer over (tensor parallelism, the seed's `--mp_size`): `--device` and the next
    /// N−1 devices of the same backend each hold 1/N of every block's big linears; the partial sums meet through
    /// host memory. With `--dp-size 2`, the conditional half takes the N devices after those.
    #[arg(long = "mp-size", default_value_t = 1, value_name = "N")]
    pub mp_size: usize,
    /// Print per-stage timings (wall clock, and device time from device events where the backend has them), each
    /// step, peak memory and host fallbacks.
    #[arg(long)]
    pub benchmark: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// A LoRA in diffusers/PEFT format, merged at load (repeatable).
    #[arg(long = "lora", value_name = "FILE")]
    pub loras: Vec<PathBuf>,
    /// LoRA scale: one value for every --lora, or one per --lora in order.
    #[arg(long = "lora-scale", value_name = "S")]
    pub lora_scales: Vec<f32>,
    /// Skip-layer guidance layers, e.g. 7,8,9 for SD3.5-medium (off when not given).
    #[arg(long = "slg-layers", value_delimiter = ',', value_name = "L,L,...")]
    pub slg_layers: Vec<usize>,
    /// Skip-layer guidance scale.
    #[arg(long = "slg-scale", default_value_t = 2.8)]
    pub slg_scale: f32,
    /// Skip-layer guidance applies at steps i with steps·start < i < steps·stop.
    #[arg(long = "slg-start", default_value_t = 0.01)]
    pub slg_start: f64,
    /// See --slg-start.
    #[arg(long = "slg-stop", default_value_t = 0.2)]
    pub slg_stop: f64,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let say = |s: String| {
        if !args.quiet {
            eprintln!("{s}");
        }
    };
    let prompt = args.prompt.clone().context("give a prompt: --prompt \"…\" (see --help)")?;
    let dtype: DType = args.dtype.parse().map_err(|e: String| anyhow::anyhow!("--dtype: {e}"))?;
    if !dtype.is_float() {
        bail!("--dtype {dtype}: the models compute in f32, f16 or bf16");
    }
    let (model_dir, model_name) = match &args.model {
        Some(dir) => (dir.clone(), dir.display().to_string()),
        None => {
            let dir = sd3::bundled::tiny_model_dir().context("unpacking the bundled tiny model")?;
            say(format!("no --model given: using {}", sd3::bundled::DESCRIPTION));
            (dir, "bundled sd3-tiny".to_string())
        }
    };
    let loras = lora_list(&args.loras, &args.lora_scales)?;

    let backend = sd3::runtime::open_backend(&args.backend.request())?;
    say(format!("backend: {} ({})", backend.name(), backend.info().name));
    let options = PipelineOptions { dtype, no_t5: args.no_t5, loras };
    let mut pipe = StableDiffusion3Pipeline::new(&model_dir, backend.clone(), options)
        .with_context(|| format!("opening the model {}", model_dir.display()))?;
    let mp = args.mp_size;
    if mp == 0 {
        bail!("--mp-size 0: at least one device holds the transformer");
    }
    // Device `--device + offset` of the same backend.
    let open_next = |offset: usize, flag: &str| -> anyhow::Result<sd3_core::Backend> {
        let mut req = args.backend.request();
        req.device += offset;
        sd3::runtime::open_backend(&req)
            .with_context(|| format!("{flag}: opening device {} of `{}`", req.device, req.backend))
    };
    if mp > 1 {
        let more = (1..mp).map(|i| open_next(i, "--mp-size")).collect::<anyhow::Result<Vec<_>>>()?;
        say(format!("transformer split over devices {}..={}", args.backend.device, args.backend.device + mp - 1));
        pipe = pipe.with_tensor_parallel(more);
    }
    match args.dp_size {
        1 => {}
        2 => {
            if args.guidance <= 1.0 {
                bail!(
                    "--dp-size 2 splits classifier-free guidance over two devices, but --guidance {} turns it off",
                    args.guidance
                );
            }
            let group = (mp..2 * mp).map(|i| open_next(i, "--dp-size 2")).collect::<anyhow::Result<Vec<_>>>()?;
            say(format!(
                "guidance split: conditional batch on device{} {}..={} ({})",
                if mp > 1 { "s" } else { "" },
                args.backend.device + mp,
                args.backend.device + 2 * mp - 1,
                group[0].info().name
            ));
            pipe = pipe.with_cfg_parallel_group(group);
        }
        n => bail!("--dp-size {n}: 1 or 2 (the two halves of classifier-free guidance) are supported"),
    }

    let size = pipe.default_size();
    let mut req =
        GenerationRequest::new(prompt, args.height.unwrap_or(size), args.width.or(args.height).unwrap_or(size));
    req.negative_prompt = args.negative_prompt.clone();
    req.steps = args.steps;
    req.guidance = args.guidance;
    req.max_sequence_length = args.max_sequence_length;
    req.seed = args.seed.unwrap_or_else(random_seed);
    req.init_noise = args.init_noise.clone();
    req.num_images = args.num_images;
    req.device_timing = args.benchmark;
    if !args.slg_layers.is_empty() {
        req.slg = Some(SkipLayerGuidance {
            layers: args.slg_layers.clone(),
            scale: args.slg_scale,
            start: args.slg_start,
            stop: args.slg_stop,
        });
    }
    pipe.validate(&req)?;
    if req.slg.is_some() && !req.cfg() {
        say("note: --slg-layers has no effect without classifier-free guidance (--guidance > 1), as in diffusers"
            .into());
    }
    let noise = match &req.init_noise {
        Some(f) => format!("noise from {}", f.display()),
        None => format!("seed {}", req.seed),
    };
    say(format!(
        "{}x{}, {} steps, guidance {}, {noise}, {dtype}{}",
        req.width,
        req.height,
        req.steps,
        req.guidance,
        if pipe.uses_t5() { "" } else { ", no T5" }
    ));

    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(req.steps as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} steps ({elapsed}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("denoising");
        bar
    });
    let mut on_event = |e: &Event| match e {
        Event::Step { index, .. } => {
            if let Some(bar) = &bar {
                bar.set_position(*index as u64 + 1);
            }
        }
        Event::Stage { .. } => {}
    };
    let generation = pipe.generate(&req, &mut on_event)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    let paths = output_paths(&args.out, generation.images.len());
    for (image, path) in generation.images.iter().zip(&paths) {
        let text = png_text(&req, &model_name, &backend, dtype, &args);
        let text: Vec<(&str, String)> = text.iter().map(|(k, v)| (*k, v.clone())).collect();
        sd3::image_out::write_png(path, image, &text)?;
        say(format!("wrote {} ({}x{})", path.display(), image.width, image.height));
    }
    if args.benchmark && !args.quiet {
        print_benchmark(&generation, &backend);
    } else {
        say(format!("done in {:.2} s", generation.report.total_seconds));
    }
    Ok(ExitCode::SUCCESS)
}

fn lora_list(files: &[PathBuf], scales: &[f32]) -> anyhow::Result<Vec<(PathBuf, f32)>> {
    let scale_of = |i: usize| match scales.len() {
        0 => Ok(1.0),
        1 => Ok(scales[0]),
        n if n == files.len() => Ok(scales[i]),
        n => bail!("{n} --lora-scale values for {} --lora files: give one, or one per file", files.len()),
    };
    if files.is_empty() && !scales.is_empty() {
        bail!("--lora-scale given without --lora");
    }
    files.iter().enumerate().map(|(i, f)| Ok((f.clone(), scale_of(i)?))).collect()
}

fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sd3".into());
    let ext = out.extension().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    (0..n).map(|i| out.with_file_name(format!("{stem}_{i}.{ext}"))).collect()
}

fn png_text(
    r: &GenerationRequest,
    model: &str,
    backend: &sd3_core::Backend,
    dtype: DType,
    args: &GenerateArgs,
) -> Vec<(&'static str, String)> {
    let mut t = vec![
        ("prompt", r.prompt.clone()),
        ("negative_prompt", r.negative_prompt.clone().unwrap_or_default()),
        ("seed", if r.init_noise.is_some() { "none (init-noise)".into() } else { r.seed.to_string() }),
        ("steps", r.steps.to_string()),
        ("guidance", r.guidance.to_string()),
        ("size", format!("{}x{}", r.width, r.height)),
        ("max_sequence_length", r.max_sequence_length.to_string()),
        ("model", model.to_string()),
        ("backend", format!("{} ({})", backend.name(), backend.info().name)),
        ("dtype", dtype.to_string()),
        ("sd3_version", env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(f) = &r.init_noise {
        t.push(("init_noise", f.display().to_string()));
    }
    if args.no_t5 {
        t.push(("t5", "off".into()));
    }
    for l in &args.loras {
        t.push(("lora", l.display().to_string()));
    }
    if let Some(s) = &r.slg {
        t.push(("slg", format!("layers {:?} scale {} start {} stop {}", s.layers, s.scale, s.start, s.stop)));
    }
    t
}

fn print_benchmark(g: &Generation, backend: &sd3_core::Backend) {
    let r = &g.report;
    // Device seconds come from device markers (CUDA events, ...); "-" where the device has none.
    let device = |d: Option<f64>| d.map_or_else(|| "-".to_string(), |d| format!("{d:.3}"));
    let row = |label: &str, wall: f64, dev: Option<f64>| println!("{label:<18} {wall:>8.3} {:>9}", device(dev));
    println!("{:<18} {:>8} {:>9}", "stage", "wall s", "device s");
    for (i, (name, s)) in r.stages.iter().enumerate() {
        row(name, *s, r.stage_device_seconds.get(i).copied().flatten());
    }
    for (i, s) in r.steps.iter().enumerate() {
        row(&format!("  step {i}"), *s, r.step_device_seconds.get(i).copied().flatten());
    }
    if !r.steps.is_empty() {
        let n = r.steps.len() as f64;
        let device_sum: Option<f64> = r.step_device_seconds.iter().copied().sum();
        row("  mean step", r.steps.iter().sum::<f64>() / n, device_sum.map(|d| d / n));
    }
    row("total", r.total_seconds, r.total_device_seconds);
    match r.peak_rss_bytes {
        Some(b) => println!("peak host memory   {:>8.1} MiB (VmHWM)", b as f64 / (1 << 20) as f64),
        None => println!("peak host memory   unknown on this OS"),
    }
    if r.fallbacks.is_empty() {
        println!("host fallbacks     none");
    } else {
        let list: Vec<String> = r.fallbacks.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
        println!("host fallbacks     {}", list.join(", "));
    }
    for line in backend.stats() {
        println!("device             {line}");
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64) ^ ((std::process::id() as u64) << 32)
}
