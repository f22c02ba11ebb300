"""From a DICOM dataset (or a PNG/JPEG file) to a display-ready grey image in [0, 1].

The model never sees raw stored values: it sees what a radiologist would see on a
monitor. Every source therefore goes through the same steps, in the order PS3.3
C.11 prescribes:

1. decode the pixel data (pydicom + its pylibjpeg / openjpeg / rle plugins; for
   JPEG 2000, when the caller says how many pixels it needs, only the resolution
   levels that give at least that many, through Pillow's openjpeg ``reduce``),
2. mask to Bits Stored (some devices leave garbage in the unused high bits),
3. Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence),
4. VOI LUT or Window Center / Width when the dataset carries one, otherwise
   the image's own min/max (many DX "for presentation" devices omit the VOI),
5. invert MONOCHROME1 so that 1.0 is always bright (bone, metal).

The result is float32, shape (rows, cols), 0 = black, 1 = white.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

log = logging.getLogger(__name__)

SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class PixelError(ValueError):
    """The image cannot be turned into pixels; the message says why and what to do."""


@dataclass(frozen=True)
class DisplayImage:
    """A decoded image ready for preprocessing, plus how it was obtained."""

    pixels: np.ndarray  # float32 in [0, 1], 1 = bright; the whole image, maybe at reduced resolution
    source_shape: tuple[int, int]  # rows, cols of the stored image (heatmaps map back onto these)
    window: str  # which VOI was applied, for logs and the result record


def dataset_to_display(ds: Dataset, *, source: str = "<dataset>", min_side: int = 0) -> DisplayImage:
    """Decode ``ds`` and apply Modality LUT, VOI and MONOCHROME1 inversion.

    ``min_side`` > 0 allows a reduced-resolution decode whose shorter side is still at
    least ``min_side`` pixels (JPEG 2000 only); ``source_shape`` stays the stored size.
    """
    values = decode_modality_values(ds, source=source, min_side=min_side)
    pixels, window = modality_values_to_display(values, ds)
    return DisplayImage(pixels=pixels, source_shape=stored_shape(ds, values), window=window)


def stored_shape(ds: Dataset, values: np.ndarray) -> tuple[int, int]:
    """Rows, columns of the stored image, also when ``values`` is a reduced decode of it.

    A full decode always has the header's Rows x Columns (pydicom shapes it so), so the
    header is the answer whenever it has both; the decoded shape otherwise.
    """
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    return (rows, cols) if rows and cols else (int(values.shape[0]), int(values.shape[1]))


def decode_modality_values(ds: Dataset, *, source: str = "<dataset>", min_side: int = 0) -> np.ndarray:
    """Steps 1-3: decode, mask to Bits Stored and apply the Modality LUT (float32, first frame).

    Public so that the web viewer renders from exactly the values the model sees. With
    ``min_side`` > 0 a JPEG 2000 image may come back at 1/2, 1/4, ... of its size (see
    :func:`decode_j2k_reduced`); every other image, and the default, is decoded in full.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelError(f"{source}: no Pixel Data (7FE0,0010); the dataset holds no image")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise PixelError(
            f"{source}: Photometric Interpretation (0028,0004) is {photometric or 'missing'!r}; "
            "only MONOCHROME1/MONOCHROME2 radiographs can be triaged"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        log.info("multi-frame image, using first frame", extra={"source": source})
    stored = decode_j2k_reduced(ds, min_side) if min_side > 0 else None
    if stored is None:
        stored = _mask_bits_stored(_decode_full(ds, source), ds)
    return apply_modality_lut(stored, ds).astype(np.float32, copy=False)


def _decode_full(ds: Dataset, source: str) -> np.ndarray:
    """The first frame at full size, through pydicom's decoder plugins."""
    _prefer_fast_decoder(ds)
    try:
        return ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) == 1 else ds.pixel_array[0]
    except Exception as exc:  # decoder plugins raise many types; report them as one
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise PixelError(f"{source}: cannot decode Pixel Data ({ts_name}): {exc}") from exc


def j2k_reduce_factor(rows: int, cols: int, min_side: int) -> int:
    """The largest r such that both sides, divided by 2**r (rounded up), stay >= ``min_side``."""
    r = 0
    while min(math.ceil(rows / 2 ** (r + 1)), math.ceil(cols / 2 ** (r + 1))) >= min_side:
        r += 1
    return r


