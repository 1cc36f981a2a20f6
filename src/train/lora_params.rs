//! The trained LoRA on the host: f32 `A [rank, in]` and `B [out, rank]` per target module, initialised as PEFT's
//! `init_lora_weights="gaussian"` (A ~ N(0, 1/rank²), B = 0), uploaded to the device each step, and saved in the
//! file layout diffusers' `save_lora_weights` writes (`<component>.<module>.lora_{A,B}.weight`, alpha in the
//! `lora_adapter_metadata`), which `sd3 --lora` and diffusers' `load_lora_weights` read.

use crate::models::mmdit::train::{AdapterGrads, Adapters, LoraPair};
use safetensors::tensor::{Dtype, TensorView};
use sd3_core::{Backend, DType};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One module's adapter on the host.
pub struct HostLora {
    pub in_features: usize,
    pub out_features: usize,
    /// `[rank, in]` row-major.
    pub a: Vec<f32>,
    /// `[out, rank]` row-major.
    pub b: Vec<f32>,
}

/// Every adapter of one component (`transformer`, `text_encoder`, `text_encoder_2`), by module name, with one rank
/// and alpha.
pub struct LoraParams {
    /// The component, the file's key prefix.
    pub component: String,
    /// The module-name suffixes adapted (the LoRA config's `target_modules`, for the file's metadata).
    pub targets: Vec<&'static str>,
    pub rank: usize,
    pub alpha: f32,
    pub modules: BTreeMap<String, HostLora>,
}

impl LoraParams {
    /// Fresh adapters of the transformer for `shapes` (module → (in, out)): A from `seed`'s standard normals scaled
    /// by 1/rank, B zero.
    pub fn gaussian(shapes: &BTreeMap<String, (usize, usize)>, rank: usize, alpha: f32, seed: u64) -> Self {
        let targets = crate::models::mmdit::train::LORA_TARGETS.to_vec();
        Self::gaussian_for("transformer", targets, shapes, rank, alpha, seed)
    }

    /// [`Self::gaussian`] for any component.
    pub fn gaussian_for(
        component: &str,
        targets: Vec<&'static str>,
        shapes: &BTreeMap<String, (usize, usize)>,
        rank: usize,
        alpha: f32,
        seed: u64,
    ) -> Self {
        let modules = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, &(inp, out)))| {
                let a = crate::noise::standard_normal(seed.wrapping_add(i as u64 * 0x9e37_79b9), rank * inp);
                let a = a.into_iter().map(|v| v / rank as f32).collect();
                (name.clone(), HostLora { in_features: inp, out_features: out, a, b: vec![0.0; out * rank] })
            })
            .collect();
        LoraParams { component: component.to_string(), targets, rank, alpha, modules }
    }

    /// The adapters on `backend` in `dtype`, with scale alpha/rank.
    pub fn upload(&self, backend: &Backend, dtype: DType) -> sd3_core::Result<Adapters> {
        let scale = self.alpha / self.rank as f32;
        self.modules
            .iter()
            .map(|(name, m)| {
                let a = backend.from_f32(&m.a, &[self.rank, m.in_features], dtype)?;
                let b = backend.from_f32(&m.b, &[m.out_features, self.rank], dtype)?;
                Ok((name.clone(), LoraPair { a, b, scale }))
            })
            .collect()
    }

    /// The parameters as flat vectors in a fixed order (A then B of each module, by name), for the optimizer.
    pub fn flat_sizes(&self) -> Vec<usize> {
        self.modules.values().flat_map(|m| [m.a.len(), m.b.len()]).collect()
    }

    pub fn take_flat(&mut self) -> Vec<Vec<f32>> {
        self.modules.values_mut().flat_map(|m| [std::mem::take(&mut m.a), std::mem::take(&mut m.b)]).collect()
    }

    pub fn put_flat(&mut self, flat: Vec<Vec<f32>>) {
        let mut it = flat.into_iter();
        for m in self.modules.values_mut() {
            m.a = it.next().expect("one vector per parameter");
            m.b = it.next().expect("one vector per parameter");
        }
    }

    /// The device gradients in [`Self::take_flat`]'s order (zeros for a module that got none).
    pub fn flat_grads(&self, grads: &AdapterGrads) -> sd3_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(2 * self.modules.len());
        for (name, m) in &self.modules {
            match grads.get(name) {
                Some([da, db]) => {
                    out.push(da.to_f32_vec()?);
                    out.push(db.to_f32_vec()?);
                }
                None => {
                    out.push(vec![0.0; m.a.len()]);
                    out.push(vec![0.0; m.b.len()]);
                }
            }
        }
        Ok(out)
    }

    /// Writes the adapters as diffusers does (f32).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        save_lora_file(&[self], path)
    }
}

/// Writes the adapters of several components (the transformer, and with `--train-text-encoder` both CLIPs) into
/// one file as diffusers' `save_lora_weights` does: `<component>.<module>.lora_{A,B}.weight` in f32, each
/// component's rank and alpha in the `lora_adapter_metadata`.
pub fn save_lora_file(parts: &[&LoraParams], path: &Path) -> std::io::Result<()> {
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut meta = serde_json::Map::new();
    for p in parts {
        let c = &p.component;
        for (name, m) in &p.modules {
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            bytes.push((format!("{c}.{name}.lora_A.weight"), le(&m.a), vec![p.rank, m.in_features]));
            bytes.push((format!("{c}.{name}.lora_B.weight"), le(&m.b), vec![m.out_features, p.rank]));
        }
        meta.insert(format!("{c}.r"), p.rank.into());
        meta.insert(format!("{c}.lora_alpha"), p.alpha.into());
        meta.insert(format!("{c}.target_modules"), p.targets.iter().map(|t| serde_json::Value::from(*t)).collect());
        meta.insert(format!("{c}.init_lora_weights"), "gaussian".into());
    }
    let views = bytes
        .iter()
        .map(|(k, data, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (k.clone(), v)).map_err(std::io::Error::other)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), serde_json::Value::Object(meta).to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(std::io::Error::other)
}
