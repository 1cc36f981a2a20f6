#!/usr/bin/env python3
"""PyTorch's times for the ops `examples/bench_ops_gpu.rs` measures (same shapes, same dtype, same card):
scaled_dot_product_attention on [2, 24, 4429, 64] and the joint block's four linears. Usage:
`python3 scripts/bench_ops_torch.py [bf16|f16] [iters]`."""
import sys
import time

import torch
import torch.nn.functional as F

dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 20
dev = "cuda"


def seconds(fn):
    """Seconds per call of fn, after one warm-up call, synchronised around the timed calls."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def timed(label, flops, fn):
    s = seconds(fn)
    print(f"{label:<40} {s * 1e3:>9.3f} ms {flops / s / 1e12:>8.1f} TFLOP/s")


def gbs(label, nbytes, fn):
    s = seconds(fn)
    print(f"{label:<40} {s * 1e3:>9.3f} ms {nbytes / s / 1e9:>8.0f} GB/s")


b, h, n, dh, d = 2, 24, 4429, 64, 1536
q, k, v = (torch.randn(b, h, n, dh, device=dev, dtype=dtype) for _ in range(3))
with torch.no_grad():
    timed("attention [2,24,4429,64] (SDPA)", 4.0 * b * h * n * n * dh, lambda: F.scaled_dot_product_attention(q, k, v))
    tokens = b * 4096
    x = torch.randn(tokens, d, device=dev, dtype=dtype)
    x4 = torch.randn(tokens, 4 * d, device=dev, dtype=dtype)
    for label, inp, out_features in [
        ("linear 8192x1536 -> 4608 (qkv)", x, 3 * d),
        ("linear 8192x1536 -> 1536 (out)", x, d),
        ("linear 8192x1536 -> 6144 (ff up)", x, 4 * d),
        ("linear 8192x6144 -> 1536 (ff down)", x4, d),
    ]:
        w = torch.randn(out_features, inp.shape[1], device=dev, dtype=dtype) * 0.02
        bias = torch.randn(out_features, device=dev, dtype=dtype)
        timed(label, 2.0 * tokens * inp.shape[1] * out_features, lambda: F.linear(inp, w, bias))
    pooled = torch.randn(b, d, device=dev, dtype=dtype)
    w_mod = torch.randn(6 * d, d, device=dev, dtype=dtype) * 0.02
    bias_mod = torch.randn(6 * d, device=dev, dtype=dtype)
    timed("linear 2x1536 -> 9216 (adaLN)", 2.0 * b * d * 6 * d, lambda: F.linear(pooled, w_mod, bias_mod))


with torch.no_grad():
    es = torch.finfo(dtype).bits // 8
    x3 = torch.randn(b, 4096, d, device=dev, dtype=dtype)
    y3 = torch.randn(b, 4096, d, device=dev, dtype=dtype)
    scale = torch.randn(b, 1, d, device=dev, dtype=dtype)
    shift = torch.randn(b, 1, d, device=dev, dtype=dtype)
    nbytes = 2.0 * b * 4096 * d * es
    # diffusers' AdaLayerNormZero: norm(x) * (1 + scale) + shift, and the gated residual x + gate * y.
    gbs("layer_norm_modulate [2,4096,1536]", nbytes,
        lambda: F.layer_norm(x3, (d,), eps=1e-6) * (1 + scale) + shift)
    gbs("gated_residual [2,4096,1536]", 1.5 * nbytes, lambda: x3 + scale * y3)
    h3 = torch.randn(b, 4096, 4 * d, device=dev, dtype=dtype)
    gbs("gelu_tanh [2,4096,6144]", 8.0 * b * 4096 * d * es, lambda: F.gelu(h3, approximate="tanh"))
    qkv = torch.randn(b, 4096, 3, h, dh, device=dev, dtype=dtype)
    gbs("head split copy [2,4096,24,64]", nbytes, lambda: qkv[:, :, 0].permute(0, 2, 1, 3).contiguous())
