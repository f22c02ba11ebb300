"""Server-side rendering of a stored DICOM image for the web viewer.

The viewer must show what the model saw, so rendering starts from the very values
the triage pipeline computes (``pixels.decode_modality``: pydicom and its plugins,
the sample bits located, Pixel Padding noted, Modality LUT); there is no second
decoder. Windows are given in those Modality-LUT units (after Rescale Slope/Intercept),
windows derived from the image (min/max, the presets) leave Pixel Padding out, and
MONOCHROME1 images (and MONOCHROME2 with Presentation LUT Shape INVERSE) are inverted
*after* windowing so that bone is always bright. A colour image is shown as its luminance.

Decoding a large radiograph takes a noticeable fraction of a second, and a
viewer asks for the same image many times while the user changes the window or
zooms, so decoded images are kept in a small thread-safe LRU cache
(``settings.render_cache_images`` images) and so are their down-scaled copies.

A JPEG 2000 image is first decoded only down to the resolution the requested
picture needs (a 2800 px detector image at half size for the 1024 px first view,
~4x less decode time); a zoom that needs more decodes it in full and replaces the
cached copy, keeping the window presets worked out on the first decode so the
picture does not change brightness on zoom. Other transfer syntaxes are always
decoded in full.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from xray_triage.pipeline.pixels import (
    DEFAULT_MAX_FRAME_PIXELS,
    MONOCHROME,
    PixelError,
    colour_full_scale,
    decode_modality,
    modality_values_to_display,
    photometric_of,
    read_dicom,
    stored_shape,
    unpadded,
)

log = logging.getLogger(__name__)

PRESETS = ("dicom", "lung", "mediastinum", "bone")
FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}
DEFAULT_SIZE = 1024
MIN_SIZE = 64
JPEG_QUALITY = 85
SCALED_COPIES = 3  # down-scaled value arrays kept per decoded image (one per zoom level)
PERCENTILE_STEP = 4  # percentiles are taken on every 4th row and column: fast, and plenty of samples

# Brightness percentiles (0 = darkest on screen, 100 = brightest) bounding each preset's window.
# CR/DX values have no fixed physical unit (unlike CT Hounsfield units), so the presets are
# defined relative to the image's own value distribution:
#   lung         a wide window over the darker part of the image (air, lung fields, vessels),
#   mediastinum  a narrower window over the brighter soft tissue (heart, mediastinum, diaphragm),
#   bone         the bright tail (ribs, spine, clavicles, lines and tubes).
PRESET_PERCENTILES: dict[str, tuple[float, float]] = {
    "lung": (1.0, 80.0),
    "mediastinum": (30.0, 99.5),
    "bone": (55.0, 99.9),
}


class RenderError(ValueError):
    """The render request itself is invalid (window, preset, format); the message says why."""


@dataclass(frozen=True)
class Window:
    """A linear window in Modality-LUT units: values center +- width/2 map to black..white."""

    center: float
    width: float

    def as_dict(self) -> dict[str, float]:
        return {"wc": round(self.center, 3), "ww": round(self.width, 3)}


@dataclass
class LoadedImage:
    """One decoded image: Modality-LUT values plus what rendering needs from its header."""

    values: np.ndarray  # float32 (rows, cols), Modality-LUT units
    header: Dataset  # the dataset without its Pixel Data, for the DICOM VOI
    photometric: str
    dicom_voi: str  # "window", "voi_lut", "minmax" or "colour": what the "dicom" preset applies
    presets: dict[str, Window]
    value_range: tuple[float, float]  # min, max of the values that are not Pixel Padding
    source_shape: tuple[int, int] | None = None  # the stored size (``values`` may be a reduced decode)
    inverted: bool = False  # low values bright: MONOCHROME1, or Presentation LUT Shape INVERSE
    padding: np.ndarray | None = field(default=None, repr=False)  # Pixel Padding mask of ``values``
    _scaled: OrderedDict[tuple[int, int], np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Rows, columns of the stored image: the geometry the viewer and annotations use."""
        return self.source_shape or self.decoded_shape

    @property
    def decoded_shape(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])

    def covers(self, rows: int, cols: int) -> bool:
        """Whether a rows x cols picture can be made without upscaling a reduced decode."""
        decoded = self.decoded_shape
        return decoded == self.shape or (rows <= decoded[0] and cols <= decoded[1])

    def scaled(self, rows: int, cols: int) -> np.ndarray:
        """The values resized to rows x cols (antialiased), cached for repeated windowing."""
        if not self.covers(rows, cols):
            raise ValueError(f"a {rows}x{cols} picture needs more than the {self.decoded_shape} decode")
        if (rows, cols) == self.decoded_shape:
            return self.values
        with self._lock:
            hit = self._scaled.get((rows, cols))
            if hit is not None:
                self._scaled.move_to_end((rows, cols))
                return hit
        resized = np.asarray(
            Image.fromarray(np.ascontiguousarray(self.values), mode="F").resize(
                (cols, rows), Image.Resampling.LANCZOS, reducing_gap=2.0
            ),
            dtype=np.float32,
        )
        with self._lock:
            self._scaled[(rows, cols)] = resized
            while len(self._scaled) > SCALED_COPIES:
                self._scaled.popitem(last=False)
        return resized


