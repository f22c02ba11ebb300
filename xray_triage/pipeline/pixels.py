"""From a DICOM dataset (or a PNG/JPEG file) to a display-ready grey image in [0, 1].

The model never sees raw stored values: it sees what a radiologist would see on a
monitor. Every source therefore goes through the same steps, in the order of the
grayscale pipeline of PS3.3 C.11 (Modality LUT -> VOI LUT -> Presentation LUT):

0. read the header the way real devices write it: a file without preamble or File
   Meta is read as a raw data set (as dcmtk and GDCM do), and decimal strings written
   with a comma ("1,0") are read as decimals where that is unambiguous, else ignored
   with a note (as fo-dicom does);
1. refuse, before any decoding, a frame larger than ``max_frame_pixels`` (also when
   only a compressed stream's own header declares it: a few hundred kilobytes of
   JPEG-LS can declare gigabytes of pixels);
2. decode the first frame only (pydicom + its pylibjpeg / openjpeg / rle / pyjpegls
   plugins; for JPEG 2000, when the caller says how many pixels it needs, only the
   resolution levels that give at least that many, through Pillow's openjpeg ``reduce``);
3. locate the sample bits: shift down by High Bit + 1 - Bits Stored and clear the bits
   above Bits Stored (PS3.5 8.1.1; some legacy devices store 12 bits at the top of the
   16), and note the Pixel Padding Value / Range Limit pixels (PS3.3 C.7.5.1.1.2);
4. Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence);
5. VOI LUT or Window Center / Width when the dataset carries one, otherwise the min/max
   of the image without its padding (many DX "for presentation" devices omit the VOI);
   a VOI LUT's output range is taken from its data, not its descriptor (Agfa CRs
   declare 16 bits for 12-bit tables; Cornerstone and dcmtk ``+Mv`` do the same);
6. Presentation polarity: 1.0 is always bright (bone, metal). MONOCHROME1 is inverted,
   and so is MONOCHROME2 with Presentation LUT Shape INVERSE; MONOCHROME1 with INVERSE
   is the same single inversion (the DX IOD requires that pair, PS3.3 C.8.11.7).

Colour images (RGB, YBR_* and palette colour secondary captures: film digitisers,
consoles exporting screenshots) become their luminance, Y of ITU-R BT.601 (the Y of
YBR_FULL, PS3.3 C.7.6.3.1.2), shown at their full sample range: a chest film scanned
in colour is still a grey picture, and the model and the viewer both get it.

The result is float32, shape (rows, cols), 0 = black, 1 = white. Every failure is a
:class:`PixelError` whose message names the image (``source``), the tag and what to do.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger(__name__)

MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
# Colour photometric interpretations and the Samples per Pixel each requires (PS3.3 C.7.6.3.1.2).
COLOUR = {
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
    "YBR_PARTIAL_420": 3,
    "PALETTE COLOR": 1,
}
SUPPORTED_PHOTOMETRIC = MONOCHROME | set(COLOUR)
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
HTJ2K = {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
JPEG = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DEFAULT_MAX_FRAME_PIXELS = (
    64_000_000  # 64 megapixels: 8000 x 8000; a 43 x 43 cm detector at 0.1 mm is 4300 x 4300
)
# BT.601 luma weights (ITU-R BT.601, the Y of YBR_FULL in PS3.3 C.7.6.3.1.2), for samples
# wider than 8 bits, which pydicom's convert_color_space does not take.
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class PixelError(ValueError):
    """The image cannot be turned into pixels; the message names the image and says why and what to do.

    ``kind`` says which sort of failure it is, so that a user interface can say it in the
    user's language: ``too_large`` (over ``max_frame_megapixels``), ``unsupported`` (a kind
    of image or header the pipeline does not take) or ``unreadable`` (missing, broken or
    inconsistent data).
    """

    KINDS = ("too_large", "unsupported", "unreadable")

    def __init__(self, message: str, *, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind if kind in self.KINDS else "unreadable"


@dataclass(frozen=True)
class DisplayImage:
    """A decoded image ready for preprocessing, plus how it was obtained."""

    pixels: np.ndarray  # float32 in [0, 1], 1 = bright; the whole image, maybe at reduced resolution
    source_shape: tuple[int, int]  # rows, cols of the stored image (heatmaps map back onto these)
    window: str  # which VOI was applied, for logs and the result record
    notes: tuple[str, ...] = ()  # header quirks tolerated on the way (e.g. a comma in a decimal string)


@dataclass(frozen=True)
class ModalityImage:
    """Steps 0-4: the first frame in Modality-LUT units, with what display needs to know.

    ``values`` is float32 (rows, cols); for a colour image, its luminance in sample units.
    ``padding`` is a bool mask (same shape) of Pixel Padding pixels, or None when the
    dataset declares none. ``inverted``: low values are bright on screen.
    """

    values: np.ndarray
    padding: np.ndarray | None
    inverted: bool
    colour: bool
    notes: tuple[str, ...] = ()


def dataset_to_display(
    ds: Dataset,
    *,
    source: str = "<dataset>",
    min_side: int = 0,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> DisplayImage:
    """Decode ``ds`` and apply Modality LUT, VOI and the presentation polarity.

    ``min_side`` > 0 allows a reduced-resolution decode whose shorter side is still at
    least ``min_side`` pixels (JPEG 2000 only); ``source_shape`` stays the stored size.
    Raises :class:`PixelError` (never anything else) when the image cannot be shown.
    """
    image = decode_modality(ds, source=source, min_side=min_side, max_frame_pixels=max_frame_pixels)
    try:
        pixels, window = modality_values_to_display(image.values, ds, padding=image.padding)
    except PixelError:
        raise
    except Exception as exc:  # numpy/pydicom errors on odd headers must not escape as crashes
        raise PixelError(
            f"{source}: cannot apply the image's display settings ({type(exc).__name__}: {exc})"
        ) from exc
    return DisplayImage(
        pixels=pixels, source_shape=stored_shape(ds, image.values), window=window, notes=image.notes
    )


def stored_shape(ds: Dataset, values: np.ndarray) -> tuple[int, int]:
    """Rows, columns of the stored image, also when ``values`` is a reduced decode of it.

    A full decode always has the header's Rows x Columns (pydicom shapes it so), so the
    header is the answer whenever it has both; the decoded shape otherwise.
    """
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    return (rows, cols) if rows and cols else (int(values.shape[0]), int(values.shape[1]))


def photometric_of(ds: Dataset) -> str:
    """(0028,0004) Photometric Interpretation, upper case and stripped ('' when absent)."""
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def display_inverted(ds: Dataset) -> bool:
    """Whether low values are bright on screen (PS3.3 C.7.6.3.1.2 and C.11.6).

    MONOCHROME1 says so of the stored values, and Presentation LUT Shape INVERSE says so
    of the P-values: either inverts, and both together are one inversion, not two (the DX
    IOD requires INVERSE with MONOCHROME1, PS3.3 C.8.11.7). MONOCHROME1 with IDENTITY, which
    the DX IOD forbids, is still shown inverted: the photometric interpretation describes
    the pixels themselves. (dcmtk would show that pair uninverted.)
    """
    if photometric_of(ds) == "MONOCHROME1":
        return True
    try:
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    except Exception:  # an unreadable optional attribute: no presentation LUT
        return False
    return shape == "INVERSE"


def decode_modality_values(
    ds: Dataset,
    *,
    source: str = "<dataset>",
    min_side: int = 0,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> np.ndarray:
    """The Modality-LUT values of the first frame (float32); see :func:`decode_modality`."""
    return decode_modality(ds, source=source, min_side=min_side, max_frame_pixels=max_frame_pixels).values


def decode_modality(
    ds: Dataset,
    *,
    source: str = "<dataset>",
    min_side: int = 0,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> ModalityImage:
    """Steps 0-4: check, decode the first frame, locate the bits, note padding, Modality LUT.

    Public so that the web viewer renders from exactly the values the model sees. With
    ``min_side`` > 0 a JPEG 2000 image may come back at 1/2, 1/4, ... of its size (see
    :func:`decode_j2k_reduced`); every other image, and the default, is decoded in full.
    Header repairs are made on ``ds`` in memory only (the stored file never changes).
    Raises :class:`PixelError`, and nothing else, when the image cannot be decoded.
    """
    try:
        return _decode_modality(ds, source, min_side, max_frame_pixels)
    except PixelError:
        raise
    except MemoryError as exc:
        raise PixelError(f"{source}: not enough memory to decode the image") from exc
    except Exception as exc:  # whatever a decoder or numpy raises on a quirky file: one clear error
        raise PixelError(f"{source}: cannot read the image's pixels ({type(exc).__name__}: {exc})") from exc


def _decode_modality(ds: Dataset, source: str, min_side: int, max_frame_pixels: int) -> ModalityImage:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelError(f"{source}: no Pixel Data (7FE0,0010); the dataset holds no image")
    notes = tuple(repair_decimal_strings(ds, source))
    photometric = photometric_of(ds)
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise PixelError(
            f"{source}: Photometric Interpretation (0028,0004) is {photometric or 'missing'!r}; "
            "only MONOCHROME1/MONOCHROME2 radiographs and RGB/YBR/palette colour images can be shown",
            kind="unsupported",
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected_samples = COLOUR.get(photometric, 1)
    if samples != expected_samples:
        raise PixelError(
            f"{source}: Samples per Pixel (0028,0002) is {samples} but Photometric Interpretation "
            f"(0028,0004) {photometric} needs {expected_samples}; the pixel data cannot be interpreted",
            kind="unsupported",
        )
    check_frame_size(ds, source=source, max_frame_pixels=max_frame_pixels)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        log.info("multi-frame image, using the first frame", extra={"source": source})
    if photometric in COLOUR:
        return ModalityImage(
            values=_colour_luminance(ds, source), padding=None, inverted=False, colour=True, notes=notes
        )
    stored = None
    if (
        min_side > 0 and "PixelPaddingValue" not in ds
    ):  # padding needs exact values: a low-pass band blurs them
        stored = decode_j2k_reduced(ds, min_side)
    if stored is None:
        stored = locate_sample_bits(_decode_full(ds, source), ds, source)
    padding = padding_mask(stored, ds)
    values = apply_modality_lut(stored, ds).astype(np.float32, copy=False)
    return ModalityImage(
        values=values, padding=padding, inverted=display_inverted(ds), colour=False, notes=notes
    )


def check_frame_size(ds: Dataset, *, source: str, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
    """Refuse, before decoding, a frame of more than ``max_frame_pixels`` (Rows x Columns).

    A decoder allocates what the compressed stream's own header declares, which need not
    match Rows/Columns, so the first fragment's header is read too (openjpeg for JPEG 2000,
    libjpeg for JPEG and JPEG-LS); a stream whose size differs from the header is refused.
    """
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise PixelError(
            f"{source}: Rows (0028,0010) / Columns (0028,0011) missing or zero; the image has no size"
        )
    _refuse_if_too_large(rows, cols, source, max_frame_pixels, "")
    stream = codestream_shape(ds)
    if stream is None:
        return
    s_rows, s_cols = stream
    _refuse_if_too_large(s_rows, s_cols, source, max_frame_pixels, "its compressed stream declares ")
    if (s_rows, s_cols) != (rows, cols):
        raise PixelError(
            f"{source}: the compressed stream is {s_cols} x {s_rows} pixels but Rows (0028,0010) / "
            f"Columns (0028,0011) say {cols} x {rows}; the image is inconsistent and was not decoded"
        )


def _refuse_if_too_large(rows: int, cols: int, source: str, limit: int, what: str) -> None:
    if rows * cols > limit:
        raise PixelError(
            f"{source}: {what}{cols} x {rows} pixels ({rows * cols / 1e6:.0f} megapixels), over the limit of "
            f"{limit / 1e6:g} megapixels per frame (setting max_frame_megapixels); the image was stored but "
            "not decoded",
            kind="too_large",
        )


def codestream_shape(ds: Dataset) -> tuple[int, int] | None:
    """(rows, columns) that the first fragment's JPEG / JPEG-LS / JPEG 2000 header declares.

    None for native pixel data, other transfer syntaxes, or a header the codec library
    cannot read (the decode then reports the broken stream).
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts not in JPEG | JPEG_LS | JPEG_2000 | HTJ2K:
        return None
    try:
        from pydicom.encaps import generate_frames

        number = int(ds.get("NumberOfFrames", 1) or 1)
        frame = next(generate_frames(ds.PixelData, number_of_frames=number))
        if ts in JPEG_2000 | HTJ2K:
            import openjpeg

            params = openjpeg.get_parameters(frame)
        else:
            import libjpeg

            params = libjpeg.get_parameters(frame)
        return int(params["rows"]), int(params["columns"])
    except Exception as exc:  # no library, or a header it cannot parse
        log.debug("cannot read the compressed stream's header: %s", exc)
        return None


