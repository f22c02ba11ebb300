"""An Orthanc process (Debian ``orthanc`` + ``orthanc-dicomweb``) with our server as its DICOMweb server.

Orthanc runs as a plain process (no service) from a JSON configuration written into a
temporary directory, on free 127.0.0.1 ports, with its REST API open only to localhost.
Its DICOMweb plugin lists and retrieves from ``xrt``, our ``/dicomweb/`` with a bearer
token (``DicomWeb.Servers.xrt.HttpHeaders``). Missing packages skip the test with the
install command, except in CI (``CI`` set), where they fail it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e_helpers import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install orthanc orthanc-dicomweb"
READY_DEADLINE_S = 60.0


def require_orthanc_dicomweb() -> None:
    """Skip (fail in CI) unless Orthanc and its DICOMweb plugin are installed."""
    if shutil.which(ORTHANC) and DICOMWEB_PLUGIN.is_file():
        return
    message = f"Orthanc with its DICOMweb plugin is not installed ({INSTALL})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class OrthancDicomweb:
    """A running Orthanc; ``rest`` is an httpx client on its REST API."""

    def __init__(self, root: Path, base_url: str, rest: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.base_url = base_url
        self.rest = rest
        self.proc = proc

    def log(self) -> str:
        return (self.root / "orthanc.log").read_text(encoding="utf-8", errors="replace")[-4000:]

    def post(self, path: str, body: Any) -> Any:
        response = self.rest.post(path, json=body)
        assert response.status_code == 200, (
            f"POST {path}: {response.status_code} {response.text}\n{self.log()}"
        )
        return response.json()


@contextmanager
def orthanc_with_dicomweb_server(root: Path, server_url: str, token: str) -> Iterator[OrthancDicomweb]:
    """Orthanc with ``xrt`` = ``server_url`` (ending in ``/dicomweb/``) and ``token``; stopped on exit."""
    require_orthanc_dicomweb()
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "xrt-test-orthanc",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"xrt": {"Url": server_url, "HttpHeaders": {"Authorization": f"Bearer {token}"}}},
        },
    }
    (root / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen(
            [ORTHANC, str(root / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=root,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{http_port}"
    rest = httpx.Client(base_url=base, trust_env=False, timeout=60)
    orthanc = OrthancDicomweb(root, base, rest, proc)
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while True:
            assert proc.poll() is None, (
                f"Orthanc exited with {proc.returncode}\n{_read(root / 'orthanc.log')}"
            )
            try:
                if rest.get("/system").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"Orthanc not ready\n{_read(root / 'orthanc.log')}"
            time.sleep(0.2)
        yield orthanc
    finally:
        rest.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else ""
