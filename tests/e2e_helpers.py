"""Helpers for the end-to-end tests: a real ``xray-triage serve`` process driven by dcmtk.

Everything here talks to the server the way a site does: dcmtk ``storescu`` /
``echoscu`` over TCP, the HTTP API, the ``xray-triage`` CLI, and (for checks
only) the SQLite file and the data directory. Deadlines below are there so a
hung server fails the test with its log; no test asserts on speed.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from db_helpers import db_env

from xray_triage.settings import DEFAULT_MODEL_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DICOM = SHARED_DATA / "dicom"
DEFAULT_MODEL_CARD = DEFAULT_MODEL_DIR / "model.toml"  # the shipped model (package data)

CALLED_AE = "XRAY_TRIAGE"
STATION1 = "STATION1"
STATION1_NAME = "Trạm Y tế Thạnh An"

FINAL_AI_STATUSES = frozenset({"done", "failed", "not_applicable"})
PRIORITIES = frozenset({"urgent", "abnormal", "normal"})

# storescu proposes only uncompressed transfer syntaxes unless told otherwise.
TS_FLAGS = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}

SERVER_READY_DEADLINE_S = 120.0
TRIAGE_DEADLINE_S = 180.0
DCMTK_TIMEOUT_S = 120.0


# -- environment -------------------------------------------------------------------------


def dcmtk_env() -> dict[str, str]:
    """Debian's dcmtk stalls ~57 ms per image on loopback without TCP_NODELAY."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any XRAY_TRIAGE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_TRIAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "xray-triage"
    if script.is_file():
        return [str(script)]
    venv_script = PROJECT_ROOT / ".venv" / "bin" / "xray-triage"
    if venv_script.is_file():
        return [str(venv_script)]
    return [sys.executable, "-m", "xray_triage_server.cli"]


