"""Association slots: how many associations one station, one address and unknown stations may hold.

Pure bookkeeping, no sockets: :class:`SlotTable` is asked at A-ASSOCIATE-RQ time
(EVT_REQUESTED) whether one more association fits, and told when one ends. The
limits keep one station (or one spoofed AE title, or one address) from taking
every slot, and keep ``reserved_for_registered`` slots that only registered
stations may use (unknown stations only get in with ``accept_unknown_stations``).
A refusal is answered with A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded
(PS3.8 9.3.4), so a modality retries later.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotLimits:
    """Limits on concurrent associations (counts, not rates)."""

    max_associations: int  # all associations together
    per_station: int  # one calling AE title
    per_address: int  # one peer IP address
    reserved_for_registered: int  # slots unknown stations may never take

    def refusal(
        self, live: list[tuple[str, str, bool]], calling_ae: str, address: str, registered: bool
    ) -> str | None:
        """Why one more association from ``calling_ae`` at ``address`` does not fit, or None.

        ``live`` holds ``(calling_ae, address, registered)`` of every association
        already admitted and still open.
        """
        if len(live) >= self.max_associations:
            return f"all {self.max_associations} association slots are in use"
        if not registered:
            unknown_share = self.max_associations - self.reserved_for_registered
            if len(live) >= unknown_share:
                return f"the {unknown_share} slots open to unregistered stations are in use"
        same_station = sum(1 for ae, _, _ in live if ae == calling_ae)
        if same_station >= self.per_station:
            return f"calling AE title {calling_ae!r} already holds {same_station} associations (limit {self.per_station})"
        same_address = sum(1 for _, addr, _ in live if addr == address)
        if same_address >= self.per_address:
            return f"address {address} already holds {same_address} associations (limit {self.per_address})"
        return None


class SlotTable:
    """Thread-safe table of admitted associations, keyed by any hashable (the Association)."""

    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._live: dict[Hashable, tuple[str, str, bool]] = {}

    def try_take(self, key: Hashable, calling_ae: str, address: str, registered: bool) -> str | None:
        """Take a slot for ``key``; returns the refusal reason instead when it does not fit."""
        with self._lock:
            why = self.limits.refusal(list(self._live.values()), calling_ae, address, registered)
            if why is None:
                self._live[key] = (calling_ae, address, registered)
            return why

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._live.pop(key, None)

    def prune(self, alive: set[Hashable]) -> None:
        """Drop entries whose association is gone without an end event (belt and braces)."""
        with self._lock:
            for key in [k for k in self._live if k not in alive]:
                del self._live[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)
