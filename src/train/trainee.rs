//! What a DreamBooth run trains: a LoRA (adapters and AdamW on the host, `train_dreambooth_lora_sd3.py`) or every
//! parameter of the transformer (f32 masters and AdamW on the device, `train_dreambooth_sd3.py`), behind one
//! interface the training loop drives: gradients of a micro-batch, their sum, clipping, the update, saving.

use super::lora_params::{save_lora_file, LoraParams};
use super::optim::{clip_device_grad_norm, clip_grad_norm, AdamW, AdamWConfig, DeviceAdamW};
use super::text_encoders::{sum_rows, Encoded, TextEncoders, COMPONENTS};
use crate::models::mmdit::train::{AdapterGrads, Adapters, GradientRequest, ParamGrads, TrainingBatch};
use crate::models::mmdit::Sd3Transformer2DModel;
use crate::weights::Weights;
use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, TensorView};
use sd3_core::{Backend, DType, Tensor};
use std::path::{Path, PathBuf};

/// The file a LoRA is written to (diffusers' name).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The training method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// LoRA of this rank (alpha equal to it) on the attention projections.
    Lora { rank: usize },
    /// Every parameter of the transformer.
    Full,
}

pub(super) enum Trainee {
    /// The transformer's adapters, then (with `--train-text-encoder`) both CLIPs'.
    Lora {
        parts: Vec<LoraPart>,
    },
    Full {
        adam: DeviceAdamW,
        base_lr: f32,
    },
}

/// One component's LoRA with its optimizer (its own learning rate and weight decay, as the script's parameter
/// groups) and its current values on each device of the run.
pub(super) struct LoraPart {
    params: LoraParams,
    adam: AdamW,
    /// The rate the schedule scales.
    base_lr: f32,
    adapters: Vec<Adapters>,
}

/// The text encoders' share of a step with `--train-text-encoder`: the encoders, each prompt's encoding with the
/// current adapters, and how many batch rows each prompt has (its rows are consecutive, in this order).
pub(super) struct TextStep<'a, 'e> {
    pub encoders: &'a TextEncoders,
    pub encoded: &'a [Encoded<'e>],
    pub rows_per_prompt: usize,
}

/// A micro-batch's gradients (or their running sum).
pub(super) enum Gradients {
    Host(Vec<Vec<f32>>),
    Device(ParamGrads),
}

impl Trainee {
    /// `text`: with `--train-text-encoder`, both CLIPs' adapted modules and their optimizer settings.
    pub fn new(
        method: Method,
        config: AdamWConfig,
        text: Option<(&TextEncoders, AdamWConfig)>,
        seed: u64,
        transformer: &Sd3Transformer2DModel,
    ) -> anyhow::Result<Self> {
        Ok(match method {
            Method::Lora { rank } => {
                let part = |params: LoraParams, config: AdamWConfig| {
                    let adam = AdamW::new(config, &params.flat_sizes());
                    LoraPart { params, adam, base_lr: config.lr, adapters: Vec::new() }
                };
                let mut parts =
                    vec![part(LoraParams::gaussian(&transformer.adapter_shapes(), rank, rank as f32, seed), config)];
                if let Some((encoders, text_config)) = text {
                    let targets = crate::models::clip_train::CLIP_LORA_TARGETS.to_vec();
                    for (i, shapes) in encoders.adapter_shapes().iter().enumerate() {
                        let seed = seed.wrapping_add(1 + i as u64);
                        let params =
                            LoraParams::gaussian_for(COMPONENTS[i], targets.clone(), shapes, rank, rank as f32, seed);
                        parts.push(part(params, text_config));
                    }
                }
                Trainee::Lora { parts }
            }
            Method::Full if text.is_some() => bail!("--train-text-encoder trains LoRA adapters: use train-lora"),
            Method::Full => {
                Trainee::Full { adam: DeviceAdamW::new(config, transformer.named_parameters()?)?, base_lr: config.lr }
            }
        })
    }

    /// `(tensors, values)` trained.
    pub fn size(&self) -> (usize, usize) {
        match self {
            Trainee::Lora { parts } => parts.iter().fold((0, 0), |(t, v), p| {
                (t + p.params.modules.len(), v + p.params.flat_sizes().iter().sum::<usize>())
            }),
            Trainee::Full { adam, .. } => (adam.masters().count(), adam.masters().map(|(_, t)| t.elem_count()).sum()),
        }
    }

