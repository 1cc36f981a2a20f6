//! The trained LoRA on the host: f32 `A [rank, in]` and `B [out, rank]` per target module, initialised as PEFT's
//! `init_lora_weights="gaussian"` (A ~ N(0, 1/rank²), B = 0), uploaded to the device each step, and saved in the
//! file layout diffusers' `save_lora_weights` writes (`transformer.<module>.lora_{A,B}.weight`, alpha in the
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

/// Every adapter of a transformer, by module name, with one rank and alpha.
pub struct LoraParams {
    pub rank: usize,
    pub alpha: f32,
    pub modules: BTreeMap<String, HostLora>,
}

impl LoraParams {
    /// Fresh adapters for `shapes` (module → (in, out)): A from `seed`'s standard normals scaled by 1/rank, B zero.
    pub fn gaussian(shapes: &BTreeMap<String, (usize, usize)>, rank: usize, alpha: f32, seed: u64) -> Self {
        let modules = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, &(inp, out)))| {
                let a = crate::noise::standard_normal(seed.wrapping_add(i as u64 * 0x9e37_79b9), rank * inp);
                let a = a.into_iter().map(|v| v / rank as f32).collect();
                (name.clone(), HostLora { in_features: inp, out_features: out, a, b: vec![0.0; out * rank] })
            })
            .collect();
        LoraParams { rank, alpha, modules }
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
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .modules
            .iter()
            .flat_map(|(name, m)| {
                [
                    (format!("transformer.{name}.lora_A.weight"), &m.a, vec![self.rank, m.in_features]),
                    (format!("transformer.{name}.lora_B.weight"), &m.b, vec![m.out_features, self.rank]),
                ]
            })
            .map(|(k, v, shape)| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect(), shape))
            .collect();
        let views = bytes
            .iter()
            .map(|(k, data, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (k.clone(), v)).map_err(std::io::Error::other)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let meta = serde_json::json!({
            "transformer.r": self.rank,
            "transformer.lora_alpha": self.alpha,
            "transformer.target_modules": crate::models::mmdit::train::LORA_TARGETS,
            "transformer.init_lora_weights": "gaussian",
        });
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("lora_adapter_metadata".to_string(), meta.to_string()),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), path).map_err(std::io::Error::other)
    }
}
