"""Delivery over a slow station link: edge -> centre through the fault proxy at a set rate.

Three transfers of the same N images over the same link (a
``xray_triage_tools.faultproxy`` proxy throttled to ``rate`` bytes/s each way),
one after the other, so each has the link to itself:

- **raw**: the files' bytes, concatenated, written to a plain TCP sink through
  the proxy (no DICOM): what the link itself allows, the reference;
- **storescu**: dcmtk's ``storescu`` sending the files through the proxy to the
  centre server directly, in one association: DICOM's own overhead on the link;
- **edge -> centre**: the files sent to an edge server (directly, at full speed),
  whose ``images`` destination forwards them through the proxy to the centre.
  Time: first ``storescu`` spawn at the edge -> the centre's last
  ``instances.received_at``. Needs the durable delivery of the ``delivery``
  branch (``xray-triage destinations add``); without it this row is "n/a" with
  a warning.

Ratio = raw seconds / seconds of the row (1.0: as fast as the bare link).

**Orthanc acknowledgement** (``run_orthanc_ack``): a server with an ``images``
destination to a real Orthanc (``tests/orthanc_helpers.py``, the delivery tests'
helper), no proxy; images sent one at a time, each waited for. Per image: our
``instances.received_at`` (the C-STORE from the station acknowledged) -> the
``deliveries.sent_at`` the sender writes when Orthanc answered Success; and the
triage result's ``triage_results.created_at`` -> that same acknowledgement
(negative when the image reached Orthanc before its triage finished). Both are
the server's own timestamps, one clock.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BenchSetupError, dcmtk_env, mb, progress
from benchmarks.dicom_files import image_info, sop_instance_uid, unique_copies
from benchmarks.server import HOST, SERVER_AE, ResultsDB, TriageServer, cli_command
from benchmarks.storescu import StoreSCU
from xray_triage_tools.faultproxy import ProxyThread

DEFAULT_RATE = 2_000_000 / 8  # 2 Mbit/s in bytes/s
EDGE_AE = SERVER_AE  # the edge's own AE title (the default), its calling AE title when it sends: registered at the centre


@dataclass
class DeliveryPlan:
    images: int
    rate: float  # bytes/s each way

    @classmethod
    def for_mode(cls, quick: bool) -> DeliveryPlan:
        # quick: 4 x 0.9 MB at 8 Mbit/s (~4 s per transfer); full: 20 x 0.9 MB at 2 Mbit/s (~72 s per transfer)
        return cls(images=4, rate=8_000_000 / 8) if quick else cls(images=20, rate=DEFAULT_RATE)


def raw_transfer_s(files: list[Path], rate: float) -> float:
    """Seconds to push the files' bytes through a proxy at ``rate`` into a TCP sink (connect -> last byte in)."""
    total = sum(p.stat().st_size for p in files)
    listener = socket.create_server((HOST, 0))
    got = 0
    done = threading.Event()

    def sink() -> None:
        nonlocal got
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            while got < total and (data := conn.recv(1 << 16)):
                got += len(data)
        done.set()

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    with ProxyThread(HOST, listener.getsockname()[1], rate=rate) as proxy:
        started = time.monotonic()
        with socket.create_connection((HOST, proxy.port), timeout=600) as sock:
            for path in files:
                sock.sendall(path.read_bytes())
            done.wait(600)
            seconds = time.monotonic() - started
    listener.close()
    thread.join(10)
    if got != total:
        raise BenchSetupError(f"raw transfer: the sink got {got} of {total} bytes")
    return seconds


def _delivery_available() -> bool:
    help_run = subprocess.run(
        [*cli_command(), "destinations", "--help"], capture_output=True, text=True, check=False
    )
    return help_run.returncode == 0


