"""Consult and annotation rules live in core: they refuse with domain codes, no HTTP in sight,
and the web app answers every code with its localized HTTP error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from web_helpers import add_user_row, client_for, make_web_env

from consult_web.errors import RULE_ERRORS, LocalizedError, localized
from consult_web.i18n import catalog
from xray_triage.consults import annotations, geometry, rules
from xray_triage.consults.errors import AnnotationRuleError, ConsultRuleError, RuleError
from xray_triage.settings import Settings
from xray_triage.store.consult_schema import CONSULT_CLOSED, CONSULT_REQUESTED, Annotation, Consult
from xray_triage.store.db import open_database
from xray_triage.store.schema import Instance
from xray_triage.store.users import AuthUser

RULE_ERROR_CLASSES = (ConsultRuleError, AnnotationRuleError)


def _user(role: str, user_id: int = 1, station: str | None = None) -> AuthUser:
    return AuthUser(user_id, f"u{user_id}", "", role, station, "en", "UTC")


def test_rules_import_no_web_framework() -> None:
    """Core's rules load without FastAPI or the web app (a CLI or an exporter can use them)."""
    code = (
        "import sys, xray_triage.consults.rules, xray_triage.consults.annotations; "
        "loaded = sorted(m for m in ('fastapi', 'starlette', 'consult_web', 'dicom_gateway') if m in sys.modules); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_consult_rules_refuse_with_domain_codes(tmp_path: Path) -> None:
    db = open_database(Settings(data_dir=tmp_path / "data"))
    try:
        with db.session() as session:
            with pytest.raises(ConsultRuleError) as refused:
                rules.claim(session, _user("station", station="CR1"), Consult(status=CONSULT_REQUESTED))
            assert refused.value.code == "only_specialist_claims" and refused.value.params == {}
            with pytest.raises(ConsultRuleError) as refused:
                rules.claim(session, _user("specialist"), Consult(status=CONSULT_CLOSED))
            assert refused.value.code == "consult_closed"
            with pytest.raises(ConsultRuleError) as refused:
                rules.conclude(session, _user("specialist"), Consult(status=CONSULT_REQUESTED), "maybe")
            assert refused.value.code == "conclusion_invalid" and "normal" in str(refused.value.params["choices"])
    finally:
        db.dispose()


def test_annotation_rules_refuse_with_domain_codes() -> None:
    with pytest.raises(AnnotationRuleError) as refused:
        annotations.check_author(_user("specialist", user_id=2), Annotation(author_id=1))
    assert refused.value.code == "annotation_not_author"
    annotations.check_author(_user("specialist", user_id=1), Annotation(author_id=1))
    with pytest.raises(AnnotationRuleError) as refused:
        annotations.check_label("text", "  ")
    assert refused.value.code == "text_mark_label"
    annotations.check_label("arrow", "")


def test_geometry_rules_need_no_web() -> None:
    """Shape per kind and on-the-image checks are core's; they refuse with a ValueError that says why."""
    image = Instance(rows=100, columns=200)
    geometry.check_bounds(geometry.parse_geometry("rect", {"x": 190.0, "y": 0.0, "w": 10.0, "h": 100.0}), image)
    with pytest.raises(ValueError, match=r"outside the image \(200x100 px\): point \(230, 5\)"):
        geometry.check_bounds(geometry.parse_geometry("arrow", {"x1": 0.0, "y1": 0.0, "x2": 230.0, "y2": 5.0}), image)
    with pytest.raises(ValueError, match="invalid ellipse geometry"):
        geometry.parse_geometry("ellipse", {"cx": 1.0, "cy": 1.0, "rx": float("nan"), "ry": 1.0})
    freehand = geometry.parse_geometry("freehand", {"points": [[1.0, 2.0], [3.0, 4.0]]})
    assert geometry.geometry_json(freehand) == {"points": [[1.0, 2.0], [3.0, 4.0]]}


def test_an_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="consult_closd"):
        ConsultRuleError("consult_closd")


@pytest.mark.parametrize("cls", RULE_ERROR_CLASSES)
def test_every_domain_code_has_an_http_error_in_both_languages(cls: type[RuleError]) -> None:
    vi, en = catalog("vi"), catalog("en")
    for code in sorted(cls.CODES):
        assert code in RULE_ERRORS, f"{cls.__name__}({code!r}) has no HTTP error in consult_web/errors.py"
        error = localized(cls(code))
        assert isinstance(error, LocalizedError) and error.key == f"usererror.{code}"
        assert error.key in vi and error.key in en
        assert 400 <= error.status_code < 500
    assert set(RULE_ERRORS) == {code for c in RULE_ERROR_CLASSES for code in c.CODES}


def test_a_domain_refusal_is_answered_as_its_localized_http_error(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    add_user_row(env, "bacsi", "specialist", language="vi")
    client, _ = client_for(env, "bacsi")

    def too_long() -> None:
        raise ConsultRuleError("question_too_long", limit=4000)

    env.app.add_api_route("/api/test-too-long", too_long)
    env.app.add_api_route("/test-too-long", too_long)
    answer = client.get("/api/test-too-long")  # JSON: English detail for programs, the user's message for scripts
    assert answer.status_code == 400
    assert answer.json() == {
        "detail": "The question is longer than 4000 characters.",
        "message": "Câu hỏi dài hơn 4000 ký tự.",
    }
    page = client.get("/test-too-long")  # a page: the message in the user's language
    assert page.status_code == 400 and "Câu hỏi dài hơn 4000 ký tự." in page.text


def _thread(opener: str, *authors: str) -> Consult:
    from xray_triage.store.consult_schema import ConsultMessage, User

    consult = Consult(status=CONSULT_REQUESTED, requested_by=User(role=opener))
    consult.messages = [ConsultMessage(author=User(role=role), body="...") for role in authors]
    return consult


@pytest.mark.parametrize(
    ("opener", "authors", "closer", "unanswered"),
    [
        ("station", (), "specialist", True),  # the station's question, never answered
        ("station", (), "station", False),  # one's own question: a confirmation only
        ("station", ("specialist",), "specialist", False),  # answered
        ("station", ("specialist", "station"), "specialist", True),  # a follow-up question
        ("station", ("specialist", "station"), "admin", True),  # admins answer as specialists
        ("specialist", (), "station", True),  # a specialist asked the station
        ("specialist", ("station",), "station", False),
        ("specialist", ("station",), "specialist", False),
    ],
)  # fmt: skip
def test_unanswered_question_is_the_other_sides_last_word(
    opener: str, authors: tuple[str, ...], closer: str, unanswered: bool
) -> None:
    consult = _thread(opener, *authors)
    assert rules.unanswered_question(consult, _user(closer)) is unanswered


def test_close_refuses_an_unanswered_question_unless_acknowledged(tmp_path: Path) -> None:
    db = open_database(Settings(data_dir=tmp_path / "data"))
    try:
        with db.session() as session:
            consult = _thread("station")
            consult.study_id = 10**6  # no such study: no event to record
            with pytest.raises(ConsultRuleError) as refused:
                rules.close(session, _user("specialist"), consult)
            assert refused.value.code == "unanswered_question" and consult.status == CONSULT_REQUESTED
            rules.close(session, _user("specialist"), consult, acknowledge_unanswered=True)
            assert consult.status == CONSULT_CLOSED
    finally:
        db.dispose()
