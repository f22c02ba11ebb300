"""Failure reasons as users see them: they name the image, never the server's disk.

A triage or render failure is shown on the study page, in the JSON API and by the
CLI to anyone who may open the study. The server's file paths (data directory,
install paths) are nobody's business there, and older versions stored reasons
that began with the file's absolute path; ``user_reason`` cleans those on display.
"""

from __future__ import annotations

import re
from pathlib import Path

# An absolute POSIX path of two or more parts, not glued to a word before it
# ("Rows/Columns" and "1/2" are left alone).
_ABSOLUTE_PATH = re.compile(r"(?<![\w./~-])/(?:[^\s/'\"(),;:]+/)+[^\s/'\"(),;:]*")
SERVER_PATH = "<server file>"


def image_label(sop_instance_uid: str) -> str:
    """How a failure names one image: its SOP Instance UID (0008,0018)."""
    return f"image {sop_instance_uid}"


def user_reason(
    reason: str | None, *, file_path: str = "", label: str = "", data_dir: Path | str | None = None
) -> str | None:
    """``reason`` with the image's file path (``file_path``, relative to the data directory,
    with whatever directory precedes it) replaced by ``label``, and any other path in
    ``data_dir`` or absolute path by ``<server file>``. None stays None.
    """
    if not reason:
        return reason
    text = reason
    if file_path and label:
        text = re.sub(r"[^\s'\"]*" + re.escape(file_path.lstrip("/")), lambda _m: label, text)
    if data_dir is not None:
        for directory in {str(data_dir), str(Path(data_dir).resolve())} - {"", "."}:
            text = re.sub(re.escape(directory) + r"[^\s'\"]*", lambda _m: SERVER_PATH, text)
    return _ABSOLUTE_PATH.sub(SERVER_PATH, text)
