//! LoRA inference (diffusers' `SD3LoraLoaderMixin.load_lora_weights` + `fuse_lora`): `--lora FILE` (repeatable)
//! with `--lora-scale`, merged into the weights at load time: `W += scale · alpha/r · B·A`, computed on the host in
//! f32 and stored in the weight dtype (see [`Weights::add_delta`]).
//!
//! Keys are diffusers/PEFT names with a component prefix: `transformer.`, `text_encoder.` (CLIP-L) or
//! `text_encoder_2.` (CLIP-G), e.g. `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` `[r, in]` and
//! `….lora_B.weight` `[out, r]`. Older diffusers names are converted as `convert_unet_state_dict_to_peft` does:
//! `.lora.down/.lora.up`, `.lora_linear_layer.down/.up`, `X_lora.down/.up` (→ module `X`). Every key must contain
//! `lora` (diffusers' own rule); `dora_scale` keys (DoRA) are refused.
//!
//! Alpha: from the safetensors metadata `lora_adapter_metadata` (JSON, `"<component>.lora_alpha"`,
//! `"<component>.alpha_pattern"`, `"<component>.use_rslora"`), otherwise alpha = rank (scale alpha/r = 1).

// Errors carry the file and the key; they are built once per failure, so their size does not matter.
#![allow(clippy::result_large_err)]

use crate::weights::{WeightDelta, Weights, WeightsError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The components a LoRA may adapt, as named by the key prefixes.
pub const COMPONENTS: [&str; 3] = ["transformer", "text_encoder", "text_encoder_2"];

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("--lora {path}: {source}")]
    Read { path: PathBuf, source: WeightsError },
    #[error("--lora {path}: key `{key}` {reason}")]
    Key { path: PathBuf, key: String, reason: String },
    #[error("--lora {path}: metadata lora_adapter_metadata: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error("--lora {path}: key `{key}` does not fit the model: {reason}")]
    Mismatch { path: PathBuf, key: String, reason: String },
}

/// One adapted module (`A`, `B` pair) of one LoRA file.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The `lora_A` key as written in the file (for error messages).
    pub key: String,
    /// `[rank, in]` and `[out, rank]`.
    pub a_shape: [usize; 2],
    pub b_shape: [usize; 2],
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// `user scale · alpha / rank` (or `/ √rank` with rslora).
    pub scale: f32,
}

/// LoRA files loaded, grouped by component, then by module path (`transformer_blocks.0.attn.to_q`).
/// component → module path → module.
type Modules = BTreeMap<String, BTreeMap<String, LoraModule>>;

#[derive(Debug, Default)]
pub struct LoraSet {
    files: Vec<(PathBuf, Modules)>,
}

