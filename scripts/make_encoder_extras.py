"""Goldens for encoder behaviour the SD3 fixtures (fixtures/, made by make_fixtures.py) do not cover:

1. the non-gated ("relu") T5 encoder variant: a tiny random `T5EncoderModel` shaped like
   `hf-internal-testing/tiny-random-t5` (the encoder diffusers' own SD3 pipeline tests use), rounded to float16,
   saved in the transformers layout, and its float32 output (tests/data/t5-relu/, t5-relu-golden.safetensors);
2. CLIP `clip_skip`: transformers' `hidden_states[-(k+2)]` of the fixture CLIP-L for k = 1, 2 on the sd3-cfg
   prompt ids (tests/data/clip-skip-golden.safetensors).

    python scripts/make_encoder_extras.py

Needs torch, transformers and safetensors (scripts/requirements-fixtures.txt). Random weights come from torch's
RNG (seed 0), so another torch version may write other, equally valid, files.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
OUT = DATA / "t5-relu"
GOLDEN = DATA / "t5-relu-golden.safetensors"


def clip_skip():
    model = CLIPTextModelWithProjection.from_pretrained(ROOT / "fixtures/sd3-tiny/text_encoder", torch_dtype=torch.float32)
    model.eval()
    ids = load_file(ROOT / "fixtures/golden/sd3-cfg/golden.safetensors")["clip_l_ids"]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    out = {"ids": ids.contiguous()}
    for k in (1, 2):
        out[f"hidden_clip_skip_{k}"] = hs[-(k + 2)].float().contiguous()
    save_file(out, DATA / "clip-skip-golden.safetensors")
    print("wrote clip-skip-golden.safetensors")


def main():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=128,
        feed_forward_proj="relu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
        is_encoder_decoder=False, use_cache=False,
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                # Initialised to 1: perturb them so the test can tell whether they are applied.
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            p.copy_(p.half().float())
    OUT.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(OUT)
    model = T5EncoderModel.from_pretrained(OUT, torch_dtype=torch.float32).eval()
    # 40 tokens: relative distances up to 39 reach every one of the 8 buckets; id 0 (pad) included.
    ids = torch.cat([torch.randint(3, 1103, (1, 30)), torch.tensor([[1] + [0] * 9])], dim=1)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    save_file({"ids": ids.to(torch.int64).contiguous(), "hidden": hidden.float().contiguous()}, GOLDEN)
    print("wrote", OUT, "hidden std", hidden.std().item())
    clip_skip()


if __name__ == "__main__":
    main()
