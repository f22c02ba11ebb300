"""Writing model cards as TOML: the one card writer of the project.

The standard library reads TOML but cannot write it. Every tool that writes a card
(``model_tools.train``, ``model_tools.quantize``, ``model_tools.export``) goes through
:func:`card_text` / :func:`write_card`, so cards are written one way and each one is
proved to parse back to what was meant before it is written. The server only *reads*
cards (``xray_triage.inference.card``); it never imports this module.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class CardWriteError(ValueError):
    """The card text would not parse back to the tables it was made from."""


def toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any, digits: int | None = None) -> str:
    """One TOML value; floats rounded to ``digits`` decimals when given."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(round(value, digits) if digits is not None else value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, digits) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(
    tables: dict[str, dict[str, Any]], comments: dict[str, str] | None = None, *, digits: int | None = None
) -> str:
    """Serialise ``{table: {key: value | {sub-table}}}`` to TOML, one ``[table]`` block each.

    A table's plain values come first, then its sub-tables as ``[table.sub]`` blocks
    (recursively); a table that holds only sub-tables gets no block of its own.
    ``comments[name]`` (lines of text) goes as ``# ...`` above table ``name``.
    ``digits`` rounds every float (see :func:`toml_value`).
    """
    comments = comments or {}
    out: list[str] = []

    def emit(name: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if name in comments:
            out.extend(f"# {line}".rstrip() for line in comments[name].splitlines())
        if scalars or not subtables:
            out.append(f"[{name}]")
            out.extend(f"{toml_key(key)} = {toml_value(value, digits)}" for key, value in scalars.items())
            out.append("")
        for key, value in subtables.items():
            emit(f"{name}.{toml_key(key)}", value)

    for name, table in tables.items():
        emit(toml_key(name), table)
    return "\n".join(out)


def _same(parsed: Any, meant: Any, digits: int | None) -> bool:
    """``parsed`` (from tomllib) equals ``meant``, floats compared after the writer's rounding."""
    if isinstance(meant, float) and not isinstance(meant, bool):
        if math.isnan(meant):
            return isinstance(parsed, float) and math.isnan(parsed)
        return parsed == (round(meant, digits) if digits is not None and math.isfinite(meant) else meant)
    if isinstance(meant, dict):
        return (
            isinstance(parsed, dict)
            and parsed.keys() == meant.keys()
            and all(_same(parsed[k], meant[k], digits) for k in meant)
        )
    if isinstance(meant, (list, tuple)):
        return (
            isinstance(parsed, list)
            and len(parsed) == len(meant)
            and all(_same(p, m, digits) for p, m in zip(parsed, meant, strict=True))
        )
    return parsed == meant


def card_text(
    tables: dict[str, dict[str, Any]],
    *,
    header: str = "",
    comments: dict[str, str] | None = None,
    digits: int | None = None,
) -> str:
    """The card's TOML text: ``header`` (lines of text) as a ``#`` block, then the tables.

    Raises :class:`CardWriteError` if the text does not parse back to ``tables``
    (floats after rounding to ``digits``): a card must say exactly what was meant.
    """
    text = toml_dumps(tables, comments, digits=digits)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + "\n" + text
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CardWriteError(f"the generated card is not valid TOML: {exc}") from exc
    if not _same(parsed, tables, digits):
        raise CardWriteError("the generated card does not round-trip through TOML")
    return text


def write_card(
    path: Path,
    tables: dict[str, dict[str, Any]],
    *,
    header: str = "",
    comments: dict[str, str] | None = None,
    digits: int | None = None,
) -> Path:
    """Write :func:`card_text` to ``path`` atomically (a ``.tmp`` file, then a rename).

    The temporary name does not end in ``.toml``, so a server scanning the directory
    never sees a half-written card.
    """
    path = Path(path)
    text = card_text(tables, header=header, comments=comments, digits=digits)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
