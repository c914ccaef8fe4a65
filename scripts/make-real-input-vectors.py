#!/usr/bin/env python3
"""Makes testdata/inputs/real: what the reference decodes, crops and hears from real inputs.

Our own script. It runs the official EchoMimic v1 code (BadToBest/EchoMimic @ 76cdab1, with the
CPU patches P1/P2 of testdata/golden/public/README.md) and its pinned packages (opencv 4.11,
facenet-pytorch 2.5.0, torch 2.2.2, the vendored Whisper with ffmpeg) on real photos and real
speech, and writes what CI compares ours against without Python
(echomimic-pipeline/tests/real_inputs.rs):

  expected.json          per photo: the shape and an FNV-1a 64 fingerprint of the RGB bytes
                         cv2.imread returns; per photo and output size: the face crop and mask
                         infer_audio2vid.py makes (fingerprints of the resized crop, RGB, and of
                         the resized mask); per speech file: the feature array's shape
  features.safetensors   per speech file: Audio2Feature.audio2feat(path) (every encoder layer,
                         float32) with the public golden set's tiny random Whisper

    ECHOMIMIC_REF=/path/to/EchoMimic python scripts/make-real-input-vectors.py

Inputs (testdata/inputs, see NOTICE.md): echomimic_a.png and echomimic_b.png (real portraits,
JPEGs named .png), echomimic_en.wav (real speech, 24 kHz mono), echomimic_en_girl_44k.mp3 (real
speech, 44.1 kHz stereo MP3 made from the reference's echomimic_en_girl.wav by ffmpeg, see
NOTICE.md). Nothing here is copied from the reference; it is only imported.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = os.environ.get("ECHOMIMIC_REF")
if not REF:
    sys.exit("set ECHOMIMIC_REF to a (P1/P2-patched) BadToBest/EchoMimic checkout")
sys.path.insert(0, REF)
sys.path.insert(0, str(ROOT / "benches/python"))
sys.path.insert(0, str(ROOT / "scripts"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import reference_face  # noqa: E402  (the official script's face handling)
from fingerprint import fnv1a64  # noqa: E402
from src.models.whisper.audio2feature import load_audio_model  # noqa: E402

INPUTS = ROOT / "testdata/inputs"
OUT = INPUTS / "real"
PHOTOS = ["echomimic_a.png", "echomimic_b.png"]
SIZES = [(512, 512), (320, 192)]
SPEECH = ["echomimic_en.wav", "echomimic_en_girl_44k.mp3"]
WHISPER = ROOT / "testdata/golden/public/pretrained_weights/audio_processor/whisper_tiny.pt"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    expected = {"photos": {}, "speech": {}}
    detector = reference_face.face_detector("cpu")
    for name in PHOTOS:
        path = str(INPUTS / name)
        rgb = np.ascontiguousarray(cv2.imread(path)[:, :, ::-1])
        crops = {}
        for w, h in SIZES:
            ref_pil, mask = reference_face.face_inputs(path, w, h, detector, torch.float32, "cpu")
            face = np.asarray(ref_pil)
            mask_u8 = np.round(mask[0, 0, 0].numpy() * 255.0).astype(np.uint8)
            crops[f"{w}x{h}"] = {
                "face_shape": list(face.shape),
                "face_fnv1a64": fnv1a64(np.ascontiguousarray(face).tobytes()),
                "mask_fnv1a64": fnv1a64(np.ascontiguousarray(mask_u8).tobytes()),
            }
        expected["photos"][name] = {
            "shape": list(rgb.shape),
            "rgb_fnv1a64": fnv1a64(rgb.tobytes()),
            "crops": crops,
        }
        print(name, expected["photos"][name], flush=True)
    audio = load_audio_model(model_path=str(WHISPER), device="cpu")
    tensors = {}
    for name in SPEECH:
        features = audio.audio2feat(str(INPUTS / name))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        expected["speech"][name] = {"feature_shape": list(features.shape)}
        print(name, features.shape, flush=True)
    save_file(tensors, OUT / "features.safetensors")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
