"""A full-size SD3-medium-shaped pipeline with random weights, in the published diffusers layout.

Used to prove the engine at full size where the real checkpoint cannot be downloaded: the transformer, VAE and
both CLIP encoders have the published SD3-medium configs; T5 keeps T5-XXL's width (d_model 4096, 64 heads, d_ff
10240, vocab 32128) but only `--t5-layers` layers (default 2) to save time. Tokenizers come from the repo's
fixtures (the real CLIP vocabulary; the tiny T5 SentencePiece model, whose ids fit T5's vocabulary).

    python3 scripts/make_random_sd3_medium.py OUT_DIR [--t5-layers N] [--device cuda]

Also writes OUT_DIR/init_noise.safetensors (tensor `latents`, [1,16,128,128], seed 42) for `--init-noise`.
"""
import json, os, shutil, sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

out = sys.argv[1]
t5_layers = int(sys.argv[sys.argv.index("--t5-layers") + 1]) if "--t5-layers" in sys.argv else 2
device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else ("cuda" if torch.cuda.is_available() else "cpu")
repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
torch.manual_seed(0)
os.makedirs(out, exist_ok=True)

with torch.device(device):
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
                        sample_size=1024)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                                                        vocab_size=49408, bos_token_id=49406, eos_token_id=49407))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                        vocab_size=49408, bos_token_id=49406, eos_token_id=49407))
    t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
                                 vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False))

for name, model in [("transformer", transformer), ("vae", vae), ("text_encoder", clip_l), ("text_encoder_2", clip_g),
                    ("text_encoder_3", t5)]:
    model.to(torch.float16).eval().save_pretrained(os.path.join(out, name), safe_serialization=True)
    print("saved", name, sum(p.numel() for p in model.parameters()), flush=True)
FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(out, "scheduler"))

clip_real = os.path.join(repo, "fixtures", "tokenizers", "clip-real")
for tok, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
    d = os.path.join(out, tok)
    os.makedirs(d, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(clip_real, f), d)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
    json.dump(special, open(os.path.join(d, "special_tokens_map.json"), "w"))
    json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special},
              open(os.path.join(d, "tokenizer_config.json"), "w"))
shutil.copytree(os.path.join(repo, "fixtures", "sd3-tiny", "tokenizer_3"), os.path.join(out, "tokenizer_3"), dirs_exist_ok=True)
json.dump({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_3": ["transformers", "T5EncoderModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
           "tokenizer_3": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
          open(os.path.join(out, "model_index.json"), "w"), indent=1)
noise = torch.randn((1, 16, 128, 128), generator=torch.Generator("cpu").manual_seed(42))
save_file({"latents": noise.float().contiguous()}, os.path.join(out, "init_noise.safetensors"))
print("done", out)