def _wait_at_centre(db: ResultsDB, uids: list[str], timeout_s: float, alive: Any) -> float | None:
    """The centre's last ``received_at`` once every UID is there (POSIX s), or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        records = db.lookup(uids)
        if len(records) == len(uids):
            return max(r.received_at or 0.0 for r in records.values())
        time.sleep(0.2)
    return None


def run_delivery(
    model_dir: Path, source: Path, work: Path, plan: DeliveryPlan
) -> tuple[dict[str, Any], list[str]]:
    """The three transfers; (report section, failures)."""
    failures: list[str] = []
    warnings: list[str] = []
    info = image_info(source.stem, source)
    total = plan.images * info.size_bytes
    budget_s = 10 * total / plan.rate + 60  # a generous bound; slowness is reported, never failed
    section: dict[str, Any] = {
        "plan": {
            "images": plan.images,
            "rate_bytes_per_s": plan.rate,
            "rate_mbit_per_s": plan.rate * 8 / 1e6,
        },
        "image": info.name,
        "bytes": total,
        "rows": [],
        "warnings": warnings,
    }

    def row(name: str, seconds: float | None, note: str = "") -> None:
        section["rows"].append(
            {
                "transfer": name,
                "seconds": round(seconds, 3) if seconds is not None else None,
                "mb_per_s": round(mb(total) / seconds, 3) if seconds else None,
                "note": note,
            }
        )

    progress(f"delivery: raw transfer of {plan.images} x {info.name} at {plan.rate * 8 / 1e6:g} Mbit/s")
    raw_files = unique_copies(source, work / "delivery-raw", plan.images, "raw")
    raw = raw_transfer_s(raw_files, plan.rate)
    row("raw TCP (reference)", raw)

    with TriageServer(work, model_dir, name="server-centre") as centre:
        centre_db = ResultsDB(centre.db_path)
        try:
            progress("delivery: storescu -> proxy -> centre")
            files = unique_copies(source, work / "delivery-storescu", plan.images, "direct")
            with ProxyThread(HOST, centre.dicom_port, rate=plan.rate) as proxy:
                send = StoreSCU(files, info.storescu_flag, proxy.port, SERVER_AE).start().wait()
            if not send.ok:
                failures.append(f"delivery: storescu through the proxy failed: {send.output[-500:]}")
            else:
                row("storescu -> centre", send.seconds)

            if not _delivery_available():
                warnings.append(
                    "edge -> centre: n/a, this build has no `xray-triage destinations` (delivery)"
                )
                row("edge -> centre", None, "n/a: no destinations in this build")
            else:
                section["rows"].append(
                    _edge_to_centre(
                        model_dir, source, work, plan, centre, centre_db, budget_s, failures, total
                    )
                )
        finally:
            centre_db.close()
    if centre.exit_code != 0:
        failures.append(f"delivery: the centre server exited {centre.exit_code} after SIGTERM")
    for r in section["rows"]:
        r["ratio_raw_over_this"] = round(raw / r["seconds"], 3) if r.get("seconds") else None
    return section, failures


def _edge_to_centre(
    model_dir: Path,
    source: Path,
    work: Path,
    plan: DeliveryPlan,
    centre: TriageServer,
    centre_db: ResultsDB,
    budget_s: float,
    failures: list[str],
    total: int,
) -> dict[str, Any]:
    files = unique_copies(source, work / "delivery-edge", plan.images, "edge")
    uids = [sop_instance_uid(p) for p in files]
    register = subprocess.run(
        [*cli_command(), "stations", "add", EDGE_AE, "--name", "edge", "--data-dir", str(centre.data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if register.returncode != 0:
        raise BenchSetupError(f"stations add at the centre: {register.stderr or register.stdout}")
    info = image_info(source.stem, source)
    with ProxyThread(HOST, centre.dicom_port, rate=plan.rate) as proxy:
        edge = TriageServer(work, model_dir, name="server-edge")
        edge.data_dir.mkdir(parents=True, exist_ok=True)
        add = subprocess.run(
            [
                *cli_command(),
                "destinations",
                "add",
                "centre",
                "--ae-title",
                SERVER_AE,
                "--host",
                HOST,
                "--port",
                str(proxy.port),
                "--send",
                "images",
                "--data-dir",
                str(edge.data_dir),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            check=False,
        )
        if add.returncode != 0:
            raise BenchSetupError(f"destinations add at the edge: {add.stderr or add.stdout}")
        with edge:
            progress("delivery: storescu -> edge -> proxy -> centre")
            started = time.time()
            send = StoreSCU(files, info.storescu_flag, edge.dicom_port, SERVER_AE).start().wait()
            if not send.ok:
                failures.append(f"delivery: storescu to the edge failed: {send.output[-500:]}")
            last = _wait_at_centre(centre_db, uids, budget_s, centre.alive)
    if edge.exit_code != 0:
        failures.append(
            f"delivery: the edge server exited {edge.exit_code} after SIGTERM; log tail:\n{edge.log_tail()}"
        )
    seconds = last - started if last is not None else None
    if seconds is None:
        failures.append(f"delivery: not every image reached the centre within {budget_s:.0f} s")
    return {
        "transfer": "edge -> centre",
        "seconds": round(seconds, 3) if seconds is not None else None,
        "mb_per_s": round(mb(total) / seconds, 3) if seconds else None,
        "note": "first storescu spawn at the edge -> the centre's last received_at",
    }


ORTHANC_ACK_SQL = """
SELECT i.received_at, r.created_at, d.sent_at
FROM deliveries AS d
JOIN instances AS i ON i.sop_instance_uid = d.sop_instance_uid
LEFT JOIN triage_results AS r ON r.instance_id = i.id
WHERE d.sop_instance_uid = ? AND d.state = 'sent'
"""


def _orthanc_class() -> Any:
    """tests/orthanc_helpers.Orthanc, or None when Orthanc or the test helpers are not here."""
    import shutil
    import sys

    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").is_file():
        return None
    tests_dir = Path(__file__).resolve().parents[1] / "tests"
    if str(tests_dir) not in sys.path:
        sys.path.insert(0, str(tests_dir))
    try:
        from orthanc_helpers import Orthanc
    except ImportError:
        return None
    return Orthanc


def run_orthanc_ack(
    model_dir: Path, source: Path, work: Path, *, warmup: int, reps: int
) -> tuple[dict[str, Any], list[str]]:
    """p50/p95 from our acknowledgement (and from the triage result) to Orthanc's, one image at a time."""
    from benchmarks.common import parse_db_time, summarize

    failures: list[str] = []
    section: dict[str, Any] = {"warmup": warmup, "reps": reps, "warnings": []}
    orthanc_cls = _orthanc_class()
    if orthanc_cls is None:
        section["warnings"].append(
            "Orthanc acknowledgement: n/a, Orthanc (apt-get install orthanc) not installed"
        )
        return section, failures
    info = image_info(source.stem, source)
    section["image"] = info.name
    orthanc = orthanc_cls(work / "orthanc")
    progress("delivery: starting Orthanc")
    orthanc.start()
    try:
        server = TriageServer(work, model_dir, name="server-pacs")
        server.data_dir.mkdir(parents=True, exist_ok=True)
        add = subprocess.run(
            [
                *cli_command(),
                "destinations",
                "add",
                "pacs",
                "--ae-title",
                orthanc.aet,
                "--host",
                HOST,
                "--port",
                str(orthanc.dicom_port),
                "--send",
                "images",
                "--data-dir",
                str(server.data_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if add.returncode != 0:
            raise BenchSetupError(f"destinations add (Orthanc): {add.stderr or add.stdout}")
        files = unique_copies(source, work / "delivery-orthanc", warmup + reps, "pacs")
        from_received: list[float] = []
        from_result: list[float] = []
        with server:
            progress(f"delivery: {warmup} + {reps} images one at a time -> server -> Orthanc")
            db = ResultsDB(server.db_path)
            try:
                for n, path in enumerate(files):
                    uid = sop_instance_uid(path)
                    send = StoreSCU([path], info.storescu_flag, server.dicom_port, SERVER_AE).start().wait()
                    if not send.ok:
                        failures.append(f"delivery: storescu to the server failed: {send.output[-300:]}")
                        break
                    deadline = time.monotonic() + 120
                    row = None
                    while time.monotonic() < deadline and server.alive():
                        row = db.conn.execute(ORTHANC_ACK_SQL, (uid,)).fetchone()
                        if row is not None and row[1] is not None:
                            break
                        time.sleep(0.01)
                    if row is None or row[1] is None:
                        failures.append(
                            f"delivery: {path.name} not acknowledged by Orthanc (or not triaged) in 120 s"
                        )
                        break
                    received, result, acked = (parse_db_time(v) for v in row)
                    if n >= warmup and received and acked and result:
                        from_received.append((acked - received) * 1000)
                        from_result.append((acked - result) * 1000)
                    time.sleep(0.05)
            finally:
                db.close()
        if server.exit_code != 0:
            failures.append(f"delivery: the Orthanc-feeding server exited {server.exit_code} after SIGTERM")
        held = orthanc.sop_uids()
        missing = [p.name for p in files if sop_instance_uid(p) not in held]
        if missing:
            failures.append(f"delivery: Orthanc does not hold {missing}")
    finally:
        orthanc.stop()
    section["received_to_orthanc_ack_ms"] = summarize(from_received, 1)
    section["result_to_orthanc_ack_ms"] = summarize(from_result, 1)
    section["samples"] = {
        "received_to_orthanc_ack_ms": from_received,
        "result_to_orthanc_ack_ms": from_result,
    }
    return section, failures