impl LoraSet {
    /// Read each `(file, scale)`.
    pub fn load(files: &[(PathBuf, f32)]) -> Result<LoraSet, LoraError> {
        let mut set = LoraSet::default();
        for (path, scale) in files {
            set.files.push((path.clone(), read_file(path, *scale)?));
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Number of adapted modules of `component` over all files.
    pub fn module_count(&self, component: &str) -> usize {
        self.files.iter().map(|(_, c)| c.get(component).map_or(0, |m| m.len())).sum()
    }

    /// Register every module of `component` as a delta of `weights`, checking that each adapted weight exists
    /// and has shape `[out, in]` matching `B·A`.
    pub fn apply(&self, component: &str, weights: &mut Weights) -> Result<(), LoraError> {
        for (path, components) in &self.files {
            let Some(modules) = components.get(component) else { continue };
            for (module, m) in modules {
                let name = format!("{module}.weight");
                let mismatch = |reason: String| LoraError::Mismatch { path: path.clone(), key: m.key.clone(), reason };
                let Some(shape) = weights.shape(&name) else {
                    let near = weights.near_names(&name);
                    let hint = if near.is_empty() { String::new() } else { format!(" (nearest: {})", near.join(", ")) };
                    return Err(mismatch(format!(
                        "{component} has no weight `{name}` in {}{hint}",
                        weights.dir().display()
                    )));
                };
                let want = [m.b_shape[0], m.a_shape[1]];
                if shape != want {
                    return Err(mismatch(format!(
                        "B·A is {want:?} but `{name}` in {} is {shape:?}",
                        weights.dir().display()
                    )));
                }
                let delta = WeightDelta { a: m.a.clone(), b: m.b.clone(), rank: m.a_shape[0], scale: m.scale };
                weights.add_delta(&name, delta).map_err(|e| mismatch(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// Split a LoRA key into (component, module path, A or B). `None` for the part when the key is not a LoRA factor.
fn parse_key(key: &str) -> Result<(String, String, char), String> {
    if !key.contains("lora") {
        return Err("is not a LoRA key (every key of a diffusers LoRA contains `lora`)".into());
    }
    if key.contains("dora_scale") {
        return Err("is a DoRA magnitude (dora_scale); DoRA is not supported".into());
    }
    let (component, rest) = COMPONENTS
        .iter()
        .filter_map(|c| key.strip_prefix(&format!("{c}.")).map(|r| (c.to_string(), r)))
        .max_by_key(|(c, _)| c.len())
        .ok_or_else(|| {
            format!("has no component prefix (expected one of {})", COMPONENTS.map(|c| format!("`{c}.`")).join(", "))
        })?;
    let forms: [(&str, char); 8] = [
        (".lora_A.weight", 'A'),
        (".lora_B.weight", 'B'),
        (".lora.down.weight", 'A'),
        (".lora.up.weight", 'B'),
        (".lora_linear_layer.down.weight", 'A'),
        (".lora_linear_layer.up.weight", 'B'),
        ("_lora.down.weight", 'A'),
        ("_lora.up.weight", 'B'),
    ];
    for (suffix, part) in forms {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((component, module.to_string(), part));
        }
    }
    Err("is not a lora_A/lora_B (or lora.down/lora.up) weight; biases and other LoRA tensors are not supported".into())
}

/// `lora_adapter_metadata` of one component: (lora_alpha, alpha_pattern, use_rslora).
struct AlphaConfig {
    alpha: Option<f64>,
    pattern: BTreeMap<String, f64>,
    rslora: bool,
}

fn alpha_config(meta: Option<&serde_json::Value>, component: &str) -> Result<AlphaConfig, String> {
    let mut cfg = AlphaConfig { alpha: None, pattern: BTreeMap::new(), rslora: false };
    let Some(obj) = meta.and_then(|m| m.as_object()) else { return Ok(cfg) };
    let get = |k: &str| obj.get(&format!("{component}.{k}"));
    if let Some(a) = get("lora_alpha") {
        cfg.alpha = Some(a.as_f64().ok_or(format!("{component}.lora_alpha is not a number"))?);
    }
    if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
        for (k, v) in p {
            cfg.pattern.insert(k.clone(), v.as_f64().ok_or(format!("{component}.alpha_pattern[{k}] is not a number"))?);
        }
    }
    cfg.rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok(cfg)
}

/// PEFT's pattern match: the module name equals the pattern or ends with `.pattern`.
fn pattern_matches(module: &str, pattern: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

fn read_file(path: &Path, user_scale: f32) -> Result<Modules, LoraError> {
    let w = Weights::open_file(path).map_err(|source| LoraError::Read { path: path.into(), source })?;
    let key_err = |key: &str, reason: String| LoraError::Key { path: path.into(), key: key.into(), reason };
    let meta: Option<serde_json::Value> = match w.metadata("lora_adapter_metadata") {
        Some(text) => Some(
            serde_json::from_str(text).map_err(|e| LoraError::Metadata { path: path.into(), reason: e.to_string() })?,
        ),
        None => None,
    };
    // (component, module) → (A key, B key)
    let mut pairs: BTreeMap<(String, String), (Option<String>, Option<String>)> = BTreeMap::new();
    for key in w.names() {
        let (component, module, part) = parse_key(key).map_err(|r| key_err(key, r))?;
        let slot = pairs.entry((component, module)).or_default();
        let target = if part == 'A' { &mut slot.0 } else { &mut slot.1 };
        if let Some(prev) = target.replace(key.to_string()) {
            return Err(key_err(key, format!("adapts the same module as `{prev}`")));
        }
    }
    if pairs.is_empty() {
        return Err(LoraError::Key {
            path: path.into(),
            key: String::new(),
            reason: "the file holds no tensors".into(),
        });
    }
    let mut out = Modules::new();
    for ((component, module), (a_key, b_key)) in pairs {
        let (a_key, b_key) = match (a_key, b_key) {
            (Some(a), Some(b)) => (a, b),
            (Some(k), None) | (None, Some(k)) => return Err(key_err(&k, "has no matching A/B partner".into())),
            (None, None) => unreachable!(),
        };
        let a_shape = w.shape(&a_key).unwrap_or_default();
        let b_shape = w.shape(&b_key).unwrap_or_default();
        if a_shape.len() != 2 || b_shape.len() != 2 || a_shape[0] != b_shape[1] || a_shape[0] == 0 {
            return Err(key_err(
                &a_key,
                format!("shapes A {a_shape:?} and B {b_shape:?} are not [r, in] and [out, r]"),
            ));
        }
        let rank = a_shape[0];
        let cfg = alpha_config(meta.as_ref(), &component)
            .map_err(|reason| LoraError::Metadata { path: path.into(), reason })?;
        let alpha = cfg
            .pattern
            .iter()
            .find(|(p, _)| pattern_matches(&module, p))
            .map(|(_, a)| *a)
            .or(cfg.alpha)
            .unwrap_or(rank as f64);
        let denom = if cfg.rslora { (rank as f64).sqrt() } else { rank as f64 };
        let read = |k: &str| w.host_f32(k).map_err(|source| LoraError::Read { path: path.into(), source });
        let m = LoraModule {
            a: read(&a_key)?,
            b: read(&b_key)?,
            key: a_key,
            a_shape: [a_shape[0], a_shape[1]],
            b_shape: [b_shape[0], b_shape[1]],
            scale: (user_scale as f64 * alpha / denom) as f32,
        };
        out.entry(component).or_default().insert(module, m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        let p = |k: &str| parse_key(k).unwrap();
        assert_eq!(
            p("transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
            ("transformer".into(), "transformer_blocks.0.attn.to_q".into(), 'A')
        );
        assert_eq!(p("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight").0, "text_encoder_2");
        assert_eq!(p("text_encoder.text_model.x.lora.up.weight"), ("text_encoder".into(), "text_model.x".into(), 'B'));
        assert_eq!(p("transformer.a.attn.to_q_lora.down.weight"), ("transformer".into(), "a.attn.to_q".into(), 'A'));
        assert!(parse_key("transformer.a.weight").unwrap_err().contains("not a LoRA key"));
        assert!(parse_key("unet.a.lora_A.weight").unwrap_err().contains("component prefix"));
        assert!(parse_key("transformer.a.lora_B.bias").is_err());
        assert!(pattern_matches("transformer_blocks.0.attn.to_q", "attn.to_q"));
        assert!(!pattern_matches("transformer_blocks.0.attn2.to_q", "attn.to_q"));
    }
}
