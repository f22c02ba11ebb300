"""Re-read the header text of stored studies from their files (``xray-triage studies redecode-text``).

Studies stored before the character-set rules of ``charset.header_encodings`` (or
before ``default_character_set`` was changed) may show mojibake names. The stored
files hold the bytes as received, so the database's text can be decoded again from
them; nothing is written to the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from xray_triage.store.dicom_meta import extract_meta
from xray_triage.store.schema import Series, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextChange:
    study_uid: str
    field: str  # "patient_name", "institution_name", "description" or "series <UID> description"
    old: str
    new: str


def redecode_text(
    session: Session, data_dir: Path, default_character_set: str, *, apply: bool = True
) -> list[TextChange]:
    """Decode each study's and series' header text again from its first stored file.

    Returns what changed (or would change, with ``apply=False``). A file that cannot be
    read is logged and skipped.
    """
    changes: list[TextChange] = []
    studies = session.scalars(
        select(Study).options(selectinload(Study.series).selectinload(Series.instances))
    )
    for study in studies:
        for n, series in enumerate(study.series):
            if not series.instances:
                continue
            path = Path(data_dir) / series.instances[0].file_path
            try:
                meta = extract_meta(
                    pydicom.dcmread(path, stop_before_pixels=True),
                    default_character_set=default_character_set,
                )
            except Exception as exc:  # a missing or damaged file: leave the study as it is
                log.warning("cannot re-read header", extra={"file": str(path), "error": str(exc)})
                continue
            targets = [
                (
                    series,
                    "description",
                    meta.series_description,
                    f"series {series.series_instance_uid} description",
                )
            ]
            if n == 0:
                targets += [
                    (study, "patient_name", meta.patient_name, "patient_name"),
                    (study, "institution_name", meta.institution_name, "institution_name"),
                    (study, "description", meta.study_description, "description"),
                ]
            for row, attribute, new, label in targets:
                old = getattr(row, attribute) or ""
                if new != old:
                    changes.append(TextChange(study.study_instance_uid, label, old, new))
                    if apply:
                        setattr(row, attribute, new)
    return changes
