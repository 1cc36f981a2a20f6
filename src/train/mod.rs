//! Fine-tuning: DreamBooth with LoRA on the MM-DiT, as diffusers' `train_dreambooth_lora_sd3.py` does it (see
//! `docs/training.md`). The gradients come from `models::mmdit::train`, built on the backward formulas of
//! [`grad_ops`]; the optimizer state lives on the host in f32.

pub mod data;
pub mod dreambooth;
pub mod golden;
pub mod grad_ops;
pub mod lora_params;
pub mod objective;
pub mod optim;
pub mod prior;
pub mod trainee;
