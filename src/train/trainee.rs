//! What a DreamBooth run trains: a LoRA (adapters and AdamW on the host, `train_dreambooth_lora_sd3.py`) or every
//! parameter of the transformer (f32 masters and AdamW on the device, `train_dreambooth_sd3.py`), behind one
//! interface the training loop drives: gradients of a micro-batch, their sum, clipping, the update, saving.

use super::checkpoint::{link_components, save_transformer};
use super::lora_params::{save_lora_file, LoraParams};
use super::optim::{clip_device_grad_norm, clip_grad_norm, AdamW, AdamWConfig, DeviceAdamW};
use super::text_encoders::{sum_rows, Encoded, TextEncoders, COMPONENTS};
use crate::models::mmdit::train::{AdapterGrads, Adapters, GradientRequest, ParamGrads, TrainingBatch};
use crate::models::mmdit::Sd3Transformer2DModel;
use anyhow::{bail, Context};
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
    pub(super) params: LoraParams,
    pub(super) adam: AdamW,
    /// The rate the schedule scales.
    pub(super) base_lr: f32,
    pub(super) adapters: Vec<Adapters>,
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
