"""Which character set decodes a header's text, when the sender did not say.

PS3.5 6.1.2.5.2: without Specific Character Set (0008,0005) a data set's text is
the default repertoire (ISO-IR 6, ASCII). Local devices break this: Vietnamese
consoles write UTF-8 names and declare nothing, others write Latin-1 or a
Windows code page. Like Orthanc's ``DefaultEncoding``, the server then decodes
with a configured default character set, but first checks whether the bytes are
valid UTF-8: multi-byte UTF-8 sequences almost never occur by chance in Latin-1
or code-page text, so a valid non-ASCII UTF-8 header is read as UTF-8.

Order: a declared (0008,0005) always wins; else UTF-8 if every top-level text
element is valid UTF-8 and one is not plain ASCII; else ``default_character_set``.
Only the decoding for the database and the pages changes: the stored file keeps
the bytes as received.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

# Value representations whose bytes are decoded with the character set (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
UTF8 = "utf_8"
PYDICOM_DEFAULT = "iso8859"  # what pydicom decodes undeclared text with: Latin-1, byte for byte


def python_codec(term: str) -> str:
    """The Python codec for a character set setting, or ``ValueError`` naming what is accepted.

    ``term`` is a DICOM Defined Term of (0008,0005) (``"ISO_IR 100"``, ``"ISO_IR 192"``,
    ``"GB18030"``; PS3.3 C.12.1.1.2) or a Python codec name (``"cp1258"`` for Windows
    Vietnamese, which has no DICOM term). Single-byte ISO 2022 terms map to their codec.
    """
    term = term.strip()
    if term in python_encoding:
        return python_encoding[term]
    if term.startswith("ISO 2022 ") and term.replace("ISO 2022 ", "ISO_", 1) in python_encoding:
        return python_encoding[term.replace("ISO 2022 ", "ISO_", 1)]
    try:
        return codecs.lookup(term).name
    except LookupError:
        raise ValueError(
            f"{term!r} is neither a DICOM character set term (e.g. 'ISO_IR 100', 'ISO_IR 192') "
            "nor a Python codec name (e.g. 'latin-1', 'cp1258')"
        ) from None


def header_encodings(ds: Dataset, default_codec: str) -> list[str]:
    """The Python encodings for ``ds``'s text: declared, else detected UTF-8, else ``default_codec``."""
    declared = ds.get(SPECIFIC_CHARACTER_SET)
    if declared is not None and declared.value:
        return convert_encodings(declared.value)
    chunks = [value for _, value in _text_bytes(ds)]
    if any(not chunk.isascii() for chunk in chunks) and all(_is_utf8(chunk) for chunk in chunks):
        return [UTF8]
    return [default_codec]


def decoded_text(ds: Dataset, keyword: str, encodings: Sequence[str]) -> Any:
    """The value of text element ``keyword`` decoded with ``encodings`` (None if absent).

    Other elements are returned as pydicom gives them. Works whether or not pydicom
    has already decoded the element (an undeclared one it decoded as Latin-1, which
    gives the bytes back unchanged).
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        if _vr(elem) not in TEXT_VRS:
            return ds[tag].value
        return convert_raw_data_element(elem, encoding=list(encodings), ds=ds).value
    raw = _bytes_of(elem) if _undeclared(ds) else None
    if raw is None:
        return elem.value
    return convert_raw_data_element(
        RawDataElement(elem.tag, elem.VR, len(raw), raw, 0, False, True), encoding=list(encodings), ds=ds
    ).value


def _undeclared(ds: Dataset) -> bool:
    declared = ds.get(SPECIFIC_CHARACTER_SET)
    return declared is None or not declared.value


def _text_bytes(ds: Dataset) -> Iterator[tuple[Any, bytes]]:
    """(tag, bytes) of every top-level text element, without decoding any of them."""
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself would decode every element
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            if _vr(elem) in TEXT_VRS and elem.value:
                yield tag, bytes(elem.value)
        elif isinstance(elem, DataElement) and elem.VR in TEXT_VRS:
            raw = _bytes_of(elem)
            if raw:
                yield tag, raw


def _vr(elem: RawDataElement) -> str | None:
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:  # private or unknown tag in implicit VR: not ours to decode
        return None


def _bytes_of(elem: DataElement) -> bytes | None:
    """The received bytes of a text element pydicom already decoded without a declared charset."""
    if elem.VR not in TEXT_VRS or elem.value is None:
        return None
    values = elem.value if elem.VM > 1 else [elem.value]
    parts = []
    for value in values:
        if isinstance(value, PersonName):
            original = value.original_string
            parts.append(original if isinstance(original, bytes) else str(value).encode("latin_1", "replace"))
        else:
            parts.append(str(value).encode("latin_1", "replace"))
    return b"\\".join(parts)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode(UTF8)
    except UnicodeDecodeError:
        return False
    return True
