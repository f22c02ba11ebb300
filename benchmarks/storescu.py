"""Sending with dcmtk's ``storescu``: the station side of every measurement."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import dcmtk_env
from benchmarks.server import BENCH_AE, HOST


@dataclass
class SendResult:
    started_at: float  # time.time() just before the process was spawned
    exited_at: float  # time.time() when it exited: every C-STORE acknowledged, association released
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def seconds(self) -> float:
        return self.exited_at - self.started_at


class StoreSCU:
    """One ``storescu`` process sending ``files`` in one association.

    ``-R`` proposes only the SOP classes of the files being sent, as a station
    does (without it storescu proposes ~120 contexts, which costs the receiver
    negotiation time no modality would cause). ``flag`` picks the proposed
    transfer syntax so each file travels as stored. The exit time is taken by a
    thread blocked in ``communicate()``, so it is not quantised by anyone's polling.
    """

    def __init__(
        self, files: list[Path], flag: str, port: int, called_ae: str, timeout_s: float = 600.0
    ) -> None:
        self.timeout_s = timeout_s
        self.args = [
            "storescu",
            "-aet",
            BENCH_AE,
            "-aec",
            called_ae,
            "-R",
            flag,
            HOST,
            str(port),
            *map(str, files),
        ]
        self.result: SendResult | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StoreSCU:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.time()
        try:
            proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env()
            )
        except OSError as exc:
            self.result = SendResult(started, time.time(), -1, str(exc))
            self._done.set()
            return
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n(killed after {self.timeout_s:.0f} s)".encode()
        self.result = SendResult(started, time.time(), proc.returncode, out.decode(errors="replace").strip())
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> SendResult:
        """The result; never blocks longer than the process's own ``timeout_s``."""
        self._done.wait()
        self._thread.join()
        assert self.result is not None
        return self.result
