//! diffusers + PEFT's LoRA training step on the tiny transformers (`fixtures/training/<model>.safetensors`, made
//! by `scripts/make_training_golden.py`): how far one backend's prediction, loss and adapter gradients land from
//! it. Every backend's training test runs through here with its own tolerances: the CPU's `tests/training.rs`,
//! OpenCL's `tests/pipeline_opencl.rs`, `backends/vulkan/tests/pipeline_on_vulkan.rs`.

use super::objective::{noisy_latents, preconditioned_loss};
use crate::models::mmdit::train::{Adapters, LoraPair, TrainingBatch};
use crate::models::mmdit::Sd3Transformer2DModel;
use anyhow::{ensure, Context};
use safetensors::SafeTensors;
use sd3_core::{Backend, DType, Tensor};
use std::fmt;
use std::path::{Path, PathBuf};

/// A golden file, read whole (it is small).
pub struct TrainingGolden {
    pub path: PathBuf,
    /// `fixtures/<model>/transformer`.
    pub transformer_dir: PathBuf,
    bytes: Vec<u8>,
}

/// Largest differences from the golden, each relative to the golden's largest magnitude.
#[derive(Clone, Debug, Default)]
pub struct StepDistance {
    pub prediction: f32,
    pub loss: f32,
    pub gradients: f32,
    /// The adapter parameter with the largest gradient error.
    pub worst: String,
    pub modules: usize,
}

impl fmt::Display for StepDistance {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "prediction within {:.1e}, loss within {:.1e}, gradients of {} tensors within {:.1e} (relative; worst {})",
            self.prediction, self.loss, self.modules, self.gradients, self.worst
        )
    }
}

/// `max |a - b| / max |b|`.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A golden step's inputs on a backend: the noisy latents and their noise levels, and the prompt's conditioning.
struct StepInputs {
    x0: Vec<f32>,
    sigmas: Vec<f32>,
    noisy_host: Vec<f32>,
    noisy: Tensor,
    timesteps: Vec<f32>,
    embeds: Tensor,
    pooled: Tensor,
}

impl StepInputs {
    fn batch(&self) -> TrainingBatch<'_> {
        TrainingBatch {
            hidden_states: &self.noisy,
            encoder_hidden_states: &self.embeds,
            pooled: &self.pooled,
            timesteps: &self.timesteps,
        }
    }

    /// The preconditioned loss's gradient for `pred`, with the prediction and the loss for comparison.
    fn loss_grad(&self, pred: &Tensor) -> anyhow::Result<(Tensor, (Vec<f32>, f32))> {
        let (loss, d) = preconditioned_loss(pred, &self.noisy_host, &self.x0, &self.sigmas)?;
        Ok((d, (pred.to_f32_vec()?, loss)))
    }
}

impl StepDistance {
    /// Records one tensor's gradient error.
    fn gradient(&mut self, err: f32, name: impl FnOnce() -> String) {
        if err >= self.gradients {
            (self.gradients, self.worst) = (err, name());
        }
    }
}

