//! The safetensors loader on small files written here: single and sharded folders, dtype conversion,
//! LoRA deltas, and every bad-input error.

mod common;
use common::*;
use sd3::weights::{WeightDelta, Weights, WeightsError};
use sd3_core::DType;

#[test]
fn single_file_upload_and_convert() {
    let dir = scratch("weights-single");
    let vals = rand_values(6, 1, 1.0);
    write_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &[t("a.weight", DType::F16, &[2, 3], vals.clone()), t("b", DType::F32, &[3], vec![1.0, 2.0, 3.0])],
        None,
    );
    let w = Weights::open(&dir).unwrap();
    assert_eq!(w.names().collect::<Vec<_>>(), ["a.weight", "b"]);
    assert_eq!(w.shape("a.weight"), Some(vec![2, 3]));
    assert_eq!(w.dtype_of("a.weight"), Some(DType::F16));
    assert!(w.contains("b") && !w.contains("c"));
    let be = cpu();
    let a32 = w.tensor("a.weight", &be, DType::F32).unwrap();
    assert_eq!(a32.dtype(), DType::F32);
    let expect: Vec<f32> = vals.iter().map(|&v| DType::F16.round_f32(v)).collect();
    assert_eq!(a32.to_f32_vec().unwrap(), expect);
    let b16 = w.tensor_checked("b", &[3], &be, DType::BF16).unwrap();
    assert_eq!(b16.to_f32_vec().unwrap(), [1.0, 2.0, 3.0]);
}

#[test]
fn sharded_folder_with_index() {
    let dir = scratch("weights-sharded");
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &[t("x", DType::F32, &[2], vec![1.0, 2.0])], None);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &[t("y", DType::F32, &[1], vec![3.0])], None);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 12}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let w = Weights::open(&dir).unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(w.tensor("y", &cpu(), DType::F32).unwrap().to_f32_vec().unwrap(), [3.0]);
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = scratch("weights-missing-shard");
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map": {"x": "gone.safetensors"}}"#).unwrap();
    let err = Weights::open(&dir).unwrap_err().to_string();
    assert!(err.contains("gone.safetensors") && err.contains("missing"), "{err}");
}

#[test]
fn missing_folder_and_empty_folder() {
    let dir = scratch("weights-missing");
    let err = Weights::open(&dir.join("transformer")).unwrap_err();
    assert!(matches!(err, WeightsError::MissingDir { .. }), "{err}");
    assert!(err.to_string().contains("transformer"), "{err}");
    let err = Weights::open(&dir).unwrap_err();
    assert!(matches!(err, WeightsError::NoSafetensors { .. }), "{err}");
}

#[test]
fn missing_tensor_is_named_with_suggestions() {
    let dir = scratch("weights-misnamed");
    write_safetensors(&dir.join("m.safetensors"), &[t("blocks.0.attn.to_q.weight", DType::F32, &[1], vec![0.0])], None);
    let w = Weights::open(&dir).unwrap();
    let err = w.tensor("blocks.0.attn.to_k.weight", &cpu(), DType::F32).unwrap_err().to_string();
    assert!(err.contains("`blocks.0.attn.to_k.weight` not found"), "{err}");
    assert!(err.contains("did you mean `blocks.0.attn.to_q.weight`"), "{err}");
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = scratch("weights-shape");
    write_safetensors(&dir.join("m.safetensors"), &[t("w", DType::F32, &[2, 2], vec![0.0; 4])], None);
    let w = Weights::open(&dir).unwrap();
    let err = w.tensor_checked("w", &[4, 1], &cpu(), DType::F32).unwrap_err().to_string();
    assert!(err.contains("expected shape [4, 1], found [2, 2]"), "{err}");
}

#[test]
fn truncated_file_is_named() {
    let dir = scratch("weights-truncated");
    let path = dir.join("m.safetensors");
    write_safetensors(&path, &[t("w", DType::F32, &[64], vec![0.5; 64])], None);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = Weights::open(&dir).unwrap_err().to_string();
    assert!(err.contains("m.safetensors") && err.contains("truncated or corrupt"), "{err}");
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    let err = Weights::open(&dir).unwrap_err().to_string();
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = scratch("weights-dtype");
    let path = dir.join("m.safetensors");
    let data = vec![0u8; 16];
    let view = safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F64, vec![2], &data).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
    let w = Weights::open(&dir).unwrap();
    let err = w.tensor("w", &cpu(), DType::F32).unwrap_err().to_string();
    assert!(err.contains("`w`") && err.contains("F64") && err.contains("not supported"), "{err}");
}

#[test]
fn lora_delta_is_merged_on_upload() {
    let dir = scratch("weights-delta");
    write_safetensors(&dir.join("m.safetensors"), &[t("w", DType::F32, &[2, 3], vec![0.0; 6])], None);
    let mut w = Weights::open(&dir).unwrap();
    // B [2,1] = [1, 2], A [1,3] = [1, 0, -1], scale 0.5
    w.add_delta("w", WeightDelta { a: vec![1.0, 0.0, -1.0], b: vec![1.0, 2.0], rank: 1, scale: 0.5 }).unwrap();
    let got = w.tensor("w", &cpu(), DType::F32).unwrap().to_f32_vec().unwrap();
    assert_eq!(got, [0.5, 0.0, -0.5, 1.0, 0.0, -1.0]);
    let bad = w.add_delta("w", WeightDelta { a: vec![1.0; 4], b: vec![1.0, 2.0], rank: 1, scale: 1.0 });
    assert!(bad.unwrap_err().to_string().contains("expected shape [2, 3]"));
}
