#!/usr/bin/env python3
"""Goldens for LoRA fine-tuning (DreamBooth) and the VAE encoder, made with diffusers + PEFT (see fixtures/README.md).

For each tiny transformer (sd3-tiny, sd35-tiny) this does one training step exactly as diffusers'
examples/dreambooth/train_dreambooth_lora_sd3.py does it, with fixed inputs instead of random ones:

  LoRA (PEFT, rank 4, alpha 4) on the script's default targets; A and B set to seeded values (B not zero, so that
  A has a gradient); noisy = (1-σ)·x0 + σ·noise; pred = transformer(noisy, σ·1000, prompt_embeds, pooled);
  preconditioned: pred·(-σ) + noisy against x0; loss = mean((pred - x0)²); backward; clip the gradient norm to 1;
  one AdamW step (lr 1e-3, betas 0.9/0.999, weight decay 1e-4, eps 1e-8).

and for the VAE the encoder's latent distribution of a fixed image; and the same step for full fine-tuning
(train_dreambooth_sd3.py: every transformer parameter trainable, no LoRA) into fixtures/training/<model>-full.safetensors:
  pred, loss, grad.<parameter> for every parameter of the transformer (the inputs are <model>.safetensors').

Writes fixtures/training/<model>.safetensors with
  input.{x0, noise, sigmas, prompt_embeds, pooled}   the step's inputs
  lora.<module>.lora_{A,B}.weight                      the LoRA before the step (diffusers' key names, no prefix)
  grad.<module>.lora_{A,B}.weight                      the loss's gradient (before clipping)
  step.<module>.lora_{A,B}.weight                      the LoRA after the clipped AdamW step
  pred, loss                                           the transformer's raw output and the loss
  {bf16,f16}.grad.<module>.lora_{A,B}.weight, {bf16,f16}.pred
                                                       the same step with the transformer in half precision as
                                                       the script runs it (--mixed_precision: base weights and
                                                       inputs in that dtype, the LoRA in float32), to bound a
                                                       half-precision run by diffusers' own distance from float32
  vae.{image, mean, logvar}                            (sd3-tiny only) vae.encode(image).latent_dist

Usage:  python scripts/make_training_golden.py [--fixtures fixtures]
"""

import argparse
import os

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from diffusers import AutoencoderKL, SD3Transformer2DModel

# train_dreambooth_lora_sd3.py's default `target_modules`.
TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
RANK = 4
LR = 1e-3
CASES = {"sd3-tiny": (8, 8), "sd35-tiny": (8, 12)}  # latent height, width
TEXT_TOKENS = 10


def adapted(fixtures, name, dtype):
    """The transformer in `dtype` with seeded LoRA values in float32 (the script's cast_training_params)."""
    torch.manual_seed(0)
    tr = SD3Transformer2DModel.from_pretrained(os.path.join(fixtures, name, "transformer"), torch_dtype=dtype)
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    params = {}
    for key, p in tr.named_parameters():
        if "lora_" in key:
            p.data = torch.randn(p.shape, generator=g) * 0.1
            params[key.replace(".default", "")] = p
    return tr, params, g


def half_step(fixtures, name, dtype, inputs):
    """The step with the base model and inputs in `dtype` (--mixed_precision), the loss in float32."""
    tr, params, _ = adapted(fixtures, name, dtype)
    x0, noise, sigmas, prompt, pooled = inputs
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = tr(hidden_states=noisy.to(dtype), timestep=sigmas * 1000, encoder_hidden_states=prompt.to(dtype),
              pooled_projections=pooled.to(dtype), return_dict=False)[0]
    loss = torch.mean(((pred.float() * (-s) + noisy) - x0) ** 2)
    # fp16 runs under accelerate's GradScaler (initial scale 2^16), bf16 without one.
    loss_scale = 65536.0 if dtype == torch.float16 else 1.0
    (loss * loss_scale).backward()
    tag = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    out = {f"{tag}.pred": pred.detach().float()}
    for key, p in params.items():
        out[f"{tag}.grad.{key}"] = p.grad.detach().float().clone() / loss_scale
    return out