def decode_j2k_reduced(ds: Dataset, min_side: int) -> np.ndarray | None:
    """Stored values of a JPEG 2000 image at 1/2**r of its size, or None to decode in full.

    A JPEG 2000 code stream holds the image as resolution levels, and a decoder can stop
    at a lower one (openjpeg's ``reduce``, which Pillow exposes) without touching the
    code blocks of the finer levels. A detector's 2800 x 2800 12-bit image then decodes in
    ~0.07 s instead of ~1.1 s here, and a 224-pixel model loses nothing it could use. The
    result is the wavelet low-pass band, i.e. an antialiased downscale of the same image.

    Two details make the values right. Pillow scales a code stream of precision p to the
    full 8 or 16 bits of its mode (GDCM writes p = 16 for 12-bit data, openjpeg's encoder
    p = Bits Stored), so the values are shifted back by the precision openjpeg reads from
    the stream's header. And the low-pass band can overshoot at sharp edges, beyond Bits
    Stored: values are clipped to its range (a bit mask would wrap them to black).

    Only the plain case is taken (one frame, one unsigned sample of 8 or 16 bits); on
    anything else, or any decoder error, None: the caller then decodes in full, and a
    broken stream is reported by that full decode.
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts not in JPEG_2000 or not ds.get("Rows") or not ds.get("Columns"):
        return None
    if (
        int(ds.get("NumberOfFrames", 1) or 1) != 1
        or int(ds.get("SamplesPerPixel", 1) or 1) != 1
        or int(ds.get("PixelRepresentation", 0) or 0) != 0
        or int(ds.get("BitsAllocated", 0) or 0) not in (8, 16)
    ):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    factor = j2k_reduce_factor(rows, cols, min_side)
    if factor == 0:
        return None
    import openjpeg
    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        header = openjpeg.get_parameters(frame)
        with Image.open(io.BytesIO(frame)) as im:
            mode_bits = {"L": 8, "I;16": 16}.get(im.mode, 0)
            shift = mode_bits - int(header["precision"])
            if im.size != (cols, rows) or header["is_signed"] or not 0 <= shift < mode_bits:
                return None
            im.reduce = factor
            im.load()
            stored = np.asarray(im)
    except Exception as exc:  # a stream openjpeg cannot reduce, or a broken one: decode in full
        log.debug("reduced JPEG 2000 decode not possible (%s); decoding in full", exc)
        return None
    if stored.shape != (math.ceil(rows / 2**factor), math.ceil(cols / 2**factor)):
        return None
    bits_stored = int(ds.get("BitsStored", 0) or 0) or mode_bits
    top = (1 << min(bits_stored, mode_bits)) - 1
    return np.minimum(stored >> shift, top).astype(stored.dtype, copy=False)


def modality_values_to_display(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Steps 4-5: the dataset's VOI (or min/max), then MONOCHROME1 inversion; [0, 1], 1 = bright.

    Returns the image and which VOI was applied (``voi_lut``, ``window`` or ``minmax``).
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    values, window = _apply_voi(values, ds)
    lo, hi = float(values.min()), float(values.max())
    if window == "minmax":
        span = hi - lo
        image = (values - lo) / span if span > 0 else np.zeros_like(values)
    else:
        image = values  # _apply_voi already returned [0, 1]
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False), window


def _prefer_fast_decoder(ds: Dataset) -> None:
    """Use CharLS (pyjpegls) for JPEG-LS when installed.

    pydicom would try pylibjpeg-libjpeg first, which decodes a 2800x2800 12-bit
    JPEG-LS image about 4x slower than CharLS here, with identical pixels.
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts in JPEG_LS and _has_module("jpeg_ls"):
        ds.pixel_array_options(decoding_plugin="pyjpegls")


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _mask_bits_stored(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Clear bits above Bits Stored for unsigned data (PS3.5 8.1.1)."""
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0 and 0 < bits_stored < bits_allocated:
        return stored & ((1 << bits_stored) - 1)
    return stored


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Apply the dataset's first VOI LUT or window; return values in [0, 1]."""
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_lut or has_window):
        return values, "minmax"
    try:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32, copy=False)
    except Exception as exc:  # a malformed VOI must not make the image unreadable
        log.warning("ignoring unusable VOI LUT/window: %s", exc)
        return values, "minmax"
    if has_lut:
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return out / float((1 << lut_bits) - 1), "voi_lut"
    # pydicom maps a window onto the output range of the rescaled stored values; find
    # that range by windowing two extreme values rather than re-deriving its rules.
    lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0))
    span = hi - lo
    return ((out - lo) / span if span > 0 else np.zeros_like(out)), "window"


def read_dicom(path: Path, source: str = "") -> Dataset:
    """The dataset of a DICOM file; ``PixelError`` naming ``source`` (default: the path) if unreadable."""
    label = source or str(path)
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise PixelError(f"{label}: the DICOM file is missing") from exc
    except Exception as exc:
        raise PixelError(f"{label}: not a readable DICOM file ({exc})") from exc


def read_dicom_display(path: Path, *, min_side: int = 0) -> DisplayImage:
    """Read a DICOM file from disk and decode it for display (``min_side``: see ``dataset_to_display``)."""
    return dataset_to_display(read_dicom(path), source=str(path), min_side=min_side)


def read_picture_display(path: Path) -> DisplayImage:
    """Read a PNG/JPEG (8 or 16 bit, grey, RGB or RGBA) as a display image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                top = 65535.0 if arr.max() > 255 else 255.0
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
                top = 255.0
    except Exception as exc:
        raise PixelError(f"{path}: not a readable PNG/JPEG image ({exc})") from exc
    pixels = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    return DisplayImage(pixels=pixels, source_shape=pixels.shape[:2], window="picture")


def read_any_display(path: Path, *, min_side: int = 0) -> DisplayImage:
    """DICOM or picture, by suffix (``min_side`` applies to JPEG 2000 DICOM only)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_picture_display(path)
    return read_dicom_display(path, min_side=min_side)
