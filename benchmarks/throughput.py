"""Ingest throughput: N images from K concurrent storescu processes, ours vs dcmtk's storescp.

Each of the K processes sends its share of the N images in one association,
as a station sends a study. The same files (same bytes, same UIDs) go first
to ``storescp``, then to our store-only server, then to our server; every run
starts with the page cache flushed to disk (``os.sync``) so none pays for
another's writeback.
Ingest time ends when the last storescu exits (every C-STORE acknowledged:
for our server that means fsync'ed and committed). For our server the time
until the last triage result is committed is reported as well, with triage
running concurrently with ingest, as it does in production. A second server
with triage off (``XRAY_TRIAGE_TRIAGE_WORKERS=0``) receives the same files too,
so the report can tell the storage path's own cost from triage's competition
for the CPU.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import mb, median, progress, summarize
from benchmarks.dicom_files import ImageInfo, renew_uids, sop_instance_uid, unique_copies
from benchmarks.server import (
    REFERENCE_AE,
    SERVER_AE,
    ReferenceSCP,
    ResultsDB,
    RssSampler,
    TriageServer,
    proc_status_kb,
)
from benchmarks.storescu import SendResult, StoreSCU

TARGET_RATIO = 0.8  # ingest MB/s while triaging >= 0.8 x storescp's (issue); printed, not asserted


def split(files: list[Path], k: int) -> list[list[Path]]:
    """Contiguous, nearly equal shares: process i sends files i*n/k .. (i+1)*n/k."""
    n = len(files)
    return [files[i * n // k : (i + 1) * n // k] for i in range(k) if files[i * n // k : (i + 1) * n // k]]


def send_all(
    shares: list[list[Path]], flag: str, port: int, called_ae: str, timeout_s: float
) -> list[SendResult]:
    senders = [StoreSCU(share, flag, port, called_ae, timeout_s) for share in shares]
    for sender in senders:
        sender.start()
    return [sender.wait() for sender in senders]


def _rates(n: int, n_bytes: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3) if seconds > 0 else 0.0,
        "mb_per_s": round(mb(n_bytes) / seconds, 2) if seconds > 0 else 0.0,
    }


def run_one(
    k: int,
    files: list[Path],
    uids: list[str],
    info: ImageInfo,
    server: TriageServer,
    db: ResultsDB,
    store_only: tuple[TriageServer, ResultsDB] | None,
    work_dir: Path,
) -> tuple[dict[str, Any], list[str]]:
    n = len(files)
    n_bytes = sum(p.stat().st_size for p in files)
    shares = split(files, k)
    timeout_s = 120.0 + 10.0 * n
    failures: list[str] = []

    # dcmtk storescp, the reference.
    ref_dir = work_dir / f"storescp-k{k}"
    os.sync()
    with ReferenceSCP(ref_dir, work_dir / "storescp.log") as ref:
        sends = send_all(shares, info.storescu_flag, ref.port, REFERENCE_AE, timeout_s)
        ref_files, ref_bytes = ref.stored()
    ref_seconds = max(s.exited_at for s in sends) - min(s.started_at for s in sends)
    for s in sends:
        if not s.ok:
            failures.append(f"throughput K={k} storescp: storescu exited {s.returncode}: {s.output[-300:]}")
    if ref_files != n:
        failures.append(f"throughput K={k} storescp: {n} images sent, {ref_files} files written")
    shutil.rmtree(ref_dir, ignore_errors=True)
    reference = {"stored": ref_files, **_rates(n, n_bytes, ref_seconds)}

    # Our server with triage off (triage_workers = 0): the storage path alone.
    no_triage = None
    if store_only is not None:
        so_server, so_db = store_only
        os.sync()
        sends = send_all(shares, info.storescu_flag, so_server.dicom_port, SERVER_AE, timeout_s)
        so_seconds = max(s.exited_at for s in sends) - min(s.started_at for s in sends)
        so_records = so_db.lookup(uids)  # acknowledged means committed: no waiting
        so_stored = len(so_records)
        for s in sends:
            if not s.ok:
                failures.append(
                    f"throughput K={k} store-only: storescu exited {s.returncode}: {s.output[-300:]}"
                )
        if so_stored != n:
            failures.append(
                f"throughput K={k} store-only: {n} images sent, {so_stored} stored (lost {n - so_stored})"
            )
        no_triage = {
            "stored": so_stored,
            **_rates(n, n_bytes, so_seconds),
            "receive_ms_median": median(r.receive_ms for r in so_records.values()),
            "store_ms_median": median(r.store_ms for r in so_records.values()),
        }

    # Our server, triaging as it ingests.
    os.sync()
    with RssSampler(server.pid) as rss:
        sends = send_all(shares, info.storescu_flag, server.dicom_port, SERVER_AE, timeout_s)
        records, settled_seen = db.wait_settled(uids, time.monotonic() + timeout_s, 0.1, server.alive)
    t0 = min(s.started_at for s in sends)
    ingest_seconds = max(s.exited_at for s in sends) - t0
    for s in sends:
        if not s.ok:
            failures.append(
                f"throughput K={k} xray-triage: storescu exited {s.returncode}: {s.output[-300:]}"
            )
    stored = len(records)
    triaged = [r for r in records.values() if r.triaged]
    if stored != n:
        failures.append(f"throughput K={k} xray-triage: {n} images sent, {stored} stored (lost {n - stored})")
    if len(triaged) != n:
        states = sorted({r.ai_status for r in records.values() if not r.triaged})
        failures.append(
            f"throughput K={k} xray-triage: {n} images sent, {len(triaged)} triaged (others: {states})"
        )
    if not server.alive():
        failures.append(f"throughput K={k}: the server exited during the run")
    triage_seconds = (max(r.result_created_at for r in triaged) - t0) if triaged else float("nan")  # type: ignore[type-var]
    ours = {
        "stored": stored,
        "triaged": len(triaged),
        "ingest": _rates(n, n_bytes, ingest_seconds),
        "all_triaged": _rates(n, n_bytes, triage_seconds),
        "per_image_e2e_s": summarize(
            [r.result_created_at - t0 for r in triaged]  # type: ignore[operator]
        ),
        "server_stages_ms_median": {
            key: median(
                r.timings_ms.get(key) for r in triaged if isinstance(r.timings_ms.get(key), int | float)
            )
            for key in sorted({key for r in triaged for key in r.timings_ms})
        },
        "peak_rss_mb_sampled": round(rss.peak_kb / 1024, 1),
        "settled_seen_after_s": round(settled_seen - t0, 3),
    }
    ratio = ours["ingest"]["mb_per_s"] / reference["mb_per_s"] if reference["mb_per_s"] else None
    result = {
        "concurrency": k,
        "images": n,
        "image": info.name,
        "transfer_syntax": info.ts_name,
        "total_mb": round(mb(n_bytes), 2),
        "storescp": reference,
        "xray_triage": ours,
        "xray_triage_store_only": no_triage,
        "ingest_mb_s_ratio_vs_storescp": round(ratio, 3) if ratio is not None else None,
        "store_only_mb_s_ratio_vs_storescp": (
            round(no_triage["mb_per_s"] / reference["mb_per_s"], 3)
            if no_triage and reference["mb_per_s"]
            else None
        ),
        "target": {
            "metric": "ingest MB/s ratio vs storescp",
            "target": TARGET_RATIO,
            "measured": round(ratio, 3) if ratio is not None else None,
            "met": ratio is not None and ratio >= TARGET_RATIO,
        },
    }
    return result, failures


def run_throughput(
    server: TriageServer,
    db: ResultsDB,
    info: ImageInfo,
    work_dir: Path,
    *,
    images: int,
    concurrency: list[int],
    store_only: tuple[TriageServer, ResultsDB] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    progress(
        f"throughput: {images} copies of {info.name} ({info.ts_name}, {mb(info.size_bytes):.1f} MB each)"
    )
    files = unique_copies(info.path, work_dir / "throughput", images, "tp")
    # One untimed image first, so a server that has not run the latency part yet
    # pays its first-image costs (lazy imports, first decoder use) outside the runs.
    warm = unique_copies(info.path, work_dir / "throughput-warmup", 1, "warm")
    warm_uid = [sop_instance_uid(warm[0])]
    send_all([warm], info.storescu_flag, server.dicom_port, SERVER_AE, 120.0)
    db.wait_settled(warm_uid, time.monotonic() + 120.0, 0.1, server.alive)
    if store_only is not None:
        send_all([warm], info.storescu_flag, store_only[0].dicom_port, SERVER_AE, 120.0)
    shutil.rmtree(work_dir / "throughput-warmup", ignore_errors=True)
    runs = []
    failures: list[str] = []
    for i, k in enumerate(concurrency):
        if i:
            renew_uids(files)  # the server has these instances already; new UIDs make them new
        uids = [sop_instance_uid(p) for p in files]
        result, run_failures = run_one(k, files, uids, info, server, db, store_only, work_dir)
        failures += run_failures
        runs.append(result)
        ours, ref = result["xray_triage"], result["storescp"]
        progress(
            f"throughput K={k}: storescp {ref['mb_per_s']} MB/s; xray-triage ingest {ours['ingest']['mb_per_s']} MB/s "
            f"({ours['ingest']['images_per_s']} img/s, ratio {result['ingest_mb_s_ratio_vs_storescp']}), "
            + (
                f"with triage off {result['xray_triage_store_only']['mb_per_s']} MB/s, "
                if result["xray_triage_store_only"]
                else ""
            )
            + f"all triaged after {ours['all_triaged']['seconds']} s; peak RSS {ours['peak_rss_mb_sampled']} MB"
            + (f"  FAILED x{len(run_failures)}" if run_failures else "")
        )
    shutil.rmtree(work_dir / "throughput", ignore_errors=True)
    status = proc_status_kb(server.pid)
    return {
        "runs": runs,
        "server_vm_hwm_mb": round(status.get("VmHWM", 0) / 1024, 1),
        "server_vm_rss_mb_after": round(status.get("VmRSS", 0) / 1024, 1),
    }, failures
