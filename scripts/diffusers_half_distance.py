#!/usr/bin/env python3
"""How far diffusers' own half-precision runs land from its f32 goldens: for each case in fixtures/golden/, run
StableDiffusion3Pipeline on the same tiny pipeline, prompt and initial noise in bf16 and in f16 (on the CPU) and
print the largest pixel difference from the golden's image.png. This is the yardstick for our half-precision
golden tolerances (tests/pipeline_cuda.rs): a backend is not asked to be closer to the f32 result than diffusers
itself is at the same precision. Usage: `python3 scripts/diffusers_half_distance.py` with the fixtures venv
(scripts/requirements-fixtures.txt)."""
import importlib.util
import json
import pathlib

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

root = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_fixtures", root / "scripts" / "make_fixtures.py")
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)

for case_dir in sorted((root / "fixtures" / "golden").iterdir()):
    params = json.loads((case_dir / "params.json").read_text())
    noise = next(iter(load_file(case_dir / "init_noise.safetensors").values()))
    case = dict(params, noise=noise)
    if params.get("slg"):
        case["slg"] = params["slg"]
    else:
        case.pop("slg", None)
    lora = params.get("lora")
    if lora:
        lora = dict(lora, file=str(root / "fixtures" / lora["file"]))
    want = np.asarray(Image.open(case_dir / "image.png").convert("RGB")).astype(int)
    row = [case_dir.name]
    for dtype in (torch.bfloat16, torch.float16):
        _, _, _, image = mf.run_golden(str(root / "fixtures" / params["model"]), dtype, case, lora)
        got = (np.clip(image[0].astype(np.float32), 0, 1) * 255).round().astype(int)
        row.append(f"{str(dtype).split('.')[-1]} {int(np.abs(got - want).max())}/255")
    print("  ".join(row), flush=True)