def run_cli(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    if env is None:
        env = server_env(_db_env_of_args(args))
    return subprocess.run(
        [*cli_command(), *map(str, args)],
        input=stdin_text,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def _db_env_of_args(args: Sequence[str | Path]) -> dict[str, str]:
    """The test database of the ``--data-dir`` among ``args`` (tests/db_helpers.py), if any."""
    args = [str(a) for a in args]
    if "--data-dir" in args and args.index("--data-dir") + 1 < len(args):
        return db_env(Path(args[args.index("--data-dir") + 1]))
    return {}


def check_cli(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = run_cli(*args, **kwargs)
    assert proc.returncode == 0, (
        f"xray-triage {' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _station_args(data_dir: Path, ae_title: str, name: str, allow_ip: str | None) -> list[str]:
    args = ["stations", "add", ae_title, "--name", name, "--data-dir", str(data_dir)]
    return args + ["--allow-ip", allow_ip] if allow_ip else args


_ADD_MANY = """
import contextlib, io, json, sys
from xray_triage_server.cli import main
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    if code != 0 or "added station" not in out.getvalue():
        sys.exit(f"xray-triage {' '.join(args)} -> {code}: {out.getvalue()}")
    print(out.getvalue(), end="")
"""


def add_stations(data_dir: Path, stations: Sequence[tuple[str, str, str | None]]) -> None:
    """Register stations: (ae_title, name, allow_ip).

    One station: the ``xray-triage stations add`` executable. Several: the same CLI
    entry point (``xray_triage_server.cli.main``) called once per station in a single
    interpreter, which saves an interpreter start per station.
    """
    if not stations:
        return
    if len(stations) == 1:
        proc = run_cli(*_station_args(data_dir, *stations[0]))
    else:
        batch = [_station_args(data_dir, *station) for station in stations]
        proc = subprocess.run(
            [python_command(), "-c", _ADD_MANY, json.dumps(batch)],
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=server_env(db_env(data_dir)),
            timeout=120,
        )
    assert proc.returncode == 0 and proc.stdout.count("added station") == len(stations), (
        f"stations add {stations} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )


_API_USER = """
import contextlib, io, sys
from xray_triage_server.cli import main
data = ["--data-dir", sys.argv[1]]
sys.stdin = io.StringIO("e2e-specialist-password\\n")
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["users", "add", "e2e-specialist", "--role", "specialist", "--password-stdin", *data])
    code = code or main(["tokens", "create", "e2e-specialist", "--name", "e2e tests", *data])
if code != 0:
    sys.exit(f"users add / tokens create -> {code}: {out.getvalue()}")
print(out.getvalue().splitlines()[-1])
"""


def create_api_user(data_dir: Path) -> str:
    """A specialist user with an API token (the JSON API needs one); returns the token."""
    proc = subprocess.run(
        [python_command(), "-c", _API_USER, str(data_dir)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=server_env(db_env(data_dir)),
        timeout=120,
    )
    token = proc.stdout.strip()
    assert proc.returncode == 0 and token.startswith("xrt_"), f"{proc.returncode}\n{proc.stdout}{proc.stderr}"
    return token


_USERS = """
import contextlib, io, json, sys
from xray_triage_server.cli import main
data = ["--data-dir", sys.argv[1]]
tokens = {}
for name, role, station, password in json.loads(sys.argv[2]):
    sys.stdin = io.StringIO(password + "\\n")
    out = io.StringIO()
    extra = ["--station", station] if station else []
    with contextlib.redirect_stdout(out):
        code = main(["users", "add", name, "--role", role, *extra, "--password-stdin", *data])
        code = code or main(["tokens", "create", name, "--name", "e2e tests", *data])
    if code != 0:
        sys.exit(f"users add / tokens create {name} -> {code}: {out.getvalue()}")
    tokens[name] = out.getvalue().splitlines()[-1].strip()
print(json.dumps(tokens))
"""


def create_users(data_dir: Path, users: Sequence[tuple[str, str, str | None, str]]) -> dict[str, str]:
    """Add users (name, role, station AE or None, password), each with an API token; name -> token."""
    proc = subprocess.run(
        [python_command(), "-c", _USERS, str(data_dir), json.dumps(list(users))],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=server_env(db_env(data_dir)),
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.returncode}\n{proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def web_login(base_url: str, username: str, password: str) -> httpx.Client:
    """A browser-like client logged in through the real login form (login CSRF cookie and token)."""
    client = httpx.Client(base_url=base_url, trust_env=False, timeout=30)
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]*)"', page.text)
    assert page.status_code == 200 and token, page.text[:500]
    response = client.post(
        "/login", data={"username": username, "password": password, "login_csrf": token.group(1), "next": "/"}
    )
    assert response.status_code == 303, f"login {username}: {response.status_code} {response.text[:500]}"
    return client


def python_command() -> str:
    venv_python = PROJECT_ROOT / ".venv" / "bin" / "python"
    if Path(sys.executable).parent == venv_python.parent or not venv_python.is_file():
        return sys.executable
    return str(venv_python)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- test data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleFile:
    path: Path
    transfer_syntax: str
    modality: str
    sop_class: str
    rows: int
    cols: int
    notes: str

    @property
    def name(self) -> str:
        return self.path.name


def load_manifest() -> list[SampleFile]:
    with open(SHARED_DICOM / "manifest.csv", newline="", encoding="utf-8") as f:
        return [
            SampleFile(
                path=SHARED_DICOM / row["file"],
                transfer_syntax=row["transfer_syntax"].strip(),
                modality=row["modality"].strip(),
                sop_class=row["sop_class"].strip(),
                rows=int(row["rows"]),
                cols=int(row["cols"]),
                notes=row.get("notes", ""),
            )
            for row in csv.DictReader(f)
        ]


@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str


def read_uids(path: Path) -> Uids:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # force: raw data sets too
    return Uids(
        study=str(ds.StudyInstanceUID),
        series=str(ds.SeriesInstanceUID),
        sop=str(ds.SOPInstanceUID),
        sop_class=str(ds.SOPClassUID),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")),
    )


def meta_group_end(data: bytes) -> int:
    """Offset of the first byte after the File Meta Information group (0002,xxxx).

    The meta group is always Explicit VR Little Endian (PS3.10 7.1). Parsed here by
    hand so the comparison does not depend on how any DICOM library re-encodes.
    """
    pos = 132 if data[128:132] == b"DICM" else 0
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in long_vrs:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    return pos


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after the file meta group."""
    data = Path(path).read_bytes()
    return data[meta_group_end(data) :]


def copy_with_new_uids(sources: Iterable[Path], dest_dir: Path, prefix: str = "") -> list[Path]:
    """Copy files and give the copies new Study/Series/SOP Instance UIDs with dcmtk's dcmodify."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for n, src in enumerate(sources):
        dst = dest_dir / f"{prefix}{n:03d}_{Path(src).name}"
        shutil.copyfile(src, dst)
        copies.append(dst)
    if copies:
        dcmodify("-gin", "-gse", "-gst", *copies)
    return copies


def dcmodify(*args: str | Path) -> None:
    """Run dcmtk dcmodify in place without .bak files (meta header UIDs follow the data set)."""
    proc = subprocess.run(
        ["dcmodify", "-nb", *map(str, args)], capture_output=True, text=True, env=dcmtk_env(), timeout=120
    )
    assert proc.returncode == 0, f"dcmodify {args} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"


def random_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def write_random_dataset_file(path: Path, seed: int = 1234, size: int = 200_000) -> str:
    """A valid File Meta header (DX, new SOP Instance UID) followed by random bytes; return the UID."""
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    sop_uid = random_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = random_uid()
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(random.Random(seed).randbytes(size))
    path.write_bytes(buf.getvalue())
    return sop_uid


def first_fragment_offset(data: bytes) -> tuple[int, int]:
    """(offset, length) of the first fragment of encapsulated top-level Pixel Data."""
    header = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
    pos = data.rfind(header)
    assert pos > 0, "no encapsulated (7FE0,0010) in file"
    pos += len(header)
    tag, length = struct.unpack_from("<II", data, pos)
    assert tag == 0xE000FFFE, "no Basic Offset Table item"
    pos += 8 + length
    tag, length = struct.unpack_from("<II", data, pos)
    assert tag == 0xE000FFFE, "no first fragment item"
    return pos + 8, length


# -- dcmtk -------------------------------------------------------------------------------


@dataclass
class DcmtkRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def store_responses(self) -> list[str]:
        """Each ``Received Store Response (...)`` reported with -v, e.g. ``Success``."""
        return re.findall(r"Received Store Response \(([^)]*)\)", self.output)

    def describe(self) -> str:
        return f"{' '.join(self.args)}\n-> exit {self.returncode}\n{self.output}"


def storescu(
    files: Sequence[Path],
    port: int,
    *,
    aet: str = STATION1,
    aec: str = CALLED_AE,
    ts_flag: str | None = None,
    host: str = "127.0.0.1",
    timeout: float = DCMTK_TIMEOUT_S,
    tls: Sequence[str] = (),
) -> DcmtkRun:
    """Send files in one association; the -x flag follows the files' transfer syntax.

    ``tls``: dcmtk TLS options, e.g. ``["+tls", key, cert, "+cf", ca]`` (DICOM TLS port)."""
    if ts_flag is None:
        flags = {TS_FLAGS[read_uids(f).transfer_syntax] for f in files}
        assert len(flags) == 1, f"one storescu run sends one transfer syntax, got {flags}"
        ts_flag = flags.pop()
    args = ["storescu", "-v", ts_flag, *map(str, tls), "-aet", aet, "-aec", aec, host, str(port), *map(str, files)]
    proc = subprocess.run(
        args, capture_output=True, text=True, errors="replace", env=dcmtk_env(), timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return DcmtkRun(args, proc.returncode, proc.stdout, proc.stderr)


def store_ok(files: Sequence[Path], port: int, **kwargs: Any) -> DcmtkRun:
    """Send and assert every file was acknowledged with Success (exit code and -v responses)."""
    run = storescu(files, port, **kwargs)
    assert run.returncode == 0, run.describe()
    assert run.store_responses == ["Success"] * len(files), run.describe()
    assert "Store Failed" not in run.output and "E: " not in run.output, run.describe()
    return run


def echoscu(
    port: int, *, aet: str = STATION1, aec: str = CALLED_AE, host: str = "127.0.0.1", tls: Sequence[str] = ()
) -> DcmtkRun:
    args = ["echoscu", "-v", *map(str, tls), "-aet", aet, "-aec", aec, host, str(port)]
    proc = subprocess.run(
        args, capture_output=True, text=True, errors="replace", env=dcmtk_env(), timeout=60, stdin=subprocess.DEVNULL
    )
    return DcmtkRun(args, proc.returncode, proc.stdout, proc.stderr)


# -- raw C-STORE with pynetdicom ---------------------------------------------------------


_raw_send_lock = threading.Lock()


def send_raw_c_store(path: Path, port: int, *, aet: str = STATION1, aec: str = CALLED_AE) -> int:
    """C-STORE the file's encoded data set *as it is on disk* (no decoding) and return the status.

    pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` makes ``send_c_store(path)`` read the
    File Meta group only and stream the rest of the file unchanged, so a truncated or
    garbled data set really reaches the server.
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    meta, _ = split_dataset(Path(path))
    with _raw_send_lock:
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            ae = AE(ae_title=aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
            assoc = ae.associate("127.0.0.1", port, ae_title=aec)
            assert assoc.is_established, f"association for raw C-STORE of {path} not established"
            try:
                status = assoc.send_c_store(Path(path))
            finally:
                assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in status, f"no C-STORE response for {path} (association aborted?)"
    return int(status.Status)


def is_failure_status(status: int) -> bool:
    """PS3.4 B.2.3: failures are 0xA7xx (out of resources), 0xA9xx (mismatch), 0xCxxx."""
    return (status & 0xFF00) in (0xA700, 0xA900) or (status & 0xF000) == 0xC000


# -- the server process --------------------------------------------------------------------

# HTTP to the server under test only: never through a proxy from the environment.
http = httpx.Client(trust_env=False, timeout=30)


class AcknowledgedBurst:
    """Files sent from one thread per share, each with its own ``storescu``, so that its exit code
    is that file's acknowledgement: ``results[file]`` is the run, and ``wait_acknowledged(n)``
    returns once ``n`` files were acknowledged (to pull a plug mid-burst)."""

    def __init__(self, shares: Sequence[Sequence[Path]], port: int) -> None:
        self.port = port
        self.results: dict[Path, DcmtkRun] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._acknowledged = threading.Semaphore(0)
        self._threads = [threading.Thread(target=self._send, args=(list(share),)) for share in shares]

    def _send(self, files: list[Path]) -> None:
        try:
            for f in files:
                run = storescu([f], self.port)
                with self._lock:
                    self.results[f] = run
                if run.returncode == 0:
                    self._acknowledged.release()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(exc)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def wait_acknowledged(self, n: int, timeout_s: float = 120.0) -> None:
        for _ in range(n):
            assert self._acknowledged.acquire(timeout=timeout_s), f"fewer than {n} files acknowledged"

    def join(self, timeout_s: float = 300.0) -> list[Path]:
        """Wait for every sender; returns the files acknowledged (each answered Success)."""
        for t in self._threads:
            t.join(timeout_s)
        assert not self.errors, self.errors
        acked = [f for f, run in self.results.items() if run.returncode == 0]
        for f in acked:
            assert self.results[f].store_responses == ["Success"], self.results[f].describe()
        return acked


def assert_acknowledged_kept(server: Server, acked: Iterable[Path]) -> None:
    """Every acknowledged file is stored, with the data set bytes it was sent with."""
    stored = {r[0] for r in query(server.data_dir, "SELECT sop_instance_uid FROM instances")}
    for f in acked:
        uids = read_uids(f)
        assert uids.sop in stored, f"{f.name} was acknowledged but is not stored"
        image = next(i for i in server.study(uids.study)["images"] if i["sop_instance_uid"] == uids.sop)
        assert dataset_bytes(server.data_dir / image["file_path"]) == dataset_bytes(f), f.name


def resend_and_assert_each_once(server: Server, copies: Sequence[Path], acked: Sequence[Path]) -> None:
    """The modality retries what was not acknowledged; then every file is stored and triaged exactly once."""
    for f in copies:
        if f not in acked:
            store_ok([f], server.dicom_port)
    studies = server.wait_final(read_uids(f).study for f in copies)
    for f in copies:
        uids = read_uids(f)
        assert studies[uids.study]["ai_status"] == "done", studies[uids.study]
        assert counts_for_sop(server.data_dir, uids.sop) == (1, 1, 1), f.name


class ServerExited(RuntimeError):
    """The server process ended while we waited for it to become ready."""


@dataclass
class Server:
    """One ``xray-triage serve`` process with its own data directory and ports."""

    root: Path
    model_dir: Path | None
    env_extra: dict[str, str] = field(default_factory=dict)
    data_dir: Path = field(init=False)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0
    api_token: str = ""  # Bearer token of a specialist (sees every station's studies)
    command: list[str] | None = None  # the xray-triage executable; default cli_command()
    roles: str | None = None  # --roles; None: all three (the default)

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"

    # lifecycle
    def start(self, *, env_extra: dict[str, str] | None = None, wait: bool = True) -> Server:
        """Start on fresh free ports; retried if a port was taken between probing and binding."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        if env_extra is not None:
            self.env_extra = env_extra
        for attempt in range(3):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except ServerExited:
                if attempt == 2 or "Address already in use" not in self.log():
                    raise
        return self

    def _spawn(self) -> None:
        self.starts += 1
        self.dicom_port, self.http_port = free_port(), free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.log_path = self.root / f"server-{self.starts}.log"
        args = [
            *(self.command or cli_command()),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dicom-port",
            str(self.dicom_port),
            "--http-port",
            str(self.http_port),
        ]
        if self.model_dir is not None:
            args += ["--model", str(self.model_dir)]
        if self.roles is not None:
            args += ["--roles", self.roles]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env({**db_env(self.data_dir), **self.env_extra}),
                cwd=self.root,
                start_new_session=True,
            )

    def wait_ready(self, deadline_s: float = SERVER_READY_DEADLINE_S, echo_aet: str = STATION1) -> None:
        """Until GET /healthz answers 200 and a C-ECHO succeeds (a process without the gateway: no
        C-ECHO; a worker-only process: until its log says the workers started); raise with the log tail."""
        deadline = time.monotonic() + deadline_s
        last = "nothing tried yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerExited(
                    f"server exited with {self.proc.returncode} before it was ready\n{self.log_tail()}"
                )
            if self.roles is not None and "web" not in self.roles:
                if "triage workers started" in self.log():
                    return
                last = "no 'triage workers started' in the log yet"
                time.sleep(0.2)
                continue
            try:
                response = http.get(self.url("/healthz"), timeout=5)
                if response.status_code == 200 and self.roles is not None and "gateway" not in self.roles:
                    return  # a process without the gateway has no DICOM port to echo
                if response.status_code == 200:
                    echo = echoscu(self.dicom_port, aet=echo_aet)
                    if echo.returncode == 0:
                        return
                    last = f"echoscu: {echo.describe()}"
                else:
                    last = f"healthz {response.status_code}: {response.text}"
            except httpx.HTTPError as exc:
                last = f"healthz: {exc!r}"
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {deadline_s} s (last: {last})\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; kill -9 (and fail) if it does not exit. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                raise AssertionError(
                    f"server ignored SIGTERM for {timeout_s} s, killed\n{self.log_tail()}"
                ) from None
        return self.proc.returncode

    def stop_cleanly(self) -> None:
        code = self.stop()
        assert code == 0, f"server exited with {code} after SIGTERM\n{self.log_tail()}"
        assert any(line.endswith(": stopped") for line in self.log().splitlines()), (
            f"the server log does not end its shutdown with 'stopped'\n{self.log_tail()}"
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    # observation
    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def all_logs(self) -> str:
        return "".join(
            p.read_text(encoding="utf-8", errors="replace") for p in sorted(self.root.glob("server-*.log"))
        )

    def log_tail(self, lines: int = 60) -> str:
        text = self.log().splitlines()[-lines:]
        return f"--- server log ({self.log_path}) ---\n" + "\n".join(text)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}

    def api(self, path: str, expect: int = 200) -> Any:
        response = http.get(self.url(path), headers=self.auth_headers())
        assert response.status_code == expect, (
            f"GET {path}: {response.status_code} {response.text}\n{self.log_tail()}"
        )
        return response.json()

    def study(self, study_uid: str) -> dict[str, Any]:
        return self.api(f"/api/studies/{study_uid}")

    def echo_ok(self) -> None:
        assert self.running, f"server is not running\n{self.log_tail()}"
        run = echoscu(self.dicom_port)
        assert run.returncode == 0, run.describe() + "\n" + self.log_tail()

    def db(self) -> sqlite3.Connection:
        return connect_db(self.data_dir)

    def wait_final(
        self, study_uids: Iterable[str], deadline_s: float = TRIAGE_DEADLINE_S
    ) -> dict[str, dict[str, Any]]:
        """Poll the API until every study has a final AI status; return the studies."""
        wanted = list(dict.fromkeys(study_uids))
        deadline = time.monotonic() + deadline_s
        studies: dict[str, dict[str, Any]] = {}
        while True:
            for uid in wanted:
                if uid not in studies or studies[uid]["ai_status"] not in FINAL_AI_STATUSES:
                    response = http.get(self.url(f"/api/studies/{uid}"), headers=self.auth_headers())
                    if response.status_code == 200:
                        studies[uid] = response.json()
            pending = [
                u for u in wanted if u not in studies or studies[u]["ai_status"] not in FINAL_AI_STATUSES
            ]
            if not pending:
                return studies
            if time.monotonic() > deadline or not self.running:
                states = {u: studies.get(u, {}).get("ai_status", "<not found>") for u in pending}
                raise AssertionError(
                    f"{len(pending)} studies not final after {deadline_s} s "
                    f"(server running: {self.running}): {states}\n{self.log_tail()}"
                )
            time.sleep(0.25)


# -- the database and the data directory --------------------------------------------------


def connect_db(data_dir: Path) -> sqlite3.Connection:
    path = data_dir / "xray-triage.db"
    assert path.is_file(), f"no database at {path}"
    conn = sqlite3.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _pg_statement(sql: str, params: Any) -> tuple[str, Any]:
    """sqlite3's ``?`` / ``:name`` placeholders as psycopg's ``%s`` / ``%(name)s``."""
    if isinstance(params, dict):
        return re.sub(r"(?<!:):(\w+)", r"%(\1)s", sql), params
    return sql.replace("?", "%s"), tuple(params)


class _Row(tuple):  # noqa: SLOT001 - like sqlite3.Row: by index or by column name
    names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self.names.index(key) if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.names)


def query(data_dir: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Rows of ``sql`` (``?`` placeholders) on the data directory's database (SQLite or the test PostgreSQL)."""
    url = db_env(data_dir).get("XRAY_TRIAGE_DATABASE_URL")
    if url is not None:
        from sqlalchemy import create_engine

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                result = conn.exec_driver_sql(*_pg_statement(sql, params))
                names = tuple(result.keys())
                rows = []
                for values in result.fetchall():
                    row = _Row(tuple(values))
                    row.names = names
                    rows.append(row)
                return rows  # type: ignore[return-value]
        finally:
            engine.dispose()
    conn = connect_db(data_dir)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def execute(data_dir: Path, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one changing statement (``?`` placeholders) on the data directory's database, committed;
    returns the row count (SQLite or the test PostgreSQL)."""
    url = db_env(data_dir).get("XRAY_TRIAGE_DATABASE_URL")
    if url is None:
        conn = connect_db(data_dir)
        try:
            with conn:
                return conn.execute(sql, params).rowcount
        finally:
            conn.close()
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            return conn.exec_driver_sql(*_pg_statement(sql, params)).rowcount
    finally:
        engine.dispose()


def scalar(data_dir: Path, sql: str, params: Sequence[Any] = ()) -> Any:
    rows = query(data_dir, sql, params)
    return rows[0][0] if rows else None


def counts_for_sop(data_dir: Path, sop_uid: str) -> tuple[int, int, int]:
    """(instances, triage jobs, triage results) for one SOP Instance UID."""
    row = query(
        data_dir,
        """
        SELECT
          (SELECT COUNT(*) FROM instances WHERE sop_instance_uid = :uid),
          (SELECT COUNT(*) FROM triage_jobs j JOIN instances i ON i.id = j.instance_id WHERE i.sop_instance_uid = :uid),
          (SELECT COUNT(*) FROM triage_results r JOIN instances i ON i.id = r.instance_id
             WHERE i.sop_instance_uid = :uid)
        """,
        {"uid": sop_uid},  # type: ignore[arg-type]
    )[0]
    return int(row[0]), int(row[1]), int(row[2])


DB_FILES = {"xray-triage.db", "xray-triage.db-wal", "xray-triage.db-shm", "xray-triage.db-journal"}


def assert_store_consistent(data_dir: Path) -> None:
    """No half-written file, no file without a row, no row without a file, no orphan row."""
    data_dir = data_dir.resolve()
    problems: list[str] = []
    parts = (
        sorted(p.name for p in (data_dir / "incoming").glob("*")) if (data_dir / "incoming").exists() else []
    )
    if parts:
        problems.append(f"left in incoming/: {parts}")
    files: set[str] = set()
    quarantined: set[str] = set()
    for path in data_dir.rglob("*"):
        rel = path.relative_to(data_dir)
        if (
            path.is_dir()
            or rel.parts[0] in ("incoming", ".processes")  # .processes: locks of live servers (store/data_dir_lock.py)
            or (len(rel.parts) == 1 and rel.name in DB_FILES)
        ):
            continue
        if rel.parts[0] == "quarantine" and len(rel.parts) == 3 and path.suffix == ".dcm":
            quarantined.add(str(rel))
            continue
        if rel.parts[0] != "dicom" or len(rel.parts) != 4 or path.suffix != ".dcm":
            problems.append(f"unexpected file in the data directory: {rel}")
            continue
        files.add(str(rel))
    rows = query(
        data_dir,
        "SELECT i.file_path, i.sop_instance_uid, s.series_instance_uid, st.study_instance_uid "
        "FROM instances i JOIN series s ON s.id = i.series_id JOIN studies st ON st.id = s.study_id",
    )
    known = {r["file_path"] for r in rows}
    # The DICOM objects the server makes (AI SR/GSPS, specialist GSPS/SR) lie beside the images.
    # A running server's results consumer commits an object's row just after its file is in place,
    # so a file not yet known is looked for again until its row appears (bounded).
    deadline = time.monotonic() + 30
    while True:
        files -= {r["file_path"] for r in query(data_dir, "SELECT file_path FROM result_objects")}
        if not (files - known) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for r in rows:
        expected = f"dicom/{r['study_instance_uid']}/{r['series_instance_uid']}/{r['sop_instance_uid']}.dcm"
        if r["file_path"] != expected:
            problems.append(
                f"instance {r['sop_instance_uid']} stored at {r['file_path']}, expected {expected}"
            )
    if files - known:
        problems.append(f"files without an instance row: {sorted(files - known)}")
    if known - files:
        problems.append(f"instance rows without a file: {sorted(known - files)}")
    kept_apart = quarantined_rows(data_dir)
    if quarantined != kept_apart:
        problems.append(
            f"quarantined files without a row: {sorted(quarantined - kept_apart)}; "
            f"rows without a file: {sorted(kept_apart - quarantined)}"
        )
    orphan_checks = {
        "instances without a series/study": "SELECT COUNT(*) FROM instances i LEFT JOIN series s ON s.id = i.series_id "
        "LEFT JOIN studies st ON st.id = s.study_id WHERE st.id IS NULL",
        "series without instances": "SELECT COUNT(*) FROM series s WHERE NOT EXISTS "
        "(SELECT 1 FROM instances i WHERE i.series_id = s.id)",
        "studies without series": "SELECT COUNT(*) FROM studies st WHERE NOT EXISTS "
        "(SELECT 1 FROM series s WHERE s.study_id = st.id)",
        "triage jobs without an instance": "SELECT COUNT(*) FROM triage_jobs j WHERE NOT EXISTS "
        "(SELECT 1 FROM instances i WHERE i.id = j.instance_id)",
        "triage results without an instance": "SELECT COUNT(*) FROM triage_results r WHERE NOT EXISTS "
        "(SELECT 1 FROM instances i WHERE i.id = r.instance_id)",
        "instances with more than one result": "SELECT COUNT(*) FROM (SELECT instance_id FROM triage_results "
        "GROUP BY instance_id HAVING COUNT(*) > 1) AS repeated",
        "done instances without a result": "SELECT COUNT(*) FROM instances i WHERE i.ai_status = 'done' AND NOT EXISTS "
        "(SELECT 1 FROM triage_results r WHERE r.instance_id = i.id)",
    }
    for what, sql in orphan_checks.items():
        n = scalar(data_dir, sql)
        if n:
            problems.append(f"{what}: {n}")
    assert not problems, "store is inconsistent:\n" + "\n".join(problems)


def quarantined_rows(data_dir: Path) -> set[str]:
    """File paths of quarantined instances (the table is in every schema since the baseline migration)."""
    return {r[0] for r in query(data_dir, "SELECT file_path FROM quarantined_instances")}


def own_error_lines(log: str) -> list[str]:
    """ERROR/CRITICAL lines logged by the server's own packages (not by pydicom & co.)."""
    return re.findall(r"^.* (?:ERROR|CRITICAL) (?:xray_triage|dicom_gateway|consult_web)\b.*$", log, re.M)


def model_labels(model_dir: Path) -> list[str]:
    card = model_dir if model_dir.is_file() else next(model_dir.glob("*.toml"))
    return list(tomllib.loads(card.read_text(encoding="utf-8"))["model"]["labels"])


def model_version(model_dir: Path) -> str:
    card = model_dir if model_dir.is_file() else next(model_dir.glob("*.toml"))
    model = tomllib.loads(card.read_text(encoding="utf-8"))["model"]
    return f"{model['name']}@{model['version']}"


def assert_triaged(image: dict[str, Any], labels: Sequence[str], model: str | None = None) -> None:
    """An image of GET /api/studies/{uid} was triaged: a full result with timings."""
    assert image["ai_status"] == "done", image
    assert image["ai_error"] in (None, ""), image
    result = image["result"]
    assert result is not None, image
    probs = result["probabilities"]
    assert sorted(probs) == sorted(labels), probs
    assert all(isinstance(p, float | int) and 0.0 <= p <= 1.0 for p in probs.values()), probs
    assert result["priority"] in PRIORITIES, result
    assert 0.0 <= result["abnormal_score"] <= 1.0, result
    assert set(result["flagged"]) <= set(labels), result
    if model is not None:
        assert result["model_version"] == model, result
    timings = result["timings_ms"]
    for key in ("receive", "store", "decode", "preprocess", "inference"):
        assert key in timings, f"timing {key!r} missing: {timings}"
    for key in ("decode", "preprocess", "inference"):
        assert isinstance(timings[key], float | int) and timings[key] >= 0, timings


def browser_login(page: Any, base: str, username: str, password: str, timeout_ms: float = 30_000) -> Any:
    """Log ``page`` (a playwright page) in through the real login form; returns it on the worklist."""
    page.goto(f"{base}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-submit")
    page.wait_for_url(f"{base}/worklist", timeout=timeout_ms)
    return page