@dataclass(frozen=True)
class Rendered:
    """An encoded picture and how it was made (for headers and logs)."""

    data: bytes
    media_type: str
    width: int
    height: int
    window: str  # e.g. "preset:lung" or "wc=..,ww=.."


def load_image(
    path: Path,
    *,
    source: str = "",
    size: int | None = None,
    presets_from: LoadedImage | None = None,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> LoadedImage:
    """Decode ``path`` through the model's pixel pipeline and work out its window presets.

    ``size``: the longest side of the largest picture wanted; a JPEG 2000 image is then
    decoded only down to the resolution that covers it (None: in full). ``presets_from``:
    an earlier decode of the same file whose presets and value range are kept.
    ``max_frame_pixels``: a larger image is refused before decoding.
    Raises ``PixelError`` (with a message fit for the user) when the file cannot be read.
    """
    label = source or path.name
    ds = read_dicom(path, source=label)
    min_side = 0
    if size is not None and ds.get("Rows") and ds.get("Columns"):
        min_side = min(output_shape_for((int(ds.Rows), int(ds.Columns)), size))
    decoded = decode_modality(ds, source=label, min_side=min_side, max_frame_pixels=max_frame_pixels)
    values = decoded.values
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)  # keep only the header in memory
    photometric = photometric_of(ds)
    try:
        return _loaded(values, ds, photometric, decoded.inverted, decoded.padding, presets_from)
    except Exception as exc:  # presets on a degenerate image: one clear error, never a crash
        raise PixelError(f"{label}: cannot work out display windows ({type(exc).__name__}: {exc})") from exc


def _loaded(
    values: np.ndarray,
    ds: Dataset,
    photometric: str,
    inverted: bool,
    padding: np.ndarray | None,
    presets_from: LoadedImage | None,
) -> LoadedImage:
    if presets_from is not None:
        presets, dicom_voi, value_range = (
            presets_from.presets,
            presets_from.dicom_voi,
            presets_from.value_range,
        )
    else:
        real = unpadded(values, padding)
        value_range = (float(real.min()), float(real.max()))
        presets, dicom_voi = _presets(real, ds, inverted, value_range)
    return LoadedImage(
        values=values,
        header=ds,
        photometric=photometric,
        dicom_voi=dicom_voi,
        presets=presets,
        value_range=value_range,
        source_shape=stored_shape(ds, values),
        inverted=inverted,
        padding=padding,
    )


