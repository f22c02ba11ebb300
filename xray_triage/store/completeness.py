"""Is a received data set complete? Every element's declared length must fit in the bytes received.

pydicom reads a short value without complaint (``fp.read(length)`` simply returns
fewer bytes) and drops an undefined-length element whose delimiter never came
(with only a warning), so a data set cut off in transit parses "fine" and would
be stored as a file that stricter readers (dcmtk, a PACS) refuse. This module
re-parses what was received with pydicom and checks pydicom's own record of
each element (its value offset and declared length, PS3.5 7.1) against the
length of the stream, at every nesting level, and that the last element ends
where the stream ends.
"""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM_DELIMITER_BYTES = 8  # (FFFE,E0DD) or (FFFE,E00D) tag + a zero 32-bit length


def dataset_offset(part10: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the 128-byte preamble, ``DICM``
    and the File Meta Information group (PS3.10 7.1). Raises if there is no preamble."""
    fp = BytesIO(part10)
    read_preamble(fp, False)
    read_dataset(fp, False, True, stop_when=lambda tag, _vr, _length: tag.group != 0x0002)
    return fp.tell()


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


def incompleteness(part10: bytes, transfer_syntax_uid: str) -> str | None:
    """Why the data set in ``part10`` (a Part 10 file as received) is incomplete, or None.

    Fully parses the data set (every element converted, every sequence item read)
    and reports the first element whose declared length runs past the bytes
    received, an undefined-length element without its delimiter, or any element
    pydicom cannot read. Deflated streams are inflated first.
    """
    ts = UID(transfer_syntax_uid)
    try:
        stream = dataset_stream(part10, ts)
        implicit = ts.is_implicit_VR if ts.is_transfer_syntax else False
        little = ts.is_little_endian if ts.is_transfer_syntax else True
        ds = read_dataset(BytesIO(stream), implicit, little)
    except Exception as exc:  # pydicom raises many kinds on malformed input
        return f"data set cannot be parsed: {exc}"
    last_end = _last_element_end(ds)  # before _check_level converts the raw elements
    try:
        problem = _check_level(ds, len(stream))
    except Exception as exc:
        return f"data set cannot be parsed: {exc}"
    if problem:
        return problem
    if last_end > len(stream):
        return "the last element's delimiter is cut off"
    if last_end < len(stream):
        return f"{len(stream) - last_end} bytes after the last complete element are no complete element (cut off?)"
    return None


def _name(tag: int) -> str:
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    return f"{keyword} {text}" if keyword else text


def _check_level(ds: Dataset, end: int) -> str | None:
    """Check each element of one (sub)data set whose bytes end at offset ``end``."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            if raw.length != UNDEFINED_LENGTH and raw.value_tell + raw.length > end:
                have = max(0, end - raw.value_tell)
                return f"{_name(tag)} declares {raw.length} bytes, only {have} were received"
            value_end = raw.value_tell + len(raw.value or b"")
        else:
            value_end = end
        elem = ds[tag]  # converts the raw value: the "full parse"; may raise
        if elem.VR == "SQ":
            for item in elem.value:
                problem = _check_level(item, value_end)
                if problem:
                    return f"{_name(tag)} item: {problem}"
    return None


def _last_element_end(ds: Dataset) -> int:
    """Stream offset just after the last top-level element, from pydicom's record of it.

    0 for an empty data set: pydicom returns one when an undefined-length element at
    the top level never reaches its delimiter (it stops reading and only warns).
    """
    if not len(ds):
        return 0
    raw = ds.get_item(list(ds.keys())[-1])
    if not isinstance(raw, RawDataElement):
        raise TypeError("expected a freshly read data set")
    if raw.length != UNDEFINED_LENGTH:
        return raw.value_tell + raw.length
    return raw.value_tell + len(raw.value or b"") + ITEM_DELIMITER_BYTES
