"""Card-driven preprocessing: display image in [0, 1] -> the model's input tensor.

Training code (``model_tools/train.py``) calls this same function on PNGs, so the
server and the training loop can never disagree about resizing or scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from xray_triage.inference.card import InputSpec


@dataclass(frozen=True)
class CropBox:
    """The region of the source image the model saw, in source pixel coordinates.

    Heatmaps are mapped back through this box (and the resize) so they land on
    the original image whatever the model's geometry.
    """

    top: int
    left: int
    height: int
    width: int


def model_crop_box(rows: int, cols: int, spec: InputSpec) -> CropBox:
    """Which part of a rows x cols image the model is shown."""
    if spec.resize == "center_crop":
        side = min(rows, cols)
        return CropBox(top=(rows - side) // 2, left=(cols - side) // 2, height=side, width=side)
    return CropBox(top=0, left=0, height=rows, width=cols)


def decode_min_side(spec: InputSpec) -> int:
    """Source pixels the model needs along the image's shorter side: twice its input size.

    A decoder that can stop at a lower resolution (JPEG 2000) may hand over an image this
    small; the final antialiased resize then still averages two or more pixels into each
    input pixel, so the model sees what it would see from the full-size image.
    """
    return 2 * max(spec.height, spec.width)


def resize_for_model(image01: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Crop (if the card says so) and resize with an antialiased bilinear filter."""
    box = model_crop_box(image01.shape[0], image01.shape[1], spec)
    crop = image01[box.top : box.top + box.height, box.left : box.left + box.width]
    if crop.shape == (spec.height, spec.width):
        return crop.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32), mode="F")
    resized = pil.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def to_model_input(image01: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Return a float32 tensor of shape (channels, height, width) for one image."""
    resized = resize_for_model(image01, spec)
    low, high = spec.value_range
    scaled = resized * np.float32(high - low) + np.float32(low)
    stacked = np.repeat(scaled[None, :, :], spec.channels, axis=0)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((stacked - mean) / std).astype(np.float32, copy=False)
