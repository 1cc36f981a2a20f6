//! The MM-DiT loader against the published checkpoints' tensor names and shapes, derived independently here
//! from the published configs (reference §1.3) and the diffusers module tree (§1.8); no data is needed.
//! Also the loader's errors for missing, misnamed and mis-shaped tensors, and for sizes it cannot take.

mod common;
use common::*;
use sd3::models::mmdit::{MmditError, Sd3Transformer2DModel, Sd3TransformerConfig};
use sd3::weights::Weights;
use sd3_core::DType;
use std::collections::BTreeMap;
use std::path::PathBuf;

const SD3_MEDIUM: &str = r#"{"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
  "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
  "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128}"#;
const SD35_MEDIUM: &str = r#"{"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
  "dual_attention_layers": [0,1,2,3,4,5,6,7,8,9,10,11,12], "in_channels": 16, "joint_attention_dim": 4096,
  "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
  "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128}"#;
const SD35_LARGE: &str = r#"{"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
  "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
  "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
  "dual_attention_layers": []}"#;

/// The checkpoint's name → shape table, written from the reference's listing (§1.8), not from the loader.
fn published_table(layers: usize, d: usize, m: usize, qk: bool, dual: &[usize]) -> BTreeMap<String, Vec<usize>> {
    let mut t = BTreeMap::new();
    fn wb_in(t: &mut BTreeMap<String, Vec<usize>>, n: String, w: Vec<usize>) {
        t.insert(format!("{n}.bias"), vec![w[0]]);
        t.insert(format!("{n}.weight"), w);
    }
    macro_rules! wb {
        ($n:expr, $w:expr) => {
            wb_in(&mut t, $n, $w)
        };
    }
    wb!("pos_embed.proj".into(), vec![d, 16, 2, 2]);
    wb!("time_text_embed.timestep_embedder.linear_1".into(), vec![d, 256]);
    wb!("time_text_embed.timestep_embedder.linear_2".into(), vec![d, d]);
    wb!("time_text_embed.text_embedder.linear_1".into(), vec![d, 2048]);
    wb!("time_text_embed.text_embedder.linear_2".into(), vec![d, d]);
    wb!("context_embedder".into(), vec![d, 4096]);
    for i in 0..layers {
        let last = i == layers - 1;
        let is_dual = dual.contains(&i);
        let b = format!("transformer_blocks.{i}");
        wb!(format!("{b}.norm1.linear"), vec![if is_dual { 9 * d } else { 6 * d }, d]);
        wb!(format!("{b}.norm1_context.linear"), vec![if last { 2 * d } else { 6 * d }, d]);
        for p in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"] {
            wb!(format!("{b}.attn.{p}"), vec![d, d]);
        }
        if !last {
            wb!(format!("{b}.attn.to_add_out"), vec![d, d]);
            wb!(format!("{b}.ff_context.net.0.proj"), vec![4 * d, d]);
            wb!(format!("{b}.ff_context.net.2"), vec![d, 4 * d]);
        }
        wb!(format!("{b}.ff.net.0.proj"), vec![4 * d, d]);
        wb!(format!("{b}.ff.net.2"), vec![d, 4 * d]);
        if is_dual {
            for p in ["to_q", "to_k", "to_v", "to_out.0"] {
                wb!(format!("{b}.attn2.{p}"), vec![d, d]);
            }
        }
        if qk {
            for p in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                t.insert(format!("{b}.attn.{p}.weight"), vec![64]);
            }
            if is_dual {
                t.insert(format!("{b}.attn2.norm_q.weight"), vec![64]);
                t.insert(format!("{b}.attn2.norm_k.weight"), vec![64]);
            }
        }
    }
    wb!("norm_out.linear".into(), vec![2 * d, d]);
    wb!("proj_out".into(), vec![64, d]);
    t.insert("pos_embed.pos_embed".into(), vec![1, m * m, d]);
    t
}

fn loader_table(json: &str) -> (Sd3TransformerConfig, BTreeMap<String, Vec<usize>>) {
    let cfg: Sd3TransformerConfig = serde_json::from_str(json).unwrap();
    let table: BTreeMap<_, _> = cfg.expected_tensors().into_iter().collect();
    (cfg, table)
}

fn params(t: &BTreeMap<String, Vec<usize>>) -> usize {
    t.values().map(|s| s.iter().product::<usize>()).sum()
}

#[test]
fn sd3_medium_names_and_shapes() {
    let (cfg, loader) = loader_table(SD3_MEDIUM);
    assert_eq!(cfg, Sd3TransformerConfig::sd3_medium());
    let published = published_table(24, 1536, 192, false, &[]);
    assert_eq!(loader, published);
    // ≈2B parameters (incl. the 192² positional table).
    let n = params(&published);
    assert!((2_000_000_000..2_100_000_000).contains(&n), "{n}");
}

#[test]
fn sd35_medium_names_and_shapes() {
    let (cfg, loader) = loader_table(SD35_MEDIUM);
    assert_eq!(cfg, Sd3TransformerConfig::sd35_medium());
    assert_eq!(loader, published_table(24, 1536, 384, true, &(0..=12).collect::<Vec<_>>()));
}

