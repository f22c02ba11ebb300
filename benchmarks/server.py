"""The processes under test: a real ``xray-triage serve`` and dcmtk's ``storescp``.

The server runs exactly as deployed (its own process, its CLI, the shipped
model, a registered station) so the figures include everything a station
waits for: association admission, fsync'ed storage, the SQLite commit, the
durable queue and the worker. Results are read straight from its SQLite
database, which is the record the server commits before anyone can see a result.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.common import BenchSetupError, dcmtk_env, parse_db_time, terminate

BENCH_AE = "BENCH"
SERVER_AE = "XRAY_TRIAGE"
REFERENCE_AE = "STORESCP"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cli_command() -> list[str]:
    """The ``xray-triage`` CLI run by this interpreter, so server and benchmark share a venv."""
    return [sys.executable, "-m", "xray_triage_server.cli"]


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and friends from ``/proc/PID/status``; empty if unreadable."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


class RssSampler:
    """Samples a process's VmRSS every ``interval_s`` on a thread; ``peak_kb`` is the largest seen.

    Used per throughput run; the process's lifetime peak (VmHWM) is read as well
    at the end, but that one also covers everything before the run.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_kb(self.pid).get("VmRSS", 0)
            self.peak_kb = max(self.peak_kb, rss)
            self._stop.wait(self.interval_s)


@dataclass
class InstanceRecord:
    """What the server committed about one SOP instance (timestamps in POSIX seconds)."""

    sop_uid: str
    ai_status: str
    transfer_syntax: str
    file_size: int
    received_at: float | None
    job_started_at: float | None
    job_finished_at: float | None
    result_created_at: float | None
    timings_ms: dict[str, Any] = field(default_factory=dict)
    receive_ms: float | None = None  # the gateway's own timers, on the instance row
    store_ms: float | None = None

    @property
    def triaged(self) -> bool:
        return self.result_created_at is not None

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it: triaged, failed for good, or not a triage candidate."""
        return self.triaged or self.ai_status in ("failed", "not_applicable")


_LOOKUP_SQL = """
SELECT i.sop_instance_uid, i.ai_status, i.transfer_syntax_uid, i.file_size, i.received_at,
       j.started_at, j.finished_at, r.created_at, r.timings_ms, i.receive_ms, i.store_ms
FROM instances AS i
LEFT JOIN triage_jobs AS j ON j.instance_id = i.id
LEFT JOIN triage_results AS r ON r.instance_id = i.id
WHERE i.sop_instance_uid IN ({marks})
"""


class ResultsDB:
    """Read-only view of the server's SQLite database.

    WAL mode lets this reader poll while the server writes, without blocking it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self.conn.execute("PRAGMA query_only = 1")

    def close(self) -> None:
        self.conn.close()

    def lookup(self, sop_uids: list[str]) -> dict[str, InstanceRecord]:
        found: dict[str, InstanceRecord] = {}
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i : i + 500]
            sql = _LOOKUP_SQL.format(marks=",".join("?" * len(chunk)))
            for row in self.conn.execute(sql, chunk):
                found[row[0]] = instance_record(row)
        return found

    def wait_settled(
        self,
        sop_uids: list[str],
        deadline: float,
        poll_s: float = 0.1,
        alive: Callable[[], bool] = lambda: True,
    ) -> tuple[dict[str, InstanceRecord], float]:
        """Poll until every instance is settled, ``deadline`` (monotonic) passes or ``alive()`` is false.

        Returns the records and the wall-clock time (``time.time()``) at which the
        poll first saw all of them settled (an upper bound on the last commit).
        """
        while True:
            records = self.lookup(sop_uids)
            now = time.time()
            if len(records) == len(sop_uids) and all(r.settled for r in records.values()):
                return records, now
            if time.monotonic() >= deadline or not alive():
                return records, now
            time.sleep(poll_s)