def _decode_full(ds: Dataset, source: str) -> np.ndarray:
    """The first frame at full size, through pydicom's decoder plugins (only that frame is decoded)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    options: dict = {}
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        options["index"] = 0
    if ts in JPEG_LS and _has_module("jpeg_ls"):
        # CharLS decodes a 2800x2800 12-bit JPEG-LS image ~4x faster than pylibjpeg-libjpeg, same pixels.
        options["decoding_plugin"] = "pyjpegls"
    if _high_bit_shift(ds):
        # pydicom clears the bits above Bits Stored, which here hold the samples themselves:
        # keep them, locate_sample_bits shifts them down.
        options["correct_unused_bits"] = False
    if options:
        ds.pixel_array_options(**options)
    try:
        return ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types; report them as one
        ts_name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise PixelError(f"{source}: cannot decode Pixel Data ({ts_name}): {exc}") from exc


def _colour_luminance(ds: Dataset, source: str) -> np.ndarray:
    """The first frame of a colour image as BT.601 luminance, float32 in sample units.

    pydicom returns YBR_FULL/_422 as RGB (``as_rgb``, its default) and a palette colour
    image is mapped through its LUTs (``apply_color_lut``); 8-bit RGB goes back to Y with
    pydicom's ``convert_color_space`` (the exact Y of YBR_FULL), wider samples with the
    same BT.601 weights.
    """
    photometric = photometric_of(ds)
    arr = _decode_full(ds, source)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise PixelError(f"{source}: colour Pixel Data decoded to shape {arr.shape}, not rows x columns x 3")
    if arr.dtype == np.uint8:
        return convert_color_space(arr, "RGB", "YBR_FULL")[..., 0].astype(np.float32)
    return (arr.astype(np.float32) @ BT601).astype(np.float32)


def colour_full_scale(ds: Dataset) -> float:
    """The largest sample value of a colour image (white): 2**bits - 1."""
    if photometric_of(ds) == "PALETTE COLOR":
        try:
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception:
            bits = 16
        return float((1 << (8 if bits <= 8 else 16)) - 1)
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 8) or 8)
    return float((1 << bits) - 1)


def locate_sample_bits(stored: np.ndarray, ds: Dataset, source: str) -> np.ndarray:
    """Shift the samples down to bit 0 and clear the bits above Bits Stored (PS3.5 8.1.1).

    High Bit (0028,0102) is normally Bits Stored - 1. Legacy devices may put 12 stored bits
    at the top of 16 (High Bit 15): the samples are shifted down as dcmtk does, for native
    and RLE data (whose layout is the native one); a JPEG-family decoder already returns
    the samples at bit 0, so there High Bit is ignored. Unused high bits may hold garbage
    (overlays, noise): unsigned data is masked to Bits Stored. Signed data whose samples
    are not at bit 0 is refused: pydicom's sign extension has already mixed the bits.
    """
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    if not (0 < bits_stored <= bits_allocated) or stored.dtype.kind not in "ui":
        return stored
    high_bit = ds.get("HighBit")
    high_bit = bits_stored - 1 if high_bit is None else int(high_bit)
    if high_bit < bits_stored - 1 or high_bit >= bits_allocated:
        raise PixelError(
            f"{source}: High Bit (0028,0102) {high_bit} is impossible with Bits Stored (0028,0101) "
            f"{bits_stored} and Bits Allocated (0028,0100) {bits_allocated}; the pixel values cannot be located. "
            "Ask the device's vendor to correct the header",
            kind="unsupported",
        )
    shift = _high_bit_shift(ds)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if signed:
        if shift:
            raise PixelError(
                f"{source}: signed pixel data with High Bit (0028,0102) {high_bit} above Bits Stored (0028,0101) "
                f"- 1 = {bits_stored - 1} is not supported; the image was not decoded",
                kind="unsupported",
            )
        return stored
    if shift == 0 and bits_stored == bits_allocated:
        return stored
    if shift:
        log.info(
            "samples shifted down: High Bit is not Bits Stored - 1", extra={"source": source, "shift": shift}
        )
        stored = stored >> shift
    return stored & stored.dtype.type((1 << bits_stored) - 1)


def _high_bit_shift(ds: Dataset) -> int:
    """High Bit + 1 - Bits Stored for native and RLE pixel data (their layout is the native one), else 0."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False) and ts != "1.2.840.10008.1.2.5":
        return 0
    try:
        bits_stored = int(ds.get("BitsStored", 0) or 0)
        high_bit = ds.get("HighBit")
        shift = 0 if high_bit is None or not bits_stored else int(high_bit) + 1 - bits_stored
    except (TypeError, ValueError):
        return 0
    return max(shift, 0)


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels that are Pixel Padding (PS3.3 C.7.5.1.1.2), in stored values, or None.

    Pixel Padding Value alone marks that value; with Pixel Padding Range Limit, every value
    between the two (inclusive). The values are compared after the bits are located (so a
    padding value written with the unused high bits set still matches). None when the
    dataset declares no padding, or when no pixel or every pixel matches (then the
    declaration is wrong, and leaving it out would leave nothing to show).
    """
    if "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(_ds_items(ds.PixelPaddingValue)[0])
        limit = ds.get("PixelPaddingRangeLimit")
        limit = int(_ds_items(limit)[0]) if limit is not None else value
    except (TypeError, ValueError, IndexError):
        log.warning("ignoring unreadable Pixel Padding Value (0028,0120)")
        return None
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0 and bits_stored:
        value &= (1 << bits_stored) - 1
        limit &= (1 << bits_stored) - 1
    lo, hi = min(value, limit), max(value, limit)
    mask = (stored >= lo) & (stored <= hi)
    if not mask.any() or mask.all():
        return None
    return mask


# ---- decimal strings ---------------------------------------------------------------------

# The DS attributes the pixel pipeline reads, in pairs that are only meaningful together.
PIXEL_DS_PAIRS = (("RescaleSlope", "RescaleIntercept"), ("WindowCenter", "WindowWidth"))
_COMMA_DECIMAL = re.compile(r"^([+-]?\d+),(\d+)([eE][+-]?\d+)?$")


def parse_decimal_string(text: str) -> float:
    """One DS value (PS3.5 6.2) as a float, reading a decimal comma where unambiguous.

    "2047,5" and "1,0" are 2047.5 and 1.0 (devices localised to a comma decimal separator,
    as fo-dicom reads them). "1,000" is ambiguous (a thousands separator reads it as 1000)
    and is refused, as is anything else that is not a finite number: ``ValueError``.
    """
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        match = _COMMA_DECIMAL.match(text)
        if not match or len(match.group(2)) == 3:
            raise ValueError(f"{text!r} is not a decimal number") from None
        number = float(f"{match.group(1)}.{match.group(2)}{match.group(3) or ''}")
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number


def _ds_items(value: object) -> list:
    """The values of an element, whatever pydicom made of it (a number, str, MultiValue)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


