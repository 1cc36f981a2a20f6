//! The models, each a small file mirroring diffusers' / transformers' module names.

pub mod clip;
pub mod clip_train;
pub mod layers;
pub mod mmdit;
pub mod t5;
pub mod vae;
pub mod vae_encoder;
