"""Where a C-MOVE sends its images: the Move Destination AE title -> host, port, TLS.

PS3.4 C.4.2.1.2: the SCP must know the destination by its AE title; an unknown one is
answered 0xA801 (Move destination unknown). Destinations come from the settings'
``[[dicom_peers]]`` list (name, ae_title, host, port, tls). The ``delivery`` branch's
destinations registry is meant to replace this source; callers only use
:func:`move_resolver`'s function, so that swap stays in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class PeerLike(Protocol):
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool


@dataclass(frozen=True)
class MoveDestination:
    host: str
    port: int
    tls: bool


def move_resolver(peers: Sequence[PeerLike]) -> Callable[[str], MoveDestination | None]:
    """``resolve_move_destination(ae_title) -> MoveDestination | None`` over ``peers``.

    AE titles compare after stripping spaces (they are space-padded on the wire), case
    sensitively (PS3.8 9.3.2: AE titles are case sensitive).
    """
    table = {peer.ae_title.strip(): MoveDestination(peer.host, int(peer.port), bool(peer.tls)) for peer in peers}

    def resolve_move_destination(ae_title: str) -> MoveDestination | None:
        return table.get(ae_title.strip())

    return resolve_move_destination