def repair_decimal_strings(ds: Dataset, source: str = "<dataset>") -> list[str]:
    """Make the pixel pipeline's DS attributes numbers, in memory; return notes on what changed.

    pydicom keeps an invalid DS (e.g. "1,0") as a string, which numpy then cannot multiply.
    A value with a decimal comma is read as a decimal where unambiguous
    (:func:`parse_decimal_string`). Any other invalid value makes its pair be ignored:
    Rescale Slope / Intercept then default to the identity, a window to the image's own
    range. Each repair is logged as a warning naming the image and the tag.
    """
    notes: list[str] = []
    for pair in PIXEL_DS_PAIRS:
        fixes: dict[str, list[float]] = {}
        bad: list[str] = []
        for keyword in pair:
            if keyword not in ds:
                continue
            element = ds[keyword]
            items = _ds_items(element.value)
            if all(isinstance(item, (int, float)) for item in items):
                continue
            try:
                fixes[keyword] = [
                    float(item) if isinstance(item, (int, float)) else parse_decimal_string(str(item))
                    for item in items
                    if str(item).strip()
                ]
            except ValueError as exc:
                bad.append(f"{keyword} {element.tag}: {exc}")
        if bad:
            for keyword in pair:
                if keyword in ds:
                    del ds[keyword]
            fallback = "identity rescale" if pair[0] == "RescaleSlope" else "the image's own range"
            notes.append(f"{' and '.join(pair)} ignored ({'; '.join(bad)}); using {fallback}")
            continue
        for keyword, numbers in fixes.items():
            element = ds[keyword]
            notes.append(f"{keyword} {element.tag} {element.value!r} read as {numbers}")
            if numbers:
                element.value = numbers[0] if len(numbers) == 1 else numbers
            else:
                del ds[keyword]
    for note in notes:
        log.warning("tolerated invalid decimal string: %s", note, extra={"source": source})
    return notes


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

    Only the plain case is taken (one frame, one unsigned sample of 8 or 16 bits, High
    Bit = Bits Stored - 1); on anything else, or any decoder error, None: the caller then decodes in full, and a
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
        or photometric_of(ds) not in MONOCHROME
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


