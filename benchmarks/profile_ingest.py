"""Where the gateway's per-image time goes: ``python -m benchmarks.profile_ingest``.

Issue 17, item 1. Starts a real ``xray-triage serve`` (triage off by default: the storage path
alone), sends ``--images`` new copies of the ~0.5 MB image of the ``ingest`` part (512x512 16-bit
explicit VR LE) from K concurrent ``storescu -R`` processes for each K of ``--senders``, and
prints per run: img/s, the server's CPU milliseconds per image (``/proc/<pid>/stat`` utime +
stime, before/after) and the median ``receive_ms`` / ``store_ms`` the server recorded.

With ``--py-spy`` (needs the ``py-spy`` command: ``pip install py-spy``; it attaches with
ptrace, so run as root or with ``kernel.yama.ptrace_scope`` 0) each K is sent twice: once
timed, once under ``py-spy record --gil --threads`` (only samples of the thread holding the GIL:
the Python CPU that serialises the gateway), and the samples are sorted into the gateway's
stages by the functions on their stack (``STAGES``; first match wins). The profiled run is
slower (py-spy pauses the process to sample); its shares, not its rate, are the result.
A breakdown is a description of one machine and one moment, reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from benchmarks import DEFAULT_MODEL_DIR
from benchmarks.common import median, progress
from benchmarks.ingest import SMALL_SOURCE, make_small_image
from benchmarks.scaleout import proc_cpu_s
from benchmarks.server import TriageServer
from benchmarks.throughput import send_all, split

# Stage -> functions that put a sample in it (substrings of py-spy's "function (file:line)" frames).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("outbox consumers (delivery, results)", ("OutboxConsumer._run",)),
    (
        "file write, fsync, rename, directory fsync",
        ("write_durably", "stage_file", "stage_bytes", "place_staged", "fsync_dirs", "_fsync_dir"),
    ),
    ("association set-up (pynetdicom)", ("process_request_thread",)),
    (
        "placement, rows, commit (SQLAlchemy, SQLite)",
        ("Ingestor._store", "Ingestor._commit", "Ingestor._file_batch"),
    ),
    ("completeness check", ("incompleteness",)),
    (
        "data set decode and validation",
        ("Event.dataset", "dcmread", "extract_meta", "validate (", "encoded_dataset", "_pixel_data_problem"),
    ),
    ("C-STORE handler, other", ("DicomGateway._on_store",)),
    (
        "pynetdicom receive, DIMSE, response (reactor threads)",
        ("run_reactor", "DULServiceProvider", "Association."),
    ),
)
OTHER = "other (web app, logging, idle workers)"


def stage_of(stack: str) -> str:
    """The stage a py-spy collapsed stack belongs to (``STAGES`` order; ``OTHER`` if none)."""
    for name, needles in STAGES:
        if any(needle in stack for needle in needles):
            return name
    return OTHER


def breakdown(raw: str) -> dict[str, float]:
    """Share (percent) of samples per stage, from py-spy's ``--format raw`` output (``stack count`` lines)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, number = line.rstrip().rpartition(" ")
        if stack and number.isdigit():
            counts[stage_of(stack)] += int(number)
    total = sum(counts.values())
    names = [name for name, _ in STAGES] + [OTHER]
    return {name: round(100 * counts[name] / total, 1) if total else 0.0 for name in names}


def _copies(source: Path, out_dir: Path, count: int) -> list[Path]:
    """``count`` copies of ``source`` with new Study/Series/SOP Instance UIDs (pydicom; fast)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    paths = []
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"p{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    os.sync()
    return paths


def _send(server: TriageServer, files: list[Path], k: int) -> tuple[float, float]:
    """Send ``files`` from ``k`` storescu; (seconds first spawn -> last exit, server CPU seconds)."""
    before = proc_cpu_s(server.pid) or 0.0
    sends = send_all(split(files, k), "-xe", server.dicom_port, "XRAY_TRIAGE", 120.0 + 2.0 * len(files))
    failed = [s for s in sends if not s.ok]
    if failed:
        raise SystemExit(f"storescu failed: {failed[0].output[-300:]}")
    seconds = max(s.exited_at for s in sends) - min(s.started_at for s in sends)
    return seconds, (proc_cpu_s(server.pid) or 0.0) - before


def _recorded_ms(server: TriageServer, uids: set[str]) -> tuple[float | None, float | None]:
    with sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True) as conn:
        rows = [
            r
            for r in conn.execute("SELECT sop_instance_uid, receive_ms, store_ms FROM instances")
            if r[0] in uids
        ]
    if len(rows) != len(uids):
        raise SystemExit(f"{len(uids)} images sent, {len(rows)} stored")
    return median(r[1] for r in rows), median(r[2] for r in rows)


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_ingest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=400, help="images per run (default 400)")
    parser.add_argument("--senders", default="1,4", help="comma-separated K values (default 1,4)")
    parser.add_argument(
        "--triage", action="store_true", help="triage on (default: off, the storage path alone)"
    )
    parser.add_argument("--py-spy", action="store_true", help="also sample the server with py-spy --gil")
    args = parser.parse_args(argv)
    senders = [int(v) for v in args.senders.split(",") if v.strip()]
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if args.py_spy and py_spy is None:
        parser.error("--py-spy needs the py-spy command (pip install py-spy)")
    work = Path(tempfile.mkdtemp(prefix="xrt-profile-"))
    try:
        small = make_small_image(SMALL_SOURCE, work / "small.dcm")
        env = {} if args.triage else {"XRAY_TRIAGE_TRIAGE_WORKERS": "0"}
        with TriageServer(work, DEFAULT_MODEL_DIR, extra_env=env) as server:
            send_all([_copies(small.path, work / "warm", 1)], "-xe", server.dicom_port, "XRAY_TRIAGE", 60.0)
            for k in senders:
                files = _copies(small.path, work / f"k{k}", args.images)
                seconds, cpu = _send(server, files, k)
                receive_ms, store_ms = _recorded_ms(server, _uids(files))
                print(
                    f"K={k}: {args.images / seconds:.1f} img/s, server CPU {1000 * cpu / args.images:.1f} ms/image, "
                    f"median receive_ms {receive_ms}, store_ms {store_ms}",
                    flush=True,
                )
                if args.py_spy:
                    files = _copies(small.path, work / f"k{k}-spy", args.images)
                    out = work / f"k{k}.txt"
                    spy = subprocess.Popen(
                        [str(py_spy), "record", "--gil", "--threads", "-r", "200", "-f", "raw", "-o", str(out),
                         "-p", str(server.pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    time.sleep(1.5)  # py-spy attaches
                    _send(server, files, k)
                    spy.send_signal(2)
                    spy.wait(60)
                    for name, share in breakdown(out.read_text()).items():
                        print(f"  {share:5.1f}%  {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
