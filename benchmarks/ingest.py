"""Ingest side by side (issue 17): dcmtk's storescp, Orthanc, and our server with triage off and on,
and on with ``gateway_processes`` = the number of cores (at least 2; receiver processes on one port).

Four workloads, the same files to every receiver: N_big copies of the 15.7 MB 2800x2800
explicit-LE DX from 1 and from 4 concurrent ``storescu`` processes, and N_small copies of a
0.53 MB 512x512 image (``make_small_image``) from 1 and from 4. In every round each workload
goes to the four receivers one after the other, in an order rotated by round and workload,
with ``os.sync()`` before each so none pays for another's writeback; the files get new UIDs
before each (round, workload), since Orthanc and our servers keep what they received.
Orthanc and our two servers are started once for the whole part and reused across rounds;
storescp is started per send (as in the throughput part), each time in an empty directory.

Per receiver and workload: img/s and MB/s (first storescu spawned -> last exited), the
server's CPU seconds per image (utime + stime of its process, before/after; storescp forks a
child per association and is left out; with several gateway processes, summed over the gateway
process and its receiver processes), its peak sampled RSS (summed likewise), and for triage on the time until
the last result is committed, so "acknowledging at Orthanc's pace while triage catches up" is
visible. Ratios are taken within a round (same files, same minute) and their median over
rounds reported. A memory workload (8 associations, one 15.7 MB image each, all at once) gives
our server's peak RSS against the 500 MB goal, and Orthanc's for reference.

Goals are reported as met / MISSED, never asserted; a lost image is a failure (exit 1).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from benchmarks import SHARED_DICOM
from benchmarks.common import BenchSetupError, mb, percentile, progress
from benchmarks.dicom_files import ImageInfo, image_info, renew_uids, sop_instance_uid, unique_copies
from benchmarks.orthanc import CONFIG_KEYS_SET, ORTHANC_AET, OrthancReceiver, orthanc_binary
from benchmarks.scaleout import proc_cpu_s, rates
from benchmarks.server import (
    REFERENCE_AE,
    SERVER_AE,
    ReferenceSCP,
    ResultsDB,
    RssSampler,
    TriageServer,
    proc_status_kb,
)
from benchmarks.storescu import SendResult
from benchmarks.throughput import send_all, split

SMALL_SOURCE = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"  # 1024x1024 16-bit explicit LE DX
# "ours_multi": triage on, XRAY_TRIAGE_GATEWAY_PROCESSES = the number of cores (at least 2)
GATEWAY_PROCESSES = max(2, os.cpu_count() or 1)
RECEIVERS = ("storescp", "orthanc", "ours_off", "ours_on", "ours_multi")
LABELS = {
    "storescp": "storescp",
    "orthanc": "Orthanc",
    "ours_on": "ours, triage on",
    "ours_off": "ours, triage off",
    "ours_multi": f"ours, triage on, {GATEWAY_PROCESSES} gateway processes",
}
RATIO_PAIRS = (
    ("ours_on", "storescp"),
    ("ours_on", "orthanc"),
    ("ours_off", "storescp"),
    ("ours_off", "orthanc"),
    ("ours_multi", "orthanc"),
    ("ours_multi", "ours_on"),
)
GOAL_VS_ORTHANC = 1.0  # issue 17: ours >= 1.0x Orthanc (MB/s big K=4 triage on; img/s small K=4)
MEMORY_GOAL_MB = 500.0  # issue 17: peak RSS with 8 concurrent 15 MB associations <= 500 MB
MEMORY_ASSOCIATIONS = 8


@dataclass(frozen=True)
class Workload:
    key: str  # "big-k1", ...
    image: ImageInfo
    images: int
    senders: int

    @property
    def label(self) -> str:
        return f"{self.images} x {mb(self.image.size_bytes):.1f} MB, {self.senders} sender{'s' * (self.senders > 1)}"


@dataclass
class IngestPlan:
    """How much to send. Quick (CI): only the small workloads, 40 images, 1 round, plus the memory one."""

    big_images: int
    small_images: int
    rounds: int
    memory: bool

    @classmethod
    def for_mode(cls, quick: bool) -> IngestPlan:
        if quick:
            return cls(big_images=0, small_images=40, rounds=1, memory=True)
        return cls(big_images=48, small_images=400, rounds=3, memory=True)


# -- pure summaries (unit-tested in tests/unit/test_bench_ingest.py) --


def rotation(receivers: Sequence[str], shift: int) -> list[str]:
    """``receivers`` rotated left by ``shift``: round r of workload w sends in order ``rotation(R, r + w)``,
    so over rounds every receiver goes first, last and in between (a cache warmed, or writeback
    left, by the previous receiver does not always favour the same one)."""
    if not receivers:
        return []
    k = shift % len(receivers)
    return [*receivers[k:], *receivers[:k]]


def spread(values: Sequence[float | None], digits: int = 3) -> dict[str, float | int | None]:
    """Median, min, max and n over rounds; None / NaN entries (a receiver that was n/a) are left out."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(percentile(clean, 50), digits),
        "min": round(min(clean), digits),
        "max": round(max(clean), digits),
        "n": len(clean),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def per_round_ratios(
    rounds: Sequence[Mapping[str, Mapping[str, Any] | None]], num: str, den: str, key: str
) -> list[float | None]:
    """``rounds[i][num][key] / rounds[i][den][key]`` for each round: ratios within a round, never across."""
    out = []
    for measured in rounds:
        a, b = measured.get(num), measured.get(den)
        out.append(ratio(a.get(key) if a else None, b.get(key) if b else None))
    return out


