#!/usr/bin/env python3
"""Makes the `midsize` golden set (testdata/golden/midsize) with the reference PyTorch code.

Our own script: it builds random-weight networks in the official `pretrained_weights/`
layout at mid-size, non-square shapes, runs the official EchoMimic v1 modules on them
(CPU, float32) and stores inputs and outputs; it then reruns every computation in
float64 to measure the float32 error of the reference itself, from which the
tolerances in `manifest.json` are derived. See testdata/golden/midsize/README.md.

Usage (the reference checkout must carry the two CPU patches P1/P2 described in the
README; a venv with the reference's pinned packages):

    ECHOMIMIC_REF=/path/to/EchoMimic python scripts/golden/make_midsize.py OUT_DIR

Nothing here is copied from the reference; it is only imported.
"""

import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch

REF = os.environ.get("ECHOMIMIC_REF")
if not REF:
    sys.exit("set ECHOMIMIC_REF to a (P1/P2-patched) BadToBest/EchoMimic checkout")
sys.path.insert(0, REF)

from diffusers import AutoencoderKL  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from diffusers import DDIMScheduler  # noqa: E402

from src.models.face_locator import FaceLocator  # noqa: E402
from src.models.mutual_self_attention import ReferenceAttentionControl  # noqa: E402
from src.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from src.models.unet_3d_echo import EchoUNet3DConditionModel  # noqa: E402
from src.models.whisper.audio2feature import load_audio_model  # noqa: E402
from src.pipelines.pipeline_echo_mimic import Audio2VideoPipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches/python"))
import reference_face  # noqa: E402  (the official script's face handling)

SEED = 20261204
# Sizes. Every UNet width is a multiple of 32 (the motion module's GroupNorm has 32
# groups hard-coded); GroupNorm uses 32 groups everywhere (1 or 5 channels per
# group, up to 10 in the up blocks' concatenations); latents are non-square and reach
# an odd size (3x5) at the deepest level; the VAE runs at odd latent sizes.
# Attention heads per block (diffusers' `attention_head_dim` list): head dim 16 at 32
# channels and 40 in the mid block (160 channels, 4 heads); the motion modules (2 heads)
# have head dims 16 and 80 (160 channels): the released model's 40 and 80.
UNET = dict(block_out_channels=[32, 32, 32, 160], layers_per_block=1,
            attention_head_dim=[2, 2, 2, 4], norm_num_groups=32, cross_attention_dim=48)
MM_HEADS = 2
AUDIO_DIM = 32  # whisper width (cross_attention_dim of the denoising UNet)
AUDIO_TOKENS = 50
VAE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32)
FACE_LOCATOR = [16, 32, 64, 96]
LATENT_HW = (24, 40)  # UNet latents (h, w): a 192x320 video
VAE_LATENT_HW = (13, 21)  # VAE: 104x168 images, odd latent sizes
FRAMES = 12  # one context window
MM_PROBE = "mid_block.motion_modules.0"  # 160 channels (head dim 80), 3x5, 12 frames
MM_PROBE_HW = (3, 5)
RESNET_PROBE = "up_blocks.0.resnets.0"  # 320 -> 160 channels, 1x1 shortcut, 10 channels/group
TIMESTEP = 666
# The whole pipeline, as infer_audio2vid.py runs it, on the public set's photo and speech:
# a 160x96 video (latents 12x20, down to 2x3 in the UNets; small enough to commit the
# float32 video), 16 frames = two 12-frame windows overlapping by 3 (so the window
# averaging runs), 2 DDIM steps with classifier-free guidance.
VIDEO = dict(W=160, H=96, L=16, steps=2, cfg=2.5, fps=24, context_frames=12,
             context_overlap=3, pipe_seed=420)
PUBLIC = Path(__file__).resolve().parents[2] / "testdata/golden/public"


def unet_config():
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.24.0",
        "act_fn": "silu",
        "attention_head_dim": UNET["attention_head_dim"],
        "block_out_channels": UNET["block_out_channels"],
        "center_input_sample": False,
        "cross_attention_dim": UNET["cross_attention_dim"],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": UNET["layers_per_block"],
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": UNET["norm_num_groups"],
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


