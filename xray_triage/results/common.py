"""What every object we make shares: UIDs under the operator's root, series numbers, the source image."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

SOFTWARE = "xray-triage"
# One series per kind of object in a study, numbered far from a modality's own series.
SERIES_NUMBERS = {"ai-sr": 9901, "ai-gsps": 9902, "annotation-gsps": 9903, "consult-sr": 9904}
SERIES_DESCRIPTIONS = {
    "ai-sr": "AI results (xray-triage)",
    "ai-gsps": "AI regions (xray-triage)",
    "annotation-gsps": "Specialist marks",
    "consult-sr": "Teleconsult",
}


def uid_prefix(uid_root: str) -> str:
    """``uid_root`` as a pydicom prefix (ends with a dot); empty: pydicom's root (PS3.5 9.1)."""
    return f"{uid_root.rstrip('.')}." if uid_root else PYDICOM_ROOT_UID


def make_uid(uid_root: str, *parts: str) -> str:
    """A UID under ``uid_root``, the same for the same ``parts`` (so a rebuild names the same object)."""
    return str(generate_uid(prefix=uid_prefix(uid_root), entropy_srcs=[SOFTWARE, *parts]))


def series_uid(uid_root: str, study_uid: str, kind: str) -> str:
    """The series of ``kind`` objects in ``study_uid`` (one per kind and study)."""
    return make_uid(uid_root, "series", study_uid, kind)


def content_hash(value: Any) -> str:
    """sha256 of a JSON-able description of an object's inputs (what decides a new version)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_source(data_dir: Path, file_path: str) -> Dataset:
    """The stored source image's header (no pixel data: the objects only reference it).

    ``force``: a file is stored as it was received, which may be without preamble or meta group."""
    return pydicom.dcmread(data_dir / file_path, stop_before_pixels=True, force=True)


def person_name(display: str) -> str:
    """A display name as a PN value: one family-name component (no ``^``, ``=`` or ``\\`` inside),
    at most 63 characters, with the trailing ``^`` that marks a single-component name (PS3.5 6.2.1.2)."""
    return "".join(ch for ch in display if ch not in "^=\\").strip()[:63] + "^"


def encode(dataset: Dataset) -> bytes:
    """The object as a Part 10 file, its text in UTF-8 (ISO_IR 192: names and messages may be Vietnamese)."""
    dataset.SpecificCharacterSet = "ISO_IR 192"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
