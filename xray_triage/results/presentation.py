"""The presentation state class and the display pipeline for a source image, from its header.

A presentation state replaces the image's default display, so highdicom copies the image's
own Modality LUT / rescale and VOI LUT / window into it (PS3.3 C.11). Real headers trip it:
a DS with a decimal comma ("1,0") stays a string, and LUT Data read as a list of numbers is not
the bytes it wants. ``presentation_source`` repairs a copy the way the pixel pipeline reads the
image (``pipeline.pixels.repair_decimal_strings``: the same numbers the viewer uses) and turns
LUT Data into little-endian words. A colour image (Samples per Pixel 3) gets a Color Softcopy
Presentation State (a grayscale one may only reference single-sample images), with the image's
ICC profile or sRGB.
"""

from __future__ import annotations

import copy
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from xray_triage.pipeline.pixels import repair_decimal_strings, voi_lut_output_bits

LUT_SEQUENCES = ("ModalityLUTSequence", "VOILUTSequence")


def presentation_source(source: Dataset) -> Dataset:
    """A copy of the source header that highdicom can derive the display pipeline from."""
    fixed = copy.deepcopy(source)
    repair_decimal_strings(fixed, source=str(source.get("SOPInstanceUID", "")))
    for keyword in LUT_SEQUENCES:
        for item in fixed.get(keyword, []):
            if "LUTData" in item and not isinstance(item.LUTData, (bytes, bytearray)):
                bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
                values = [item.LUTData] if isinstance(item.LUTData, int) else list(item.LUTData)
                item["LUTData"].VR = "OW"
                item.LUTData = np.asarray(values, dtype=np.uint8 if bits <= 8 else "<u2").tobytes()
    return fixed


def state_voi_lut_range(state: Dataset) -> None:
    """Stretch each 16-bit Softcopy VOI LUT over the 16-bit range when its data use fewer bits.

    A presentation state's VOI LUT entries are 8 or 16 bits (PS3.3 C.11.2.1.1, enumerated), and
    a 16-bit table's output range is 0..65535. An Agfa-style image table declares 16 bits but
    holds 12-bit data (``pipeline.pixels.voi_lut_output_bits``, which the viewer follows); copied
    as it is, it would show almost black-to-grey. Scaling its entries keeps the look the viewer gives.
    """
    for transformation in state.get("SoftcopyVOILUTSequence", []):
        for item in transformation.get("VOILUTSequence", []):
            if "LUTDescriptor" not in item or "LUTData" not in item or int(item.LUTDescriptor[2]) != 16:
                continue
            used = voi_lut_output_bits(item)
            if used >= 16:
                continue
            data = np.frombuffer(bytes(item.LUTData), dtype="<u2").astype(np.uint32)
            item.LUTData = (data * 65535 // ((1 << used) - 1)).astype("<u2").tobytes()


def is_colour(source: Dataset) -> bool:
    return int(source.get("SamplesPerPixel", 1) or 1) > 1


def srgb_profile() -> bytes:
    """An sRGB ICC profile (Pillow's littleCMS) for a colour image that carries none.

    DICOM wants an input-device profile (PS3.3 C.11.15: device class "scnr" or "spac", as
    highdicom checks); littleCMS writes sRGB as a display ("mntr") profile. The colour
    transform is the same, so the header's device class (bytes 12-15, ICC.1 7.2.5) is set to
    "scnr"; littleCMS leaves the profile ID (bytes 84-99) zero, "not calculated", so it stays valid.
    """
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    if profile[84:100] != bytes(16):
        raise ValueError("the sRGB profile carries a profile ID; its device class cannot be changed")
    profile[12:16] = b"scnr"
    return bytes(profile)


def presentation_state(source: Dataset, **kwargs: Any) -> Dataset:
    """A Grayscale (or, for a colour image, Color) Softcopy Presentation State over ``source``;
    ``kwargs`` are highdicom's. ``referenced_images`` is set here, from the repaired copy."""
    fixed = presentation_source(source)
    if is_colour(fixed):
        icc = bytes(fixed.ICCProfile) if "ICCProfile" in fixed else srgb_profile()
        return hd.pr.ColorSoftcopyPresentationState(referenced_images=[fixed], icc_profile=icc, **kwargs)
    state = hd.pr.GrayscaleSoftcopyPresentationState(referenced_images=[fixed], **kwargs)
    state_voi_lut_range(state)
    return state
