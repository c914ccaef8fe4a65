"""One generation with the official EchoMimic v1 pipeline, timed per part.

Drives `Audio2VideoPipeline` the way the official `infer_audio2vid.py` does
(MTCNN face detection, mask and crop, the pipeline call, the video written
with the official `save_videos_grid`, then the speech added with the official
moviepy step), on the CPU in float32, and writes the wall time of each part
as JSON. Used by `scripts/bench-vs-reference.sh`;
the reference code must already carry the two CPU patches (the script applies
them to its own copy).

    python reference_runner.py --reference-dir DIR --config PROMPT.yaml \
        --image PHOTO --audio SPEECH --output OUT.mp4 --timings-json T.json \
        [-W 128 -H 128 -L 16 --steps 3 --cfg 2.5 --context-frames 8 ...]

Relative paths in the prompt yaml are read from the working directory, as the
official script reads them.

Parts (the same boundaries as `echomimic-worker generate --timings-json`):
  import     Python imports of torch/diffusers/the reference code
  load       building every network and loading its weights
  face       photo read, MTCNN detect, mask, crop and resize
  audio      Whisper features and per-frame windows (`audio2feat`,
             `feature2chunks`), from the audio file
  reference  initial noise, face locator, VAE encode of the reference and
             the reference UNet (everything between the audio and the first
             denoising-UNet call)
  denoising  first denoising-UNet call to the end of the DDIM loop
  decoding   latent interpolation and VAE decode of every frame
  write      the deliverable MP4: `write_video` + `write_audio` (with
             --no-audio-track, `write_video` alone)
  write_video  the frames to a silent MP4 (`save_videos_grid`: PyAV,
             libx264 at its defaults, CRF 23)
  write_audio  the official script's last step: moviepy 1.0.3 reads the
             silent MP4 back, adds the speech and writes `--output` (libx264
             at CRF 23 again, AAC); this is what makes an MP4 with sound, as
             `echomimic-worker generate` writes in one pass
  total      from the first line of this script to the written video
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-dir", required=True,
                   help="EchoMimic checkout (with the CPU patches applied)")
    p.add_argument("--config", required=True, help="prompt yaml naming the weights")
    p.add_argument("--image", required=True)
    p.add_argument("--audio", required=True)
    p.add_argument("--output", required=True, help="MP4 to write")
    p.add_argument("--timings-json", required=True)
    p.add_argument("-W", type=int, default=512)
    p.add_argument("-H", type=int, default=512)
    p.add_argument("-L", type=int, default=1200)
    p.add_argument("--seed", type=int, default=420)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=2.5)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--context-frames", type=int, default=12)
    p.add_argument("--context-overlap", type=int, default=3)
    p.add_argument("--facemusk-dilation-ratio", type=float, default=0.1)
    p.add_argument("--facecrop-dilation-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-audio-track", action="store_true",
                   help="stop at the silent MP4 (written to --output), skipping the moviepy step")
    return p.parse_args()


ARGS = parse_args()
sys.path.insert(0, os.path.abspath(ARGS.reference_dir))

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from src.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from src.models.unet_3d_echo import EchoUNet3DConditionModel  # noqa: E402
from src.models.whisper.audio2feature import load_audio_model  # noqa: E402
from src.pipelines.pipeline_echo_mimic import Audio2VideoPipeline  # noqa: E402
from src.utils.util import save_videos_grid  # noqa: E402
from moviepy.editor import AudioFileClip, VideoFileClip  # noqa: E402  (imported as the official script does)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_face  # noqa: E402
from reference_face import face_locator_from  # noqa: E402

T_IMPORTED = time.perf_counter()


def load(config_path, device, dtype):
    config = OmegaConf.load(config_path)

    def path(p):  # relative to the working directory, as the official script reads them
        return os.path.abspath(p)

    infer_config = OmegaConf.load(path(config.inference_config))
    vae = AutoencoderKL.from_pretrained(path(config.pretrained_vae_path)).to(device, dtype=dtype)
    reference_unet = UNet2DConditionModel.from_pretrained(
        path(config.pretrained_base_model_path), subfolder="unet"
    ).to(dtype=dtype, device=device)
    reference_unet.load_state_dict(torch.load(path(config.reference_unet_path), map_location="cpu"))
    denoising_unet = EchoUNet3DConditionModel.from_pretrained_2d(
        path(config.pretrained_base_model_path),
        path(config.motion_module_path),
        subfolder="unet",
        unet_additional_kwargs=infer_config.unet_additional_kwargs,
    ).to(dtype=dtype, device=device)
    denoising_unet.load_state_dict(
        torch.load(path(config.denoising_unet_path), map_location="cpu"), strict=False
    )
    locator_state = torch.load(path(config.face_locator_path), map_location="cpu")
    face_locator = face_locator_from(locator_state).to(dtype=dtype, device=device)
    face_locator.load_state_dict(locator_state)
    audio_processor = load_audio_model(model_path=path(config.audio_model_path), device=device)
    face_detector = reference_face.face_detector(device)
    scheduler = DDIMScheduler(**OmegaConf.to_container(infer_config.noise_scheduler_kwargs))
    pipe = Audio2VideoPipeline(
        vae=vae,
        reference_unet=reference_unet,
        denoising_unet=denoising_unet,
        audio_guider=audio_processor,
        face_locator=face_locator,
        scheduler=scheduler,
    ).to(device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, face_detector


def face_inputs(args, face_detector, dtype, device):
    """Mask and crop exactly as infer_audio2vid.py computes them."""
    return reference_face.face_inputs(
        args.image, args.W, args.H, face_detector, dtype, device,
        facemusk_dilation_ratio=args.facemusk_dilation_ratio,
        facecrop_dilation_ratio=args.facecrop_dilation_ratio)


class Marks:
    """Timestamps taken by wrappers around the pipeline's own callables."""

    def __init__(self, pipe):
        self.t = {}
        self.unet_calls = 0
        guider = pipe.audio_guider
        audio2feat, feature2chunks = guider.audio2feat, guider.feature2chunks

        def timed_audio2feat(*a, **k):
            self.t.setdefault("audio_start", time.perf_counter())
            return audio2feat(*a, **k)

        def timed_feature2chunks(*a, **k):
            out = feature2chunks(*a, **k)
            self.t["audio_end"] = time.perf_counter()
            return out

        guider.audio2feat, guider.feature2chunks = timed_audio2feat, timed_feature2chunks

        def before_unet(_module, _inputs):
            self.t.setdefault("denoising_start", time.perf_counter())
            self.unet_calls += 1

        pipe.denoising_unet.register_forward_pre_hook(before_unet)
        interpolate, decode = pipe.interpolate_latents, pipe.decode_latents

        def timed_interpolate(*a, **k):
            self.t["denoising_end"] = time.perf_counter()
            return interpolate(*a, **k)

        def timed_decode(*a, **k):
            self.t.setdefault("denoising_end", time.perf_counter())
            out = decode(*a, **k)
            self.t["decoding_end"] = time.perf_counter()
            return out

        pipe.interpolate_latents, pipe.decode_latents = timed_interpolate, timed_decode


