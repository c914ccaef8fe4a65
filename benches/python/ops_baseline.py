#!/usr/bin/env python3
"""torch baseline of benches/benches/ops.rs: the denoising UNet's hot operations one by one
at the released model's 64x64 level (320 channels, 8 heads of 40, 4096 tokens) and a CFG
window's batch (2 x 12 frames), timed like the Rust side (one warm-up, median of N).
Prints one JSON object on stdout."""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    a = p.parse_args()
    dev, dt = a.device, DTYPES[a.dtype]
    n, c, s, h = a.batch, a.channels, a.side, a.heads
    l, hd = s * s, c // h
    torch.manual_seed(0)
    image = torch.randn(n, c, s, s, device=dev, dtype=dt)
    tokens = torch.randn(n, l, c, device=dev, dtype=dt)
    q = tokens.view(n, l, h, hd).transpose(1, 2).contiguous()
    k, v = q.clone(), q.clone()
    audio = torch.randn(n, 50, 384, device=dev, dtype=dt)
    conv3 = nn.Conv2d(c, c, 3, padding=1).to(dev, dt)
    conv1 = nn.Conv2d(c, c, 1).to(dev, dt)
    gn = nn.GroupNorm(32, c, eps=1e-5).to(dev, dt)
    ln = nn.LayerNorm(c).to(dev, dt)
    linear = nn.Linear(c, c).to(dev, dt)
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    self_attn = Attention(c, heads=h, dim_head=hd).to(dev, dt)
    cross_attn = Attention(c, cross_attention_dim=384, heads=h, dim_head=hd).to(dev, dt)
    ff = FeedForward(c, activation_fn="geglu").to(dev, dt)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    results = {}

    def timed(name, fn):
        with torch.inference_mode():
            fn()
            sync()
            times = []
            for _ in range(a.iters):
                t = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results[name] = {"seconds": med, "times": times}
        print(f"{name:<28} {med * 1e3:>9.3f} ms", file=__import__("sys").stderr)

    timed("conv3x3", lambda: conv3(image))
    timed("conv1x1", lambda: conv1(image))
    timed("group_norm_silu", lambda: F.silu(gn(image)))
    timed("group_norm", lambda: gn(image))
    timed("layer_norm", lambda: ln(tokens))
    timed("linear", lambda: linear(tokens))
    timed("sdpa", lambda: F.scaled_dot_product_attention(q, k, v))
    timed("softmax_f32_scores", lambda: torch.softmax((q[:1, :4] @ k[:1, :4].transpose(-1, -2)).float() / hd**0.5, -1))
    timed("self_attention_block", lambda: self_attn(tokens))
    timed("cross_attention_block", lambda: cross_attn(tokens, encoder_hidden_states=audio))
    timed("feed_forward", lambda: ff(tokens))
    timed("permute_to_tokens", lambda: image.flatten(2).transpose(1, 2).contiguous())
    timed("add", lambda: image + image)
    w = torch.randn(c, c, device=dev, dtype=dt)
    b = torch.randn(c, device=dev, dtype=dt)
    flat = tokens.reshape(n * l, c)
    timed("matmul_3d_broadcast_weight", lambda: tokens @ w.t())
    timed("matmul_2d", lambda: flat @ w.t())
    y = flat @ w.t()
    timed("bias_broadcast_add", lambda: y + b)
    timed("linear_2d", lambda: F.linear(flat, w, b).view(n, l, c))
    timed("conv1x1_as_matmul", lambda: (w @ image.reshape(n, c, l)).view(n, c, s, s))
    chunk = q[:1, :4] @ k[:1, :4].transpose(-1, -2)
    timed("scores_matmul_chunk", lambda: q[:1, :4] @ k[:1, :4].transpose(-1, -2))
    timed("to_f32_chunk", lambda: chunk.float())
    timed("softmax_chunk_in_dtype", lambda: torch.softmax(chunk, -1))
    timed("to_f32_image", lambda: image.float())
    image32 = image.float()
    timed("sum_over_groups_f32", lambda: image32.reshape(n, 32, -1).sum(2, keepdim=True))
    timed("silu", lambda: F.silu(image))
    out = {"tool": "torch ops", "torch": torch.__version__, "device": dev, "dtype": a.dtype,
           "batch": n, "side": s, "channels": c, "heads": h, "iters": a.iters, "results": results}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
