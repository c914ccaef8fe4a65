#!/usr/bin/env python3
"""diffusers baseline for the echomimic-rs benchmarks.

Builds diffusers' `UNet2DConditionModel` and `AutoencoderKL` with random
weights at a given size, times their forward calls (one warm-up, then the
median of N) and prints one JSON object on stdout. The Rust counterpart is
`benches/benches/unet_vs_diffusers.rs`; `scripts/bench-vs-diffusers.sh` runs
both and prints the ratios.

Networks (see benches/RESULTS.md for why these are the like-for-like pairs):

* `unet`: the denoising-UNet baseline: a plain SD-1.x UNet2DConditionModel with
  `cross_attention_dim` = the audio width, run on `batch` = B*F images with
  `audio_tokens` context tokens each (what EchoMimic's 3D UNet is per frame,
  minus motion modules, reference bank and the 3.0 audio weight);
* `ref`: the reference-UNet baseline: the same UNet with every `attn2`/`norm2`
  removed and no `conv_norm_out`/`conv_out` (exactly the network EchoMimic's
  reference UNet computes in write mode), one image at t = 0;
* `vae`: AutoencoderKL (sd-vae-ft-mse config unless overridden): encode one
  image (latent_dist.mean) and decode one latent.

With `--export DIR` the weights, inputs and outputs are written as
safetensors so the Rust side can load the same weights and report the max
abs difference (a parity check at benchmark size).

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matmuls,
convolutions and SDPA; 2 FLOPs per multiply-add), the same convention as the
analytic counter of the Rust side.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="unet,ref,vae", help="comma list of unet, ref, vae")
    p.add_argument("--block-out-channels", default="64,128,256,256")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="attention_head_dim (number of heads in SD 1.x)")
    p.add_argument("--norm-groups", type=int, default=32)
    p.add_argument("--audio-dim", type=int, default=384, help="cross_attention_dim of the denoising UNet")
    p.add_argument("--audio-tokens", type=int, default=50)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--cfg-batch", type=int, default=2, help="B: 2 = CFG, 1 = acc mode")
    p.add_argument("--vae-block-out-channels", default="128,256,512,512")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", default=None, help="folder for weights/inputs/outputs (safetensors)")
    return p.parse_args()


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def ints(s):
    return [int(x) for x in s.split(",") if x]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, iters, device):
    """One warm-up call, then the median wall time of `iters` calls."""
    with torch.inference_mode():
        fn()
        sync(device)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), times


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def unet_config(a, cross_dim):
    from diffusers import UNet2DConditionModel

    boc = ints(a.block_out_channels)
    n = len(boc)
    return UNet2DConditionModel(
        sample_size=a.latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=boc,
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        layers_per_block=a.layers_per_block,
        attention_head_dim=a.heads,
        norm_num_groups=a.norm_groups,
        cross_attention_dim=cross_dim,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )


def strip_to_reference(unet):
    """EchoMimic's reference UNet in write mode: no attn2/norm2, no conv_norm_out/conv_out."""
    from diffusers.models.attention import BasicTransformerBlock

    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            m.attn2 = None
            m.norm2 = None
    unet.conv_norm_out = None
    unet.conv_out = nn.Identity()
    return unet


def save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, path)


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev, dtype = a.device, DTYPES[a.dtype]
    parts = [p for p in a.parts.split(",") if p]
    if a.export:
        os.makedirs(a.export, exist_ok=True)
    import diffusers

    out = {
        "tool": "diffusers",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": dev,
        "dtype": a.dtype,
        "iters": a.iters,
        "latent": a.latent,
        "frames": a.frames,
        "cfg_batch": a.cfg_batch,
        "block_out_channels": ints(a.block_out_channels),
        "results": {},
    }
    res = out["results"]
    h = w = a.latent

    if "unet" in parts:
        unet = unet_config(a, a.audio_dim).to(dev, dtype).eval()
        n = a.cfg_batch * a.frames
        x = torch.randn(n, 4, h, w).to(dev, dtype)
        ctx = torch.randn(n, a.audio_tokens, a.audio_dim).to(dev, dtype)
        t = torch.tensor(999.0, device=dev)
        # "unet": the CFG batch (B*F images); "unet_acc": one video (F images)
        batches = [("unet", n)] + ([("unet_acc", a.frames)] if n != a.frames else [])
        for key, b in batches:
            fn = lambda: unet(x[:b], t, encoder_hidden_states=ctx[:b]).sample
            med, times = median_time(fn, a.iters, dev)
            res[key] = {"batch": b, "seconds": med, "times": times, "flops": count_flops(fn)}
        res["unet"]["params"] = sum(p.numel() for p in unet.parameters())
        if a.export:
            with torch.inference_mode():
                y = unet(x, t, encoder_hidden_states=ctx).sample
            save(os.path.join(a.export, "unet.safetensors"), unet.state_dict())
            save(os.path.join(a.export, "unet_io.safetensors"), {"sample": x, "context": ctx, "out": y})
        del unet

    if "ref" in parts:
        ref = strip_to_reference(unet_config(a, a.audio_dim)).to(dev, dtype).eval()
        x = torch.randn(1, 4, h, w).to(dev, dtype)
        ctx = torch.zeros(1, 1, a.audio_dim).to(dev, dtype)  # unused: no attn2
        t = torch.tensor(0.0, device=dev)
        fn = lambda: ref(x, t, encoder_hidden_states=ctx).sample
        med, times = median_time(fn, a.iters, dev)
        res["ref"] = {
            "batch": 1,
            "seconds": med,
            "times": times,
            "flops": count_flops(fn),
            "params": sum(p.numel() for p in ref.parameters()),
        }
        if a.export:
            with torch.inference_mode():
                y = fn()
            save(os.path.join(a.export, "ref.safetensors"), ref.state_dict())
            save(os.path.join(a.export, "ref_io.safetensors"), {"sample": x, "out": y})
        del ref

    if "vae" in parts:
        from diffusers import AutoencoderKL

        vboc = ints(a.vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * len(vboc),
            up_block_types=["UpDecoderBlock2D"] * len(vboc),
            block_out_channels=vboc,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=h * 2 ** (len(vboc) - 1),
        ).to(dev, dtype).eval()
        side = h * 2 ** (len(vboc) - 1)
        img = torch.randn(1, 3, side, side).to(dev, dtype)
        z = torch.randn(1, 4, h, w).to(dev, dtype)
        enc = lambda: vae.encode(img).latent_dist.mean
        dec = lambda: vae.decode(z).sample
        me, te = median_time(enc, a.iters, dev)
        md, td = median_time(dec, a.iters, dev)
        res["vae_encode"] = {"image": side, "seconds": me, "times": te, "flops": count_flops(enc)}
        res["vae_decode"] = {"image": side, "seconds": md, "times": td, "flops": count_flops(dec)}
        if a.export:
            with torch.inference_mode():
                m, y = enc(), dec()
            save(os.path.join(a.export, "vae.safetensors"), vae.state_dict())
            save(os.path.join(a.export, "vae_io.safetensors"), {"image": img, "mean": m, "z": z, "out": y})
        del vae

    import resource

    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.startswith("cuda"):
        # torch's own allocator statistics; nvidia-smi's "memory used" (what the Rust side
        # samples) also counts the CUDA context and the allocator's cache.
        out["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["gpu_name"] = torch.cuda.get_device_name()
    out["load_average"] = os.getloadavg()[0]
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
