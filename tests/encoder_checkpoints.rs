//! The CLIP-L, CLIP-G, T5-XXL and VAE loaders against the published checkpoints' tensor names and shapes
//! (`stabilityai/stable-diffusion-3-medium-diffusers`; the SD3.5 repos ship the same encoders and VAE),
//! no data needed: each loader's `expected_tensors` (its loading code run without weights) must equal a table
//! written here independently from the transformers / diffusers module trees and the published configs
//! (reference §2.2, §2.4). The same comparison on the tiny fixtures checks that `expected_tensors` is exactly
//! what those files hold, so the table is the loader's real behaviour.

use sd3::models::clip::{ClipTextConfig, ClipTextModel};
use sd3::models::t5::{T5Config, T5EncoderModel};
use sd3::models::vae::{AutoencoderKL, VaeConfig};
use sd3::weights::Weights;
use std::collections::BTreeMap;
use std::path::Path;

type Table = BTreeMap<String, Vec<usize>>;

/// `text_encoder/config.json` (openai/clip-vit-large-patch14's text tower).
const CLIP_L: &str = r#"{"architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2,
  "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}"#;
/// `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14's text tower).
const CLIP_G: &str = r#"{"architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2,
  "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 20,
  "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280, "vocab_size": 49408}"#;
/// `text_encoder_3/config.json` (google/t5-v1_1-xxl's encoder).
const T5_XXL: &str = r#"{"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
  "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": true, "layer_norm_epsilon": 1e-06,
  "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
  "relative_attention_num_buckets": 32, "vocab_size": 32128}"#;
/// `vae/config.json`.
const VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null, "latents_std": null,
  "layers_per_block": 2, "mid_block_add_attention": true, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "use_post_quant_conv": false, "use_quant_conv": false}"#;

fn wb(t: &mut Table, module: &str, weight: &[usize]) {
    t.insert(format!("{module}.weight"), weight.to_vec());
    t.insert(format!("{module}.bias"), vec![weight[0]]);
}

/// transformers' `CLIPTextModelWithProjection` state dict.
fn clip_table(d: usize, layers: usize, mlp: usize, proj: usize) -> Table {
    let mut t = Table::new();
    t.insert("text_model.embeddings.token_embedding.weight".into(), vec![49408, d]);
    t.insert("text_model.embeddings.position_embedding.weight".into(), vec![77, d]);
    for i in 0..layers {
        let p = format!("text_model.encoder.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            wb(&mut t, &format!("{p}.self_attn.{m}"), &[d, d]);
        }
        wb(&mut t, &format!("{p}.layer_norm1"), &[d]);
        wb(&mut t, &format!("{p}.mlp.fc1"), &[mlp, d]);
        wb(&mut t, &format!("{p}.mlp.fc2"), &[d, mlp]);
        wb(&mut t, &format!("{p}.layer_norm2"), &[d]);
    }
    wb(&mut t, "text_model.final_layer_norm", &[d]);
    t.insert("text_projection.weight".into(), vec![proj, d]);
    t
}

