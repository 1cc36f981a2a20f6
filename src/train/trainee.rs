//! What a DreamBooth run trains: a LoRA (adapters and AdamW on the host, `train_dreambooth_lora_sd3.py`) or every
//! parameter of the transformer (f32 masters and AdamW on the device, `train_dreambooth_sd3.py`), behind one
//! interface the training loop drives: gradients of a micro-batch, their sum, clipping, the update, saving.

use super::lora_params::LoraParams;
use super::optim::{clip_device_grad_norm, clip_grad_norm, AdamW, AdamWConfig, DeviceAdamW};
use crate::models::mmdit::train::{Adapters, ParamGrads, TrainingBatch};
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
    Lora { params: LoraParams, adam: AdamW, adapters: Adapters },
    Full { adam: DeviceAdamW },
}

/// A micro-batch's gradients (or their running sum).
pub(super) enum Gradients {
    Host(Vec<Vec<f32>>),
    Device(ParamGrads),
}

impl Trainee {
    pub fn new(
        method: Method,
        config: AdamWConfig,
        seed: u64,
        transformer: &Sd3Transformer2DModel,
    ) -> anyhow::Result<Self> {
        Ok(match method {
            Method::Lora { rank } => {
                let params = LoraParams::gaussian(&transformer.adapter_shapes(), rank, rank as f32, seed);
                let adam = AdamW::new(config, &params.flat_sizes());
                Trainee::Lora { params, adam, adapters: Adapters::new() }
            }
            Method::Full => Trainee::Full { adam: DeviceAdamW::new(config, transformer.named_parameters()?)? },
        })
    }

    /// `(tensors, values)` trained.
    pub fn size(&self) -> (usize, usize) {
        match self {
            Trainee::Lora { params, .. } => (params.modules.len(), params.flat_sizes().iter().sum()),
            Trainee::Full { adam } => (adam.masters().count(), adam.masters().map(|(_, t)| t.elem_count()).sum()),
        }
    }

    /// Before a step's micro-batches: the adapters' current values on the device.
    pub fn begin_step(&mut self, backend: &Backend, dtype: DType) -> sd3_core::Result<()> {
        if let Trainee::Lora { params, adapters, .. } = self {
            *adapters = params.upload(backend, dtype)?;
        }
        Ok(())
    }

    /// One micro-batch's forward and backward: its gradients and the loss `loss_grad` reports.
    pub fn gradients(
        &self,
        transformer: &Sd3Transformer2DModel,
        batch: &TrainingBatch,
        checkpointing: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, f32)>,
    ) -> anyhow::Result<(Gradients, f32)> {
        Ok(match self {
            Trainee::Lora { params, adapters, .. } => {
                let (grads, loss) = transformer.adapter_gradients(batch, adapters, checkpointing, loss_grad)?;
                (Gradients::Host(params.flat_grads(&grads)?), loss)
            }
            Trainee::Full { .. } => {
                let (grads, loss) = transformer.parameter_gradients(batch, checkpointing, loss_grad)?;
                (Gradients::Device(grads), loss)
            }
        })
    }

    /// The update from the micro-batches' summed gradients: their mean, clipped to `max_norm`, through AdamW at
    /// learning rate `lr`. Returns the norm before clipping; a non-finite one stops the run.
    pub fn update(&mut self, sum: Gradients, micro_batches: usize, max_norm: f32, lr: f32) -> anyhow::Result<f32> {
        let inv = 1.0 / micro_batches as f32;
        let norm = match (self, sum) {
            (Trainee::Lora { params, adam, .. }, Gradients::Host(mut grads)) => {
                grads.iter_mut().flatten().for_each(|g| *g *= inv);
                let norm = clip_grad_norm(&mut grads, max_norm);
                if norm.is_finite() {
                    adam.config.lr = lr;
                    let mut flat = params.take_flat();
                    adam.step(&mut flat, &grads);
                    params.put_flat(flat);
                }
                norm
            }
            (Trainee::Full { adam }, Gradients::Device(mut grads)) => {
                for g in grads.values_mut() {
                    *g = g.scale(inv)?;
                }
                let norm = clip_device_grad_norm(&mut grads, max_norm)?;
                if norm.is_finite() {
                    adam.config.lr = lr;
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
            Trainee::Lora { params, .. } => {
                let path = dir.join(LORA_FILE);
                params.save(&path).with_context(|| format!("writing {}", path.display()))?;
                Ok(path)
            }
            Trainee::Full { adam } => {
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