def lora_step(fixtures, name, hw):
    tr, params, g = adapted(fixtures, name, torch.float32)
    c = tr.config
    b, (h, w) = 2, hw
    x0 = torch.randn(b, c.in_channels, h, w, generator=g)
    noise = torch.randn(b, c.in_channels, h, w, generator=g)
    sigmas = torch.tensor([0.3, 0.85])
    prompt = torch.randn(b, TEXT_TOKENS, c.joint_attention_dim, generator=g)
    pooled = torch.randn(b, c.pooled_projection_dim, generator=g)
    s = sigmas.view(b, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = tr(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=prompt,
              pooled_projections=pooled, return_dict=False)[0]
    loss = torch.mean(((pred * (-s) + noisy) - x0) ** 2)
    loss.backward()
    out = {
        "input.x0": x0, "input.noise": noise, "input.sigmas": sigmas, "input.prompt_embeds": prompt,
        "input.pooled": pooled, "pred": pred.detach(), "loss": loss.detach().reshape(1),
    }
    for key, p in params.items():
        out[f"lora.{key}"] = p.detach().clone()
        out[f"grad.{key}"] = p.grad.detach().clone()
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    for key, p in params.items():
        out[f"step.{key}"] = p.detach().clone()
    for dtype in (torch.bfloat16, torch.float16):
        out.update(half_step(fixtures, name, dtype, (x0, noise, sigmas, prompt, pooled)))
    print(f"{name}: loss {loss.item():.6f}, {len(params)} LoRA tensors")
    return out, full_step(fixtures, name, (x0, noise, sigmas, prompt, pooled))


def full_step(fixtures, name, inputs):
    """The step with every transformer parameter trainable (train_dreambooth_sd3.py), float32."""
    tr = SD3Transformer2DModel.from_pretrained(os.path.join(fixtures, name, "transformer"), torch_dtype=torch.float32)
    tr.requires_grad_(True)
    x0, noise, sigmas, prompt, pooled = inputs
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = tr(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=prompt,
              pooled_projections=pooled, return_dict=False)[0]
    loss = torch.mean(((pred * (-s) + noisy) - x0) ** 2)
    loss.backward()
    out = {"pred": pred.detach(), "loss": loss.detach().reshape(1)}
    for key, p in tr.named_parameters():
        out[f"grad.{key}"] = p.grad.detach().clone()
    print(f"{name} full: loss {loss.item():.6f}, {len(out) - 2} parameters")
    return out


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the script's text_lora_config
PROMPT = "a photo of sks dog"


def text_encoder_step(fixtures, name, inputs):
    """The LoRA step with --train_text_encoder: adapters on both CLIPs too, the prompt encoded with gradients."""
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(fixtures, name), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    params = {}
    for prefix, model, targets in (("transformer", pipe.transformer, TARGETS),
                                   ("text_encoder", pipe.text_encoder, TEXT_TARGETS),
                                   ("text_encoder_2", pipe.text_encoder_2, TEXT_TARGETS)):
        model.requires_grad_(False)
        config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets)
        # transformers' add_adapter wants PEFT >= 0.22; inject_adapter_in_model is what it calls.
        inject_adapter_in_model(config, model)
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.data = torch.randn(p.shape, generator=g) * 0.1
                params[f"{prefix}.{key.replace('.default', '')}"] = p
    pipe.text_encoder_3.requires_grad_(False)
    prompt, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=77)
    x0, noise, sigmas, _, _ = inputs
    b = x0.shape[0]
    prompt, pooled = prompt.expand(b, -1, -1), pooled.expand(b, -1)
    s = sigmas.view(b, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    pred = pipe.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=prompt,
                            pooled_projections=pooled, return_dict=False)[0]
    loss = torch.mean(((pred * (-s) + noisy) - x0) ** 2)
    loss.backward()
    out = {"pred": pred.detach(), "loss": loss.detach().reshape(1)}
    for key, p in params.items():
        out[f"lora.{key}"] = p.detach().clone()
        out[f"grad.{key}"] = p.grad.detach().clone()
    print(f"{name} with the text encoders: loss {loss.item():.6f}, {len(params)} LoRA tensors")
    return out


def vae_encoding(fixtures):
    vae = AutoencoderKL.from_pretrained(os.path.join(fixtures, "sd3-tiny", "vae"), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    return {"vae.image": image, "vae.mean": dist.mean, "vae.logvar": dist.logvar}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="fixtures")
    args = ap.parse_args()
    out_dir = os.path.join(args.fixtures, "training")
    os.makedirs(out_dir, exist_ok=True)
    for name, hw in CASES.items():
        tensors, full = lora_step(args.fixtures, name, hw)
        outputs = [("", tensors), ("-full", full)]
        if name == "sd3-tiny":
            tensors.update(vae_encoding(args.fixtures))
            inputs = tuple(tensors[f"input.{k}"] for k in ("x0", "noise", "sigmas", "prompt_embeds", "pooled"))
            outputs.append(("-text", text_encoder_step(args.fixtures, name, inputs)))
        for suffix, t in outputs:
            t = {k: v.contiguous().float() for k, v in t.items()}
            save_file(t, os.path.join(out_dir, f"{name}{suffix}.safetensors"))


if __name__ == "__main__":
    main()