impl TrainingGolden {
    /// `fixtures/training/<model>.safetensors` of the tiny pipeline `fixtures/<model>`.
    pub fn load(fixtures: &Path, model: &str) -> anyhow::Result<Self> {
        let path = fixtures.join("training").join(format!("{model}.safetensors"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        Ok(TrainingGolden { path, transformer_dir: fixtures.join(model).join("transformer"), bytes })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked at load")
    }

    /// Tensor `name` (f32) with its shape.
    pub fn get(&self, name: &str) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
        let st = self.st();
        let t = st.tensor(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((v, t.shape().to_vec()))
    }

    fn tensor(&self, name: &str, backend: &Backend) -> anyhow::Result<Tensor> {
        let (v, shape) = self.get(name)?;
        Ok(backend.from_f32(&v, &shape, DType::F32)?)
    }

    /// The step's inputs on `backend`, with the prompt's conditioning `[1, …]` repeated to the batch, or the
    /// golden's `input.prompt_embeds` / `input.pooled` without one.
    fn inputs(&self, backend: &Backend, text: Option<(&Tensor, &Tensor)>) -> anyhow::Result<StepInputs> {
        let (x0, shape) = self.get("input.x0")?;
        let (noise, _) = self.get("input.noise")?;
        let (sigmas, _) = self.get("input.sigmas")?;
        let noisy_host = noisy_latents(&x0, &noise, &sigmas);
        let noisy = backend.from_f32(&noisy_host, &shape, DType::F32)?;
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * 1000.0).collect();
        let (embeds, pooled) = match text {
            Some((embeds, pooled)) => {
                let rows = |t: &Tensor| -> sd3_core::Result<Tensor> {
                    let mut s = t.shape().to_vec();
                    s[0] = shape[0];
                    t.broadcast_to(&s)?.contiguous()
                };
                (rows(embeds)?, rows(pooled)?)
            }
            None => (self.tensor("input.prompt_embeds", backend)?, self.tensor("input.pooled", backend)?),
        };
        Ok(StepInputs { x0, sigmas, noisy_host, noisy, timesteps, embeds, pooled })
    }

    /// The golden file beside this one, `<model><suffix>.safetensors`.
    fn sibling(&self, suffix: &str) -> anyhow::Result<TrainingGolden> {
        let stem = self.path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let path = self.path.with_file_name(format!("{stem}{suffix}.safetensors"));
        Ok(TrainingGolden {
            bytes: std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            path,
            transformer_dir: self.transformer_dir.clone(),
        })
    }

    /// The adapted modules (`lora.<module>.lora_A.weight`), sorted.
    pub fn modules(&self) -> Vec<String> {
        self.modules_under("lora.")
    }

    /// The modules with an adapter under `prefix` (`<prefix><module>.lora_A.weight`), sorted.
    fn modules_under(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .st()
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix(prefix)?.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// The golden's adapters of `modules` under `prefix`, on `backend` in `dtype` (scale 1: alpha is the rank).
    fn adapters(&self, prefix: &str, modules: &[String], backend: &Backend, dtype: DType) -> anyhow::Result<Adapters> {
        modules
            .iter()
            .map(|m| {
                let a = self.tensor(&format!("{prefix}{m}.lora_A.weight"), backend)?.to_dtype(dtype)?;
                let b = self.tensor(&format!("{prefix}{m}.lora_B.weight"), backend)?.to_dtype(dtype)?;
                Ok((m.clone(), LoraPair { a, b, scale: 1.0 }))
            })
            .collect()
    }

    /// Runs the step on `backend` (the transformer in f32) and measures it against the golden.
    pub fn run(&self, backend: &Backend) -> anyhow::Result<StepDistance> {
        self.run_in(backend, DType::F32)
    }

    /// How far diffusers' own step with the transformer in `dtype` (bf16 or f16; `--mixed_precision`) lands from
    /// its f32 step: the yardstick for [`Self::run_in`] in that dtype.
    pub fn reference_distance(&self, dtype: DType) -> anyhow::Result<StepDistance> {
        let tag = half_tag(dtype)?;
        let mut d = StepDistance {
            prediction: relative_error(&self.get(&format!("{tag}.pred"))?.0, &self.get("pred")?.0),
            modules: self.modules().len(),
            ..StepDistance::default()
        };
        for m in self.modules() {
            for which in ["A", "B"] {
                let name = format!("grad.{m}.lora_{which}.weight");
                let err = relative_error(&self.get(&format!("{tag}.{name}"))?.0, &self.get(&name)?.0);
                d.gradient(err, || format!("{m}.lora_{which}"));
            }
        }
        Ok(d)
    }

    /// Runs the step on `backend` with the transformer (and the adapters) in `dtype`, and measures it against the
    /// f32 golden (the loss's distance is absolute in f32 terms, relative to the golden loss).
    pub fn run_in(&self, backend: &Backend, dtype: DType) -> anyhow::Result<StepDistance> {
        self.run_with(backend, dtype, false)
    }

    /// [`Self::run_in`], with or without gradient checkpointing.
    pub fn run_with(&self, backend: &Backend, dtype: DType, checkpointing: bool) -> anyhow::Result<StepDistance> {
        let transformer = Sd3Transformer2DModel::load(&self.transformer_dir, backend, dtype)?;
        let modules = self.modules();
        let targets: Vec<String> = transformer.adapter_shapes().into_keys().collect();
        ensure!(modules == targets, "golden adapters {modules:?}, the transformer's targets {targets:?}");
        let adapters = self.adapters("lora.", &modules, backend, dtype)?;
        let inputs = self.inputs(backend, None)?;
        let (grads, (pred, loss)) =
            transformer.adapter_gradients(&inputs.batch(), &adapters, checkpointing, |p| inputs.loss_grad(p))?;
        let golden_loss = self.get("loss")?.0[0];
        let mut d = StepDistance {
            prediction: relative_error(&pred, &self.get("pred")?.0),
            loss: (loss - golden_loss).abs() / golden_loss.abs(),
            gradients: 0.0,
            worst: String::new(),
            modules: modules.len(),
        };
        for m in &modules {
            let [da, db] = grads.get(m).with_context(|| format!("no gradient for {m}"))?;
            for (t, which) in [(da, "A"), (db, "B")] {
                let golden = self.get(&format!("grad.{m}.lora_{which}.weight"))?.0;
                let err = relative_error(&t.to_f32_vec()?, &golden);
                d.gradient(err, || format!("{m}.lora_{which}"));
            }
        }
        Ok(d)
    }
}

impl TrainingGolden {
    /// The full fine-tuning step (`<model>-full.safetensors`: every parameter's gradient, no LoRA) on `backend` in
    /// f32, measured against the golden. Errors unless the gradients cover exactly the golden's parameters.
    pub fn run_full(&self, backend: &Backend, checkpointing: bool) -> anyhow::Result<StepDistance> {
        let full = self.sibling("-full")?;
        let transformer = Sd3Transformer2DModel::load(&self.transformer_dir, backend, DType::F32)?;
        let inputs = self.inputs(backend, None)?;
        let (grads, (pred, loss)) =
            transformer.parameter_gradients(&inputs.batch(), checkpointing, |p| inputs.loss_grad(p))?;
        let golden_names: Vec<String> =
            full.st().names().iter().filter_map(|n| n.strip_prefix("grad.").map(str::to_string)).collect();
        let mut golden_names = golden_names;
        golden_names.sort();
        let ours: Vec<String> = grads.keys().cloned().collect();
        ensure!(ours == golden_names, "gradients for {ours:?}, the golden has {golden_names:?}");
        let golden_loss = full.get("loss")?.0[0];
        let mut d = StepDistance {
            prediction: relative_error(&pred, &full.get("pred")?.0),
            loss: (loss - golden_loss).abs() / golden_loss.abs(),
            modules: grads.len(),
            ..StepDistance::default()
        };
        for (name, g) in &grads {
            let golden = full.get(&format!("grad.{name}"))?.0;
            let err = relative_error(&g.to_f32_vec()?, &golden);
            d.gradient(err, || name.clone());
        }
        Ok(d)
    }
}

impl TrainingGolden {
    /// The LoRA step with `--train_text_encoder` (`<model>-text.safetensors`: adapters on the transformer and both
    /// CLIPs, the prompt "a photo of sks dog" encoded with them): every adapter's gradient, f32.
    pub fn run_text_encoders(&self, backend: &Backend) -> anyhow::Result<StepDistance> {
        use super::text_encoders::{sum_rows, TextEncoders, COMPONENTS};
        use crate::models::mmdit::train::GradientRequest;
        let text = self.sibling("-text")?;
        let model_dir = self.transformer_dir.parent().context("the transformer's pipeline folder")?;
        let options = crate::pipeline::PipelineOptions { dtype: DType::F32, ..Default::default() };
        let pipe = crate::pipeline::StableDiffusion3Pipeline::new(model_dir, backend.clone(), options)?;
        let inputs = pipe.text_inputs("a photo of sks dog", 77)?;
        let encoders = TextEncoders::load(model_dir, backend, DType::F32)?;
        let transformer = Sd3Transformer2DModel::load(&self.transformer_dir, backend, DType::F32)?;
        // Adapters by component, from `lora.<component>.<module>.lora_{A,B}.weight`.
        let adapters_of = |component: &str| -> anyhow::Result<(Vec<String>, Adapters)> {
            let prefix = format!("lora.{component}.");
            let modules = text.modules_under(&prefix);
            let adapters = text.adapters(&prefix, &modules, backend, DType::F32)?;
            Ok((modules, adapters))
        };
        let (t_modules, t_adapters) = adapters_of("transformer")?;
        let (l_modules, l_adapters) = adapters_of(COMPONENTS[0])?;
        let (g_modules, g_adapters) = adapters_of(COMPONENTS[1])?;
        let text_adapters = [l_adapters, g_adapters];
        let encoded = encoders.encode(&pipe, &inputs, [&text_adapters[0], &text_adapters[1]])?;
        let inputs = self.inputs(backend, Some((&encoded.embeds, &encoded.pooled)))?;
        let b = inputs.sigmas.len();
        let request = GradientRequest { parameters: false, text_inputs: true };
        let (grads, (pred, loss)) =
            transformer.step_gradients(&inputs.batch(), &t_adapters, false, request, |p| inputs.loss_grad(p))?;
        let (d_embeds, d_pooled) = grads.text_inputs.context("the text inputs' gradients")?;
        let text_grads = encoders.backward(&encoded, &sum_rows(&d_embeds, 0..b)?, &sum_rows(&d_pooled, 0..b)?)?;
        let golden_loss = text.get("loss")?.0[0];
        let mut d = StepDistance {
            prediction: relative_error(&pred, &text.get("pred")?.0),
            loss: (loss - golden_loss).abs() / golden_loss.abs(),
            modules: t_modules.len() + l_modules.len() + g_modules.len(),
            ..StepDistance::default()
        };
        let groups = [
            ("transformer", &t_modules, &grads.adapters),
            (COMPONENTS[0], &l_modules, &text_grads[0]),
            (COMPONENTS[1], &g_modules, &text_grads[1]),
        ];
        for (component, modules, grads) in groups {
            for m in modules.iter() {
                let [da, db] = grads.get(m).with_context(|| format!("no gradient for {component}.{m}"))?;
                for (t, which) in [(da, "A"), (db, "B")] {
                    let golden = text.get(&format!("grad.{component}.{m}.lora_{which}.weight"))?.0;
                    let err = relative_error(&t.to_f32_vec()?, &golden);
                    d.gradient(err, || format!("{component}.{m}.lora_{which}"));
                }
            }
        }
        Ok(d)
    }
}

fn half_tag(dtype: DType) -> anyhow::Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => anyhow::bail!("no half-precision golden for {other}"),
    }
}

