//! Saving what a run trained and where it stands: the trained transformer as a pipeline folder (full
//! fine-tuning), and beside every checkpoint the optimizer's state and the run's position, so that
//! `--resume-from-checkpoint` goes on exactly where the run stopped.

use super::optim::DeviceAdamW;
use super::trainee::{Method, Trainee, LORA_FILE};
use crate::weights::Weights;
use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, TensorView};
use sd3_core::Tensor;
use std::path::Path;

/// The trained transformer as diffusers stores one: `config.json` and every tensor of the original file (the
/// trained ones from the f32 masters, buffers such as `pos_embed.pos_embed` as they were), in f32.
pub(super) fn save_transformer(adam: &DeviceAdamW, source: &Path, dest: &Path) -> anyhow::Result<()> {
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
pub(super) fn link_components(model_dir: &Path, dir: &Path) -> anyhow::Result<()> {
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
