//! sd3: Stable Diffusion 3 written once on `sd3-core`'s ops.

pub use sd3_core as core;
/// Linked so that the built-in CPU backend registers itself.
pub use sd3_backend_cpu as cpu;
