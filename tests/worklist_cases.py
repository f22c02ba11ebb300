"""Mixed worklist cases for the order tests (tests/web/test_worklist_order.py, the browser test).

Each case is a stored study given a known AI priority, flagged findings, arrival time and
newest consult (status, urgency). The shipped model card's urgent labels are Effusion and Edema.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from web_helpers import WebEnv, store_dicom

from xray_triage.priority import PRIORITY_RANK
from xray_triage.store.consult_schema import Consult, User
from xray_triage.store.schema import Instance, Series, Study, TriageResult

THRESHOLDS = {"Abnormal": 0.7, "Infiltration": 0.14, "Atelectasis": 0.15, "Effusion": 0.11, "Edema": 0.14}
# name, AI priority, flagged {label: probability}, hours waiting, consult (status, urgency) or None
CASES = [
    ("emergency_on_normal", "normal", {}, 0.1, ("requested", "emergency")),
    *[(f"ai_urgent_{i}", "urgent", {"Effusion": 0.5 + i / 100, "Abnormal": 0.8}, 10 - i, None) for i in range(1, 7)],
    ("urgent_request_on_abnormal", "abnormal", {"Infiltration": 0.4}, 0.2, ("in_review", "urgent")),
    ("routine_request_on_urgent", "urgent", {"Edema": 0.3}, 0.3, ("requested", "routine")),
    ("emergency_closed", "urgent", {"Edema": 0.2}, 20, ("closed", "emergency")),
    ("emergency_answered", "normal", {}, 30, ("answered", "emergency")),
    ("abnormal_plain", "abnormal", {"Atelectasis": 0.6}, 3, None),
    ("pending", None, {}, 0.05, None),
]
# The worklist order README "Worklist order" promises for CASES, with each row's tier.
EXPECTED = [
    ("emergency_on_normal", "emergency_consult"),  # a human emergency first, whatever the AI said
    ("urgent_request_on_abnormal", "urgent_consult"),
    ("routine_request_on_urgent", "ai_urgent"),  # AI-urgent: open consults first
    *[(f"ai_urgent_{i}", "ai_urgent") for i in range(1, 7)],  # then the longest waiting first
    ("emergency_closed", "ai_urgent"),  # a closed consult no longer lifts a study
    ("abnormal_plain", "ai_abnormal"),
    ("emergency_answered", "ai_normal"),  # answered: the emergency has been seen to
    ("pending", "ai_none"),
]


def store_cases(env: WebEnv, source: Path, station: str, requester: str, now: datetime | None = None) -> dict[str, str]:
    """Store CASES from ``source`` as ``station``'s studies; returns name -> Study Instance UID."""
    now = now or datetime.now(UTC)
    uids = {}
    for name, priority, flagged, hours, consult in CASES:
        uid, _ = store_dicom(env, source, station, PatientName=f"Case^{name}")
        with env.db.session() as session:
            study = session.query(Study).filter_by(study_instance_uid=uid).one()
            study.priority, study.priority_rank = priority, PRIORITY_RANK[priority]
            study.received_at = now - timedelta(hours=hours)
            study.ai_status = "done" if priority else "pending"
            instance = session.query(Instance).join(Series).filter(Series.study_id == study.id).one()
            instance.ai_status = study.ai_status
            if priority:
                probabilities = {label: flagged.get(label, 0.05) for label in THRESHOLDS}
                session.add(
                    TriageResult(
                        instance_id=instance.id, model_version="fixture@1", probabilities=probabilities,
                        thresholds=THRESHOLDS, flagged=sorted(flagged, key=lambda k: -flagged[k]),
                        abnormal_score=probabilities["Abnormal"], priority=priority, timings_ms={}, heatmaps={},
                    )  # fmt: skip
                )
            if consult:
                user = session.query(User).filter_by(username=requester).one()
                session.add(
                    Consult(study_id=study.id, requested_by_id=user.id, question="?", status=consult[0], urgency=consult[1])
                )
        uids[name] = uid
    return uids
