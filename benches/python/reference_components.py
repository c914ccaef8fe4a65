"""The reference's side of the component comparison (scripts/bench-vs-reference.sh).

Times, on the CPU in float32, best of N calls after one warm-up call:
  mtcnn:<photo>      facenet-pytorch MTCNN.detect on the photo as OpenCV reads it
                     (BGR array), configured as EchoMimic's infer_audio2vid.py
  log_mel_30s        the vendored Whisper's log_mel_spectrogram of 30 s of speech
  whisper_tiny_30s   a Whisper-tiny-sized AudioEncoder (width 384, 6 heads,
                     4 layers, random weights) on one 30 s log-mel (3000 frames),
                     with the per-layer embeddings EchoMimic asks for

    python reference_components.py --reference-dir DIR --speech WAV \
        --photo NAME=PATH [--photo ...] --iters 5 --threads 2 > ref.json
"""

import argparse
import json
import os
import sys
import time


def best_of(n, f):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reference-dir", required=True)
    p.add_argument("--speech", required=True, help="speech file, tiled to 30 s")
    p.add_argument("--photo", action="append", default=[], help="NAME=PATH")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    sys.path.insert(0, os.path.abspath(a.reference_dir))

    import cv2
    import numpy as np
    import torch
    from facenet_pytorch import MTCNN

    from src.models.whisper.whisper.audio import load_audio, log_mel_spectrogram
    from src.models.whisper.whisper.model import AudioEncoder

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "iters": a.iters}

    detector = MTCNN(image_size=320, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
                     factor=0.709, post_process=True, device="cpu")
    for spec in a.photo:
        name, path = spec.split("=", 1)
        img = cv2.imread(path)
        if img is None:
            raise SystemExit(f"cannot read {path}")
        boxes, probs = detector.detect(img)
        out[f"mtcnn:{name}"] = best_of(a.iters, lambda: detector.detect(img))
        out[f"mtcnn:{name}:faces"] = 0 if boxes is None else len(boxes)

    clip = load_audio(a.speech)
    wave = np.resize(clip, 30 * 16000).astype(np.float32)
    out["log_mel_30s"] = best_of(a.iters, lambda: log_mel_spectrogram(wave))
    mel = log_mel_spectrogram(wave)[None]
    encoder = AudioEncoder(80, 1500, 384, 6, 4).eval()
    with torch.no_grad():
        out["whisper_tiny_30s"] = best_of(
            a.iters, lambda: encoder(mel, include_embeddings=True))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
