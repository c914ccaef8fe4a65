"""The official infer_audio2vid.py's face handling, for our reference-side scripts.

Shared by `reference_runner.py` (timing) and `scripts/golden/make_midsize.py` (the
midsize set's video): MTCNN's box choice, the mask and crop rectangles, and a
FaceLocator shaped like its checkpoint. The caller puts the reference checkout on
`sys.path` before importing this module (it imports the reference's `src.utils.util`).
Nothing here is copied from the reference; it reproduces what the official script does.
"""

import cv2
import numpy as np
import torch
from PIL import Image

from facenet_pytorch import MTCNN

from src.models.face_locator import FaceLocator
from src.utils.util import crop_and_pad


def face_detector(device):
    """MTCNN with the official script's settings."""
    return MTCNN(image_size=320, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
                 factor=0.709, post_process=True, device=device)


def select_face(det_bboxes, probs):
    """The official script's choice: the largest box with probability > 0.8."""
    if det_bboxes is None or probs is None:
        return None
    kept = [b for b, p in zip(det_bboxes, probs) if p > 0.8]
    if not kept:
        return None
    return sorted(kept, key=lambda b: (b[3] - b[1]) * (b[2] - b[0]), reverse=True)[0]


def face_locator_from(state):
    """A FaceLocator shaped like its checkpoint (the official script hard-codes
    the released widths; the tiny test weights have their own)."""
    widths = [state["conv_in.weight"].shape[0]]
    i = 1
    while f"blocks.{i}.weight" in state:
        widths.append(state[f"blocks.{i}.weight"].shape[0])
        i += 2
    return FaceLocator(
        state["conv_out.weight"].shape[0],
        conditioning_channels=state["conv_in.weight"].shape[1],
        block_out_channels=tuple(widths),
    )


def face_inputs(image, width, height, face_detector, dtype, device,
                facemusk_dilation_ratio=0.1, facecrop_dilation_ratio=0.5):
    """Mask and crop exactly as infer_audio2vid.py computes them: the reference image (PIL)
    and the face mask tensor (1, 1, 1, H, W) in [0, 1]."""
    face_img = cv2.imread(image)
    if face_img is None:
        raise SystemExit(f"cannot read {image}")
    face_mask = np.zeros((face_img.shape[0], face_img.shape[1])).astype("uint8")
    det_bboxes, probs = face_detector.detect(face_img)
    select_bbox = select_face(det_bboxes, probs)
    if select_bbox is None:
        face_mask[:, :] = 255
    else:
        xyxy = np.round(select_bbox[:4]).astype("int")
        rb, re, cb, ce = xyxy[1], xyxy[3], xyxy[0], xyxy[2]
        r_pad = int((re - rb) * facemusk_dilation_ratio)
        c_pad = int((ce - cb) * facemusk_dilation_ratio)
        face_mask[rb - r_pad: re + r_pad, cb - c_pad: ce + c_pad] = 255
        r_pad_crop = int((re - rb) * facecrop_dilation_ratio)
        c_pad_crop = int((ce - cb) * facecrop_dilation_ratio)
        # the official rect, including its c_pad_crop on the bottom edge
        crop_rect = [max(0, cb - c_pad_crop), max(0, rb - r_pad_crop),
                     min(ce + c_pad_crop, face_img.shape[1]),
                     min(re + c_pad_crop, face_img.shape[0])]
        face_img, _ = crop_and_pad(face_img, crop_rect)
        face_mask, _ = crop_and_pad(face_mask, crop_rect)
        face_img = cv2.resize(face_img, (width, height))
        face_mask = cv2.resize(face_mask, (width, height))
    ref_image_pil = Image.fromarray(face_img[:, :, [2, 1, 0]])
    mask = torch.Tensor(face_mask).to(dtype=dtype, device=device)
    return ref_image_pil, mask.unsqueeze(0).unsqueeze(0).unsqueeze(0) / 255.0
