"""Standard-library logging, as plain text or one JSON object per line.

Modules log with ``extra={...}`` for structured fields; both formats show them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = _fields(record)
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            {
                k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                for k, v in _fields(record).items()
            }
        )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


class _ProcessFields(logging.Filter):
    """Adds the same fields to every record (which process of the server logged it)."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            setattr(record, key, value)
        return True


def configure_logging(
    level: str = "INFO", fmt: str = "text", fields: Mapping[str, object] | None = None
) -> None:
    """``fields``: added to every record of this process, e.g. ``{"receiver": 1, "pid": 4242}`` in a
    receiver process (``gateway_processes``), whose lines share the gateway process's output."""
    handler = logging.StreamHandler(sys.stderr)
    if fields:
        handler.addFilter(_ProcessFields(fields))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
