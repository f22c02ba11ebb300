"""Benchmark suite for xray-triage: ``python -m benchmarks run [--quick] [--out FILE.json]``.

It measures the server as a station sees it (a real ``xray-triage serve`` process
fed by dcmtk's ``storescu``), compares ingest with dcmtk's own ``storescp`` on the
same machine, times inference bare and through our runner, and records the
machine it ran on. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

from pathlib import Path

from xray_triage.settings import DEFAULT_MODEL_DIR  # noqa: F401 - the shipped model (package data)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DICOM = SHARED_DATA / "dicom"
# The detector-size source image every transfer syntax variant is made from.
DETECTOR_SOURCE = SHARED_DICOM / "dev_08_dx_pa_2800px_jpegls.dcm"
