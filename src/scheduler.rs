//! `FlowMatchEulerDiscreteScheduler` (diffusers `schedulers/scheduling_flow_match_euler_discrete.py`), the
//! static-shift configuration SD3 and SD3.5 ship (reference §3), with its float32/float64 details:
//!
//! - training sigmas (float32): `σ = (1..=T reversed)/T`, shifted `s·σ/(1+(s-1)·σ)`; `σ_min` = last of them;
//! - `set_timesteps(N)` (float64): `linspace(σ_max·T, σ_min·T, N)/T`, shifted **again** (so the low end is shifted
//!   twice), then cast to float32; `timesteps = σ·T` (float32); a final `σ = 0` appended;
//! - `step`: `x ← x + (σ_{i+1} − σ_i)·v` in float32, cast back to the model dtype.

use crate::weights::{read_json, WeightsError};
use sd3_core::{DType, Tensor};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Config(#[from] WeightsError),
    #[error("{path}: {option} is not supported (SD3 and SD3.5 use a static shift with plain sigmas)")]
    Unsupported { path: String, option: &'static str },
    #[error("the number of steps must be at least 1")]
    NoSteps,
}

impl SchedulerConfig {
    /// Read `scheduler/scheduler_config.json`, refusing options this implementation does not have.
    pub fn load(dir: &Path) -> Result<Self, SchedulerError> {
        let path = dir.join("scheduler_config.json");
        let cfg: SchedulerConfig = read_json(&path)?;
        let unsupported = [
            (cfg.use_dynamic_shifting, "use_dynamic_shifting"),
            (cfg.shift_terminal.is_some(), "shift_terminal"),
            (cfg.invert_sigmas, "invert_sigmas"),
            (cfg.stochastic_sampling, "stochastic_sampling"),
            (cfg.use_karras_sigmas, "use_karras_sigmas"),
            (cfg.use_exponential_sigmas, "use_exponential_sigmas"),
            (cfg.use_beta_sigmas, "use_beta_sigmas"),
        ];
        if let Some((_, option)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(SchedulerError::Unsupported { path: path.display().to_string(), option });
        }
        Ok(cfg)
    }
}

/// The sampling schedule of one generation.
#[derive(Clone, Debug)]
pub struct FlowMatchEulerDiscreteScheduler {
    pub config: SchedulerConfig,
    /// `N + 1` sigmas, the last one 0 (float32).
    pub sigmas: Vec<f32>,
    /// `N` timesteps `σ·T` (float32): what the transformer receives.
    pub timesteps: Vec<f32>,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        if steps == 0 {
            return Err(SchedulerError::NoSteps);
        }
        let t_train = config.num_train_timesteps;
        // __init__: float32 training sigmas, shifted once.
        let s32 = config.shift as f32;
        let shift32 = |x: f32| s32 * x / (1.0 + (s32 - 1.0) * x);
        let sigma_max = shift32(1.0) as f64; // σ of the first training timestep, T/T
        let sigma_min = shift32(1.0f32 / t_train as f32) as f64;
        // set_timesteps: float64 linspace between the shifted ends, shifted again, then float32.
        let (t0, t1) = (sigma_max * t_train as f64, sigma_min * t_train as f64);
        let s = config.shift;
        let mut sigmas: Vec<f32> = linspace(t0, t1, steps)
            .into_iter()
            .map(|t| {
                let x = t / t_train as f64;
                (s * x / (1.0 + (s - 1.0) * x)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|&x| x * t_train as f32).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEulerDiscreteScheduler { config, sigmas, timesteps })
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Euler step `i`: `sample + (σ_{i+1} − σ_i)·v`, computed in f32 and returned in `v`'s dtype.
    pub fn step(&self, i: usize, v: &Tensor, sample: &Tensor) -> sd3_core::Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let prev = sample.to_dtype(DType::F32)?.add(&v.to_dtype(DType::F32)?.scale(dt)?)?;
        prev.to_dtype(v.dtype())
    }
}

/// `numpy.linspace(a, b, n)` in float64 (`a + i·(b−a)/(n−1)`, the last point exactly `b`).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { b } else { a + i as f64 * step }).collect()
}