def at_least(where: str, metric: str, measured: float | None, goal: float) -> dict[str, Any]:
    """A target entry for ``collect_targets``: met when ``measured >= goal``; nothing measured is not met."""
    return {
        "where": where,
        "metric": metric,
        "target": goal,
        "measured": round(measured, 3) if measured is not None else None,
        "met": measured is not None and measured >= goal,
    }


def at_most(where: str, metric: str, measured: float | None, goal: float) -> dict[str, Any]:
    """A target entry met when ``measured <= goal`` (a memory ceiling); nothing measured is not met."""
    return {
        "where": where,
        "metric": metric,
        "target": goal,
        "measured": round(measured, 1) if measured is not None else None,
        "met": measured is not None and measured <= goal,
    }


def cpu_per_image(before: float | None, after: float | None, images: int) -> float | None:
    """CPU seconds per image between two ``proc_cpu_s`` readings; None if either is missing."""
    if before is None or after is None or images <= 0:
        return None
    return round((after - before) / images, 4)


def summarize_workload(
    workload: Workload, rounds: Sequence[Mapping[str, Mapping[str, Any] | None]]
) -> dict[str, Any]:
    """One workload over all rounds: per receiver the spread of each figure, and the within-round ratios
    (MB/s; the same files go to every receiver, so the img/s ratio is the same number)."""
    figures = (
        "images_per_s",
        "mb_per_s",
        "cpu_s_per_image",
        "peak_rss_mb",
        "all_triaged_s",
        "triaged_images_per_s",
        "cpu_s_per_image_until_triaged",
    )
    receivers: dict[str, Any] = {}
    for name in RECEIVERS:
        measured = [r.get(name) for r in rounds]
        if not any(measured):
            receivers[name] = None
            continue
        receivers[name] = {
            key: spread([m.get(key) if m else None for m in measured])
            for key in figures
            if any(m and m.get(key) is not None for m in measured)
        }
    ratios = {
        f"{num}/{den}": spread(per_round_ratios(rounds, num, den, "mb_per_s")) for num, den in RATIO_PAIRS
    }
    return {
        "workload": workload.key,
        "label": workload.label,
        "image": workload.image.name,
        "transfer_syntax": workload.image.ts_name,
        "image_mb": round(mb(workload.image.size_bytes), 3),
        "images": workload.images,
        "senders": workload.senders,
        "rounds": len(rounds),
        "receivers": receivers,
        "ratios": ratios,
        "per_round": list(rounds),
    }


