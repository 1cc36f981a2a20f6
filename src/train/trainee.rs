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
    /// `adapters`: the current values on each device of a data-parallel run.
    Lora {
        params: LoraParams,
        adam: AdamW,
        adapters: Vec<Adapters>,
    },
    Full {
        adam: DeviceAdamW,
    },
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
                Trainee::Lora { params, adam, adapters: Vec::new() }
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

    /// Before a step's micro-batches: the adapters' current values on each device.
    pub fn begin_step(&mut self, backends: &[Backend], dtype: DType) -> sd3_core::Result<()> {
        if let Trainee::Lora { params, adapters, .. } = self {
            *adapters = backends.iter().map(|b| params.upload(b, dtype)).collect::<sd3_core::Result<_>>()?;
        }
        Ok(())
    }

    /// One micro-batch's forward and backward on device `device` of the run (its `transformer`): its gradients
    /// and the loss `loss_grad` reports.
    pub fn gradients(
        &self,
        device: usize,
        transformer: &Sd3Transformer2DModel,
        batch: &TrainingBatch,
        checkpointing: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, f32)>,
    ) -> anyhow::Result<(Gradients, f32)> {
        Ok(match self {
            Trainee::Lora { params, adapters, .. } => {
                let adapters = &adapters[device];
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
            Trainee::Lora { params, .. } => Method::Lora { rank: params.rank }.tag(),
            Trainee::Full { .. } => Method::Full.tag(),
        }
    }

    /// Writes the optimizer's state and `run` to `dir/`[`STATE_FILE`] (beside what [`Self::save`] wrote there).
    pub fn save_state(&self, dir: &Path, run: &RunState) -> anyhow::Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let adam_step = match self {
            Trainee::Lora { adam, .. } => {
                let (step, m, v) = adam.state();
                for (i, (m, v)) in m.iter().zip(v).enumerate() {
                    tensors.push((format!("m.{i}"), vec![m.len()], bytes(m)));
                    tensors.push((format!("v.{i}"), vec![v.len()], bytes(v)));
                }
                step
            }
            Trainee::Full { adam } => {
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
            Trainee::Lora { params, adam, .. } => {
                let lora_path = dir.join(LORA_FILE);
                let lora_bytes =
                    std::fs::read(&lora_path).with_context(|| format!("reading {}", lora_path.display()))?;
                let lora = safetensors::SafeTensors::deserialize(&lora_bytes)?;
                for (name, m) in params.modules.iter_mut() {
                    let a = f32s(&lora, &format!("transformer.{name}.lora_A.weight"))?;
                    let b = f32s(&lora, &format!("transformer.{name}.lora_B.weight"))?;
                    if (a.len(), b.len()) != (m.a.len(), m.b.len()) {
                        bail!("{}: the adapter of {name} has another shape", lora_path.display());
                    }
                    (m.a, m.b) = (a, b);
                }
                let n = params.flat_sizes().len();
                let m = (0..n).map(|i| f32s(&state, &format!("m.{i}"))).collect::<anyhow::Result<Vec<_>>>()?;
                let v = (0..n).map(|i| f32s(&state, &format!("v.{i}"))).collect::<anyhow::Result<Vec<_>>>()?;
                adam.restore(adam_step, m, v)?;
            }
            Trainee::Full { adam } => {
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
