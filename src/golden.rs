//! diffusers' golden pipeline runs (`fixtures/golden/<case>/`, made by `scripts/make_fixtures.py`; see
//! `fixtures/README.md`): the request a case describes (`params.json`), and how far the pipeline run on a backend
//! from the case's initial noise lands from diffusers, stage by stage (conditioning, initial and final latents,
//! the image). Every backend's golden test runs through here with its own [`Tolerances`]: the CPU's
//! `tests/pipeline_golden.rs`, OpenCL's `tests/pipeline_opencl.rs`, `backends/npu/tests/pipeline_on_npu.rs` and
//! `backends/vulkan/tests/pipeline_on_vulkan.rs`.

use crate::image_out::read_png;
use crate::pipeline::{GenerationRequest, PipelineOptions, SkipLayerGuidance, StableDiffusion3Pipeline};
use crate::weights::Weights;
use anyhow::{bail, ensure, Context};
use sd3_core::Backend;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The source tree's `fixtures/` folder (where this crate was built from).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// One golden case: what diffusers was asked for, and where its outputs are.
#[derive(Clone, Debug)]
pub struct GoldenCase {
    /// The folder's name under `fixtures/golden/`, e.g. `sd3-cfg`.
    pub name: String,
    /// `fixtures/golden/<name>/`: `params.json`, `golden.safetensors`, `init_noise.safetensors`, `image.png`.
    pub dir: PathBuf,
    /// The tiny pipeline it ran (`fixtures/<model>`).
    pub model_dir: PathBuf,
    /// The request, with the golden's initial noise.
    pub request: GenerationRequest,
    pub options: PipelineOptions,
}

