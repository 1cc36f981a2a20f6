//! sd3: Stable Diffusion 3 written once on `sd3-core`'s ops.
//!
//! Models never name a backend: they take a [`sd3_core::Backend`] and build [`sd3_core::Tensor`] ops.

/// Linked so that the built-in CPU backend registers itself.
pub use sd3_backend_cpu as cpu;
pub use sd3_core as core;

pub mod bundled;
pub mod golden;
pub mod image_out;
pub mod lora;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod runtime;
pub mod scheduler;
pub mod tokenizer;
pub mod train;
pub mod weights;
