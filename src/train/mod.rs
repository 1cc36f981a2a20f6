//! Fine-tuning: DreamBooth on the MM-DiT with a LoRA or in full, as diffusers' `train_dreambooth_lora_sd3.py`
//! and `train_dreambooth_sd3.py` do it (see `docs/training.md`). The gradients come from `models::mmdit::train`,
//! built on the backward formulas of [`grad_ops`].
//!
//! [`dreambooth`] is the training loop; [`trainee`] what it trains (a LoRA with [`lora_params`] and the host
//! AdamW, or every parameter with the device AdamW of [`optim`]); [`data`] the images as latents; [`objective`]
//! the noise levels and the loss; [`prior`] prior preservation's class images; [`text_encoders`] the CLIPs'
//! adapters; [`checkpoint`] saving results and the state to resume from; [`golden`] the diffusers steps every
//! backend's training test runs.

pub mod checkpoint;
pub mod data;
pub mod dreambooth;
pub mod golden;
pub mod grad_ops;
pub mod lora_params;
pub mod objective;
pub mod optim;
pub mod prior;
pub mod text_encoders;
pub mod trainee;