def _presets(
    values: np.ndarray, ds: Dataset, inverted: bool, value_range: tuple[float, float]
) -> tuple[dict[str, Window], str]:
    """The four presets as windows; the ``dicom`` one approximates a VOI LUT for display only.

    ``values``: the image's values without Pixel Padding (2-D, or 1-D once padding is out).
    """
    dicom_window, dicom_voi = _dicom_window(ds, value_range)
    sample = (
        values[::PERCENTILE_STEP, ::PERCENTILE_STEP].ravel()
        if values.ndim == 2
        else values[:: PERCENTILE_STEP**2]
    )
    presets = {"dicom": dicom_window}
    for name, (low_q, high_q) in PRESET_PERCENTILES.items():
        if inverted:  # high values are dark on screen
            low_q, high_q = 100.0 - high_q, 100.0 - low_q
        lo, hi = (float(v) for v in np.percentile(sample, [low_q, high_q]))
        presets[name] = Window(center=(lo + hi) / 2, width=max(hi - lo, 1e-3))
    return presets, dicom_voi


def _dicom_window(ds: Dataset, value_range: tuple[float, float]) -> tuple[Window, str]:
    """The dataset's own first VOI (window, else VOI LUT input range), else the min/max.

    A colour image has no VOI (PS3.3 C.11.2 is for grayscale): its full sample range.
    """
    lo, hi = value_range
    minmax = Window(center=(lo + hi) / 2, width=max(hi - lo, 1e-3))
    if photometric_of(ds) not in MONOCHROME:
        top = colour_full_scale(ds)
        return Window(center=top / 2, width=top), "colour"
    try:
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
            entries, first, _bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
            entries = entries or 65536
            return Window(center=first + entries / 2, width=float(entries)), "voi_lut"
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
            if math.isfinite(center) and math.isfinite(width) and width > 0:
                return Window(center=center, width=width), "window"
    except (TypeError, ValueError, IndexError) as exc:
        log.warning("ignoring unusable VOI in header: %s", exc)
    return minmax, "minmax"


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS element (several windows may be given)."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def resolve_window(
    image: LoadedImage, *, wc: float | None = None, ww: float | None = None, preset: str | None = None
) -> tuple[Window | None, str]:
    """Which window to apply: explicit ``wc``/``ww`` win over ``preset``; default ``dicom``.

    Returns (window, description); window is None for the dataset's own VOI (applied by the
    pipeline itself, including a VOI LUT or a sigmoid VOI LUT Function).
    """
    if (wc is None) != (ww is None):
        raise RenderError("give both wc (window centre) and ww (window width), or neither")
    if wc is not None and ww is not None:
        if not (math.isfinite(wc) and math.isfinite(ww)):
            raise RenderError("wc and ww must be finite numbers")
        if ww <= 0:
            raise RenderError("ww (window width) must be greater than 0")
        if max(abs(wc), ww) > 1e9:
            raise RenderError("wc/ww out of range")
        return Window(center=wc, width=ww), f"wc={wc:g},ww={ww:g}"
    name = preset or "dicom"
    if name not in PRESETS:
        raise RenderError(f"unknown preset {name!r}; use one of: {', '.join(PRESETS)}")
    if name == "dicom" and image.dicom_voi != "minmax":
        return None, "preset:dicom"
    return image.presets[name], f"preset:{name}"


def output_shape(image: LoadedImage, size: int) -> tuple[int, int]:
    """Rows, columns for a longest side of ``size``, clamped to [MIN_SIZE, source size]."""
    return output_shape_for(image.shape, size)


