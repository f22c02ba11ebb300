"""Domain errors: a rule said no, told as a stable code plus the values of the message.

The code never changes meaning, so front ends can map it: the web app
(``consult_web/errors.py``) turns ``ConsultRuleError("consult_closed")`` into an HTTP
409 with the catalog string ``usererror.consult_closed`` in the user's language. Each
class lists its codes in ``CODES``; an unknown code is a programming error (ValueError).
"""

from __future__ import annotations

from typing import ClassVar


class RuleError(Exception):
    """A domain rule refused an action. ``code``: stable identifier; ``params``: message values."""

    CODES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, code: str, **params: object) -> None:
        if code not in self.CODES:
            raise ValueError(f"{type(self).__name__}: unknown code {code!r}")
        super().__init__(code)
        self.code = code
        self.params = params

    def __str__(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.code} ({values})" if values else self.code


class ConsultRuleError(RuleError):
    """The consult life cycle (``rules.py``) refused a request, claim, reply, conclusion or text."""

    CODES = frozenset(
        {
            "question_empty",
            "question_too_long",  # limit
            "reply_empty",
            "reply_too_long",  # limit
            "only_station_requests",
            "urgency_invalid",  # choices
            "consult_open_exists",
            "only_specialist_claims",
            "consult_closed",
            "consult_claimed",
            "only_specialist_concludes",
            "conclusion_invalid",  # choices
            "unanswered_question",
        }
    )


class AnnotationRuleError(RuleError):
    """The annotation rules (``annotations.py``) refused a mark or a change to one."""

    CODES = frozenset({"annotation_forbidden", "annotation_not_author", "text_mark_label"})
