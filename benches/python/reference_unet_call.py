#!/usr/bin/env python3
"""One EchoMimic denoising UNet call at the released widths, on the official code.

The like-for-like partner of `benches/benches/kernels.rs --parts ref,cfg,acc` (ours): the
official `EchoUNet3DConditionModel` (BadToBest/EchoMimic @ 76cdab1) built from the released
sd-image-variations UNet config with the released `configs/inference/inference_v2.yaml`
kwargs (motion modules, audio cross-attention width 384), default (random) initialisation,
the reference UNet's bank written by the official `ReferenceAttentionControl` and read by the
denoising UNet, then one call on `frames` frames of an `l`x`l` latent: CFG (batch 2, zero audio
for the unconditional half) or acc (batch 1). The reference UNet call itself is timed too.
Prints one JSON line per part with the best of `--iters` timed calls (after one warm-up).

    OMP_NUM_THREADS=2 python benches/python/reference_unet_call.py --reference-dir EchoMimic \
        --latents 8,16 --parts ref,cfg --frames 12 --iters 2 --threads 2

Nothing here is copied from the reference; it is only imported.
"""

import argparse
import json
import os
import sys
import time

import torch

# The released UNet config (sd-image-variations-diffusers/unet/config.json); its
# _diffusers_version and sample_size do not change the network.
RELEASED_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
AUDIO_TOKENS = 50


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-dir", required=True, help="BadToBest/EchoMimic at 76cdab1 (P1-patched)")
    p.add_argument("--inference-config", default=None,
                   help="inference_v2.yaml (default: the one in --reference-dir)")
    p.add_argument("--parts", default="ref,cfg", help="comma list of ref, cfg, acc")
    p.add_argument("--latents", default="8", help="comma list of latent sizes (8 = a 64² image)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def best_of(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main():
    a = parse_args()
    sys.path.insert(0, os.path.abspath(a.reference_dir))
    from omegaconf import OmegaConf

    from src.models.mutual_self_attention import ReferenceAttentionControl
    from src.models.unet_2d_condition import UNet2DConditionModel
    from src.models.unet_3d_echo import EchoUNet3DConditionModel

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    parts = a.parts.split(",")
    infer = OmegaConf.load(a.inference_config
                           or os.path.join(a.reference_dir, "configs/inference/inference_v2.yaml"))
    extra = OmegaConf.to_container(infer.unet_additional_kwargs)

    t0 = time.perf_counter()
    reference = UNet2DConditionModel.from_config(RELEASED_UNET).eval()
    # what EchoUNet3DConditionModel.from_pretrained_2d does before it loads weights
    config3d = dict(RELEASED_UNET, _class_name="EchoUNet3DConditionModel",
                    down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                    up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
                    mid_block_type="UNetMidBlock3DCrossAttn")
    denoising = EchoUNet3DConditionModel.from_config(config3d, **extra).eval()
    build_s = time.perf_counter() - t0
    audio_dim = extra["cross_attention_dim"]
    first = RELEASED_UNET["block_out_channels"][0]

    latents = [int(x) for x in a.latents.split(",")]
    with torch.inference_mode():
        # the reference UNet alone first, before any hook makes it write a bank
        for l in latents if "ref" in parts else []:
            ref_latent = torch.randn(1, 4, l, l)
            best, times = best_of(lambda: reference(ref_latent, torch.zeros(()), encoder_hidden_states=None,
                                                    return_dict=False), a.iters)
            print(json.dumps({"part": "reference_unet", "latent": l, "best_s": best, "times": times,
                              "threads": a.threads, "build_s": build_s}), flush=True)
        for l in latents:
            ref_latent = torch.randn(1, 4, l, l)
            for key, b in (("acc", 1), ("cfg", 2)):
                if key not in parts:
                    continue
                cfg = b == 2
                writer = ReferenceAttentionControl(reference, do_classifier_free_guidance=cfg, mode="write",
                                                   batch_size=1, fusion_blocks="full")
                reader = ReferenceAttentionControl(denoising, do_classifier_free_guidance=cfg, mode="read",
                                                   batch_size=1, fusion_blocks="full")
                reference(ref_latent, torch.zeros(()), encoder_hidden_states=None, return_dict=False)
                reader.update(writer, do_classifier_free_guidance=cfg)
                x = torch.randn(b, 4, a.frames, l, l)
                audio = torch.randn(b, a.frames, AUDIO_TOKENS, audio_dim)
                face = torch.randn(b, first, 1, l, l)
                t = torch.tensor(999)

                def call():
                    return denoising(x, t, encoder_hidden_states=None, audio_cond_fea=audio,
                                     face_musk_fea=face, return_dict=False)[0]

                best, times = best_of(call, a.iters)
                print(json.dumps({"part": f"denoising_unet_{key}_{a.frames}frames", "latent": l,
                                  "best_s": best, "times": times, "threads": a.threads}), flush=True)
                reader.clear()
                writer.clear()


if __name__ == "__main__":
    main()