class TriageServer:
    """``xray-triage serve`` in its own data directory on free ports; use as a context manager."""

    def __init__(
        self,
        work_dir: Path,
        model_dir: Path,
        *,
        name: str = "server",
        extra_env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
        roles: str | None = None,
        data_dir: Path | None = None,
        register_station: bool = True,
    ) -> None:
        self.name = name
        # roles: ``--roles`` (None: all three); data_dir: shared with other processes of one
        # deployment (the scale-out part), which then registers the station only once.
        self.roles = roles
        self.register_station = register_station
        self.data_dir = data_dir if data_dir is not None else work_dir / f"{name}-data"
        self.log_path = work_dir / f"{name}.log"
        self.model_dir = model_dir
        self.extra_env = extra_env or {}
        self.start_timeout_s = start_timeout_s
        self.dicom_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.start_seconds: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "xray-triage.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> TriageServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.register_station:
            self._add_station()
        self._spawn_and_wait()

    def _add_station(self) -> None:
        add = subprocess.run(
            [
                *cli_command(),
                "stations",
                "add",
                BENCH_AE,
                "--name",
                "benchmark",
                "--data-dir",
                str(self.data_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **self.extra_env},
        )
        if add.returncode != 0:
            raise BenchSetupError(
                f"xray-triage stations add failed: {add.stderr.strip() or add.stdout.strip()}"
            )

    def _ready_without_web(self) -> bool:
        """A process without the web role has no /healthz: its log says when it is ready."""
        assert self.roles is not None
        marker = "triage workers started" if "worker" in self.roles else "DICOM gateway listening"
        try:
            return marker in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def _spawn_and_wait(self) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *cli_command(),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--dicom-port",
                str(self.dicom_port),
                "--http-port",
                str(self.http_port),
                "--dicom-host",
                HOST,
                "--model",
                str(self.model_dir),
                *(["--roles", self.roles] if self.roles is not None else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.extra_env},
        )
        url = f"http://{HOST}:{self.http_port}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise BenchSetupError(
                    f"xray-triage serve exited {self.proc.returncode} at start-up:\n{self.log_tail()}"
                )
            if self.roles is not None and "web" not in self.roles:
                if self._ready_without_web():
                    break
            else:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
            if time.monotonic() - started > self.start_timeout_s:
                self.stop()
                raise BenchSetupError(
                    f"xray-triage serve not healthy after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.start_seconds = round(time.monotonic() - started, 3)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, as an init system would; the server should exit 0 after a clean shutdown."""
        if self.proc is not None and self.exit_code is None:
            self.exit_code = terminate(self.proc, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


class ReferenceSCP:
    """dcmtk's ``storescp``: the yardstick for ingest throughput on this machine.

    Accepts every transfer syntax it knows (``+xa``), forks one process per
    association (``--fork``, so concurrent senders are served concurrently, as
    ours are), skips reverse DNS (``-dhl``) and offers dcmtk's largest PDU.
    It writes each object to disk but does not fsync, and keeps no database.
    """

    def __init__(self, out_dir: Path, log_path: Path) -> None:
        self.out_dir = out_dir
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> ReferenceSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [
                "storescp",
                "--fork",
                "+xa",
                "-dhl",
                "-pdu",
                "131072",
                "-aet",
                REFERENCE_AE,
                "-od",
                str(self.out_dir),
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise BenchSetupError(
                    f"storescp exited {self.proc.returncode} at start-up (see {self.log_path})"
                )
            echo = subprocess.run(
                ["echoscu", "-aet", BENCH_AE, "-aec", REFERENCE_AE, HOST, str(self.port)],
                capture_output=True,
                env=dcmtk_env(),
                check=False,
            )
            if echo.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise BenchSetupError(
                    f"storescp does not answer C-ECHO: {echo.stderr.decode(errors='replace')}"
                )
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def stored(self) -> tuple[int, int]:
        """(files, bytes) under the output directory."""
        files = [p for p in self.out_dir.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)


def env_overrides() -> dict[str, str]:
    """XRAY_TRIAGE_* variables the server inherits: recorded, since they change what is measured."""
    return {k: v for k, v in os.environ.items() if k.startswith("XRAY_TRIAGE_")}


def instance_record(row: Any) -> InstanceRecord:
    """One row of ``_LOOKUP_SQL`` (SQLite or PostgreSQL) as an ``InstanceRecord``."""
    timings = row[8]
    return InstanceRecord(
        sop_uid=row[0],
        ai_status=row[1],
        transfer_syntax=row[2] or "",
        file_size=int(row[3] or 0),
        received_at=parse_db_time(row[4]),
        job_started_at=parse_db_time(row[5]),
        job_finished_at=parse_db_time(row[6]),
        result_created_at=parse_db_time(row[7]),
        timings_ms=json.loads(timings) if isinstance(timings, str) else dict(timings or {}),
        receive_ms=row[9],
        store_ms=row[10],
    )
