//! LoRA merging on the tiny pipeline's weights: the merged weight equals `W + scale·alpha/r·B·A` for each key
//! form, alpha from `lora_adapter_metadata`, and every kind of misfit is an error naming the key.

mod common;
use common::*;
use sd3::lora::LoraSet;
use sd3::weights::Weights;
use sd3_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MODULE: &str = "transformer_blocks.0.attn.to_q";

fn tiny_transformer() -> Weights {
    Weights::open(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd3-tiny/transformer")).unwrap()
}

/// A rank-2 LoRA on `MODULE` (64×64) with the given key suffixes for A and B.
fn write_lora(name: &str, a_suffix: &str, b_suffix: &str, metadata: Option<&str>) -> (PathBuf, Vec<f32>, Vec<f32>) {
    let path = scratch(name).join("lora.safetensors");
    let (a, b) = (rand_values(2 * 64, 1, 0.5), rand_values(64 * 2, 2, 0.5));
    let meta = metadata.map(|m| HashMap::from([("lora_adapter_metadata".to_string(), m.to_string())]));
    write_safetensors(
        &path,
        &[
            t(&format!("transformer.{MODULE}{a_suffix}"), DType::F32, &[2, 64], a.clone()),
            t(&format!("transformer.{MODULE}{b_suffix}"), DType::F32, &[64, 2], b.clone()),
        ],
        meta,
    );
    (path, a, b)
}

/// max |merged − (W + s·B·A)|.
fn merged_error(path: &Path, user_scale: f32, expected_scale: f32, a: &[f32], b: &[f32]) -> f32 {
    let set = LoraSet::load(&[(path.to_path_buf(), user_scale)]).unwrap();
    assert_eq!(set.module_count("transformer"), 1);
    let mut w = tiny_transformer();
    let base = w.host_f32(&format!("{MODULE}.weight")).unwrap();
    set.apply("transformer", &mut w).unwrap();
    let merged = w.tensor(&format!("{MODULE}.weight"), &cpu(), DType::F32).unwrap().to_f32_vec().unwrap();
    let mut want = base.clone();
    for o in 0..64 {
        for i in 0..64 {
            let ba: f32 = (0..2).map(|r| b[o * 2 + r] * a[r * 64 + i]).sum();
            want[o * 64 + i] += expected_scale * ba;
        }
    }
    max_abs_diff(&merged, &want)
}

#[test]
fn peft_names_alpha_equals_rank() {
    let (p, a, b) = write_lora("lora-peft", ".lora_A.weight", ".lora_B.weight", None);
    assert!(merged_error(&p, 0.8, 0.8, &a, &b) < 1e-6);
}

#[test]
fn old_diffusers_names() {
    let (p, a, b) = write_lora("lora-old", ".lora.down.weight", ".lora.up.weight", None);
    assert!(merged_error(&p, 1.0, 1.0, &a, &b) < 1e-6);
}

#[test]
fn alpha_from_metadata_and_alpha_pattern() {
    let (p, a, b) = write_lora(
        "lora-alpha",
        ".lora_A.weight",
        ".lora_B.weight",
        Some(r#"{"transformer.r": 2, "transformer.lora_alpha": 8}"#),
    );
    assert!(merged_error(&p, 0.5, 0.5 * 8.0 / 2.0, &a, &b) < 1e-5);
    let meta = r#"{"transformer.r": 2, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"attn.to_q": 1}}"#;
    let (p, a, b) = write_lora("lora-pattern", ".lora_A.weight", ".lora_B.weight", Some(meta));
    assert!(merged_error(&p, 1.0, 0.5, &a, &b) < 1e-6);
    let (p, a, b) = write_lora(
        "lora-rs",
        ".lora_A.weight",
        ".lora_B.weight",
        Some(r#"{"transformer.lora_alpha": 4, "transformer.use_rslora": true}"#),
    );
    assert!(merged_error(&p, 1.0, 4.0 / 2f32.sqrt(), &a, &b) < 1e-5);
}

#[test]
fn misfits_are_errors_naming_the_key() {
    let dir = scratch("lora-bad");
    let only_a = dir.join("only_a.safetensors");
    write_safetensors(
        &only_a,
        &[t(&format!("transformer.{MODULE}.lora_A.weight"), DType::F32, &[2, 64], vec![0.0; 128])],
        None,
    );
    let e = LoraSet::load(&[(only_a, 1.0)]).unwrap_err().to_string();
    assert!(e.contains("lora_A.weight") && e.contains("no matching A/B partner"), "{e}");

    let bad_rank = dir.join("rank.safetensors");
    write_safetensors(
        &bad_rank,
        &[
            t(&format!("transformer.{MODULE}.lora_A.weight"), DType::F32, &[2, 64], vec![0.0; 128]),
            t(&format!("transformer.{MODULE}.lora_B.weight"), DType::F32, &[64, 3], vec![0.0; 192]),
        ],
        None,
    );
    let e = LoraSet::load(&[(bad_rank, 1.0)]).unwrap_err().to_string();
    assert!(e.contains("[2, 64]") && e.contains("[64, 3]"), "{e}");

    let bad_meta = dir.join("meta.safetensors");
    let meta = HashMap::from([("lora_adapter_metadata".to_string(), "{not json".to_string())]);
    write_safetensors(
        &bad_meta,
        &[t(&format!("transformer.{MODULE}.lora_A.weight"), DType::F32, &[1, 1], vec![0.0])],
        Some(meta),
    );
    let e = LoraSet::load(&[(bad_meta, 1.0)]).unwrap_err().to_string();
    assert!(e.contains("lora_adapter_metadata"), "{e}");

    let e = LoraSet::load(&[(dir.join("absent.safetensors"), 1.0)]).unwrap_err().to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
}
