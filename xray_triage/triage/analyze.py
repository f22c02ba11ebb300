"""One image through the whole pipeline: decode, preprocess, infer, score.

Used by the server's triage worker and by ``xray-triage predict``, so the CLI
and the server give the same answer for the same file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import DEFAULT_MAX_FRAME_PIXELS, DisplayImage, read_any_display
from xray_triage.pipeline.preprocess import decode_min_side, to_model_input
from xray_triage.triage.heatmaps import heatmap_records
from xray_triage.triage.scoring import Score, score


@dataclass(frozen=True)
class Analysis:
    score: Score
    model_version: str
    thresholds: dict[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_shape: tuple[int, int] = (0, 0)
    heatmaps: dict[str, dict] = field(default_factory=dict)  # flagged label -> grid + source box


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def analyze_display(image: DisplayImage, runner: ModelRunner, decode_ms: float) -> Analysis:
    card = runner.card
    start = time.perf_counter()
    tensor = to_model_input(image.pixels, card.input)
    preprocess_ms = _ms(start)
    start = time.perf_counter()
    probabilities, heatmap_grids = runner.infer_one(tensor)  # micro-batched when configured
    inference_ms = _ms(start)
    result = score(probabilities, card)
    heatmaps = {}
    if heatmap_grids is not None and result.flagged:
        heatmaps = heatmap_records(heatmap_grids, card.labels, result.flagged, image.source_shape, card.input)
    return Analysis(
        score=result,
        heatmaps=heatmaps,
        model_version=card.model_version,
        thresholds=dict(card.thresholds),
        timings_ms={"decode": decode_ms, "preprocess": preprocess_ms, "inference": inference_ms},
        source_shape=image.source_shape,
    )


def analyze_file(
    path: Path,
    runner: ModelRunner,
    *,
    reduced_decode: bool = True,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
    source: str = "",
) -> Analysis:
    """Raise :class:`xray_triage.pipeline.pixels.PixelError` if the image cannot be read.

    ``reduced_decode`` (the ``j2k_reduced_decode`` setting) lets a JPEG 2000 image be
    decoded only down to the resolution the model needs (``preprocess.decode_min_side``).
    ``max_frame_pixels`` (the ``max_frame_megapixels`` setting): a larger image is refused
    before it is decoded. ``source`` names the image in error messages instead of its path
    (the server passes the SOP Instance UID: users must not see its disk); empty = the path.
    """
    start = time.perf_counter()
    min_side = decode_min_side(runner.card.input) if reduced_decode else 0
    image = read_any_display(Path(path), min_side=min_side, max_frame_pixels=max_frame_pixels, source=source)
    return analyze_display(image, runner, _ms(start))
