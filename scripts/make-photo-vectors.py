#!/usr/bin/env python3
"""Makes testdata/inputs/photos: JPEG and PNG variants of a real photo and what OpenCV decodes.

Run once with the reference's pinned packages (opencv-python 4.11, Pillow):
    python scripts/make-photo-vectors.py
Writes small JPEGs cut from testdata/inputs/echomimic_a.png (a real portrait, a JPEG) in the
variants people send (baseline/progressive, 4:2:0/4:2:2/4:4:4, grey, CMYK, EXIF-rotated, odd
sizes; PNG 16-bit, alpha, palette, grey) and expected.json: for each, the shape and an FNV-1a 64 fingerprint of the RGB bytes
cv2.imread(path, IMREAD_COLOR) returns (BGR swapped to RGB). CI checks ours against it with no
Python (echomimic-pipeline/tests/photo_opencv.rs).
"""
import io
import json
import pathlib

import sys

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from fingerprint import fnv1a64  # noqa: E402

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "testdata/inputs/photos"
out.mkdir(parents=True, exist_ok=True)
src = root / "testdata/inputs/echomimic_a.png"

photo = cv2.imread(str(src))  # BGR
face = photo[380:700, 500:756]  # 320x256, the face region
odd = photo[401:652, 517:834]  # 251x317

J = cv2.IMWRITE_JPEG_QUALITY
S = cv2.IMWRITE_JPEG_SAMPLING_FACTOR
variants = {
    "baseline_420.jpg": (face, [J, 85]),
    "progressive_420.jpg": (face, [J, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "baseline_444.jpg": (face, [J, 92, S, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]),
    "progressive_422.jpg": (face, [J, 80, S, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                                   cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "odd_size_420.jpg": (odd, [J, 75]),
    "grey.jpg": (cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), [J, 90]),
}
for name, (img, params) in variants.items():
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    (out / name).write_bytes(buf.tobytes())

rgb = Image.fromarray(face[:, :, ::-1].copy())
rgb.convert("CMYK").save(out / "cmyk.jpg", quality=90)
# PNG as people send it: 16-bit, alpha, palette (with transparency), grey, grey + alpha
# (128x128, to keep the lossless files small).
tile = face[100:228, 64:192]
tile_rgb = Image.fromarray(tile[:, :, ::-1].copy())
face16 = (tile.astype(np.uint16) * 257 + np.arange(tile.shape[1], dtype=np.uint16)[None, :, None])
cv2.imwrite(str(out / "rgb16.png"), face16)
bgra = np.dstack([tile, np.linspace(0, 255, tile.shape[1], dtype=np.uint8)[None, :].repeat(tile.shape[0], 0)])
cv2.imwrite(str(out / "rgba.png"), bgra)
pal = tile_rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
pal.save(out / "palette.png", transparency=0)
tile_rgb.convert("L").save(out / "grey.png")
grey16 = (cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
cv2.imwrite(str(out / "grey16.png"), grey16)
tile_rgb.convert("LA").save(out / "grey_alpha.png")

exif = Image.Exif()
exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
rgb.save(out / "exif_rotate_90.jpg", quality=88, exif=exif.tobytes())


expected = {}
files = sorted(p.name for p in out.iterdir() if p.suffix in (".jpg", ".png"))
for name in files + ["../echomimic_a.png"]:
    img = cv2.imread(str(out / name), cv2.IMREAD_COLOR)[:, :, ::-1]
    data = np.ascontiguousarray(img).tobytes()
    expected[name] = {"height": img.shape[0], "width": img.shape[1], "fnv1a64_rgb": fnv1a64(data)}
meta = {"opencv": cv2.__version__, "images": expected}
(out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
print(json.dumps(meta, indent=1))
