"""Is a received data set complete? Every element's declared length must fit in the bytes received.

pydicom reads a short value without complaint (``fp.read(length)`` simply returns
fewer bytes) and drops an undefined-length element whose delimiter never came
(with only a warning), so a data set cut off in transit parses "fine" and would
be stored as a file that stricter readers (dcmtk, a PACS) refuse. This module
re-reads what was received with pydicom's element reader and checks pydicom's
own record of each element (its value offset and declared length, PS3.5 7.1)
against the length of the stream, at every nesting level, and that the last
element ends where the stream ends.
"""

from __future__ import annotations

import hashlib
import zlib
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 1024 * 1024  # larger values are bounds-checked and skipped, not read


def dataset_offset(part10: bytes | BinaryIO) -> int:
    """Where the data set starts in a Part 10 file (bytes, or a binary file object read from
    its start): after the 128-byte preamble, ``DICM`` and the File Meta Information group
    (PS3.10 7.1). Raises if there is no preamble."""
    fp = BytesIO(part10) if isinstance(part10, bytes | bytearray | memoryview) else part10
    fp.seek(0)
    read_preamble(fp, False)
    read_dataset(fp, False, True, stop_when=lambda tag, _vr, _length: tag.group != 0x0002)
    return fp.tell()


HASH_CHUNK = 1024 * 1024


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the data set of a Part 10 file (its bytes after the File Meta Information),
    read in chunks: what identifies a re-sent copy whatever meta a sender wrote."""
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(dataset_offset(fp))
        while chunk := fp.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def same_dataset(a: Path, b: Path) -> bool:
    """Whether two Part 10 files hold the same data set bytes (their File Meta may differ)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset_a, offset_b = dataset_offset(fa), dataset_offset(fb)
        size_a, size_b = fa.seek(0, 2) - offset_a, fb.seek(0, 2) - offset_b
        if size_a != size_b:
            return False
        fa.seek(offset_a)
        fb.seek(offset_b)
        while True:
            chunk_a, chunk_b = fa.read(HASH_CHUNK), fb.read(HASH_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def dataset_stream(part10: bytes, transfer_syntax_uid: str) -> bytes:
    """The encoded data set of a Part 10 file, inflated if its transfer syntax is Deflated.

    Raises ValueError if a deflated stream is cut off.
    """
    stream = part10[dataset_offset(part10) :]
    if UID(transfer_syntax_uid) == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        stream = inflater.decompress(stream) + inflater.flush()
        if not inflater.eof:
            raise ValueError("the deflated data set is cut off before its end")
    return stream


def incompleteness(part10: bytes | Path, transfer_syntax_uid: str) -> str | None:
    """Why the data set in ``part10`` (a Part 10 file as received: bytes, or its path) is incomplete, or None.

    Walks every top-level element with pydicom's element reader and checks that each
    declared length fits in the bytes received and that the last element ends where
    the bytes end (an undefined-length element without its delimiter raises inside
    pydicom). Then converts every element, reading every sequence item, and checks the
    items against their sequence's bytes (the "full parse"). Values over 1 MiB (Pixel
    Data) are skipped over, not copied. Deflated streams are inflated first.
    """
    if isinstance(part10, Path):
        with open(part10, "rb") as fp:
            if UID(transfer_syntax_uid) == DeflatedExplicitVRLittleEndian:
                return incompleteness(fp.read(), transfer_syntax_uid)  # inflated in memory: rare, small
            return _incompleteness(fp, fp.seek(0, 2), transfer_syntax_uid)
    ts = UID(transfer_syntax_uid)
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            stream = dataset_stream(part10, ts)
        except Exception as exc:  # pydicom raises EOFError, OSError, struct.error... on cut input
            return f"data set cut off or malformed: {exc}"
        fp = BytesIO(stream)
        return _incompleteness(fp, len(stream), ts, offset=0)
    return _incompleteness(BytesIO(part10), len(part10), ts)  # no copy of the (large) bytes


def _incompleteness(
    fp: BinaryIO, end: int, transfer_syntax_uid: str, offset: int | None = None
) -> str | None:
    """``incompleteness`` of the Part 10 file (``offset`` None) or bare data set (``offset`` 0) in ``fp``, ``end`` bytes long."""
    ts = UID(transfer_syntax_uid)
    try:
        fp.seek(dataset_offset(fp) if offset is None else offset)
        implicit = ts.is_implicit_VR if ts.is_transfer_syntax else False
        little = ts.is_little_endian if ts.is_transfer_syntax else True
        elements: dict[BaseTag, RawDataElement | DataElement] = {}
        last_end = fp.tell()
        for elem in data_element_generator(fp, implicit, little, defer_size=DEFER_BYTES):
            problem = _beyond(elem, end)
            if problem:
                return problem
            elements[elem.tag] = elem
            last_end = fp.tell()  # the generator has consumed (read or skipped) this element
    except Exception as exc:  # pydicom raises EOFError, OSError, struct.error... on cut input
        return f"data set cut off or malformed: {exc}"
    if last_end > end:
        return "the last element's delimiter is cut off"
    if last_end < end:
        return f"{end - last_end} bytes after the last complete element are no complete element (cut off?)"
    try:
        ds = Dataset(elements)
        return _check_level(ds, end)
    except Exception as exc:
        return f"data set cannot be parsed: {exc}"


def _name(tag: int) -> str:
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    return f"{keyword} {text}" if keyword else text


def _beyond(elem: RawDataElement | DataElement, end: int) -> str | None:
    """The element's declared length runs past ``end``, the end of the bytes that hold it."""
    if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
        return None
    if elem.value_tell + elem.length <= end:
        return None
    have = max(0, end - elem.value_tell)
    return f"{_name(elem.tag)} declares {elem.length} bytes, only {have} were received"


def _check_level(ds: Dataset, end: int) -> str | None:
    """Convert each element of one (sub)data set whose bytes end at offset ``end``; check its items."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement):
            problem = _beyond(raw, end)
            if problem:
                return problem
            if raw.value is None and raw.length != 0:
                continue  # skipped over (over DEFER_BYTES): nothing to convert
            value_end = raw.value_tell + len(raw.value or b"")
        else:
            value_end = end
        elem = ds[tag]  # converts the raw value; may raise
        if elem.VR == "SQ":
            for item in elem.value:
                problem = _check_level(item, value_end)
                if problem:
                    return f"{_name(tag)} item: {problem}"
    return None