def output_shape_for(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """``output_shape`` for an image of ``shape`` (rows, columns)."""
    rows, cols = shape
    longest = max(rows, cols)
    target = min(max(int(size), MIN_SIZE), longest)
    scale = target / longest
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def to_display(image: LoadedImage, window: Window | None, rows: int, cols: int) -> np.ndarray:
    """Window the (scaled) values into [0, 1] with 1 = bright, inverted (MONOCHROME1, INVERSE) after windowing."""
    values = image.scaled(rows, cols)
    if window is None:
        display, _ = modality_values_to_display(values, image.header)
        return display
    low = window.center - window.width / 2
    display = np.clip((values - np.float32(low)) / np.float32(window.width), 0.0, 1.0)
    if image.inverted:
        display = 1.0 - display
    return display.astype(np.float32, copy=False)


def render(
    image: LoadedImage,
    *,
    wc: float | None = None,
    ww: float | None = None,
    preset: str | None = None,
    size: int = DEFAULT_SIZE,
    fmt: str = "jpeg",
) -> Rendered:
    """Window, scale and encode ``image`` as 8-bit grey JPEG (quality 85) or PNG."""
    if fmt not in FORMATS:
        raise RenderError(f"unknown format {fmt!r}; use jpeg or png")
    window, description = resolve_window(image, wc=wc, ww=ww, preset=preset)
    rows, cols = output_shape(image, size)
    display = to_display(image, window, rows, cols)
    grey = Image.fromarray(np.rint(display * 255.0).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    if fmt == "jpeg":
        grey.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    else:
        grey.save(buffer, format="PNG", compress_level=6)
    return Rendered(buffer.getvalue(), FORMATS[fmt], cols, rows, description)


def windows_info(image: LoadedImage) -> dict[str, Any]:
    """The presets as JSON for the viewer (window values in Modality-LUT units)."""
    rows, cols = image.shape
    return {
        "rows": rows,
        "columns": cols,
        "photometric": image.photometric,
        "inverted": image.inverted,
        "value_range": [round(image.value_range[0], 3), round(image.value_range[1], 3)],
        "dicom_voi": image.dicom_voi,
        "presets": {name: image.presets[name].as_dict() for name in PRESETS},
    }


class ImageCache:
    """A thread-safe LRU of decoded images, keyed by file path, size and modification time.

    Concurrent requests for an image being decoded wait for that one decode instead of
    starting their own (a viewer asks for the picture and its windows at the same time).
    """

    def __init__(self, capacity: int, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.capacity = capacity
        self.max_frame_pixels = max_frame_pixels
        self._images: OrderedDict[tuple[str, int, int], LoadedImage] = OrderedDict()
        self._loading: dict[tuple[str, int, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, *, source: str = "", size: int | None = None) -> LoadedImage:
        """The decoded image, good for pictures up to ``size`` px on the longest side (None: any)."""
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise PixelError(
                f"{source or path.name}: the stored DICOM file is missing on the server"
            ) from exc
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if self.capacity <= 0:
            return load_image(path, source=source, size=size, max_frame_pixels=self.max_frame_pixels)
        with self._lock:
            if (hit := self._lookup(key, size)) is not None:
                return hit
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if (hit := self._lookup(key, size)) is not None:
                    return hit
                coarser = self._images.get(key)  # a reduced decode too small for this picture
            try:
                image = load_image(
                    path,
                    source=source,
                    size=size,
                    presets_from=coarser,
                    max_frame_pixels=self.max_frame_pixels,
                )
            except BaseException:
                with self._lock:
                    self._loading.pop(key, None)
                raise
            with self._lock:
                self._loading.pop(key, None)
                self._images[key] = image
                while len(self._images) > self.capacity:
                    self._images.popitem(last=False)
        return image

    def _lookup(self, key: tuple[str, int, int], size: int | None) -> LoadedImage | None:
        image = self._images.get(key)
        if image is None:
            return None
        wanted = image.shape if size is None else output_shape(image, size)
        if not image.covers(*wanted):
            return None
        self._images.move_to_end(key)
        return image

    def clear(self) -> None:
        with self._lock:
            self._images.clear()


_cache: ImageCache | None = None
_cache_lock = threading.Lock()


def image_cache(capacity: int, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> ImageCache:
    """The process-wide cache, sized by ``settings.render_cache_images``."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = ImageCache(capacity, max_frame_pixels)
        _cache.capacity = capacity
        _cache.max_frame_pixels = max_frame_pixels
        return _cache