/// The bounds a backend's f32 golden steps are held to, relative to the golden's largest magnitude: the CPU
/// backend's (`tests/training.rs`, where the reasons and the measured distances are).
pub const PREDICTION_BOUND: f32 = 1e-5;
pub const LORA_GRADIENT_BOUND: f32 = 5e-5;
/// Full steps: the timestep embedder's first weight lands at 2.8e-5 (its input, the sinusoid, has f32 arguments up
/// to 850 rad); every other tensor within 3.4e-6.
pub const FULL_GRADIENT_BOUND: f32 = 1e-4;

/// Every golden step on `backend` (f32): the LoRA step and the full step on `sd3-tiny` and `sd35-tiny`, the step
/// with the text encoders on `sd3-tiny`, each checked against the bounds above. Returns a line per step; the
/// error names the step and its distances.
pub fn check_every_step(fixtures: &Path, backend: &Backend) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut check = |what: String, d: StepDistance, gradient_bound: f32| -> anyhow::Result<()> {
        let ok = d.prediction < PREDICTION_BOUND && d.loss < PREDICTION_BOUND && d.gradients < gradient_bound;
        ensure!(ok, "{what}: {d} (bounds {PREDICTION_BOUND:.0e} and {gradient_bound:.0e})");
        lines.push(format!("{what}: {d}"));
        Ok(())
    };
    for model in ["sd3-tiny", "sd35-tiny"] {
        let golden = TrainingGolden::load(fixtures, model)?;
        check(format!("{model} LoRA step"), golden.run(backend)?, LORA_GRADIENT_BOUND)?;
        check(format!("{model} full step"), golden.run_full(backend, false)?, FULL_GRADIENT_BOUND)?;
    }
    let golden = TrainingGolden::load(fixtures, "sd3-tiny")?;
    check("sd3-tiny step with the text encoders".into(), golden.run_text_encoders(backend)?, LORA_GRADIENT_BOUND)?;
    Ok(lines)
}