#[test]
fn sd35_large_names_and_shapes() {
    let (cfg, loader) = loader_table(SD35_LARGE);
    assert_eq!(cfg, Sd3TransformerConfig::sd35_large());
    let published = published_table(38, 2432, 192, true, &[]);
    assert_eq!(loader, published);
    let n = params(&published);
    assert!((8_000_000_000..8_300_000_000).contains(&n), "{n}");
}

// ------------------------------------------------------------------------------------------ bad input

fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd3-tiny/transformer")
}

/// A copy of the tiny transformer with `edit` applied to its tensor list.
fn edited_copy(name: &str, edit: impl Fn(&mut Vec<T>)) -> PathBuf {
    let src = Weights::open(&tiny_dir()).unwrap();
    let mut tensors: Vec<T> =
        src.names().map(|n| t(n, src.dtype_of(n).unwrap(), &src.shape(n).unwrap(), src.host_f32(n).unwrap())).collect();
    edit(&mut tensors);
    let dir = scratch(name);
    std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json")).unwrap();
    write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, None);
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    match Sd3Transformer2DModel::load(dir, &cpu(), DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_folder() {
    let err = load_err(&scratch("mmdit-nofolder").join("transformer"));
    assert!(err.contains("transformer") && err.contains("does not exist"), "{err}");
}

#[test]
fn misnamed_tensor_is_named() {
    let dir = edited_copy("mmdit-misnamed", |ts| {
        let x = ts.iter_mut().find(|t| t.name == "transformer_blocks.1.attn.to_k.weight").unwrap();
        x.name = "transformer_blocks.1.attn.to_key.weight".into();
    });
    let err = load_err(&dir);
    assert!(err.contains("`transformer_blocks.1.attn.to_k.weight` not found"), "{err}");
    assert!(err.contains("transformer_blocks.1.attn.to_key.weight"), "suggestion expected: {err}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = edited_copy("mmdit-shape", |ts| {
        let x = ts.iter_mut().find(|t| t.name == "proj_out.bias").unwrap();
        x.shape = vec![32, 2];
    });
    let err = load_err(&dir);
    assert!(err.contains("`proj_out.bias`") && err.contains("expected shape [64], found [32, 2]"), "{err}");
}

#[test]
fn config_disagreeing_with_weights() {
    let dir = edited_copy("mmdit-qk", |ts| {
        ts.push(t("transformer_blocks.0.attn.norm_q.weight", DType::F16, &[16], vec![1.0; 16]))
    });
    let err = load_err(&dir);
    assert!(err.contains("qk_norm") && err.contains("norm_q"), "{err}");
}

#[test]
fn sizes_outside_the_positional_table_or_patch_grid() {
    let be = cpu();
    let m = Sd3Transformer2DModel::load(&tiny_dir(), &be, DType::F32).unwrap();
    // pos_embed_max_size 16, patch 2: latents up to 32×32 (256×256 pixels).
    assert!(m.check_latent_size(32, 32).is_ok());
    let e = m.check_latent_size(34, 32).unwrap_err();
    assert!(matches!(e, MmditError::Input(_)));
    assert!(e.to_string().contains("beyond the positional table of 16x16"), "{e}");
    let e = m.check_latent_size(9, 8).unwrap_err().to_string();
    assert!(e.contains("not a positive multiple of the patch size 2") && e.contains("multiples of 16"), "{e}");
    // And the forward reports it too.
    let x = be.zeros(&[1, 16, 34, 8], DType::F32).unwrap();
    let ctx = be.zeros(&[1, 5, 96], DType::F32).unwrap();
    let pooled = be.zeros(&[1, 80], DType::F32).unwrap();
    let e = m.forward(&x, &ctx, &pooled, &[1000.0], &[]).unwrap_err().to_string();
    assert!(e.contains("beyond the positional table"), "{e}");
}

#[test]
fn random_model_from_config_runs() {
    let be = cpu();
    let mut cfg = Sd3TransformerConfig::sd35_medium();
    cfg.num_layers = 2;
    cfg.num_attention_heads = 2;
    cfg.caption_projection_dim = 128;
    cfg.joint_attention_dim = 32;
    cfg.pooled_projection_dim = 16;
    cfg.pos_embed_max_size = 8;
    cfg.dual_attention_layers = vec![0];
    let m = Sd3Transformer2DModel::random(cfg, 7, &be, DType::F32).unwrap();
    let x = be.from_f32(&rand_values(16 * 64, 3, 1.0), &[1, 16, 8, 8], DType::F32).unwrap();
    let ctx = be.from_f32(&rand_values(3 * 32, 4, 1.0), &[1, 3, 32], DType::F32).unwrap();
    let pooled = be.from_f32(&rand_values(16, 5, 1.0), &[1, 16], DType::F32).unwrap();
    let y = m.forward(&x, &ctx, &pooled, &[500.0], &[]).unwrap();
    assert_eq!(y.shape(), [1, 16, 8, 8]);
    assert!(y.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}
