//! Helpers shared by the root integration tests: scratch folders and safetensors writers.
#![allow(dead_code)]

use safetensors::tensor::{Dtype, TensorView};
use sd3_core::{Backend, DType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A fresh empty folder under the system temp dir, unique per test name and process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn cpu() -> Backend {
    Backend::new("cpu", sd3_backend_cpu::cpu_device())
}

/// One tensor to write: name, dtype, shape, f32 values (converted to the dtype).
pub struct T {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

pub fn t(name: &str, dtype: DType, shape: &[usize], values: Vec<f32>) -> T {
    assert_eq!(values.len(), shape.iter().product::<usize>());
    T { name: name.into(), dtype, shape: shape.to_vec(), values }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn rand_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn write_safetensors(path: &Path, tensors: &[T], metadata: Option<HashMap<String, String>>) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.dtype.f32_to_bytes(&t.values)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let dt = match t.dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
                DType::I64 => Dtype::I64,
                DType::I32 => Dtype::I32,
                DType::U8 => Dtype::U8,
            };
            (t.name.clone(), TensorView::new(dt, t.shape.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The backend a golden test runs on: the CPU backend, or the one named by `SD3_TEST_BACKEND` (e.g. `cuda`, its
/// plugin found through `SD3_PLUGIN_PATH`), with the CPU as fallback for ops it declines.
pub fn test_backend() -> Backend {
    match std::env::var("SD3_TEST_BACKEND") {
        Ok(name) if name != "cpu" => {
            let be = sd3::runtime::open_backend(&sd3::runtime::BackendRequest::named(&name)).unwrap();
            eprintln!("testing on backend `{}` ({})", be.name(), be.info().name);
            be
        }
        _ => cpu(),
    }
}
