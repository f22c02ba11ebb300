"""Web viewer rendering: ``xray_triage.pipeline.render`` in-process, next to dcmtk's ``dcmj2pnm``.

Three figures per image, all in this process (no HTTP, no server):

- cold first view: an empty decoded-image cache, then ``ImageCache.get(size=1024)`` (decode
  through the model's pixel pipeline, JPEG 2000 only down to the resolution 1024 px needs, window
  presets) + ``render(size=1024, fmt="jpeg")`` with the default window, as the viewer's first
  request for an image;
- warm re-render: the image already decoded and its 1024 px copy cached, ``get`` + ``render``
  at another window (the lung / mediastinum / bone presets in turn), as when the user changes
  the window;
- zoom: ``get(size=2048)`` + ``render(size=2048)``. The first zoom after each cold view (which
  makes the 2048 px copy from the cached decode, or for JPEG 2000 first decodes in full, since
  the first view's decode was reduced) is reported on its own; the warm zoom figure has that
  copy cached too.

The reference is dcmtk's command-line converter writing a 1024 px wide picture, timed as a
whole process (spawn -> exit, so process start-up is included in its figure and not in ours):
``dcmj2pnm -q +oj +Jq 85 +Sxv 1024`` (JPEG quality 85 like ours). dcmtk 3.6's ``dcmj2pnm``
cannot decode JPEG-LS and ``dcml2pnm``, which can, has no JPEG writer, so JPEG-LS files use
``dcml2pnm -q +on +Sxv 1024`` (PNG); dcmtk has no JPEG 2000 decoder, so those get "n/a".
Our cold view and the reference run alternate, the order flipped every iteration, after one
untimed run of each (codec libraries loaded, file in the page cache for both).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import DETECTOR_SOURCE
from benchmarks.common import (
    dcmtk_env,
    mb,
    progress,
    summarize,
    timed_ms,
)
from benchmarks.dicom_files import (
    J2K_LOSSLESS,
    JPEG_LS_LOSSLESS,
    ImageInfo,
)

FIRST_VIEW_SIZE = 1024
ZOOM_SIZE = 2048
WARM_PRESETS = ("lung", "mediastinum", "bone")  # "another window" than the first view's default
CACHE_IMAGES = 4  # settings.render_cache_images' default
KB = 1000  # bytes; MB elsewhere in the suite is 10^6 bytes too

# The issue: "a fast first view (<= 1024 px, a few hundred KB at most, for slow station links)".
TARGET_MAX_SIDE_PX = 1024
TARGET_MAX_KB = 400.0

JPEG_LS_SYNTAXES = {JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.4.81"}
J2K_SYNTAXES = {J2K_LOSSLESS, "1.2.840.10008.1.2.4.91"}


def reference_command(info: ImageInfo, out_dir: Path) -> tuple[list[str] | None, str]:
    """dcmtk's converter for this file (1024 px wide), or None and why not."""
    ts = info.transfer_syntax
    if ts in J2K_SYNTAXES:
        return None, "dcmtk has no JPEG 2000 decoder"
    if ts in JPEG_LS_SYNTAXES:
        tool, fmt, ext = "dcml2pnm", ["+on"], "png"  # dcml2pnm has no JPEG writer
    else:
        tool, fmt, ext = "dcmj2pnm", ["+oj", "+Jq", "85"], "jpg"
    if shutil.which(tool) is None:
        return None, f"{tool} not installed"
    out = out_dir / f"{info.name}.{ext}"
    cmd = [tool, "-q", *fmt, "+Sxv", str(FIRST_VIEW_SIZE), str(info.path), str(out)]
    return cmd, f"{tool} -> {ext.upper()}"