def modality_values_to_display(
    values: np.ndarray, ds: Dataset, *, padding: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Steps 5-6: the dataset's VOI (or min/max without padding), then polarity; [0, 1], 1 = bright.

    ``padding``: a bool mask of Pixel Padding pixels (:func:`padding_mask`), left out of
    the min/max. Returns the image and which VOI was applied (``voi_lut``, ``window``,
    ``minmax`` or, for a colour image's luminance, ``colour``: its full sample range).
    """
    if photometric_of(ds) in COLOUR:
        image = values / np.float32(colour_full_scale(ds))
        return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False), "colour"
    image, window = _apply_voi(values, ds, padding)
    if display_inverted(ds):
        # The INVERSE Presentation LUT Shape (PS3.3 C.11.6.1.2) on [0, 1]. pydicom's
        # apply_presentation_lut inverts around the image's own maximum instead, which
        # would brighten an image whose window leaves its brightest pixel below white.
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False), window


def unpadded(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """The values that are not Pixel Padding (all of them when there is no padding)."""
    return values if padding is None else values[~padding]


def voi_lut_output_bits(item: Dataset) -> int:
    """Bits of a VOI LUT's output range, from its LUT Data rather than its LUT Descriptor.

    Some CRs (Agfa) declare 16 bits per entry for tables whose data stay within 12; dividing
    by 65535 then shows an almost white image. Like Cornerstone ("we don't trust the
    numBitsPerEntry, mainly thanks to Agfa") and dcmtk's ``+Mv``, the range is the bit
    length of the largest entry. LUT Data as OW is read as pydicom reads it (8-bit entries
    when the descriptor says <= 8 bits, else 16-bit words).
    """
    descriptor_bits = int(item.LUTDescriptor[2])
    element = item["LUTData"]
    if isinstance(element.value, (bytes, bytearray)):
        data = np.frombuffer(element.value, dtype=np.uint8 if descriptor_bits <= 8 else "<u2")
    else:
        data = np.asarray(_ds_items(element.value), dtype=np.int64)
    if data.size == 0:
        return descriptor_bits
    return max(1, int(data.max()).bit_length())


def _apply_voi(values: np.ndarray, ds: Dataset, padding: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Apply the dataset's first VOI LUT or window; return values in [0, 1]."""
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        try:
            # A LUT is indexed by integer input values (PS3.3 C.11.2.1.1); a window takes any value.
            lut_input = np.rint(values).astype(np.int64) if has_lut else values
            out = apply_voi_lut(lut_input, ds, index=0, prefer_lut=True).astype(np.float32, copy=False)
            if has_lut:
                return out / float((1 << voi_lut_output_bits(ds.VOILUTSequence[0])) - 1), "voi_lut"
            # pydicom maps a window onto the output range of the rescaled stored values; find
            # that range by windowing two extreme values rather than re-deriving its rules.
            lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0))
            span = hi - lo
            return ((out - lo) / span if span > 0 else np.zeros_like(out)), "window"
        except Exception as exc:  # a malformed VOI must not make the image unreadable
            log.warning("ignoring unusable VOI LUT/window: %s", exc)
    real = unpadded(values, padding)
    lo, hi = float(real.min()), float(real.max())
    span = hi - lo
    return ((values - lo) / span if span > 0 else np.zeros_like(values)), "minmax"


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ---- reading files -------------------------------------------------------------------------


def read_dicom(path: Path, source: str = "") -> Dataset:
    """The dataset of a DICOM file; ``PixelError`` naming ``source`` (default: the path) if unreadable.

    A file without the 128-byte preamble and File Meta (a raw data set, as some old
    devices and scripts write) is read as dcmtk and GDCM read it: pydicom's ``force``,
    which works out implicit/explicit VR from the first element, and the missing Transfer
    Syntax UID is set from what it found. Bytes that do not parse as DICOM elements with
    at least an SOP Class UID or an image stay an error.
    """
    label = source or str(path)
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise PixelError(f"{label}: the DICOM file is missing") from exc
    except InvalidDicomError as exc:
        first_error = exc
    except Exception as exc:
        raise PixelError(f"{label}: not a readable DICOM file ({exc})") from exc
    try:
        ds = pydicom.dcmread(path, force=True)
        looks_like_dicom = "SOPClassUID" in ds or ("PixelData" in ds and "Rows" in ds)
    except Exception:
        looks_like_dicom = False
    if not looks_like_dicom:
        raise PixelError(f"{label}: not a readable DICOM file ({first_error})") from first_error
    add_missing_file_meta(ds)
    log.info("read a DICOM data set without File Meta", extra={"source": label})
    return ds


def add_missing_file_meta(ds: Dataset) -> None:
    """Give a data set read without File Meta the Transfer Syntax UID of its encoding."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = getattr(ds, "is_implicit_VR", True), getattr(ds, "is_little_endian", True)
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    if "SOPClassUID" in ds and "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds and "MediaStorageSOPInstanceUID" not in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def read_dicom_display(
    path: Path, *, min_side: int = 0, source: str = "", max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
) -> DisplayImage:
    """Read a DICOM file from disk and decode it for display (``min_side``: see ``dataset_to_display``).

    ``source`` names the image in errors (default: the path).
    """
    label = source or str(path)
    return dataset_to_display(
        read_dicom(path, source=label), source=label, min_side=min_side, max_frame_pixels=max_frame_pixels
    )


def read_picture_display(
    path: Path, *, source: str = "", max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
) -> DisplayImage:
    """Read a PNG/JPEG (8 or 16 bit, grey, RGB or RGBA) as a display image (size checked before decoding)."""
    from PIL import Image

    label = source or str(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            _refuse_if_too_large(height, width, label, max_frame_pixels, "")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                top = 65535.0 if arr.max() > 255 else 255.0
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
                top = 255.0
    except PixelError:
        raise
    except Exception as exc:
        raise PixelError(f"{label}: not a readable PNG/JPEG image ({exc})") from exc
    pixels = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    return DisplayImage(pixels=pixels, source_shape=pixels.shape[:2], window="picture")


def read_any_display(
    path: Path, *, min_side: int = 0, source: str = "", max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
) -> DisplayImage:
    """DICOM or picture, by suffix (``min_side`` applies to JPEG 2000 DICOM only)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_picture_display(path, source=source, max_frame_pixels=max_frame_pixels)
    return read_dicom_display(path, min_side=min_side, source=source, max_frame_pixels=max_frame_pixels)
