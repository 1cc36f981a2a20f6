# diffusers' counterpart of examples/bench_train_step.rs: one LoRA training step of SD3Transformer2DModel with
# SD3-medium shapes and random weights, as train_dreambooth_lora_sd3.py runs it (frozen weights in the compute dtype,
# rank-4 adapters with lora_alpha = rank on the script's eight attention projections, kept in f32 and run under
# autocast), timed on a CUDA card. PEFT's LoRA layer is written out below (x W^T + (x A^T) B^T * alpha / r, the
# same matmuls) so that the card needs no peft or transformers install.
#
#   python3 scripts/bench_train_step_torch.py [--dtype bf16] [--res 512] [--batch 1] [--layers 24] [--iters 5]
#       [--gradient-checkpointing]
#
# The loss is sum(pred²)/2, whose gradient is the prediction, as in bench_train_step.rs; no optimizer step (the
# adapters' AdamW is a few thousand elements). Prints the median step and forward in seconds.
import argparse
import torch
from diffusers import SD3Transformer2DModel

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
p.add_argument("--res", type=int, default=512)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--layers", type=int, default=24)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--gradient-checkpointing", action="store_true")
a = p.parse_args()
dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
dev = "cuda"
torch.manual_seed(0)

TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class LoraLinear(torch.nn.Module):
    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=torch.float32)
        torch.nn.init.normal_(self.lora_B.weight, std=1e-3)  # B = 0 would make half the backward trivial
        self.scale = 1.0  # lora_alpha = rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=a.layers, attention_head_dim=64,
           num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
model = SD3Transformer2DModel(**cfg).to(dev, dtype)
model.requires_grad_(False)
for name, module in list(model.named_modules()):
    for target in TARGETS:
        if name.endswith(target):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoraLinear(module, 4))
if a.gradient_checkpointing:
    model.enable_gradient_checkpointing()
model.train()
adapters = [q for q in model.parameters() if q.requires_grad]

lat = a.res // 8
x = torch.randn(a.batch, 16, lat, lat, device=dev, dtype=dtype)
ctx = torch.randn(a.batch, 154, 4096, device=dev, dtype=dtype)
pooled = torch.randn(a.batch, 2048, device=dev, dtype=dtype)
t = torch.full((a.batch,), 500.0, device=dev, dtype=dtype)


def forward():
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                     return_dict=False)[0]


def step():
    pred = forward()
    (pred.float().pow(2).sum() / 2).backward()
    for q in adapters:
        q.grad = None


def timed(fn):
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record(); fn(); e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3


def no_grad_forward():
    with torch.no_grad():
        forward()


steps, forwards = [], []
for i in range(a.iters + 2):
    f, s = timed(no_grad_forward), timed(step)
    if i >= 2:
        forwards.append(f); steps.append(s)
steps.sort(); forwards.sort()
print(f"diffusers {a.dtype} {a.res}² batch {a.batch}, {a.layers} layers, "
      f"{'recomputed' if a.gradient_checkpointing else 'kept'}: training step median {steps[len(steps) // 2]:.4f} s, "
      f"forward {forwards[len(forwards) // 2]:.4f} s; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
      flush=True)
