"""The consult life cycle and who may do what.

    requested --claim--> in_review --specialist reply / conclusion--> answered --close--> closed

* A station user (or an admin) requests a consult on a study of its own station,
  with a clinical question and an urgency; one open consult per study at a time.
  A specialist may open one on any study too (to ask the station something); it
  starts claimed by that specialist (in review).
* A specialist claims it; a specialist's reply or conclusion marks it answered
  (claiming it on the way if nobody had). A station's follow-up question on an
  answered consult puts it back in review.
* The requesting station, a specialist or an admin closes it. Questions come from the
  side that opened the consult (station or specialist); when the last entry of the
  thread is such a question and the closer is on the other side, closing needs an
  explicit ``acknowledge_unanswered`` (else ``unanswered_question``).

A refusal raises ``ConsultRuleError`` with a stable code (``"consult_closed"``...) and
the message's values; the web app answers it as a localized HTTP error.

Each change records its domain event (``ConsultRequested``, ``ConsultClaimed``,
``ReplyPosted``, ``ConsultAnswered``, ``ConsultClosed``) in the caller's transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from xray_triage.consults.errors import ConsultRuleError
from xray_triage.events import (
    ConsultAnswered,
    ConsultClaimed,
    ConsultClosed,
    ConsultRequested,
    Event,
    ReplyPosted,
)
from xray_triage.store import outbox
from xray_triage.store.consult_schema import (
    CONCLUSIONS,
    CONSULT_ANSWERED,
    CONSULT_CLOSED,
    CONSULT_IN_REVIEW,
    CONSULT_REQUESTED,
    ROLE_ADMIN,
    ROLE_SPECIALIST,
    ROLE_STATION,
    URGENCIES,
    Consult,
    ConsultMessage,
)
from xray_triage.store.schema import Study, utcnow
from xray_triage.store.users import AuthUser

MAX_QUESTION = 4000
MAX_MESSAGE = 8000


def _clean_text(text: str, limit: int, what: str) -> str:
    """``what`` is "question" or "reply" (it picks the message)."""
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise ConsultRuleError(f"{what}_empty")
    if len(text) > limit:
        raise ConsultRuleError(f"{what}_too_long", limit=limit)
    return text


def _record(session: Session, consult: Consult, event: type[Event], **fields: object) -> None:
    """Record ``event`` for ``consult``'s study in the caller's transaction."""
    study = session.get(Study, consult.study_id)
    if study is not None:
        outbox.record(
            session, event(study.study_instance_uid, study.station_ae, consult_id=consult.id, **fields)
        )


def is_specialist(user: AuthUser) -> bool:
    return user.role in (ROLE_SPECIALIST, ROLE_ADMIN)


def can_request(user: AuthUser) -> bool:
    """Station doctors and admins request consults; specialists open one on any study they see."""
    return user.role in (ROLE_STATION, ROLE_ADMIN, ROLE_SPECIALIST)


def side_of(role: str) -> str:
    """``"station"`` or ``"specialist"`` (admins answer as specialists)."""
    return "station" if role == ROLE_STATION else "specialist"


def unanswered_question(consult: Consult, user: AuthUser) -> bool:
    """Whether closing ``consult`` as ``user`` would leave the other side's question unanswered.

    The opener's side asks; the other side answers. True when ``user`` is not on the
    opener's side and the thread's last entry (the opening question or a message) is
    by the opener's side.
    """
    asking = side_of(consult.requested_by.role)
    if side_of(user.role) == asking:
        return False
    last_author = consult.messages[-1].author.role if consult.messages else consult.requested_by.role
    return side_of(last_author) == asking


def open_consult(session: Session, study: Study) -> Consult | None:
    return session.scalar(
        select(Consult)
        .where(Consult.study_id == study.id, Consult.status != CONSULT_CLOSED)
        .order_by(Consult.id.desc())
    )


def consults_of(session: Session, study: Study) -> list[Consult]:
    return list(
        session.scalars(select(Consult).where(Consult.study_id == study.id).order_by(Consult.id.desc()))
    )


def request_consult(session: Session, user: AuthUser, study: Study, question: str, urgency: str) -> Consult:
    if not can_request(user):
        raise ConsultRuleError("only_station_requests")
    if urgency not in URGENCIES:
        raise ConsultRuleError("urgency_invalid", choices=", ".join(URGENCIES))
    if open_consult(session, study) is not None:
        raise ConsultRuleError("consult_open_exists")
    consult = Consult(
        study_id=study.id,
        requested_by_id=user.id,
        question=_clean_text(question, MAX_QUESTION, "question"),
        urgency=urgency,
        status=CONSULT_IN_REVIEW if user.role == ROLE_SPECIALIST else CONSULT_REQUESTED,
        claimed_by_id=user.id if user.role == ROLE_SPECIALIST else None,
    )
    session.add(consult)
    session.flush()
    _record(session, consult, ConsultRequested, urgency=urgency)
    return consult


def claim(session: Session, user: AuthUser, consult: Consult) -> None:
    if not is_specialist(user):
        raise ConsultRuleError("only_specialist_claims")
    if consult.status == CONSULT_CLOSED:
        raise ConsultRuleError("consult_closed")
    if consult.claimed_by_id not in (None, user.id):
        raise ConsultRuleError("consult_claimed")
    consult.claimed_by_id = user.id
    if consult.status == CONSULT_REQUESTED:
        consult.status = CONSULT_IN_REVIEW
    consult.updated_at = utcnow()
    _record(session, consult, ConsultClaimed, specialist_id=user.id)


def reply(session: Session, user: AuthUser, consult: Consult, body: str) -> ConsultMessage:
    if consult.status == CONSULT_CLOSED:
        raise ConsultRuleError("consult_closed")
    message = ConsultMessage(
        consult_id=consult.id, author_id=user.id, body=_clean_text(body, MAX_MESSAGE, "reply")
    )
    session.add(message)
    if is_specialist(user):
        consult.claimed_by_id = consult.claimed_by_id or user.id
        consult.status = CONSULT_ANSWERED
    elif consult.status == CONSULT_ANSWERED:
        consult.status = CONSULT_IN_REVIEW if consult.claimed_by_id else CONSULT_REQUESTED
    consult.updated_at = utcnow()
    session.flush()
    _record(session, consult, ReplyPosted, message_id=message.id, author_id=user.id, status=consult.status)
    return message


def conclude(session: Session, user: AuthUser, consult: Consult, conclusion: str) -> None:
    if not is_specialist(user):
        raise ConsultRuleError("only_specialist_concludes")
    if conclusion not in CONCLUSIONS:
        raise ConsultRuleError("conclusion_invalid", choices=", ".join(CONCLUSIONS))
    if consult.status == CONSULT_CLOSED:
        raise ConsultRuleError("consult_closed")
    consult.conclusion = conclusion
    consult.claimed_by_id = consult.claimed_by_id or user.id
    consult.status = CONSULT_ANSWERED
    consult.updated_at = utcnow()
    _record(session, consult, ConsultAnswered, conclusion=conclusion)


def close(session: Session, user: AuthUser, consult: Consult, acknowledge_unanswered: bool = False) -> None:
    """Anyone who can see the study (its station, specialists, admins) may close it.

    Raises ``unanswered_question`` when the other side's question has no answer yet
    (``unanswered_question``) unless ``acknowledge_unanswered`` says the closer knows.
    """
    if consult.status == CONSULT_CLOSED:
        return
    if unanswered_question(consult, user) and not acknowledge_unanswered:
        raise ConsultRuleError("unanswered_question")
    consult.status = CONSULT_CLOSED
    consult.updated_at = utcnow()
    _record(session, consult, ConsultClosed)
