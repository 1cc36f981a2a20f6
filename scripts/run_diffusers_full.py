"""Times diffusers' StableDiffusion3Pipeline on a model folder (e.g. from make_random_sd3_medium.py) with the
folder's init noise, as the anchor for `sd3 --benchmark` on the same card.

    python3 scripts/run_diffusers_full.py MODEL_DIR OUT_PNG [--dtype float16] [--steps 28]
"""
import sys, time
import numpy as np
import torch
from safetensors.torch import load_file
from diffusers import StableDiffusion3Pipeline

model, out_png = sys.argv[1], sys.argv[2]
dtype = getattr(torch, sys.argv[sys.argv.index("--dtype") + 1]) if "--dtype" in sys.argv else torch.float16
steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 28
pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=dtype).to("cuda")
latents = load_file(f"{model}/init_noise.safetensors")["latents"].to("cuda", dtype)
prompt = "A cat holding a sign that says hello world"
for run in range(2):
    torch.cuda.synchronize()
    t0 = time.time()
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, height=1024, width=1024, latents=latents,
                 output_type="np").images[0]
    torch.cuda.synchronize()
    print(f"diffusers run {run}: {time.time() - t0:.3f} s ({steps} steps, 1024x1024, {dtype})", flush=True)
print("peak GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2))
np.save(out_png.replace(".png", ".npy"), image)
from PIL import Image
Image.fromarray((image * 255).round().astype("uint8")).save(out_png)