impl GoldenCase {
    /// Case `name` of `fixtures/golden/` under `fixtures`, from its `params.json`.
    pub fn load(fixtures: &Path, name: &str) -> anyhow::Result<GoldenCase> {
        let dir = fixtures.join("golden").join(name);
        let path = dir.join("params.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let p: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let field = |k: &str| p.get(k).with_context(|| format!("{}: no `{k}`", path.display()));
        let uint = |k: &str| {
            field(k)?.as_u64().map(|v| v as usize).with_context(|| format!("{}: `{k}` is not a count", path.display()))
        };
        let float = |v: &Value, k: &str| {
            v.get(k).and_then(Value::as_f64).with_context(|| format!("{}: `{k}` is not a number", path.display()))
        };
        let text_of = |k: &str| {
            field(k)?.as_str().map(String::from).with_context(|| format!("{}: `{k}` is not a string", path.display()))
        };

        let mut r = GenerationRequest::new(text_of("prompt")?, uint("height")?, uint("width")?);
        r.negative_prompt = p.get("negative_prompt").and_then(Value::as_str).map(String::from);
        r.steps = uint("steps")?;
        r.guidance = float(&p, "guidance")? as f32;
        r.max_sequence_length = uint("max_sequence_length")?;
        r.seed = uint("seed")? as u64;
        r.init_noise = Some(dir.join("init_noise.safetensors"));
        if let Some(slg) = p.get("slg").filter(|v| !v.is_null()) {
            let layers = slg.get("skip_guidance_layers").and_then(Value::as_array);
            let layers: Option<Vec<usize>> =
                layers.map(|a| a.iter().map(|v| v.as_u64().map(|l| l as usize)).collect()).unwrap_or(None);
            r.slg = Some(SkipLayerGuidance {
                layers: layers.with_context(|| format!("{}: bad `slg.skip_guidance_layers`", path.display()))?,
                scale: float(slg, "skip_layer_guidance_scale")? as f32,
                start: float(slg, "skip_layer_guidance_start")?,
                stop: float(slg, "skip_layer_guidance_stop")?,
            });
        }
        let mut options =
            PipelineOptions { no_t5: p.get("no_t5").and_then(Value::as_bool).unwrap_or(false), ..Default::default() };
        if let Some(lora) = p.get("lora").filter(|v| !v.is_null()) {
            let file = lora.get("file").and_then(Value::as_str);
            let file = file.with_context(|| format!("{}: `lora.file` is not a string", path.display()))?;
            options.loras.push((fixtures.join(file), float(lora, "scale")? as f32));
        }
        let model_dir = fixtures.join(text_of("model")?);
        Ok(GoldenCase { name: name.into(), dir, model_dir, request: r, options })
    }

    /// Run the pipeline on `backend` stage by stage and measure each stage against the golden.
    pub fn run(&self, backend: &Backend) -> anyhow::Result<Distances> {
        let ctx = |what: &str| format!("golden case {}: {what}", self.name);
        let r = &self.request;
        let pipe = StableDiffusion3Pipeline::new(&self.model_dir, backend.clone(), self.options.clone())
            .with_context(|| ctx("loading the pipeline"))?;
        let golden_path = self.dir.join("golden.safetensors");
        let g = Weights::open_file(&golden_path).with_context(|| ctx("opening golden.safetensors"))?;
        let golden = |n: &str| g.host_f32(n).with_context(|| format!("{}: {n}", golden_path.display()));

        // Conditioning: the negative prompt's rows first under CFG.
        let cond = pipe.encode(r, &mut |_| {}).with_context(|| ctx("encoding the prompt"))?;
        let (want_embeds, want_pooled) = if r.cfg() {
            (
                [golden("neg_prompt_embeds")?, golden("prompt_embeds")?].concat(),
                [golden("neg_pooled_projections")?, golden("pooled_projections")?].concat(),
            )
        } else {
            (golden("prompt_embeds")?, golden("pooled_projections")?)
        };
        let prompt_embeds = max_abs_diff("prompt_embeds", &cond.prompt_embeds.to_f32_vec()?, &want_embeds)?;
        let pooled = max_abs_diff("pooled_projections", &cond.pooled.to_f32_vec()?, &want_pooled)?;

        // Denoising from the golden's initial noise.
        let latents = pipe.initial_latents(r).with_context(|| ctx("loading the initial noise"))?;
        let initial_latents = max_abs_diff("latents", &latents.to_f32_vec()?, &golden("latents")?)?;
        let fin = pipe.denoise(r, &cond, latents, &mut |_| {}).with_context(|| ctx("denoising"))?;
        let final_latents = max_abs_diff("final_latents", &fin.to_f32_vec()?, &golden("final_latents")?)?;

        // The image, against diffusers' PNG.
        let images = pipe.decode(&fin).with_context(|| ctx("decoding"))?;
        let (want, _) = read_png(&self.dir.join("image.png"))?;
        let got = &images[0];
        ensure!(
            (got.width, got.height) == (want.width, want.height),
            "{}: image is {}x{}, diffusers' {}x{}",
            self.name,
            got.width,
            got.height,
            want.width,
            want.height
        );
        let image = got.pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        let image_mean = got.pixels.iter().map(|&p| p as f64).sum::<f64>() / got.pixels.len().max(1) as f64;
        Ok(Distances {
            prompt_embeds,
            pooled,
            initial_latents,
            final_latents,
            image,
            image_mean,
            host_fallbacks: backend.fallback_counts(),
        })
    }

    /// [`run`](Self::run), then an error naming every stage beyond `tol`.
    pub fn run_and_check(&self, backend: &Backend, tol: &Tolerances) -> anyhow::Result<Distances> {
        let d = self.run(backend)?;
        if let Err(e) = d.check(tol) {
            bail!("golden case {} on {}: {e}\n({d})", self.name, backend.name());
        }
        Ok(d)
    }
}

/// Largest |got - want|, NaN counting as infinitely far; an error when the lengths differ.
fn max_abs_diff(what: &str, got: &[f32], want: &[f32]) -> anyhow::Result<f32> {
    ensure!(got.len() == want.len(), "{what}: {} values, the golden has {}", got.len(), want.len());
    Ok(got
        .iter()
        .zip(want)
        .map(|(a, b)| if (a - b).is_nan() { f32::INFINITY } else { (a - b).abs() })
        .fold(0.0, f32::max))
}

/// How far one run landed from the golden: max |diff| per stage.
#[derive(Clone, Debug)]
pub struct Distances {
    pub prompt_embeds: f32,
    pub pooled: f32,
    pub initial_latents: f32,
    pub final_latents: f32,
    /// Max |diff| of the 8-bit image, in 1/255.
    pub image: u8,
    /// The image's mean value (a black or grey image is suspicious even when the golden is close).
    pub image_mean: f64,
    /// Ops the backend ran on the host instead, over its whole life so far.
    pub host_fallbacks: BTreeMap<String, u64>,
}

/// The largest distance each stage may have; `None` leaves the stage unchecked (it is still measured and
/// printed). Every op must run on the device: any host fallback fails the check.
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    /// Prompt embeddings and pooled projections.
    pub conditioning: Option<f32>,
    pub initial_latents: Option<f32>,
    pub final_latents: Option<f32>,
    /// In 1/255.
    pub image: u8,
}

impl Distances {
    /// Ok, or every stage beyond `tol`.
    pub fn check(&self, tol: &Tolerances) -> Result<(), String> {
        let mut bad = Vec::new();
        let mut within = |what: &str, got: f32, limit: Option<f32>| match limit {
            Some(limit) if got.is_nan() || got > limit => {
                bad.push(format!("{what} differ by {got:e} (limit {limit:e})"))
            }
            _ => {}
        };
        within("prompt embeddings", self.prompt_embeds, tol.conditioning);
        within("pooled projections", self.pooled, tol.conditioning);
        within("initial latents", self.initial_latents, tol.initial_latents);
        within("final latents", self.final_latents, tol.final_latents);
        if self.image > tol.image {
            bad.push(format!("the image differs from diffusers' by {}/255 (limit {}/255)", self.image, tol.image));
        }
        if !self.host_fallbacks.is_empty() {
            bad.push(format!("ops ran on the host instead of the device: {:?}", self.host_fallbacks));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

impl fmt::Display for Distances {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "max |diff|: prompt_embeds {:e}, pooled {:e}, initial latents {:e}, final latents {:e}, image {}/255 \
             (mean {:.1})",
            self.prompt_embeds, self.pooled, self.initial_latents, self.final_latents, self.image, self.image_mean
        )
    }
}