/// transformers' `T5EncoderModel` state dict (gated feed-forward; `shared` holds the tied embedding).
fn t5_table(d: usize, ff: usize, heads: usize, d_kv: usize, layers: usize, vocab: usize, buckets: usize) -> Table {
    let mut t = Table::new();
    t.insert("shared.weight".into(), vec![vocab, d]);
    t.insert("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(), vec![buckets, heads]);
    for i in 0..layers {
        let p = format!("encoder.block.{i}.layer");
        for m in ["q", "k", "v"] {
            t.insert(format!("{p}.0.SelfAttention.{m}.weight"), vec![heads * d_kv, d]);
        }
        t.insert(format!("{p}.0.SelfAttention.o.weight"), vec![d, heads * d_kv]);
        t.insert(format!("{p}.0.layer_norm.weight"), vec![d]);
        t.insert(format!("{p}.1.DenseReluDense.wi_0.weight"), vec![ff, d]);
        t.insert(format!("{p}.1.DenseReluDense.wi_1.weight"), vec![ff, d]);
        t.insert(format!("{p}.1.DenseReluDense.wo.weight"), vec![d, ff]);
        t.insert(format!("{p}.1.layer_norm.weight"), vec![d]);
    }
    t.insert("encoder.final_layer_norm.weight".into(), vec![d]);
    t
}

fn resnet(t: &mut Table, p: &str, cin: usize, cout: usize) {
    wb(t, &format!("{p}.norm1"), &[cin]);
    wb(t, &format!("{p}.conv1"), &[cout, cin, 3, 3]);
    wb(t, &format!("{p}.norm2"), &[cout]);
    wb(t, &format!("{p}.conv2"), &[cout, cout, 3, 3]);
    if cin != cout {
        wb(t, &format!("{p}.conv_shortcut"), &[cout, cin, 1, 1]);
    }
}

/// diffusers' `AutoencoderKL` decoder state dict for the SD3 VAE, written out block by block.
fn sd3_vae_decoder_table() -> Table {
    let mut t = Table::new();
    wb(&mut t, "decoder.conv_in", &[512, 16, 3, 3]);
    resnet(&mut t, "decoder.mid_block.resnets.0", 512, 512);
    wb(&mut t, "decoder.mid_block.attentions.0.group_norm", &[512]);
    for m in ["to_q", "to_k", "to_v", "to_out.0"] {
        wb(&mut t, &format!("decoder.mid_block.attentions.0.{m}"), &[512, 512]);
    }
    resnet(&mut t, "decoder.mid_block.resnets.1", 512, 512);
    // up_blocks.0 and .1: 512 channels; .2: 512 → 256; .3: 256 → 128, no upsampler.
    for (b, cin, cout) in [(0, 512, 512), (1, 512, 512), (2, 512, 256), (3, 256, 128)] {
        resnet(&mut t, &format!("decoder.up_blocks.{b}.resnets.0"), cin, cout);
        resnet(&mut t, &format!("decoder.up_blocks.{b}.resnets.1"), cout, cout);
        resnet(&mut t, &format!("decoder.up_blocks.{b}.resnets.2"), cout, cout);
        if b < 3 {
            wb(&mut t, &format!("decoder.up_blocks.{b}.upsamplers.0.conv"), &[cout, cout, 3, 3]);
        }
    }
    wb(&mut t, "decoder.conv_norm_out", &[128]);
    wb(&mut t, "decoder.conv_out", &[3, 128, 3, 3]);
    t
}

/// The loader's table, checking it names no tensor twice.
fn as_table(list: Vec<(String, Vec<usize>)>) -> Table {
    let n = list.len();
    let t: Table = list.into_iter().collect();
    assert_eq!(t.len(), n, "the loader requests some tensor twice");
    t
}

fn params(t: &Table) -> usize {
    t.values().map(|s| s.iter().product::<usize>()).sum()
}

fn assert_same(what: &str, loader: &Table, published: &Table) {
    let missing: Vec<_> = published.keys().filter(|k| !loader.contains_key(*k)).collect();
    let extra: Vec<_> = loader.keys().filter(|k| !published.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{what}: not loaded {missing:?}; not published {extra:?}");
    for (k, s) in published {
        assert_eq!(&loader[k], s, "{what}: shape of {k}");
    }
}

#[test]
fn clip_l_names_and_shapes() {
    let config: ClipTextConfig = serde_json::from_str(CLIP_L).unwrap();
    let loader = as_table(ClipTextModel::expected_tensors(&config).unwrap());
    let published = clip_table(768, 12, 3072, 768);
    assert_same("CLIP-L", &loader, &published);
    // CLIPTextModelWithProjection for ViT-L/14: 123.65 M parameters.
    assert_eq!(params(&published), 123_650_304);
}

#[test]
fn clip_g_names_and_shapes() {
    let config: ClipTextConfig = serde_json::from_str(CLIP_G).unwrap();
    let loader = as_table(ClipTextModel::expected_tensors(&config).unwrap());
    let published = clip_table(1280, 32, 5120, 1280);
    assert_same("CLIP-G", &loader, &published);
    // OpenCLIP bigG text tower with projection: ≈ 695 M parameters.
    let n = params(&published);
    assert!((690_000_000..700_000_000).contains(&n), "{n}");
}

#[test]
fn t5_xxl_names_and_shapes() {
    let config: T5Config = serde_json::from_str(T5_XXL).unwrap();
    let loader = as_table(T5EncoderModel::expected_tensors(&config).unwrap());
    let published = t5_table(4096, 10240, 64, 64, 24, 32128, 32);
    assert_same("T5-XXL", &loader, &published);
    // The T5 v1.1 XXL encoder: ≈ 4.76 B parameters.
    let n = params(&published);
    assert!((4_700_000_000..4_800_000_000).contains(&n), "{n}");
}

#[test]
fn sd3_vae_decoder_names_and_shapes() {
    let config: VaeConfig = serde_json::from_str(VAE).unwrap();
    let loader = as_table(AutoencoderKL::expected_tensors(&config).unwrap());
    let published = sd3_vae_decoder_table();
    assert_same("VAE decoder", &loader, &published);
    let n = params(&published);
    assert!((49_000_000..50_000_000).contains(&n), "{n}");
}

/// On the tiny fixtures, `expected_tensors` is exactly the set of tensors the files hold (the VAE file also
/// holds the encoder half, which decoding does not use).
#[test]
fn expected_tensors_are_what_the_fixture_files_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd3-tiny");
    let stored = |component: &str, keep: &dyn Fn(&str) -> bool| -> Table {
        let w = Weights::open(&root.join(component)).unwrap();
        w.names().filter(|n| keep(n)).map(|n| (n.to_string(), w.shape(n).unwrap())).collect()
    };
    let config = |component: &str| std::fs::read_to_string(root.join(component).join("config.json")).unwrap();
    for component in ["text_encoder", "text_encoder_2"] {
        let c: ClipTextConfig = serde_json::from_str(&config(component)).unwrap();
        let loader = as_table(ClipTextModel::expected_tensors(&c).unwrap());
        assert_same(component, &loader, &stored(component, &|_| true));
    }
    let c: T5Config = serde_json::from_str(&config("text_encoder_3")).unwrap();
    let loader = as_table(T5EncoderModel::expected_tensors(&c).unwrap());
    assert_same("text_encoder_3", &loader, &stored("text_encoder_3", &|_| true));
    let c: VaeConfig = serde_json::from_str(&config("vae")).unwrap();
    let loader = as_table(AutoencoderKL::expected_tensors(&c).unwrap());
    assert_same("vae", &loader, &stored("vae", &|n| !n.starts_with("encoder.") && !n.starts_with("quant_conv")));
}
