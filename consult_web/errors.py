"""Errors a user can act on, told in the user's language.

``LocalizedError`` is an ``HTTPException`` whose ``detail`` stays English (API clients, logs)
and whose ``key`` names a catalog string (``locales/*/core.json``, ``usererror.*``). The
app's error handler shows that string in the request's language on pages, and adds it as
``message`` to JSON answers, which the browser's scripts show instead of ``detail``.

Core's domain rules (consults, annotations) raise ``RuleError`` with a stable code and
know nothing of HTTP: ``RULE_ERRORS`` says which HTTP status and catalog string each code
becomes, and ``localized`` applies it (the app does so for every ``RuleError`` a route
lets through).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException

from consult_web.i18n import translate
from xray_triage.consults.errors import RuleError


class LocalizedError(HTTPException):
    def __init__(self, status_code: int, key: str, **values: object) -> None:
        super().__init__(status_code=status_code, detail=translate("en", key, **values))
        self.key = key
        self.values = values

    def message(self, language: str) -> str:
        return translate(language, self.key, **self.values)


# Domain code -> the HTTP error it is answered with (the code's params fill the message).
RULE_ERRORS: dict[str, Callable[..., LocalizedError]] = {
    # consults (xray_triage/consults/rules.py)
    "question_empty": lambda **v: LocalizedError(400, "usererror.question_empty", **v),
    "question_too_long": lambda **v: LocalizedError(400, "usererror.question_too_long", **v),
    "reply_empty": lambda **v: LocalizedError(400, "usererror.reply_empty", **v),
    "reply_too_long": lambda **v: LocalizedError(400, "usererror.reply_too_long", **v),
    "only_station_requests": lambda **v: LocalizedError(403, "usererror.only_station_requests", **v),
    "urgency_invalid": lambda **v: LocalizedError(400, "usererror.urgency_invalid", **v),
    "consult_open_exists": lambda **v: LocalizedError(409, "usererror.consult_open_exists", **v),
    "only_specialist_claims": lambda **v: LocalizedError(403, "usererror.only_specialist_claims", **v),
    "consult_closed": lambda **v: LocalizedError(409, "usererror.consult_closed", **v),
    "consult_claimed": lambda **v: LocalizedError(409, "usererror.consult_claimed", **v),
    "only_specialist_concludes": lambda **v: LocalizedError(403, "usererror.only_specialist_concludes", **v),
    "conclusion_invalid": lambda **v: LocalizedError(400, "usererror.conclusion_invalid", **v),
    "unanswered_question": lambda **v: LocalizedError(409, "usererror.unanswered_question", **v),
    # annotations (xray_triage/consults/annotations.py)
    "annotation_forbidden": lambda **v: LocalizedError(403, "usererror.annotation_forbidden", **v),
    "annotation_not_author": lambda **v: LocalizedError(403, "usererror.annotation_not_author", **v),
    "text_mark_label": lambda **v: LocalizedError(422, "usererror.text_mark_label", **v),
}


def localized(exc: RuleError) -> LocalizedError:
    """The HTTP error for a domain refusal (KeyError for a code missing from ``RULE_ERRORS``)."""
    return RULE_ERRORS[exc.code](**exc.params)