    /// Before a step's micro-batches: the adapters' current values on each device (the text encoders' on the
    /// first).
    pub fn begin_step(&mut self, backends: &[Backend], dtype: DType) -> sd3_core::Result<()> {
        if let Trainee::Lora { parts } = self {
            for (i, part) in parts.iter_mut().enumerate() {
                let devices = if i == 0 { backends } else { &backends[..1] };
                part.adapters =
                    devices.iter().map(|b| part.params.upload(b, dtype)).collect::<sd3_core::Result<_>>()?;
            }
        }
        Ok(())
    }

    /// Both CLIPs' current adapters (on the first device), with `--train-text-encoder`.
    pub fn text_adapters(&self) -> Option<[&Adapters; 2]> {
        match self {
            Trainee::Lora { parts } if parts.len() == 3 => Some([&parts[1].adapters[0], &parts[2].adapters[0]]),
            _ => None,
        }
    }

    /// One micro-batch's forward and backward on device `device` of the run (its `transformer`): its gradients
    /// and the loss `loss_grad` reports. With `text`, the backward goes on into the text encoders.
    pub fn gradients(
        &self,
        device: usize,
        transformer: &Sd3Transformer2DModel,
        batch: &TrainingBatch,
        checkpointing: bool,
        text: Option<TextStep>,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, f32)>,
    ) -> anyhow::Result<(Gradients, f32)> {
        Ok(match self {
            Trainee::Lora { parts } => {
                let request = GradientRequest { parameters: false, text_inputs: text.is_some() };
                let adapters = &parts[0].adapters[device];
                let (grads, loss) = transformer.step_gradients(batch, adapters, checkpointing, request, loss_grad)?;
                let mut flat = parts[0].params.flat_grads(&grads.adapters)?;
                if let Some(text) = text {
                    let (d_embeds, d_pooled) = grads.text_inputs.context("the text inputs' gradients")?;
                    let mut per_component: [AdapterGrads; 2] = Default::default();
                    for (k, encoded) in text.encoded.iter().enumerate() {
                        let rows = k * text.rows_per_prompt..(k + 1) * text.rows_per_prompt;
                        let (e, p) = (sum_rows(&d_embeds, rows.clone())?, sum_rows(&d_pooled, rows)?);
                        for (sum, g) in per_component.iter_mut().zip(text.encoders.backward(encoded, &e, &p)?) {
                            for (name, [a, b]) in g {
                                let pair = match sum.remove(&name) {
                                    Some([a0, b0]) => [a0.add(&a)?, b0.add(&b)?],
                                    None => [a, b],
                                };
                                sum.insert(name, pair);
                            }
                        }
                    }
                    for (part, g) in parts[1..].iter().zip(&per_component) {
                        flat.extend(part.params.flat_grads(g)?);
                    }
                } else {
                    for part in &parts[1..] {
                        flat.extend(part.params.flat_sizes().into_iter().map(|n| vec![0.0; n]));
                    }
                }
                (Gradients::Host(flat), loss)
            }
            Trainee::Full { .. } => {
                let (grads, loss) = transformer.parameter_gradients(batch, checkpointing, loss_grad)?;
                (Gradients::Device(grads), loss)
            }
        })
    }

    /// The update from the micro-batches' summed gradients: their mean, clipped to `max_norm`, through AdamW with
    /// every learning rate times `lr_factor` (the schedule's). Returns the norm before clipping; a non-finite one
    /// stops the run.
    pub fn update(
        &mut self,
        sum: Gradients,
        micro_batches: usize,
        max_norm: f32,
        lr_factor: f32,
    ) -> anyhow::Result<f32> {
        let inv = 1.0 / micro_batches as f32;
        let norm = match (self, sum) {
            (Trainee::Lora { parts }, Gradients::Host(mut grads)) => {
                grads.iter_mut().flatten().for_each(|g| *g *= inv);
                // One norm over every part's gradients, as clip_grad_norm_ over all trained parameters.
                let norm = clip_grad_norm(&mut grads, max_norm);
                if norm.is_finite() {
                    let mut rest = grads.into_iter();
                    for part in parts.iter_mut() {
                        let n = part.params.flat_sizes().len();
                        let grads: Vec<Vec<f32>> = rest.by_ref().take(n).collect();
                        part.adam.config.lr = part.base_lr * lr_factor;
                        let mut flat = part.params.take_flat();
                        part.adam.step(&mut flat, &grads);
                        part.params.put_flat(flat);
                    }
                }
                norm
            }
            (Trainee::Full { adam, base_lr }, Gradients::Device(mut grads)) => {
                for g in grads.values_mut() {
                    *g = g.scale(inv)?;
                }
                let norm = clip_device_grad_norm(&mut grads, max_norm)?;
                if norm.is_finite() {
                    adam.config.lr = *base_lr * lr_factor;
                    adam.step(&grads)?;
                }
                norm
            }
            _ => unreachable!("gradients come from the same trainee"),
        };
        if !norm.is_finite() {
            bail!("the gradients overflowed (norm {norm}): train in bf16 or f32, or lower --learning-rate");
        }
        Ok(norm)
    }

    /// Writes the result under `dir`: the LoRA file, or a diffusers pipeline folder whose `transformer/` holds the
    /// trained weights (f32) and whose other components link to `model_dir`'s. Returns the file or folder.
    pub fn save(&self, model_dir: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        match self {
            Trainee::Lora { parts } => {
                let path = dir.join(LORA_FILE);
                let params: Vec<&LoraParams> = parts.iter().map(|p| &p.params).collect();
                save_lora_file(&params, &path).with_context(|| format!("writing {}", path.display()))?;
                Ok(path)
            }
            Trainee::Full { adam, .. } => {
                save_transformer(adam, &model_dir.join("transformer"), &dir.join("transformer"))?;
                link_components(model_dir, dir)?;
                Ok(dir.to_path_buf())
            }
        }
    }
}

