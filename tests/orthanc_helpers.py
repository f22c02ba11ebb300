"""Orthanc as a real PACS in the tests: Debian's ``orthanc`` started as a plain process.

``Orthanc(root).start()`` writes a JSON configuration (storage and index under ``root``, HTTP
and DICOM on free loopback ports, no authentication: loopback only, ``DicomCheckCalledAet``
off) and waits for ``GET /system``. ``stop()`` ends it with SIGTERM, ``start()`` again brings it
back on the same ports with the same storage (a PACS that went down and came back).

Every C-STORE Orthanc receives, also of an instance it already has, is written to
``receipts.txt`` by a Lua ``ReceivedCStoreInstanceFilter`` (Orthanc >= 1.9.7): ``receipts()``
counts how often each SOP Instance UID arrived, so a test can tell "arrived once" from
"arrived, and was sent again".

Other test modules (edge, DICOMweb, Q/R) may import this module; the fixture ``orthanc_bin``
skips (or fails under CI) when Orthanc is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e_helpers import free_port

ORTHANC_AET = "ORTHANC"
READY_DEADLINE_S = 60.0
INSTALL_HINT = (
    "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && "
    "apt-get install -y orthanc"
)

_RECEIPTS_LUA = """
function ReceivedCStoreInstanceFilter(dicom, origin, info)
  local f = io.open(%s, "a")
  f:write(tostring(dicom.SOPInstanceUID) .. "\\n")
  f:close()
  return 1  -- 1: store it (0 would discard it silently, another value is a failure status)
end
"""


def orthanc_binary() -> str:
    """The Orthanc executable; skips the test when missing (fails under CI, where scripts/test.sh installs it)."""
    path = shutil.which("Orthanc") or (str(Path("/usr/sbin/Orthanc")) if Path("/usr/sbin/Orthanc").is_file() else None)
    if path is None:
        message = f"Orthanc not installed ({INSTALL_HINT})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Orthanc:
    """One Orthanc process under ``root``; ``http_port`` / ``dicom_port`` are fixed at the first start."""

    root: Path
    aet: str = ORTHANC_AET
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    client: httpx.Client = field(default_factory=lambda: httpx.Client(trust_env=False, timeout=30))

    @property
    def receipts_path(self) -> Path:
        return self.root / "receipts.txt"

    @property
    def log_path(self) -> Path:
        return self.root / f"orthanc-{self.starts}.log"

    def _write_config(self) -> Path:
        if not self.http_port:
            self.http_port, self.dicom_port = free_port(), free_port()
            while self.dicom_port == self.http_port:
                self.dicom_port = free_port()
        lua = self.root / "receipts.lua"
        lua.write_text(_RECEIPTS_LUA % json.dumps(str(self.receipts_path)), encoding="utf-8")
        config = {
            "Name": "xray-triage-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "LuaScripts": [str(lua)],
            "Plugins": [],
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def start(self) -> Orthanc:
        assert self.proc is None or self.proc.poll() is not None, "Orthanc already running"
        binary = orthanc_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True,
            )  # fmt: skip
        self.wait_ready()
        return self

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                response = self.client.get(self.url("/system"), timeout=5)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc not ready after {deadline_s} s ({last})\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait (kill after 30 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        response = self.client.get(self.url(path))
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:300]}"
        return response.json()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return f"--- Orthanc log ({self.log_path}) ---\n" + "\n".join(text)

    # what Orthanc holds

    def sop_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc stores."""
        found = self.client.post(
            self.url("/tools/find"), json={"Level": "Instance", "Query": {}, "Expand": True}
        )
        assert found.status_code == 200, found.text[:300]
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found.json()}

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of the study with this Study Instance UID (expanded: MainDicomTags, ID)."""
        found = self.client.post(
            self.url("/tools/find"),
            json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}, "Expand": False},
        )
        assert found.status_code == 200, found.text[:300]
        instances: list[dict[str, Any]] = []
        for orthanc_id in found.json():
            instances += self.get(f"/studies/{orthanc_id}/instances")
        return instances

    def instance_file(self, sop_uid: str) -> bytes:
        found = self.client.post(
            self.url("/tools/find"), json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
        )
        assert found.status_code == 200 and found.json(), f"{sop_uid} not in Orthanc: {found.text[:300]}"
        response = self.client.get(self.url(f"/instances/{found.json()[0]}/file"))
        assert response.status_code == 200
        return response.content

    def receipts(self) -> Counter[str]:
        """How many C-STOREs of each SOP Instance UID Orthanc has received (duplicates included)."""
        if not self.receipts_path.exists():
            return Counter()
        return Counter(line for line in self.receipts_path.read_text(encoding="utf-8").splitlines() if line)


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc for one test (import it into a test module: ``from orthanc_helpers import orthanc``)."""
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield pacs
    finally:
        pacs.stop()
