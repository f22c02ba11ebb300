"""An answered consult as an Enhanced SR: the question, the specialist's conclusion and the thread.

Content tree (PS3.3 A.35.2, Enhanced SR; LOINC 11488-4 "Consult note" as the title):
the requester and the answering specialist as person observers (TID 1003's Person Observer
Name), the question (TEXT), the conclusion (CODE, ``codes.CONCLUSIONS``) and each message of
the thread (TEXT, its author as a PNAME and its time as the item's Observation DateTime). A
changed consult is filed as a new version whose Predecessor Documents Sequence references the
previous one (PS3.3 C.17.2.3). Patient and study come from an image of the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    PnameContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from xray_triage.results import codes
from xray_triage.results.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    SOFTWARE,
    make_uid,
    person_name,
    series_uid,
)

KIND = "consult-sr"


@dataclass(frozen=True)
class ThreadEntry:
    author: str
    body: str
    at: datetime | None


@dataclass(frozen=True)
class ConsultContent:
    consult_id: int
    question: ThreadEntry
    conclusion: str | None  # consult_schema.CONCLUSIONS
    specialist: str
    messages: Sequence[ThreadEntry]


def _dt(value: datetime | None) -> str | None:
    return value.strftime("%Y%m%d%H%M%S") if value is not None else None


def _entry(name: hd.sr.CodedConcept, entry: ThreadEntry) -> ContainerContentItem:
    """One entry of the thread: a container with its author (observer context) and its text
    (Enhanced SR lets only a CONTAINER, not a TEXT, carry observer context)."""
    item = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    if entry.at is not None:
        item.ObservationDateTime = _dt(entry.at)
    children: list[Dataset] = []
    if entry.author:
        children.append(
            PnameContentItem(
                name=dcm_codes.DCM.PersonObserverName,
                value=person_name(entry.author),
                relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT,
            )
        )
    children.append(
        TextContentItem(name=name, value=entry.body, relationship_type=RelationshipTypeValues.CONTAINS)
    )
    item.ContentSequence = children
    return item


def build_consult_sr(
    source: Dataset,
    consult: ConsultContent,
    *,
    uid_root: str,
    version: int,
    content_sha256: str,
    now: datetime,
    previous: Sequence[Dataset] = (),
) -> hd.sr.EnhancedSR:
    """The consult's SR in the study of ``source`` (an image header of the study); ``previous``:
    the datasets of the earlier versions (Predecessor Documents Sequence)."""
    root = ContainerContentItem(name=codes.CONSULT_NOTE, template_id=None)
    items: list[Dataset] = []
    if consult.specialist:
        items.append(
            CodeContentItem(
                name=dcm_codes.DCM.ObserverType,
                value=dcm_codes.DCM.Person,
                relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT,
            )
        )
        items.append(
            PnameContentItem(
                name=dcm_codes.DCM.PersonObserverName,
                value=person_name(consult.specialist),
                relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT,
            )
        )
    items.append(_entry(codes.CONSULT_QUESTION, consult.question))
    if consult.conclusion in codes.CONCLUSIONS:
        items.append(
            CodeContentItem(
                name=codes.CONSULT_CONCLUSION,
                value=codes.CONCLUSIONS[consult.conclusion],
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    items.extend(_entry(codes.CONSULT_MESSAGE, message) for message in consult.messages)
    root.ContentSequence = items
    study_uid = str(source.StudyInstanceUID)
    return hd.sr.EnhancedSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_uid(uid_root, study_uid, KIND),
        series_number=SERIES_NUMBERS[KIND],
        sop_instance_uid=make_uid(uid_root, KIND, str(consult.consult_id), content_sha256),
        instance_number=version,
        manufacturer=SOFTWARE,
        is_complete=True,
        is_final=True,
        previous_versions=list(previous) or None,
        institution_name=source.get("InstitutionName") or None,
        series_description=SERIES_DESCRIPTIONS[KIND],
        content_date=now.date(),
        content_time=now.time(),
    )
