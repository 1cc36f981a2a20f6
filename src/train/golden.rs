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

    /// The adapted modules (`lora.<module>.lora_A.weight`), sorted.
    pub fn modules(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .st()
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix("lora.")?.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        names.sort();
        names
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
                if err >= d.gradients {
                    (d.gradients, d.worst) = (err, format!("{m}.lora_{which}"));
                }
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
        let adapters = modules
            .iter()
            .map(|m| {
                let a = self.tensor(&format!("lora.{m}.lora_A.weight"), backend)?.to_dtype(dtype)?;
                let b = self.tensor(&format!("lora.{m}.lora_B.weight"), backend)?.to_dtype(dtype)?;
                Ok((m.clone(), LoraPair { a, b, scale: 1.0 }))
            })
            .collect::<anyhow::Result<Adapters>>()?;
        let (x0, shape) = self.get("input.x0")?;
        let (noise, _) = self.get("input.noise")?;
        let (sigmas, _) = self.get("input.sigmas")?;
        let noisy_host = noisy_latents(&x0, &noise, &sigmas);
        let noisy = backend.from_f32(&noisy_host, &shape, DType::F32)?;
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * 1000.0).collect();
        let embeds = self.tensor("input.prompt_embeds", backend)?;
        let pooled = self.tensor("input.pooled", backend)?;
        let batch = TrainingBatch {
            hidden_states: &noisy,
            encoder_hidden_states: &embeds,
            pooled: &pooled,
            timesteps: &timesteps,
        };
        let (grads, (pred, loss)) = transformer.adapter_gradients(&batch, &adapters, checkpointing, |pred| {
            let (loss, d) = preconditioned_loss(pred, &noisy_host, &x0, &sigmas)?;
            Ok((d, (pred.to_f32_vec()?, loss)))
        })?;
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
                if err >= d.gradients {
                    (d.gradients, d.worst) = (err, format!("{m}.lora_{which}"));
                }
            }
        }
        Ok(d)
    }
}

impl TrainingGolden {
    /// The full fine-tuning step (`<model>-full.safetensors`: every parameter's gradient, no LoRA) on `backend` in
    /// f32, measured against the golden. Errors unless the gradients cover exactly the golden's parameters.
    pub fn run_full(&self, backend: &Backend, checkpointing: bool) -> anyhow::Result<StepDistance> {
        let full_path = self.path.with_file_name(format!(
            "{}-full.safetensors",
            self.path.file_stem().and_then(|s| s.to_str()).unwrap_or_default()
        ));
        let full = TrainingGolden {
            bytes: std::fs::read(&full_path).with_context(|| format!("reading {}", full_path.display()))?,
            path: full_path,
            transformer_dir: self.transformer_dir.clone(),
        };
        let transformer = Sd3Transformer2DModel::load(&self.transformer_dir, backend, DType::F32)?;
        let (x0, shape) = self.get("input.x0")?;
        let (noise, _) = self.get("input.noise")?;
        let (sigmas, _) = self.get("input.sigmas")?;
        let noisy_host = noisy_latents(&x0, &noise, &sigmas);
        let noisy = backend.from_f32(&noisy_host, &shape, DType::F32)?;
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * 1000.0).collect();
        let embeds = self.tensor("input.prompt_embeds", backend)?;
        let pooled = self.tensor("input.pooled", backend)?;
        let batch = TrainingBatch {
            hidden_states: &noisy,
            encoder_hidden_states: &embeds,
            pooled: &pooled,
            timesteps: &timesteps,
        };
        let (grads, (pred, loss)) = transformer.parameter_gradients(&batch, checkpointing, |pred| {
            let (loss, d) = preconditioned_loss(pred, &noisy_host, &x0, &sigmas)?;
            Ok((d, (pred.to_f32_vec()?, loss)))
        })?;
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
            if err >= d.gradients {
                (d.gradients, d.worst) = (err, name.clone());
            }
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
        let stem = self.path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let path = self.path.with_file_name(format!("{stem}-text.safetensors"));
        let text = TrainingGolden {
            bytes: std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            path,
            transformer_dir: self.transformer_dir.clone(),
        };
        let model_dir = self.transformer_dir.parent().context("the transformer's pipeline folder")?;
        let options = crate::pipeline::PipelineOptions { dtype: DType::F32, ..Default::default() };
        let pipe = crate::pipeline::StableDiffusion3Pipeline::new(model_dir, backend.clone(), options)?;
        let inputs = pipe.text_inputs("a photo of sks dog", 77)?;
        let encoders = TextEncoders::load(model_dir, backend, DType::F32)?;
        let transformer = Sd3Transformer2DModel::load(&self.transformer_dir, backend, DType::F32)?;
        // Adapters by component, from `lora.<component>.<module>.lora_{A,B}.weight`.
        let names: Vec<String> = text.st().names().iter().map(|n| n.to_string()).collect();
        let adapters_of = |component: &str| -> anyhow::Result<(Vec<String>, Adapters)> {
            let prefix = format!("lora.{component}.");
            let mut modules: Vec<String> = names
                .iter()
                .filter_map(|n| n.strip_prefix(&prefix)?.strip_suffix(".lora_A.weight").map(str::to_string))
                .collect();
            modules.sort();
            let adapters = modules
                .iter()
                .map(|m| {
                    let a = text.tensor(&format!("{prefix}{m}.lora_A.weight"), backend)?;
                    let b = text.tensor(&format!("{prefix}{m}.lora_B.weight"), backend)?;
                    Ok((m.clone(), LoraPair { a, b, scale: 1.0 }))
                })
                .collect::<anyhow::Result<Adapters>>()?;
            Ok((modules, adapters))
        };
        let (t_modules, t_adapters) = adapters_of("transformer")?;
        let (l_modules, l_adapters) = adapters_of(COMPONENTS[0])?;
        let (g_modules, g_adapters) = adapters_of(COMPONENTS[1])?;
        let text_adapters = [l_adapters, g_adapters];
        let encoded = encoders.encode(&pipe, &inputs, [&text_adapters[0], &text_adapters[1]])?;
        let (x0, shape) = self.get("input.x0")?;
        let (noise, _) = self.get("input.noise")?;
        let (sigmas, _) = self.get("input.sigmas")?;
        let b = shape[0];
        let rows = |t: &Tensor| -> sd3_core::Result<Tensor> {
            let mut s = t.shape().to_vec();
            s[0] = b;
            t.broadcast_to(&s)?.contiguous()
        };
        let (embeds, pooled) = (rows(&encoded.embeds)?, rows(&encoded.pooled)?);
        let noisy_host = noisy_latents(&x0, &noise, &sigmas);
        let noisy = backend.from_f32(&noisy_host, &shape, DType::F32)?;
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * 1000.0).collect();
        let batch = TrainingBatch {
            hidden_states: &noisy,
            encoder_hidden_states: &embeds,
            pooled: &pooled,
            timesteps: &timesteps,
        };
        let request = GradientRequest { parameters: false, text_inputs: true };
        let (grads, (pred, loss)) = transformer.step_gradients(&batch, &t_adapters, false, request, |pred| {
            let (loss, d) = preconditioned_loss(pred, &noisy_host, &x0, &sigmas)?;
            Ok((d, (pred.to_f32_vec()?, loss)))
        })?;
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
                    if err >= d.gradients {
                        (d.gradients, d.worst) = (err, format!("{component}.{m}.lora_{which}"));
                    }
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
