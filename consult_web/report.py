"""The printable consult report: one study's patient, annotated image, AI findings and consult, as a PDF.

The report is HTML from a Jinja2 template (``templates/report.html``) turned into PDF by
WeasyPrint, which shapes text with Pango, so Vietnamese diacritics print with the
DejaVu fonts Debian installs. The image is rendered by the same pipeline as the viewer
(``xray_triage.pipeline.render``: what the model saw, the DICOM window) and the marks
are drawn on it here with Pillow, their source-pixel geometry scaled to the picture.
The picture goes into the HTML as a ``data:`` URI and the URL fetcher refuses every
other URL, so making a report never reaches the network or the file system.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from xray_triage.pipeline.render import LoadedImage, render

log = logging.getLogger(__name__)

REPORT_IMAGE_SIZE = 1400  # longest side, px: ~200 dpi across the printed image's 17 cm
FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian fonts-dejavu-core
DEFAULT_MARK_COLOR = "#ffd400"


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype(str(FONT_FILE), size)
    except OSError:  # no DejaVu: Pillow's own font still prints ASCII labels
        return ImageFont.load_default(size)


def _colour(value: str | None) -> str:
    text = value or DEFAULT_MARK_COLOR
    return text if len(text) == 7 and text.startswith("#") else DEFAULT_MARK_COLOR


def draw_marks(picture: Image.Image, marks: Sequence[dict[str, Any]], source_shape: tuple[int, int]) -> Image.Image:
    """``picture`` (an RGB copy) with ``marks`` drawn on it.

    ``marks`` are annotation dicts (``kind``, ``geometry`` in source-pixel coordinates,
    x = column, y = row, ``label``, ``color``; see ``consult_schema.Annotation``);
    ``source_shape`` is the stored image's (rows, columns), so a mark lands where it was
    drawn whatever the picture's size. Unknown kinds and broken geometry are skipped.
    """
    out = picture.convert("RGB")
    rows, cols = source_shape
    sx, sy = out.width / max(cols, 1), out.height / max(rows, 1)
    line = max(2, round(out.width / 250))  # ~0.4 mm on paper at the report's image sizes
    font = _font(max(14, round(out.width / 35)))
    draw = ImageDraw.Draw(out)

    def label_at(x: float, y: float, text: str, colour: str) -> None:
        if not text:
            return
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill="black")
        draw.text((x, y), text, fill=colour, font=font)

    for mark in marks:
        g, colour, label = mark.get("geometry") or {}, _colour(mark.get("color")), str(mark.get("label") or "")
        try:
            kind = mark.get("kind")
            if kind == "rect":
                x0, y0 = g["x"] * sx, g["y"] * sy
                draw.rectangle((x0, y0, x0 + g["w"] * sx, y0 + g["h"] * sy), outline=colour, width=line)
                label_at(x0, max(0, y0 - font.size - 6), label, colour)
            elif kind == "ellipse":
                cx, cy, rx, ry = g["cx"] * sx, g["cy"] * sy, g["rx"] * sx, g["ry"] * sy
                draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=colour, width=line)
                label_at(cx - rx, max(0, cy - ry - font.size - 6), label, colour)
            elif kind == "arrow":
                x1, y1, x2, y2 = g["x1"] * sx, g["y1"] * sy, g["x2"] * sx, g["y2"] * sy
                draw.line((x1, y1, x2, y2), fill=colour, width=line)
                angle, head = math.atan2(y2 - y1, x2 - x1), 6 * line
                for side in (-0.45, 0.45):
                    draw.line(
                        (x2, y2, x2 - head * math.cos(angle + side), y2 - head * math.sin(angle + side)),
                        fill=colour, width=line,
                    )  # fmt: skip
                label_at(x1, y1, label, colour)
            elif kind == "freehand":
                points = [(float(x) * sx, float(y) * sy) for x, y in g["points"]]
                if len(points) >= 2:
                    draw.line(points, fill=colour, width=line, joint="curve")
                    label_at(*points[0], label, colour)
            elif kind == "text":
                label_at(g["x"] * sx, g["y"] * sy, label, colour)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("report: mark not drawn", extra={"mark_id": mark.get("id"), "error": str(exc)})
    return out


def annotated_picture(image: LoadedImage, marks: Sequence[dict[str, Any]], size: int = REPORT_IMAGE_SIZE) -> str:
    """The image in its DICOM window with ``marks`` drawn, as a ``data:image/jpeg`` URI."""
    rendered = render(image, size=size, fmt="png")  # lossless, then one JPEG encode after drawing
    picture = draw_marks(Image.open(io.BytesIO(rendered.data)), marks, image.shape)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_to_pdf(html: str) -> bytes:
    """The PDF of ``html`` (A4, fonts from the system's fontconfig: DejaVu on Debian).

    WeasyPrint is imported here, not at module load: it loads Pango through cffi, which
    the rest of the web app never needs.
    """
    from weasyprint import HTML, URLFetcher

    inline_only = URLFetcher(allowed_protocols=["data"])  # never the network, never a file
    return HTML(string=html, url_fetcher=inline_only).write_pdf()
