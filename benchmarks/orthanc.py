"""Orthanc as a second reference receiver: Debian's ``Orthanc`` as a plain process with a JSON config.

A real PACS, unlike dcmtk's ``storescp``: it keeps an index (SQLite by default) and, in
Orthanc >= 1.7.4, fsyncs every stored file (``SyncStorageArea`` defaults to true). Its
SQLite index runs in WAL mode with ``PRAGMA SYNCHRONOUS=NORMAL`` (read from the binary's
strings), so an index commit is not fsynced; benchmarks/README.md (section "Ingest vs
storescp and Orthanc") says what that means for the comparison.

Only the keys in ``CONFIG_KEYS_SET`` are written; everything else is Orthanc's own default
(the Debian package's ``/etc/orthanc`` files are not read: the process gets only our file).
Its environment has ``TCP_NODELAY=1``, as every dcmtk process of the suite: Debian's Orthanc
uses dcmtk's ``libdcmnet`` for DICOM, which otherwise leaves Nagle's algorithm on and delays
each C-STORE response by a delayed-ACK timeout (measured: 1 sender of 0.5 MB images, ~20 img/s
without it).
The benchmark never imports from ``tests/`` (it must stand alone), so this is its own small
client: ``urllib`` without proxies, ready when ``GET /system`` answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from benchmarks.common import BenchSetupError, dcmtk_env, terminate
from benchmarks.server import HOST, free_port

ORTHANC_AET = "ORTHANC"
DEBIAN_BINARY = Path("/usr/sbin/Orthanc")
INSTALL_HINT = (
    "apt-get install orthanc (the benchmark starts /usr/sbin/Orthanc itself; the service may stay off)"
)
# Every key the benchmark sets; the report and README list them. Anything else: Orthanc's default.
CONFIG_KEYS_SET = (
    "StorageDirectory",
    "IndexDirectory",
    "DicomAet",
    "DicomPort",
    "HttpPort",
    "RemoteAccessAllowed",
    "AuthenticationEnabled",
    "DicomCheckCalledAet",
    "Plugins",
)
READY_TIMEOUT_S = 60.0

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def orthanc_binary() -> str | None:
    """The Orthanc executable (``Orthanc`` on PATH, else Debian's ``/usr/sbin/Orthanc``), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return str(DEBIAN_BINARY) if DEBIAN_BINARY.is_file() else None


def orthanc_config(root: Path, dicom_port: int, http_port: int) -> dict[str, Any]:
    """The JSON configuration: exactly ``CONFIG_KEYS_SET``, storage and index under ``root``.

    Loopback only (``RemoteAccessAllowed`` false), no HTTP authentication (nobody else can
    reach it), any called AE title accepted, no plugins (so the index is the built-in SQLite
    and the storage area the built-in filesystem one).
    """
    config = {
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
    }
    assert tuple(config) == CONFIG_KEYS_SET
    return config


class OrthancReceiver:
    """One Orthanc process under ``work_dir/name``; a context manager. Raises ``BenchSetupError``
    if Orthanc is not installed, exits at start-up or does not answer ``GET /system`` in 60 s."""

    def __init__(self, work_dir: Path, name: str = "orthanc") -> None:
        self.root = work_dir / name
        self.log_path = work_dir / f"{name}.log"
        self.dicom_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.system: dict[str, Any] = {}
        self.start_seconds: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def version(self) -> str | None:
        """Orthanc's own ``Version`` from ``GET /system`` (e.g. ``1.10.1``)."""
        return self.system.get("Version")

    def __enter__(self) -> OrthancReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise BenchSetupError(f"Orthanc not installed ({INSTALL_HINT})")
        self.root.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        config_path = self.root / "orthanc.json"
        config_path.write_text(
            json.dumps(orthanc_config(self.root, self.dicom_port, self.http_port), indent=2) + "\n"
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            env=dcmtk_env(),  # Orthanc's DICOM side is dcmtk's libdcmnet: TCP_NODELAY=1, as for storescp
        )
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise BenchSetupError(
                    f"Orthanc exited {self.proc.returncode} at start-up:\n{self.log_tail()}"
                )
            try:
                self.system = self.get("/system")
                break
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = repr(exc)
            if time.monotonic() - started > READY_TIMEOUT_S:
                self.stop()
                raise BenchSetupError(
                    f"Orthanc not ready after {READY_TIMEOUT_S:.0f} s ({last}):\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.start_seconds = round(time.monotonic() - started, 3)

    def get(self, path: str) -> Any:
        """``GET path`` on Orthanc's REST API, parsed JSON; raises ``urllib.error.URLError`` / ``ValueError``."""
        with _NO_PROXY.open(f"http://{HOST}:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def count_instances(self) -> int:
        """Instances Orthanc holds now (``GET /statistics`` -> ``CountInstances``)."""
        return int(self.get("/statistics")["CountInstances"])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); Orthanc exits 0 after a clean shutdown."""
        if self.proc is not None and self.exit_code is None:
            self.exit_code = terminate(self.proc, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])