def workload_targets(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's goals against Orthanc, from the workloads that ran (quick has no 15.7 MB ones)."""
    targets = []
    for s in summaries:
        ratios = s["ratios"]
        if s["workload"] == "big-k4":
            targets.append(
                at_least(
                    f"ingest {s['label']}, triage on",
                    "MB/s vs Orthanc",
                    ratios["ours_on/orthanc"]["median"],
                    GOAL_VS_ORTHANC,
                )
            )
        if s["workload"] == "small-k4":
            targets.append(
                at_least(
                    f"ingest {s['label']}, triage off",
                    "img/s vs Orthanc",
                    ratios["ours_off/orthanc"]["median"],
                    GOAL_VS_ORTHANC,
                )
            )
            targets.append(
                at_least(
                    f"ingest {s['label']}, triage on (acknowledged)",
                    "img/s vs Orthanc",
                    ratios["ours_on/orthanc"]["median"],
                    GOAL_VS_ORTHANC,
                )
            )
            targets.append(
                at_least(
                    f"ingest {s['label']}, triage on, {GATEWAY_PROCESSES} gateway processes (acknowledged)",
                    "img/s vs Orthanc",
                    ratios["ours_multi/orthanc"]["median"],
                    GOAL_VS_ORTHANC,
                )
            )
    return targets


# -- the images --


def make_small_image(source: Path, dest: Path) -> ImageInfo:
    """A 512x512 16-bit explicit-LE copy of ``source`` (1024x1024): each 2x2 block averaged (pydicom + numpy).

    Pixel spacings are doubled so the image still describes the same anatomy. ~0.53 MB.
    Raises ``BenchSetupError`` if the source is not a single-frame 16-bit grey image with even sides.
    """
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array
    if pixels.ndim != 2 or ds.BitsAllocated != 16 or pixels.shape[0] % 2 or pixels.shape[1] % 2:
        raise BenchSetupError(f"{source}: expected a single-frame 16-bit image with even sides")
    rows, cols = pixels.shape[0] // 2, pixels.shape[1] // 2
    blocks = pixels.reshape(rows, 2, cols, 2).astype(np.float64).mean(axis=(1, 3))
    small = np.rint(blocks).astype(pixels.dtype)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = small.tobytes()
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            setattr(ds, keyword, [float(v) * 2 for v in ds.data_element(keyword).value])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return image_info("small-512", dest)


def build_workloads(plan: IngestPlan, big: ImageInfo | None, small: ImageInfo) -> list[Workload]:
    workloads = []
    if big is not None and plan.big_images > 0:
        workloads += [Workload(f"big-k{k}", big, plan.big_images, k) for k in (1, 4)]
    if plan.small_images > 0:
        workloads += [Workload(f"small-k{k}", small, plan.small_images, k) for k in (1, 4)]
    return workloads


# -- the receivers --


@dataclass
class _Receivers:
    work_dir: Path
    ours_on: TriageServer
    on_db: ResultsDB
    ours_off: TriageServer
    off_db: ResultsDB
    orthanc: OrthancReceiver | None
    ours_multi: TriageServer
    multi_db: ResultsDB


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/PID/task/TID/children``; those gone meanwhile are skipped)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                continue
    return pids


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its live descendants (the gateway process and its
    receivers); None when ``pid`` itself is gone."""
    own = proc_cpu_s(pid)
    if own is None:
        return None
    return own + sum(proc_cpu_s(child) or 0.0 for child in tree_pids(pid)[1:])


class TreeRssSampler(RssSampler):
    """``RssSampler`` of a process and its descendants: the sum of their VmRSS at each sample."""

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = sum(proc_status_kb(p).get("VmRSS", 0) for p in tree_pids(self.pid))
            self.peak_kb = max(self.peak_kb, rss)
            self._stop.wait(self.interval_s)


def _window(sends: list[SendResult]) -> tuple[float, float]:
    return min(s.started_at for s in sends), max(s.exited_at for s in sends)


def _send_failures(where: str, sends: list[SendResult]) -> list[str]:
    return [f"{where}: storescu exited {s.returncode}: {s.output[-300:]}" for s in sends if not s.ok]


def _timeout(n: int) -> float:
    return 120.0 + 10.0 * n


def _measure_storescp(
    rx: _Receivers, shares: list[list[Path]], info: ImageInfo, n: int, n_bytes: int, where: str
) -> tuple[dict[str, Any], list[str]]:
    out_dir = rx.work_dir / "ingest-storescp"
    with ReferenceSCP(out_dir, rx.work_dir / "ingest-storescp.log") as ref:
        sends = send_all(shares, info.storescu_flag, ref.port, REFERENCE_AE, _timeout(n))
        written, _ = ref.stored()
    shutil.rmtree(out_dir, ignore_errors=True)
    t0, t1 = _window(sends)
    failures = _send_failures(where, sends)
    if written != n:
        failures.append(f"{where}: {n} images sent, {written} files written")
    return {"stored": written, **rates(n, n_bytes, t1 - t0)}, failures


def _measure_orthanc(
    rx: _Receivers, shares: list[list[Path]], info: ImageInfo, n: int, n_bytes: int, where: str
) -> tuple[dict[str, Any] | None, list[str]]:
    orthanc = rx.orthanc
    if orthanc is None:
        return None, []
    count_before = orthanc.count_instances()
    cpu_before = proc_cpu_s(orthanc.pid)
    with RssSampler(orthanc.pid) as rss:
        sends = send_all(shares, info.storescu_flag, orthanc.dicom_port, ORTHANC_AET, _timeout(n))
    cpu_after = proc_cpu_s(orthanc.pid)
    t0, t1 = _window(sends)
    failures = _send_failures(where, sends)
    stored = orthanc.count_instances() - count_before  # acknowledged means indexed: no waiting
    if stored != n:
        failures.append(f"{where}: {n} images sent, Orthanc's CountInstances grew by {stored}")
    if not orthanc.alive():
        failures.append(f"{where}: Orthanc exited during the run")
    return {
        "stored": stored,
        **rates(n, n_bytes, t1 - t0),
        "cpu_s_per_image": cpu_per_image(cpu_before, cpu_after, n),
        "peak_rss_mb": round(rss.peak_kb / 1024, 1),
    }, failures


def _measure_ours(
    server: TriageServer,
    db: ResultsDB,
    triage: bool,
    shares: list[list[Path]],
    uids: list[str],
    info: ImageInfo,
    n_bytes: int,
    where: str,
    tree: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """``tree``: CPU and RSS of the server and its receiver processes together (gateway_processes > 1)."""
    n = len(uids)
    cpu_s = tree_cpu_s if tree else proc_cpu_s
    cpu_before = cpu_s(server.pid)
    with (TreeRssSampler if tree else RssSampler)(server.pid) as rss:
        sends = send_all(shares, info.storescu_flag, server.dicom_port, SERVER_AE, _timeout(n))
        cpu_acked = cpu_s(server.pid)
        if triage:
            records, _ = db.wait_settled(uids, time.monotonic() + _timeout(n), 0.1, server.alive)
        else:
            records = db.lookup(uids)  # acknowledged means committed: no waiting
    cpu_after = cpu_s(server.pid)
    t0, t1 = _window(sends)
    failures = _send_failures(where, sends)
    if len(records) != n:
        failures.append(f"{where}: {n} images sent, {len(records)} stored (lost {n - len(records)})")
    if not server.alive():
        failures.append(f"{where}: the server exited during the run")
    result: dict[str, Any] = {
        "stored": len(records),
        **rates(n, n_bytes, t1 - t0),
        "cpu_s_per_image": cpu_per_image(cpu_before, cpu_acked, n),
        "peak_rss_mb": round(rss.peak_kb / 1024, 1),
    }
    if triage:
        triaged = [r.result_created_at for r in records.values() if r.result_created_at is not None]
        if len(triaged) != n:
            states = sorted({r.ai_status for r in records.values() if not r.triaged})
            failures.append(f"{where}: {n} images sent, {len(triaged)} triaged (others: {states})")
        all_triaged = rates(n, n_bytes, max(triaged) - t0) if triaged else None
        result.update(
            triaged=len(triaged),
            all_triaged_s=all_triaged["seconds"] if all_triaged else None,
            triaged_images_per_s=all_triaged["images_per_s"] if all_triaged else None,
            cpu_s_per_image_until_triaged=cpu_per_image(cpu_before, cpu_after, n),
        )
    return result, failures


def _measure(
    name: str, rx: _Receivers, workload: Workload, files: list[Path], uids: list[str], round_no: int
) -> tuple[dict[str, Any] | None, list[str]]:
    shares = split(files, workload.senders)
    n_bytes = sum(p.stat().st_size for p in files)
    where = f"ingest {workload.key} round {round_no + 1} {LABELS[name]}"
    os.sync()
    if name == "storescp":
        return _measure_storescp(rx, shares, workload.image, len(files), n_bytes, where)
    if name == "orthanc":
        return _measure_orthanc(rx, shares, workload.image, len(files), n_bytes, where)
    if name == "ours_off":
        return _measure_ours(rx.ours_off, rx.off_db, False, shares, uids, workload.image, n_bytes, where)
    if name == "ours_multi":
        return _measure_ours(
            rx.ours_multi, rx.multi_db, True, shares, uids, workload.image, n_bytes, where, tree=True
        )
    return _measure_ours(rx.ours_on, rx.on_db, True, shares, uids, workload.image, n_bytes, where)


def _warm_up(rx: _Receivers, images: list[ImageInfo]) -> None:
    """One untimed image of each size to Orthanc and our servers: first-image costs stay outside.
    (With several gateway processes only the process the kernel picks gets it.)"""
    for info in images:
        warm = unique_copies(info.path, rx.work_dir / "ingest-warm", 1, f"warm-{info.name}")
        uid = [sop_instance_uid(warm[0])]
        send_all([warm], info.storescu_flag, rx.ours_on.dicom_port, SERVER_AE, 120.0)
        send_all([warm], info.storescu_flag, rx.ours_off.dicom_port, SERVER_AE, 120.0)
        send_all([warm], info.storescu_flag, rx.ours_multi.dicom_port, SERVER_AE, 120.0)
        if rx.orthanc is not None:
            send_all([warm], info.storescu_flag, rx.orthanc.dicom_port, ORTHANC_AET, 120.0)
        rx.on_db.wait_settled(uid, time.monotonic() + 120.0, 0.1, rx.ours_on.alive)
        rx.multi_db.wait_settled(uid, time.monotonic() + 120.0, 0.1, rx.ours_multi.alive)
        shutil.rmtree(rx.work_dir / "ingest-warm", ignore_errors=True)


def _memory(rx: _Receivers, big: ImageInfo) -> tuple[dict[str, Any], list[str]]:
    """8 associations at once, one 15.7 MB image each, to our triage-on server (the goal), then to the
    triage-off one (the gateway alone) and to Orthanc (for reference)."""
    files = unique_copies(big.path, rx.work_dir / "ingest-memory", MEMORY_ASSOCIATIONS, "mem")
    uids = [sop_instance_uid(p) for p in files]
    shares = [[p] for p in files]
    n_bytes = sum(p.stat().st_size for p in files)
    where = f"ingest memory ({MEMORY_ASSOCIATIONS} x 1)"
    os.sync()
    ours, failures = _measure_ours(rx.ours_on, rx.on_db, True, shares, uids, big, n_bytes, f"{where} ours")
    ours["vm_hwm_mb_lifetime_after"] = round(proc_status_kb(rx.ours_on.pid).get("VmHWM", 0) / 1024, 1)
    # The same 8 to the triage-off server: what the gateway's receive + store path holds on its own.
    os.sync()
    off, more = _measure_ours(rx.ours_off, rx.off_db, False, shares, uids, big, n_bytes, f"{where} ours off")
    off["vm_hwm_mb_lifetime_after"] = round(proc_status_kb(rx.ours_off.pid).get("VmHWM", 0) / 1024, 1)
    failures += more
    orthanc = None
    if rx.orthanc is not None:
        os.sync()
        orthanc, more = _measure_orthanc(rx, shares, big, len(files), n_bytes, f"{where} Orthanc")
        failures += more
        if orthanc is not None:
            orthanc["vm_hwm_mb_lifetime_after"] = round(
                proc_status_kb(rx.orthanc.pid).get("VmHWM", 0) / 1024, 1
            )
    shutil.rmtree(rx.work_dir / "ingest-memory", ignore_errors=True)
    return {
        "associations": MEMORY_ASSOCIATIONS,
        "image_mb": round(mb(big.size_bytes), 2),
        "ours_on": ours,
        "ours_off": off,
        "orthanc": orthanc,
        "target": at_most(
            f"memory, {MEMORY_ASSOCIATIONS} concurrent {mb(big.size_bytes):.1f} MB associations",
            "peak sampled RSS MB, triage on",
            ours["peak_rss_mb"],
            MEMORY_GOAL_MB,
        ),
    }, failures


def _start_orthanc(work_dir: Path, stack: ExitStack, warnings: list[str]) -> OrthancReceiver | None:
    if orthanc_binary() is None:
        warnings.append("ingest: Orthanc not installed (apt-get install orthanc): its columns are n/a")
        return None
    orthanc = OrthancReceiver(work_dir, "ingest-orthanc")
    try:
        orthanc.start()
    except BenchSetupError as exc:
        orthanc.stop()
        warnings.append(f"ingest: Orthanc did not start, its columns are n/a: {exc}")
        return None
    stack.callback(orthanc.stop)
    return orthanc


def run_ingest(
    model_dir: Path, big: ImageInfo | None, work_dir: Path, plan: IngestPlan
) -> tuple[dict[str, Any], list[str]]:
    """Every workload x round x receiver, then the memory workload; returns (report section, failures).

    ``big`` is the 15.7 MB explicit-LE variant (None: no big workloads, no memory workload).
    Raises ``BenchSetupError`` when our servers cannot start (the part cannot run at all).
    """
    small = make_small_image(SMALL_SOURCE, work_dir / "ingest-images" / "small-512.dcm")
    workloads = build_workloads(plan, big, small)
    warnings: list[str] = []
    failures: list[str] = []
    section: dict[str, Any] = {"plan": asdict(plan), "warnings": warnings, "small_source": SMALL_SOURCE.name}
    progress(
        "ingest: starting Orthanc and three xray-triage servers (triage on; triage off with "
        f"XRAY_TRIAGE_TRIAGE_WORKERS=0; triage on with XRAY_TRIAGE_GATEWAY_PROCESSES={GATEWAY_PROCESSES})"
    )
    summaries: list[dict[str, Any]] = []
    with ExitStack() as stack:
        orthanc = _start_orthanc(work_dir, stack, warnings)
        ours_on = stack.enter_context(TriageServer(work_dir, model_dir, name="ingest-on"))
        ours_off = stack.enter_context(
            TriageServer(
                work_dir, model_dir, name="ingest-off", extra_env={"XRAY_TRIAGE_TRIAGE_WORKERS": "0"}
            )
        )
        ours_multi = stack.enter_context(
            TriageServer(
                work_dir,
                model_dir,
                name="ingest-multi",
                extra_env={"XRAY_TRIAGE_GATEWAY_PROCESSES": str(GATEWAY_PROCESSES)},
            )
        )
        on_db, off_db = ResultsDB(ours_on.db_path), ResultsDB(ours_off.db_path)
        multi_db = ResultsDB(ours_multi.db_path)
        for db in (on_db, off_db, multi_db):
            stack.callback(db.close)
        rx = _Receivers(work_dir, ours_on, on_db, ours_off, off_db, orthanc, ours_multi, multi_db)
        section["idle_rss_mb_after_start"] = {
            "ours_on": round(proc_status_kb(ours_on.pid).get("VmRSS", 0) / 1024, 1),
            "ours_off": round(proc_status_kb(ours_off.pid).get("VmRSS", 0) / 1024, 1),
            "ours_multi": round(
                sum(proc_status_kb(p).get("VmRSS", 0) for p in tree_pids(ours_multi.pid)) / 1024, 1
            ),
            "orthanc": round(proc_status_kb(orthanc.pid).get("VmRSS", 0) / 1024, 1) if orthanc else None,
        }
        section["orthanc"] = (
            {
                "version": orthanc.version,
                "config_keys_set": list(CONFIG_KEYS_SET),
                "defaults_of_note": "DicomThreadsCount 4, MaximumPduLength 16384, SyncStorageArea true "
                "(fdatasync per file), SQLite index in WAL mode with SYNCHRONOUS=NORMAL, "
                "MaximumStorageCacheSize 128 MB, StorageCompression false",
                "start_seconds": orthanc.start_seconds,
            }
            if orthanc is not None
            else None
        )
        _warm_up(rx, [small, *([big] if big is not None and (workloads or plan.memory) else [])])
        if plan.memory and big is not None:
            progress(
                f"ingest: memory, {MEMORY_ASSOCIATIONS} associations x one {mb(big.size_bytes):.1f} MB image"
            )
            section["memory"], more = _memory(rx, big)
            failures += more
            m = section["memory"]
            progress(
                f"ingest memory: ours peak RSS {m['ours_on']['peak_rss_mb']} MB (goal <= {MEMORY_GOAL_MB:.0f}), "
                f"triage off {m['ours_off']['peak_rss_mb']} MB, "
                f"Orthanc {(m['orthanc'] or {}).get('peak_rss_mb', 'n/a')} MB"
            )
        copies: dict[str, list[Path]] = {}
        rounds: dict[str, list[dict[str, Any]]] = {w.key: [] for w in workloads}
        for round_no in range(plan.rounds):
            for w_no, workload in enumerate(workloads):
                files = copies.get(workload.image.name)
                if files is None:
                    files = unique_copies(
                        workload.image.path, work_dir / "ingest" / workload.image.name, workload.images, "in"
                    )
                    copies[workload.image.name] = files
                else:
                    renew_uids(files)  # the servers keep what they got: new UIDs make new instances
                uids = [sop_instance_uid(p) for p in files]
                measured: dict[str, Any] = {}
                for name in rotation(RECEIVERS, round_no + w_no):
                    result, more = _measure(name, rx, workload, files, uids, round_no)
                    failures += more
                    measured[name] = result
                measured["order"] = rotation(RECEIVERS, round_no + w_no)
                rounds[workload.key].append(measured)
                progress(_progress_line(workload, round_no, measured, more_failures=len(failures)))
        summaries = [summarize_workload(w, rounds[w.key]) for w in workloads]
        ours_on_status = proc_status_kb(ours_on.pid)
        section["ours_on_vm_hwm_mb_lifetime"] = round(ours_on_status.get("VmHWM", 0) / 1024, 1)
    for name, proc in (
        ("triage-on server", ours_on),
        ("triage-off server", ours_off),
        (f"{GATEWAY_PROCESSES}-gateway-process server", ours_multi),
    ):
        if proc.exit_code != 0:
            failures.append(
                f"ingest: the {name} exited {proc.exit_code} after SIGTERM; log tail:\n{proc.log_tail()}"
            )
    if orthanc is not None and orthanc.exit_code != 0:
        failures.append(
            f"ingest: Orthanc exited {orthanc.exit_code} after SIGTERM; log tail:\n{orthanc.log_tail()}"
        )
    shutil.rmtree(work_dir / "ingest", ignore_errors=True)
    section["workloads"] = summaries
    section["targets"] = workload_targets(summaries) if orthanc is not None else []
    if "memory" in section:
        section["targets"].append(section["memory"]["target"])
    return section, failures


def _progress_line(workload: Workload, round_no: int, measured: Mapping[str, Any], more_failures: int) -> str:
    def cell(name: str) -> str:
        m = measured.get(name)
        return (
            f"{LABELS[name]} n/a"
            if not m
            else f"{LABELS[name]} {m['mb_per_s']} MB/s {m['images_per_s']} img/s"
        )

    on = measured.get("ours_on") or {}
    return (
        f"ingest {workload.label} round {round_no + 1}: "
        + "; ".join(cell(n) for n in RECEIVERS)
        + f"; all triaged after {on.get('all_triaged_s')} s"
        + (f"  (failures so far: {more_failures})" if more_failures else "")
    )


# -- the report --


def _f(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _idle(ingest: Mapping[str, Any]) -> str:
    idle = ingest.get("idle_rss_mb_after_start") or {}
    return ", ".join(
        f"{LABELS[k]} {_f(idle.get(k), 0)} MB" for k in ("ours_on", "ours_off", "ours_multi", "orthanc")
    )


def _rate_cell(figures: Mapping[str, Any] | None) -> str:
    if not figures:
        return "n/a"
    return f"{_f(figures['mb_per_s']['median'], 1)} MB/s, {_f(figures['images_per_s']['median'], 1)} img/s"


def _ratio_cell(s: Mapping[str, Any]) -> str:
    if s["median"] is None:
        return "n/a"
    if s["n"] > 1:
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
    return f"{s['median']:.2f}"


def markdown_lines(ingest: Mapping[str, Any]) -> list[str]:
    """The part's Markdown: the issue's table (medians over rounds), CPU and memory, goals met / MISSED."""
    summaries = ingest.get("workloads") or []
    orthanc = ingest.get("orthanc")
    version = f"Orthanc {orthanc['version']}" if orthanc else "Orthanc (n/a)"
    rounds = ingest["plan"]["rounds"]
    lines = [
        "",
        f"### Ingest vs storescp and {version}: median of {rounds} round{'s' * (rounds > 1)}, receivers alternated",
        "",
        f"| workload | storescp | Orthanc | ours, triage on | ours, triage off | ours, triage on, "
        f"{GATEWAY_PROCESSES} gateway processes | on / storescp | on / Orthanc "
        f"| off / storescp | off / Orthanc | {GATEWAY_PROCESSES} procs / Orthanc | {GATEWAY_PROCESSES} procs / on "
        f"| triage on: all triaged s | {GATEWAY_PROCESSES} procs: all triaged s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        rx, ratios = s["receivers"], s["ratios"]
        on, multi = rx.get("ours_on") or {}, rx.get("ours_multi") or {}
        lines.append(
            f"| {s['label']} | "
            + " | ".join(
                _rate_cell(rx.get(n)) for n in ("storescp", "orthanc", "ours_on", "ours_off", "ours_multi")
            )
            + " | "
            + " | ".join(_ratio_cell(ratios.get(f"{a}/{b}") or spread([])) for a, b in RATIO_PAIRS)
            + f" | {_f((on.get('all_triaged_s') or {}).get('median'), 1)}"
            + f" | {_f((multi.get('all_triaged_s') or {}).get('median'), 1)} |"
        )
    lines += [
        "",
        "Ratios: MB/s (= img/s, same files) within a round, median (min-max) over rounds. Ingest = first storescu "
        "spawned -> last exited; 'all triaged' = first spawn -> last triage result committed (triage runs while "
        "images arrive, so the acknowledgement pace is the 'triage on' column).",
        "",
        "| workload | CPU s/image: Orthanc | ours on (acked / until triaged) | ours off "
        f"| ours {GATEWAY_PROCESSES} procs (acked / until triaged) | peak RSS MB: Orthanc "
        f"| ours on | ours off | ours {GATEWAY_PROCESSES} procs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        rx = s["receivers"]

        def med(name: str, key: str, digits: int, rx: Mapping[str, Any] = rx) -> str:
            return _f(((rx.get(name) or {}).get(key) or {}).get("median"), digits)

        lines.append(
            f"| {s['label']} | {med('orthanc', 'cpu_s_per_image', 3)} | {med('ours_on', 'cpu_s_per_image', 3)} / "
            f"{med('ours_on', 'cpu_s_per_image_until_triaged', 3)} | {med('ours_off', 'cpu_s_per_image', 3)} | "
            f"{med('ours_multi', 'cpu_s_per_image', 3)} / {med('ours_multi', 'cpu_s_per_image_until_triaged', 3)} | "
            f"{med('orthanc', 'peak_rss_mb', 0)} | {med('ours_on', 'peak_rss_mb', 0)} | {med('ours_off', 'peak_rss_mb', 0)} | "
            f"{med('ours_multi', 'peak_rss_mb', 0)} |"
        )
    memory = ingest.get("memory")
    if memory:
        o = memory.get("orthanc") or {}
        lines += [
            "",
            f"Memory: {memory['associations']} associations at once, one {memory['image_mb']} MB image each: ours "
            f"(triage on) peak sampled RSS {memory['ours_on']['peak_rss_mb']} MB (VmHWM since start "
            f"{memory['ours_on']['vm_hwm_mb_lifetime_after']} MB); ours, triage off (the gateway alone) "
            f"{(memory.get('ours_off') or {}).get('peak_rss_mb', 'n/a')} MB; Orthanc {o.get('peak_rss_mb', 'n/a')} MB. "
            f"Idle after start: {_idle(ingest)}.",
        ]
    targets = ingest.get("targets") or []
    if targets:
        lines += ["", "Goals:"]
        for t in targets:
            op = "<=" if "RSS" in t["metric"] else ">="
            verdict = "met" if t["met"] else "MISSED"
            lines.append(
                f"- {t['where']}: {t['metric']} {_f(t['measured'], 2)} (goal {op} {t['target']}: {verdict})"
            )
    keys = ", ".join(orthanc["config_keys_set"]) if orthanc else ""
    lines += [
        "",
        "storescp: `--fork`, no fsync, no index, started per send (its CPU is in forked children: not shown). "
        + (
            f"Orthanc: started once, config keys set: {keys}; everything else its defaults "
            f"({orthanc['defaults_of_note']}). "
            if orthanc
            else "Orthanc: not available. "
        )
        + "Ours: three servers started once (triage off = XRAY_TRIAGE_TRIAGE_WORKERS=0; "
        f"{GATEWAY_PROCESSES} gateway processes = XRAY_TRIAGE_GATEWAY_PROCESSES={GATEWAY_PROCESSES}: the gateway "
        "process triages and hands every association to its receivers, CPU and RSS summed over the processes), "
        "fsync + commit before "
        f"each acknowledgement. Small image: {ingest.get('small_source')} averaged 2x2 to 512x512, explicit VR LE.",
    ]
    return lines
