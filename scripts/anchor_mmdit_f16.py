# Trimmed copy of ../shared/tools/anchor_diffusers.py: only the f16 MM-DiT at 1024², batch 2 (same model and timing).
import torch
from diffusers import SD3Transformer2DModel
dev = "cuda"; torch.manual_seed(0)
def bench(fn, warm=3, rep=10):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); times = []
    for _ in range(rep):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
    times.sort(); return times[len(times) // 2]
cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
           num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
dtype = torch.float16
model = SD3Transformer2DModel(**cfg).to(dev, dtype).eval()
x = torch.randn(2, 16, 128, 128, device=dev, dtype=dtype); ctx = torch.randn(2, 333, 4096, device=dev, dtype=dtype)
pooled = torch.randn(2, 2048, device=dev, dtype=dtype); t = torch.tensor([500.0, 500.0], device=dev, dtype=dtype)
with torch.no_grad():
    print("mmdit_float16_1024_b2_ms", round(bench(lambda: model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)), 2), flush=True)
