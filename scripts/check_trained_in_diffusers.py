#!/usr/bin/env python3
"""Checks that what `sd3 train-lora` and `sd3 train-dreambooth` write is what diffusers reads: the same prompt and
initial noise through diffusers (the LoRA by `load_lora_weights`, the full result by `from_pretrained` on the
output folder) and through `sd3` (`--lora`, `--model`) must give the same image (within 3/255, the CPU golden
bound). Needs torch, diffusers and peft (scripts/requirements-fixtures.txt) and a built `sd3`.

Usage: python scripts/check_trained_in_diffusers.py --sd3 target/debug/sd3 --base fixtures/sd3-tiny \
           [--lora DIR] [--full DIR]
"""

import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import StableDiffusion3Pipeline

PROMPT = "a photo of sks dog"


def diffusers_image(model, lora, latents):
    pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)
    if lora:
        pipe.load_lora_weights(lora)
    out = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="np")
    return (out.images[0] * 255).round().clip(0, 255).astype(np.int16)


def sd3_image(sd3, model, lora, noise_file, out):
    cmd = [sd3, "--model", model, "--prompt", PROMPT, "--steps", "3", "--guidance", "5", "--init-noise", noise_file,
           "--out", out, "-q"]
    if lora:
        cmd += ["--lora", os.path.join(lora, "pytorch_lora_weights.safetensors")]
    subprocess.run(cmd, check=True)
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd3", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--lora")
    ap.add_argument("--full")
    args = ap.parse_args()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    worst = 0
    with tempfile.TemporaryDirectory() as tmp:
        noise = os.path.join(tmp, "noise.safetensors")
        save_file({"latents": latents.contiguous()}, noise)
        cases = []
        if args.lora:
            cases.append(("LoRA (load_lora_weights / --lora)", args.base, args.lora))
        if args.full:
            cases.append(("full fine-tune (from_pretrained / --model)", args.full, None))
        for name, model, lora in cases:
            ours = sd3_image(args.sd3, model, lora, noise, os.path.join(tmp, "ours.png"))
            theirs = diffusers_image(model, lora, latents)
            base = diffusers_image(args.base, None, latents)
            diff = int(np.abs(ours - theirs).max())
            moved = int(np.abs(theirs - base).max())
            print(f"{name}: sd3 against diffusers {diff}/255 (the training moved diffusers' image by {moved}/255)")
            assert moved > 3, f"{name}: the trained weights change nothing; the check could not judge"
            worst = max(worst, diff)
    assert worst <= 3, f"sd3 and diffusers differ by {worst}/255"


if __name__ == "__main__":
    main()