def vae_config():
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.24.0",
        "act_fn": "silu",
        "block_out_channels": VAE["block_out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": VAE["layers_per_block"],
        "norm_num_groups": VAE["norm_num_groups"],
        "out_channels": 3,
        "sample_size": 128,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def inference_yaml():
    return {
        "unet_additional_kwargs": {
            "use_inflated_groupnorm": True,
            "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False,
            "use_motion_module": True,
            "cross_attention_dim": AUDIO_DIM,
            "motion_module_resolutions": [1, 2, 4, 8],
            "motion_module_mid_block": True,
            "motion_module_decoder_only": False,
            "motion_module_type": "Vanilla",
            "motion_module_kwargs": {
                "num_attention_heads": MM_HEADS,
                "num_transformer_block": 1,
                "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                "temporal_position_encoding": True,
                "temporal_position_encoding_max_len": 32,
                "temporal_attention_dim_div": 1,
            },
        },
        "noise_scheduler_kwargs": {
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
            "clip_sample": False, "steps_offset": 1, "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
        },
        "sampler": "DDIM",
    }


PROMPT = """\
pretrained_base_model_path: ./pretrained_weights/sd-image-variations-diffusers/
pretrained_vae_path: ./pretrained_weights/sd-vae-ft-mse/
audio_model_path: ../public/pretrained_weights/audio_processor/whisper_tiny.pt
denoising_unet_path: ./pretrained_weights/denoising_unet.pth
reference_unet_path: ./pretrained_weights/reference_unet.pth
face_locator_path: ./pretrained_weights/face_locator.pth
motion_module_path: ./pretrained_weights/motion_module.pth
inference_config: ./configs/inference/inference_midsize.yaml
weight_dtype: fp32
test_cases:
  ../public/inputs/astronaut.png:
  - ../public/inputs/speech.wav
"""


def randomise(module, gen):
    """Random init of every parameter (buffers untouched), then rounded to fp16 so
    that the fp16 files we store hold exactly the weights the run used."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            elif leaf == "weight":  # norm scales
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:  # biases
                v = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(v.half().float())


def half_state(sd, keep_fp32=()):
    return OrderedDict((k, v if any(s in k for s in keep_fp32) else v.half()) for k, v in sd.items())


def randn_f16(gen, *shape):
    """Random N(0,1) input, rounded to fp16 (stored as fp16: exact)."""
    return torch.randn(shape, generator=gen).half().float()


def writer_banks(ref_unet, latents):
    """Runs the reference UNet in write mode; returns ({module name: bank}, output)."""
    names = {id(m): n for n, m in ref_unet.named_modules()}
    writer = ReferenceAttentionControl(ref_unet, do_classifier_free_guidance=True, mode="write",
                                       batch_size=1, fusion_blocks="full")
    out = ref_unet(latents, torch.zeros((), dtype=torch.long), encoder_hidden_states=None,
                   return_dict=False)[0]
    banks = {}
    for n, m in ref_unet.named_modules():
        if hasattr(m, "bank") and m.bank:
            assert len(m.bank) == 1, n
            banks[names[id(m)]] = m.bank[0].clone()
    return writer, banks, out


def measure(ref32, ref64):
    a, b = ref32.double(), ref64.double()
    d = (a - b).abs()
    return {
        "max_abs_ref": float(b.abs().max()),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
    }


def atol_rule(m):
    """The public set's rule: max(10 x measured, 2e-6 x max|ref|, 1e-6), rounded up to
    one significant digit."""
    atol = max(10 * m["max_abs_diff"], 2e-6 * m["max_abs_ref"], 1e-6)
    unit = 10 ** math.floor(math.log10(atol))
    return math.ceil(atol / unit * (1 - 1e-9)) * unit


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    pw = out / "pretrained_weights"
    (pw / "sd-image-variations-diffusers/unet").mkdir(parents=True, exist_ok=True)
    (pw / "sd-vae-ft-mse").mkdir(parents=True, exist_ok=True)
    (out / "configs/inference").mkdir(parents=True, exist_ok=True)
    (out / "configs/prompts").mkdir(parents=True, exist_ok=True)
    (out / "tensors").mkdir(parents=True, exist_ok=True)
    base = pw / "sd-image-variations-diffusers"
    (base / "unet/config.json").write_text(json.dumps(unet_config(), indent=2) + "\n")
    (pw / "sd-vae-ft-mse/config.json").write_text(json.dumps(vae_config(), indent=2) + "\n")
    inf_path = out / "configs/inference/inference_midsize.yaml"
    OmegaConf.save(OmegaConf.create(inference_yaml()), inf_path)
    (out / "configs/prompts/animation_midsize.yaml").write_text(PROMPT)
    infer = OmegaConf.load(inf_path)

    # ---- weights, saved in the official layout (fp16) ----
    vae = AutoencoderKL.from_config(vae_config())
    randomise(vae, gen)
    with torch.no_grad():  # keep the decoder's output in a sane range (as the public set)
        vae.decoder.conv_out.weight.mul_(0.5)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()},
              pw / "sd-vae-ft-mse/diffusion_pytorch_model.safetensors")

    ref_unet = UNet2DConditionModel.from_config(unet_config())
    randomise(ref_unet, gen)
    # The base-model weights file is a loader-only placeholder: every value is
    # overwritten by reference_unet.pth / denoising_unet.pth. Written for the
    # official loader, not committed (see the README).
    save_file({k: v.half().contiguous() for k, v in ref_unet.state_dict().items()},
              base / "unet/diffusion_pytorch_model.safetensors")
    torch.save(half_state(ref_unet.state_dict()), pw / "reference_unet.pth")

    den_tmp = EchoUNet3DConditionModel.from_pretrained_2d(
        base, "", subfolder="unet",
        unet_additional_kwargs=OmegaConf.to_container(infer.unet_additional_kwargs))
    randomise(den_tmp, gen)
    sd = den_tmp.state_dict()
    torch.save(half_state(OrderedDict((k, v) for k, v in sd.items() if "motion_modules." in k),
                          keep_fp32=("pos_encoder.pe",)), pw / "motion_module.pth")
    torch.save(half_state(OrderedDict((k, v) for k, v in sd.items() if "motion_modules." not in k)),
               pw / "denoising_unet.pth")
    del den_tmp

    fl = FaceLocator(UNET["block_out_channels"][0], conditioning_channels=1,
                     block_out_channels=tuple(FACE_LOCATOR))
    randomise(fl, gen)
    torch.save(half_state(fl.state_dict()), pw / "face_locator.pth")

    # ---- load everything back the official way (infer_audio2vid.py) ----
    vae = AutoencoderKL.from_pretrained(pw / "sd-vae-ft-mse").to(dtype=torch.float32)
    ref_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(dtype=torch.float32)
    ref_unet.load_state_dict(torch.load(pw / "reference_unet.pth", map_location="cpu"))
    den = EchoUNet3DConditionModel.from_pretrained_2d(
        base, pw / "motion_module.pth", subfolder="unet",
        unet_additional_kwargs=infer.unet_additional_kwargs).to(dtype=torch.float32)
    missing = den.load_state_dict(torch.load(pw / "denoising_unet.pth", map_location="cpu"),
                                  strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    fl = FaceLocator(UNET["block_out_channels"][0], conditioning_channels=1,
                     block_out_channels=tuple(FACE_LOCATOR))
    fl.load_state_dict(torch.load(pw / "face_locator.pth"))
    for m in (vae, ref_unet, den, fl):
        m.eval()

    def f64(m):
        import copy
        return copy.deepcopy(m).double()

    measured, atol = {}, {}

    def record(key, t32, t64):
        m = measure(t32, t64)
        measured[key] = m
        atol[key] = atol_rule(m)
        print(f"{key}: max|ref| {m['max_abs_ref']:.4g} fp32-vs-fp64 {m['max_abs_diff']:.3g} "
              f"-> atol {atol[key]:.1g}", flush=True)

    torch.set_grad_enabled(False)
    h, w = LATENT_HW

    # ---- VAE ----
    vh, vw = VAE_LATENT_HW
    img = (torch.rand((1, 3, 8 * vh, 8 * vw), generator=gen) * 2 - 1).half().float()
    z = randn_f16(gen, 1, 4, vh, vw)
    vae64 = f64(vae)
    enc = vae.encode(img).latent_dist
    enc64 = vae64.encode(img.double()).latent_dist
    dec = vae.decode(z).sample
    dec64 = vae64.decode(z.double()).sample
    record("vae.encode.mean", enc.mean, enc64.mean)
    record("vae.encode.logvar", enc.logvar, enc64.logvar)
    record("vae.decode.output", dec, dec64)
    save_file({"encode.input": img.half(), "encode.mean": enc.mean.contiguous(),
               "encode.logvar": enc.logvar.contiguous(), "decode.input": z.half(),
               "decode.output": dec.contiguous()}, out / "tensors/vae.safetensors")
    del vae64

    # ---- face locator ----
    mask = torch.rand((1, 1, 1, 8 * h, 8 * w), generator=gen).half().float()
    flo = fl(mask)
    flo64 = f64(fl)(mask.double())
    record("face_locator.output", flo, flo64)
    save_file({"input": mask.half(), "output": flo.contiguous()},
              out / "tensors/face_locator.safetensors")

    # ---- reference UNet + banks ----
    lat = randn_f16(gen, 1, 4, h, w)
    writer, banks, ref_out = writer_banks(ref_unet, lat)
    ref64 = f64(ref_unet)
    _, banks64, ref_out64 = writer_banks(ref64, lat.double())
    record("reference_unet.output.sample", ref_out, ref_out64)
    worst = None
    for k in banks:
        m = measure(banks[k], banks64[k])
        if worst is None or m["max_abs_diff"] > worst["max_abs_diff"]:
            worst = dict(m)
        worst["max_abs_ref"] = max(worst["max_abs_ref"], m["max_abs_ref"])
    measured["reference_unet.bank.*"] = worst
    atol["reference_unet.bank.*"] = atol_rule(worst)
    print(f"reference_unet.bank.*: {worst} -> {atol['reference_unet.bank.*']:.1g}")
    t_ref = {"input.latents": lat.half(), "input.timestep": torch.tensor(0, dtype=torch.int64),
             "output.sample": ref_out.contiguous()}
    t_ref.update({f"bank.{k}": v.contiguous() for k, v in banks.items()})
    save_file(t_ref, out / "tensors/reference_unet.safetensors")

    # ---- denoising UNet, one CFG window; banks from the fp32 writer, cast to fp16 by
    # the official update() in both runs (no rounding-boundary flips) ----
    sample = randn_f16(gen, 2, 4, FRAMES, h, w)
    audio = randn_f16(gen, 2, FRAMES, AUDIO_TOKENS, AUDIO_DIM)
    face = randn_f16(gen, 2, UNET["block_out_channels"][0], 1, h, w)
    t = torch.tensor(TIMESTEP, dtype=torch.int64)
    # One layer seen on its own as well: inside the whole network a small error in one
    # channel of a deep, 3x5 layer is diluted below the network's tolerance.
    seen = {}

    def probe(tag):
        def hook(module, args, output):
            seen[tag] = (args[0].detach().clone(), args[1].detach().clone(), output.detach().clone())
        return hook

    hooks = [dict(den.named_modules())[RESNET_PROBE].register_forward_hook(probe("f32"))]
    reader = ReferenceAttentionControl(den, do_classifier_free_guidance=True, mode="read",
                                       batch_size=1, fusion_blocks="full")
    reader.update(writer, do_classifier_free_guidance=True)
    dout = den(sample, t, encoder_hidden_states=None, audio_cond_fea=audio,
               face_musk_fea=face, return_dict=False)[0]
    for h_ in hooks:  # before the copy: deepcopy would copy the hook too
        h_.remove()
    den64 = f64(den)
    hooks = [dict(den64.named_modules())[RESNET_PROBE].register_forward_hook(probe("f64"))]
    reader64 = ReferenceAttentionControl(den64, do_classifier_free_guidance=True, mode="read",
                                         batch_size=1, fusion_blocks="full")
    reader64.update(writer, do_classifier_free_guidance=True)
    dout64 = den64(sample.double(), t, encoder_hidden_states=None, audio_cond_fea=audio.double(),
                   face_musk_fea=face.double(), return_dict=False)[0]
    record("denoising_unet.output.sample", dout, dout64)
    save_file({"input.sample": sample.half(), "input.audio_cond_fea": audio.half(),
               "input.face_musk_fea": face.half(), "input.timestep": t,
               "output.sample": dout.contiguous()}, out / "tensors/denoising_unet.safetensors")
    reader.clear()
    writer.clear()
    for h_ in hooks:
        h_.remove()
    (x32, temb32, y32), (x64, temb64, y64) = seen["f32"], seen["f64"]
    assert x32.dtype == torch.float32 and x64.dtype == torch.float64
    assert torch.equal(temb32[0], temb32[1]), "one timestep for both CFG rows"
    # The layer's float64 run from the float32 run's input, so that only the layer's own
    # rounding is measured.
    res64 = dict(den64.named_modules())[RESNET_PROBE]
    y64 = res64(x32.double(), temb32.double())
    record("resnet.output", y32, y64)
    save_file({"input": x32.contiguous(), "temb": temb32[:1].contiguous(),
               "output": y32.contiguous()}, out / "tensors/resnet.safetensors")

    # ---- motion module ----
    mm = dict(den.named_modules())[MM_PROBE]
    mm64 = dict(den64.named_modules())[MM_PROBE]
    c = UNET["block_out_channels"][-1]
    x = randn_f16(gen, 2, c, FRAMES, *MM_PROBE_HW)
    y = mm(x, None, None)
    y64 = mm64(x.double(), None, None)
    record("motion_module.output", y, y64)
    save_file({"input": x.half(), "output": y.contiguous()},
              out / "tensors/motion_module.safetensors")

    # ---- the whole pipeline (free-running, seeded noise) ----
    # Float32 as the official script runs it; then the same call with every network in
    # float64, the same face inputs, Whisper features (the audio model is not a pipeline
    # module: it stays float32 in both runs) and the float32 run's initial noise.
    scheduler = DDIMScheduler(**OmegaConf.to_container(infer.noise_scheduler_kwargs))
    audio_model = load_audio_model(model_path=str(PUBLIC / "pretrained_weights/audio_processor/whisper_tiny.pt"),
                                   device="cpu")
    pipe = Audio2VideoPipeline(vae=vae, reference_unet=ref_unet, denoising_unet=den,
                               audio_guider=audio_model, face_locator=fl, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    detector = reference_face.face_detector("cpu")
    photo = str(PUBLIC / "inputs/astronaut.png")
    speech = str(PUBLIC / "inputs/speech.wav")
    ref_pil, mask = reference_face.face_inputs(photo, VIDEO["W"], VIDEO["H"], detector,
                                               torch.float32, "cpu")
    made = {}
    prepare = pipe.prepare_latents

    def recording_prepare(*a, **k):
        made["latents_init"] = prepare(*a, **k)
        return made["latents_init"]

    def run(p, face_mask):
        return p(ref_pil, speech, face_mask, VIDEO["W"], VIDEO["H"], VIDEO["L"], VIDEO["steps"],
                 VIDEO["cfg"], generator=torch.manual_seed(VIDEO["pipe_seed"]),
                 audio_sample_rate=16000, context_frames=VIDEO["context_frames"],
                 fps=VIDEO["fps"], context_overlap=VIDEO["context_overlap"]).videos

    pipe.prepare_latents = recording_prepare
    video = run(pipe, mask)
    pipe64 = Audio2VideoPipeline(vae=f64(vae), reference_unet=f64(ref_unet),
                                 denoising_unet=den64, audio_guider=audio_model,
                                 face_locator=f64(fl), scheduler=DDIMScheduler(
                                     **OmegaConf.to_container(infer.noise_scheduler_kwargs)))
    pipe64.set_progress_bar_config(disable=True)
    pipe64.prepare_latents = lambda *a, **k: made["latents_init"].double()
    video64 = run(pipe64, mask.double())
    record("pipeline.video", video, video64)
    measured["pipeline.latents_init"] = measure(made["latents_init"], made["latents_init"])
    atol["pipeline.latents_init"] = atol_rule(measured["pipeline.latents_init"])

    def frames(v):  # (F, H, W, 3) uint8 by truncation, as save_videos_grid writes them
        return (v[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).to(torch.uint8)

    f32, f64_ = frames(video.float()), frames(video64)
    differ = (f32.int() - f64_.int()).abs()
    measured["pipeline.frames_uint8"] = {
        "max_abs_diff": int(differ.max()),
        "frac_pixels_differing": float((differ > 0).double().mean()),
    }
    print(f"pipeline.frames_uint8: {measured['pipeline.frames_uint8']}", flush=True)
    save_file({"latents_init": made["latents_init"].contiguous(),
               "video": video.float().contiguous(), "frames_uint8": f32.contiguous()},
              out / "tensors/pipeline.safetensors")

    manifest = {
        "set": "midsize",
        "echomimic_commit": "76cdab1a08cf5f10d9f9fa88957b976e4ea863f8",
        "generator": "scripts/golden/make_midsize.py",
        "config": {
            "seed": SEED,
            "unet": UNET,
            "mm": {"num_attention_heads": MM_HEADS, "temporal_position_encoding_max_len": 32},
            "audio_dim": AUDIO_DIM,
            "vae": VAE,
            "face_locator": FACE_LOCATOR,
            "latent_hw": list(LATENT_HW),
            "vae_latent_hw": list(VAE_LATENT_HW),
            "frames": FRAMES,
            "timestep": TIMESTEP,
            "motion_module": MM_PROBE,
            "resnet": RESNET_PROBE,
            **VIDEO,
        },
        "tolerances_measured": measured,
        "atol": atol,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