def _run_reference(cmd: list[str]) -> tuple[float | None, str]:
    """Spawn -> exit in ms, or None and the tool's error output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        return None, f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
    return elapsed, ""


def measure_case(
    group: str, info: ImageInfo, out_dir: Path, *, warmup: int, cold_reps: int, warm_reps: int
) -> tuple[dict[str, Any], list[str]]:
    from xray_triage.pipeline.render import ImageCache, render

    cache = ImageCache(CACHE_IMAGES)
    path = info.path
    case = f"{group}/{info.name}"
    warnings: list[str] = []
    ref_cmd, ref_what = reference_command(info, out_dir)
    ref_tool = ref_cmd[0] if ref_cmd else None
    ref_error = ""

    def first_view() -> Any:
        cache.clear()
        return render(cache.get(path, source=case, size=FIRST_VIEW_SIZE), size=FIRST_VIEW_SIZE, fmt="jpeg")

    cold: list[float] = []
    zoom_first: list[float] = []
    ref: list[float] = []
    first = zoom = None
    for i in range(warmup + cold_reps):
        timed = i >= warmup
        order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
        for who in order:
            if who == "ours":
                elapsed, first = timed_ms(first_view)
                zoom_elapsed, zoom = timed_ms(
                    lambda: render(cache.get(path, source=case, size=ZOOM_SIZE), size=ZOOM_SIZE, fmt="jpeg")
                )
                if timed:
                    cold.append(elapsed)
                    zoom_first.append(zoom_elapsed)
            elif ref_cmd is not None:
                ref_ms, err = _run_reference(ref_cmd)
                if ref_ms is None:
                    ref_error = err
                    if not ref:  # it fails from the start: no reference for this file
                        ref_what = f"{ref_tool} failed here ({err})"
                        ref_cmd = None
                elif timed:
                    ref.append(ref_ms)
    if ref_error and ref:
        warnings.append(f"viewer {case}: {ref_tool} failed on some runs: {ref_error}")

    # Warm: the decode and both scaled copies are cached; re-render and zoom alternate (ABAB).
    warm: list[float] = []
    zoom_warm: list[float] = []
    for i in range(warmup + warm_reps):
        preset = WARM_PRESETS[i % len(WARM_PRESETS)]
        w_ms, _ = timed_ms(
            lambda preset=preset: render(
                cache.get(path, source=case, size=FIRST_VIEW_SIZE), preset=preset, size=FIRST_VIEW_SIZE
            )
        )
        z_ms, _ = timed_ms(
            lambda preset=preset: render(cache.get(path, source=case, size=ZOOM_SIZE), preset=preset, size=ZOOM_SIZE)
        )
        if i >= warmup:
            warm.append(w_ms)
            zoom_warm.append(z_ms)

    assert first is not None and zoom is not None
    cold_s = summarize(cold, 1)
    ref_s = summarize(ref, 1) if ref else None
    ratio = cold_s["p50"] / ref_s["p50"] if ref_s and ref_s["p50"] else None
    ref_size = None
    if ref_cmd is not None and Path(ref_cmd[-1]).is_file():
        ref_size = round(Path(ref_cmd[-1]).stat().st_size / KB, 1)
    first_kb = round(len(first.data) / KB, 1)
    return {
        "case": case,
        "group": group,
        "file": info.path.name if group == "shared" else f"{info.name}.dcm, made from {DETECTOR_SOURCE.name}",
        "transfer_syntax": info.transfer_syntax,
        "transfer_syntax_name": info.ts_name,
        "rows": info.rows,
        "cols": info.cols,
        "size_mb": round(mb(info.size_bytes), 2),
        "first_view": {
            "width": first.width,
            "height": first.height,
            "kb": first_kb,
            "window": first.window,
            "media_type": first.media_type,
        },
        "zoom_view": {"width": zoom.width, "height": zoom.height, "kb": round(len(zoom.data) / KB, 1)},
        "cold_first_view_ms": cold_s,
        "warm_rerender_ms": summarize(warm, 1),
        "zoom_first_ms": summarize(zoom_first, 1),
        "zoom_warm_ms": summarize(zoom_warm, 1),
        "reference": {
            "tool": ref_tool,
            "output": ref_what if ref_s is not None else None,
            "available": ref_s is not None,
            "why_not": None if ref_s is not None else ref_what,
            "command": " ".join(ref_cmd[:-2] + ["IN.dcm", "OUT"]) if ref_cmd else None,
            "output_kb": ref_size,
            "ms": ref_s,
            "timed_as": "whole process, spawn -> exit (process start-up included)",
        },
        "ours_cold_over_reference_p50": round(ratio, 2) if ratio is not None else None,
        "samples": {
            "cold_first_view_ms": [round(v, 2) for v in cold],
            "warm_rerender_ms": [round(v, 2) for v in warm],
            "zoom_first_ms": [round(v, 2) for v in zoom_first],
            "zoom_warm_ms": [round(v, 2) for v in zoom_warm],
            "reference_ms": [round(v, 2) for v in ref],
        },
    }, warnings


def run_viewer(
    images: list[tuple[str, ImageInfo]], work_dir: Path, *, warmup: int, cold_reps: int, warm_reps: int
) -> dict[str, Any]:
    out_dir = work_dir / "viewer"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(
        f"viewer: {len(images)} images x ({warmup} untimed + {cold_reps} cold first views at {FIRST_VIEW_SIZE} px "
        f"alternating with dcmtk, {warm_reps} warm re-renders + {ZOOM_SIZE} px zooms)"
    )
    cases = []
    warnings: list[str] = []
    for group, info in images:
        case, case_warnings = measure_case(
            group, info, out_dir, warmup=warmup, cold_reps=cold_reps, warm_reps=warm_reps
        )
        cases.append(case)
        warnings += case_warnings
        ref = case["reference"]
        ref_text = (
            f"{ref['tool']} p50 {ref['ms']['p50']} ms (ours/dcmtk {case['ours_cold_over_reference_p50']})"
            if ref["available"]
            else f"dcmtk n/a ({ref['why_not']})"
        )
        fv = case["first_view"]
        progress(
            f"viewer {case['case']:<38} cold p50 {case['cold_first_view_ms']['p50']} ms "
            f"p95 {case['cold_first_view_ms']['p95']} ms, warm p50 {case['warm_rerender_ms']['p50']} ms, "
            f"zoom p50 {case['zoom_warm_ms']['p50']} ms, first view {fv['width']}x{fv['height']} "
            f"{fv['kb']} KB; {ref_text}"
        )
    sides = [max(c["first_view"]["width"], c["first_view"]["height"]) for c in cases]
    sizes = [c["first_view"]["kb"] for c in cases]
    largest = max(cases, key=lambda c: c["first_view"]["kb"]) if cases else None
    met = bool(cases) and max(sides) <= TARGET_MAX_SIDE_PX and max(sizes) <= TARGET_MAX_KB
    return {
        "cases": cases,
        "first_view_size_px": FIRST_VIEW_SIZE,
        "zoom_size_px": ZOOM_SIZE,
        "warm_presets": list(WARM_PRESETS),
        "cache_images": CACHE_IMAGES,
        "kb": "10^3 bytes",
        "target": {
            "metric": "first view: longest side px and JPEG KB, largest over all files",
            "target": {"max_side_px": TARGET_MAX_SIDE_PX, "max_kb": TARGET_MAX_KB},
            "measured": {
                "max_side_px": max(sides) if sides else None,
                "max_kb": max(sizes) if sizes else None,
                "largest_case": largest["case"] if largest else None,
            },
            "met": met,
        },
        "warnings": warnings,
    }