def main(args):
    torch.set_num_threads(args.threads)
    device, dtype = "cpu", torch.float32
    t = time.perf_counter()
    pipe, face_detector = load(args.config, device, dtype)
    t_loaded = time.perf_counter()
    ref_image_pil, face_mask = face_inputs(args, face_detector, dtype, device)
    t_face = time.perf_counter()
    marks = Marks(pipe)
    with torch.no_grad():
        video = pipe(
            ref_image_pil,
            args.audio,
            face_mask,
            args.W,
            args.H,
            args.L,
            args.steps,
            args.cfg,
            generator=torch.manual_seed(args.seed),
            audio_sample_rate=16000,
            context_frames=args.context_frames,
            fps=args.fps,
            context_overlap=args.context_overlap,
        ).videos
    t_pipe = time.perf_counter()
    output = os.path.abspath(args.output)
    silent = output if args.no_audio_track else os.path.splitext(output)[0] + "_silent.mp4"
    save_videos_grid(video, silent, n_rows=1, fps=args.fps)
    t_video = time.perf_counter()
    if not args.no_audio_track:
        video_clip = VideoFileClip(silent)
        video_clip = video_clip.set_audio(AudioFileClip(args.audio))
        video_clip.write_videofile(output, codec="libx264", audio_codec="aac")
    t_end = time.perf_counter()
    m = marks.t
    timings = {
        "import": T_IMPORTED - T_START,
        "load": t_loaded - t,
        "face": t_face - t_loaded,
        "audio": m["audio_end"] - m["audio_start"],
        "reference": m["denoising_start"] - m["audio_end"],
        "denoising": m["denoising_end"] - m["denoising_start"],
        "decoding": m["decoding_end"] - m["denoising_end"],
        "pipeline": t_pipe - t_face,
        "write": t_end - t_pipe,
        "write_video": t_video - t_pipe,
        "write_audio": t_end - t_video,
        "total": t_end - T_START,
        "frames": int(video.shape[2]),
        "unet_calls": marks.unet_calls,
        "threads": torch.get_num_threads(),
    }
    with open(args.timings_json, "w") as f:
        json.dump(timings, f, indent=1)


if __name__ == "__main__":
    main(ARGS)