impl Gradients {
    /// `self + other`.
    pub fn add(self, other: Gradients) -> sd3_core::Result<Gradients> {
        Ok(match (self, other) {
            (Gradients::Host(mut a), Gradients::Host(b)) => {
                a.iter_mut().flatten().zip(b.iter().flatten()).for_each(|(x, y)| *x += y);
                Gradients::Host(a)
            }
            (Gradients::Device(mut a), Gradients::Device(b)) => {
                for (name, g) in b {
                    let sum = match a.remove(&name) {
                        Some(prev) => prev.add(&g)?,
                        None => g,
                    };
                    a.insert(name, sum);
                }
                Gradients::Device(a)
            }
            _ => unreachable!("gradients come from the same trainee"),
        })
    }
}

/// The trained transformer as diffusers stores one: `config.json` and every tensor of the original file (the
/// trained ones from the f32 masters, buffers such as `pos_embed.pos_embed` as they were), in f32.
fn save_transformer(adam: &DeviceAdamW, source: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    std::fs::copy(source.join("config.json"), dest.join("config.json"))
        .with_context(|| format!("copying {}", source.join("config.json").display()))?;
    let original = Weights::open(source)?;
    let trained: std::collections::BTreeMap<&str, &Tensor> = adam.masters().collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in original.names() {
        let shape = original.shape(name).expect("listed");
        let values = match trained.get(name) {
            Some(t) => t.to_f32_vec()?,
            None => original.host_f32(name)?,
        };
        tensors.push((name.to_string(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    if let Some(name) = trained.keys().find(|n| !original.contains(n)) {
        bail!("trained parameter {name} is not in {}", source.display());
    }
    let views = tensors
        .iter()
        .map(|(n, shape, data)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let path = dest.join("diffusion_pytorch_model.safetensors");
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The pipeline's other components (text encoders, tokenizers, VAE, scheduler, `model_index.json`) as symbolic
/// links to the base model's, so that the output folder is a whole pipeline without copying gigabytes.
fn link_components(model_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let model_dir = model_dir.canonicalize().with_context(|| format!("resolving {}", model_dir.display()))?;
    for entry in std::fs::read_dir(&model_dir).with_context(|| format!("listing {}", model_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let target = dir.join(&name);
        if name == "transformer" || target.exists() || name.to_string_lossy().starts_with("checkpoint-") {
            continue;
        }
        link(&entry.path(), &target)
            .with_context(|| format!("linking {} to {}", target.display(), entry.path().display()))?;
    }
    Ok(())
}

#[cfg(unix)]
fn link(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(src, dst)
}

#[cfg(not(unix))]
fn link(src: &Path, dst: &Path) -> std::io::Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            link(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(src, dst).map(|_| ())
    }
}

/// The file beside a checkpoint's result that lets a run resume exactly (`--resume-from-checkpoint`).
pub const STATE_FILE: &str = "training_state.safetensors";

/// Where a run stands after `step` optimizer steps: enough, with the optimizer's moments, to go on exactly as if
/// it had not stopped.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub step: usize,
    /// The method, `lora-<rank>` or `full` (a checkpoint resumes only the run that wrote it).
    pub method: String,
    /// The noise streams used so far and the data generator's state.
    pub draw_index: u64,
    pub draws: u64,
    /// What is left of each image set's shuffled pass.
    pub passes: Vec<Vec<usize>>,
}

impl Method {
    fn tag(self) -> String {
        match self {
            Method::Lora { rank } => format!("lora-{rank}"),
            Method::Full => "full".into(),
        }
    }
}

impl Trainee {
    /// The method this trainee trains, as [`RunState::method`] records it.
    pub fn method_tag(&self) -> String {
        match self {
            Trainee::Lora { parts } => {
                let tag = Method::Lora { rank: parts[0].params.rank }.tag();
                if parts.len() > 1 {
                    format!("{tag}+text-encoders")
                } else {
                    tag
                }
            }
            Trainee::Full { .. } => Method::Full.tag(),
        }
    }

    /// Writes the optimizer's state and `run` to `dir/`[`STATE_FILE`] (beside what [`Self::save`] wrote there).
    pub fn save_state(&self, dir: &Path, run: &RunState) -> anyhow::Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let adam_step = match self {
            Trainee::Lora { parts } => {
                for part in parts {
                    let (_, m, v) = part.adam.state();
                    let c = &part.params.component;
                    for (i, (m, v)) in m.iter().zip(v).enumerate() {
                        tensors.push((format!("m.{c}.{i}"), vec![m.len()], bytes(m)));
                        tensors.push((format!("v.{c}.{i}"), vec![v.len()], bytes(v)));
                    }
                }
                parts[0].adam.state().0
            }
            Trainee::Full { adam, .. } => {
                let (step, moments) = adam.state();
                for (name, m, v) in moments {
                    tensors.push((format!("m.{name}"), vec![m.elem_count()], bytes(&m.to_f32_vec()?)));
                    tensors.push((format!("v.{name}"), vec![v.elem_count()], bytes(&v.to_f32_vec()?)));
                }
                step
            }
        };
        let views = tensors
            .iter()
            .map(|(n, shape, data)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let metadata = std::collections::HashMap::from([
            ("run".to_string(), serde_json::to_string(run)?),
            ("adam_step".to_string(), adam_step.to_string()),
        ]);
        let path = dir.join(STATE_FILE);
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Restores a checkpoint written by [`Self::save`] and [`Self::save_state`]: the trained values, the
    /// optimizer's moments and step; returns where the run stood.
    pub fn restore(&mut self, dir: &Path) -> anyhow::Result<RunState> {
        let path = dir.join(STATE_FILE);
        let bytes =
            std::fs::read(&path).with_context(|| format!("--resume-from-checkpoint: reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let run: RunState = serde_json::from_str(meta.get("run").map(String::as_str).unwrap_or(""))
            .with_context(|| format!("{}: no run state in its metadata", path.display()))?;
        let adam_step: u32 = meta.get("adam_step").and_then(|s| s.parse().ok()).unwrap_or(0);
        if run.method != self.method_tag() {
            bail!("{}: a checkpoint of a {} run, this run is {}", dir.display(), run.method, self.method_tag());
        }
        let state = safetensors::SafeTensors::deserialize(&bytes)?;
        let f32s = |st: &safetensors::SafeTensors, name: &str| -> anyhow::Result<Vec<f32>> {
            let t = st.tensor(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        match self {
            Trainee::Lora { parts } => {
                let lora_path = dir.join(LORA_FILE);
                let lora_bytes =
                    std::fs::read(&lora_path).with_context(|| format!("reading {}", lora_path.display()))?;
                let lora = safetensors::SafeTensors::deserialize(&lora_bytes)?;
                for part in parts.iter_mut() {
                    let c = part.params.component.clone();
                    for (name, m) in part.params.modules.iter_mut() {
                        let a = f32s(&lora, &format!("{c}.{name}.lora_A.weight"))?;
                        let b = f32s(&lora, &format!("{c}.{name}.lora_B.weight"))?;
                        if (a.len(), b.len()) != (m.a.len(), m.b.len()) {
                            bail!("{}: the adapter of {c}.{name} has another shape", lora_path.display());
                        }
                        (m.a, m.b) = (a, b);
                    }
                    let n = part.params.flat_sizes().len();
                    let load = |kind: &str| {
                        (0..n).map(|i| f32s(&state, &format!("{kind}.{c}.{i}"))).collect::<anyhow::Result<Vec<_>>>()
                    };
                    part.adam.restore(adam_step, load("m")?, load("v")?)?;
                }
            }
            Trainee::Full { adam, .. } => {
                let weights = Weights::open(&dir.join("transformer"))?;
                adam.restore(adam_step, |name, kind| match kind {
                    "master" => Ok(weights.host_f32(name)?),
                    _ => f32s(&state, &format!("{kind}.{name}")),
                })?;
            }
        }
        Ok(run)
    }
}
