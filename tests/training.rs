//! LoRA fine-tuning against diffusers + PEFT (`fixtures/training/`, made by `scripts/make_training_golden.py`):
//! one step of `train_dreambooth_lora_sd3.py` with fixed inputs: the prediction, the loss, every adapter's
//! gradient, and the adapters after the clipped AdamW step; and the VAE encoder's latent distribution.

mod common;

use safetensors::SafeTensors;
use sd3::models::mmdit::train::{Adapters, LoraPair};
use sd3::models::mmdit::Sd3Transformer2DModel;
use sd3::models::vae_encoder::VaeEncoder;
use sd3::train::lora_params::{HostLora, LoraParams};
use sd3::train::objective::{noisy_latents, preconditioned_loss};
use sd3::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use sd3_core::{Backend, DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(name: &str) -> Golden {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/training").join(format!("{name}.safetensors"));
        Golden { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden tensor {name}"));
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (v, t.shape().to_vec())
    }
    fn tensor(&self, name: &str, backend: &Backend) -> Tensor {
        let (v, shape) = self.get(name);
        backend.from_f32(&v, &shape, DType::F32).unwrap()
    }
    /// Module names with a golden LoRA (`lora.<module>.lora_A.weight`).
    fn modules(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .st()
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix("lora.")?.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        names.sort();
        names
    }
}

/// `max |a - b| / max |b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The golden step on one tiny transformer: prediction, loss, gradients, AdamW step.
fn lora_step_matches_diffusers(model: &str) {
    let cpu = common::cpu();
    let g = Golden::open(model);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join("transformer");
    let transformer = Sd3Transformer2DModel::load(&dir, &cpu, DType::F32).unwrap();
    let modules = g.modules();
    assert_eq!(
        modules.iter().cloned().collect::<std::collections::BTreeSet<_>>(),
        transformer.adapter_shapes().keys().cloned().collect(),
        "the adapted modules are the script's defaults"
    );
    let adapters: Adapters = modules
        .iter()
        .map(|m| {
            let a = g.tensor(&format!("lora.{m}.lora_A.weight"), &cpu);
            let b = g.tensor(&format!("lora.{m}.lora_B.weight"), &cpu);
            (m.clone(), LoraPair { a, b, scale: 1.0 })
        })
        .collect();
    let (x0, shape) = g.get("input.x0");
    let (noise, _) = g.get("input.noise");
    let (sigmas, _) = g.get("input.sigmas");
    let noisy_host = noisy_latents(&x0, &noise, &sigmas);
    let noisy = cpu.from_f32(&noisy_host, &shape, DType::F32).unwrap();
    let timesteps: Vec<f32> = sigmas.iter().map(|s| s * 1000.0).collect();
    let (grads, (pred, loss)) = transformer
        .adapter_gradients(
            &noisy,
            &g.tensor("input.prompt_embeds", &cpu),
            &g.tensor("input.pooled", &cpu),
            &timesteps,
            &adapters,
            |pred| {
                let (loss, d) = preconditioned_loss(pred, &noisy_host, &x0, &sigmas)?;
                Ok((d, (pred.to_f32_vec()?, loss)))
            },
        )
        .unwrap();
    let (golden_pred, _) = g.get("pred");
    let err = rel_err(&pred, &golden_pred);
    assert!(err < 1e-5, "{model}: prediction off by {err} (relative to its largest value)");
    let golden_loss = g.get("loss").0[0];
    assert!((loss - golden_loss).abs() < 1e-5 * golden_loss, "{model}: loss {loss} against diffusers' {golden_loss}");
    let mut worst = 0f32;
    for m in &modules {
        let [da, db] = grads.get(m).unwrap_or_else(|| panic!("{model}: no gradient for {m}"));
        for (t, which) in [(da, "A"), (db, "B")] {
            let golden = g.get(&format!("grad.{m}.lora_{which}.weight")).0;
            let err = rel_err(&t.to_f32_vec().unwrap(), &golden);
            worst = worst.max(err);
            assert!(err < 5e-5, "{model}: d{which} of {m} off by {err} (relative to its largest value)");
        }
    }
    eprintln!(
        "{model}: prediction within {err:.1e}, loss {loss} (diffusers {golden_loss}), gradients within {worst:.1e}"
    );
    // The optimizer step from the golden gradients (so that it is judged alone): clip to norm 1, AdamW lr 1e-3.
    let mut params = LoraParams { rank: 4, alpha: 4.0, modules: BTreeMap::new() };
    for m in &modules {
        let (a, a_shape) = g.get(&format!("lora.{m}.lora_A.weight"));
        let (b, b_shape) = g.get(&format!("lora.{m}.lora_B.weight"));
        let lora = HostLora { in_features: a_shape[1], out_features: b_shape[0], a, b };
        params.modules.insert(m.clone(), lora);
    }
    let mut golden_grads: Vec<Vec<f32>> =
        modules.iter().flat_map(|m| ["A", "B"].map(|w| g.get(&format!("grad.{m}.lora_{w}.weight")).0)).collect();
    clip_grad_norm(&mut golden_grads, 1.0);
    let mut adam = AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }, &params.flat_sizes());
    let mut flat = params.take_flat();
    adam.step(&mut flat, &golden_grads);
    params.put_flat(flat);
    for (m, lora) in &params.modules {
        for (v, which) in [(&lora.a, "A"), (&lora.b, "B")] {
            let golden = g.get(&format!("step.{m}.lora_{which}.weight")).0;
            let err = v.iter().zip(&golden).fold(0f32, |e, (x, y)| e.max((x - y).abs()));
            assert!(err < 1e-6, "{model}: {which} of {m} after the AdamW step off by {err}");
        }
    }
}

#[test]
fn sd3_lora_step_matches_diffusers() {
    lora_step_matches_diffusers("sd3-tiny");
}

/// SD3.5: q/k RMS norms and a dual-attention block (whose `attn2` has no adapter but passes the gradient).
#[test]
fn sd35_lora_step_matches_diffusers() {
    lora_step_matches_diffusers("sd35-tiny");
}

#[test]
fn vae_encoder_matches_diffusers() {
    let cpu = common::cpu();
    let g = Golden::open("sd3-tiny");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd3-tiny/vae");
    let encoder = VaeEncoder::load(&dir, &cpu, DType::F32).unwrap();
    let dist = encoder.encode(&g.tensor("vae.image", &cpu)).unwrap();
    for (t, name) in [(&dist.mean, "vae.mean"), (&dist.logvar, "vae.logvar")] {
        let (golden, shape) = g.get(name);
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let err = rel_err(&t.to_f32_vec().unwrap(), &golden);
        assert!(err < 1e-4, "{name} off by {err} (relative to its largest value)");
    }
    let bad = cpu.zeros(&[1, 3, 60, 48], DType::F32).unwrap();
    let msg = encoder.encode(&bad).err().expect("60 rows is no multiple of 8").to_string();
    assert!(msg.contains("[1, 3, 60, 48]") && msg.contains("multiples of 8"), "{msg}");
}
