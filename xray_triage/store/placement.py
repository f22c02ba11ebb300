"""Where a received instance may be filed, so that nothing is misfiled or shown to the wrong station.

Studies and series belong to the station (calling AE title) that sent their first
image, and a station user sees only its own station's studies. So an image is
filed into an existing study or series only if that study is its own station's
and (for a series) the series really is in the study the image names. Otherwise,
or when its SOP Instance UID is already stored with other content, it is
*quarantined*: stored and recorded apart, in no study, not triaged, shown to
admins on ``/admin``. Nothing acknowledged is dropped, and no UID, chosen by
mistake or on purpose, can put an image in front of another station's users.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from xray_triage.store.dicom_meta import InstanceMeta
from xray_triage.store.schema import (
    QUARANTINE_SERIES_OTHER_STATION,
    QUARANTINE_SERIES_OTHER_STUDY,
    QUARANTINE_SOP_CONFLICT,
    QUARANTINE_STUDY_OTHER_STATION,
    Instance,
    Series,
    Study,
)


@dataclass(frozen=True)
class Placement:
    """``reason`` None: file it normally. Otherwise quarantine it, for that reason.

    ``existing_instance_id``: the stored instance with the same SOP Instance UID
    (the caller decides whether the new copy is identical, i.e. an idempotent re-send).
    """

    reason: str | None = None
    detail: str = ""
    conflicting_station: str = ""
    existing_instance_id: int | None = None
    existing_file: str = ""
    existing_calling_ae: str = ""
    existing_transfer_syntax: str = ""


# Built once: this runs for every received image, and building and keying a statement each
# time cost more CPU than running it (issue 17's profile).
_SAME_SOP = select(
    Instance.id, Instance.series_id, Instance.file_path, Instance.calling_ae, Instance.transfer_syntax_uid
).where(Instance.sop_instance_uid == bindparam("uid"))
_SERIES_OWNER = (
    select(Study.station_ae)
    .join(Series, Series.study_id == Study.id)
    .where(Series.id == bindparam("series_id"))
)
_STUDY_STATION = select(Study.station_ae).where(Study.study_instance_uid == bindparam("uid"))
_SERIES_STUDY = (
    select(Study.station_ae, Study.study_instance_uid)
    .join(Series, Series.study_id == Study.id)
    .where(Series.series_instance_uid == bindparam("uid"))
)


def place(session: Session, meta: InstanceMeta, calling_ae: str) -> Placement:
    """Decide in ``session`` (the transaction that will insert) where ``meta`` may go."""
    conn = session.connection()
    existing = conn.execute(_SAME_SOP, {"uid": meta.sop_instance_uid}).first()
    if existing is not None:
        owner = conn.execute(_SERIES_OWNER, {"series_id": existing.series_id}).scalar()
        return Placement(
            QUARANTINE_SOP_CONFLICT,
            "SOP Instance UID already stored with other content or from another station",
            owner or existing.calling_ae,
            existing.id,
            existing.file_path,
            existing.calling_ae,
            existing.transfer_syntax_uid,
        )
    study_station = conn.execute(_STUDY_STATION, {"uid": meta.study_instance_uid}).scalar()
    if study_station is not None and study_station != calling_ae:
        return Placement(
            QUARANTINE_STUDY_OTHER_STATION,
            "Study Instance UID already used by another station",
            study_station,
        )
    row = conn.execute(_SERIES_STUDY, {"uid": meta.series_instance_uid}).first()
    if row is not None:
        series_station, series_study = row
        if series_station != calling_ae:
            return Placement(
                QUARANTINE_SERIES_OTHER_STATION,
                "Series Instance UID already used by another station",
                series_station,
            )
        if series_study != meta.study_instance_uid:
            return Placement(
                QUARANTINE_SERIES_OTHER_STUDY,
                f"Series Instance UID already filed under study {series_study}",
                series_station,
            )
    return Placement()
