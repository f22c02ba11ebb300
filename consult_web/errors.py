"""Errors a user can act on, told in the user's language.

``LocalizedError`` is an ``HTTPException`` whose ``detail`` stays English (API clients, logs)
and whose ``key`` names a catalog string (``locales/*/core.json``, ``usererror.*``). The
app's error handler shows that string in the request's language on pages, and adds it as
``message`` to JSON answers, which the browser's scripts show instead of ``detail``.
"""

from __future__ import annotations

from fastapi import HTTPException

from consult_web.i18n import translate


class LocalizedError(HTTPException):
    def __init__(self, status_code: int, key: str, **values: object) -> None:
        super().__init__(status_code=status_code, detail=translate("en", key, **values))
        self.key = key
        self.values = values

    def message(self, language: str) -> str:
        return translate(language, self.key, **self.values)
