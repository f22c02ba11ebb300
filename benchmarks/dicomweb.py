"""DICOMweb: QIDO-RS search latency on 10,000 studies, WADO-RS retrieval MB/s next to the disk.

A server of its own (``server-dicomweb``, triage off) gets a database seeded *in this
process* through the store's models in bulk (``Session.execute(insert(Study), rows)``,
likewise series and instances; no DICOM is sent): ``studies`` studies from four
stations with varied names, dates, accession numbers and modalities. One real
instance, the 2800x2800 detector image decoded to Explicit VR Little Endian (~16 MB),
is stored through the real ``Ingestor`` so it can be retrieved.

- **QIDO-RS**: each query shape below, ``reps`` times after one untimed run, over one
  keep-alive HTTP connection with an admin's bearer token (and one as a station user,
  who sees a quarter of the studies); latency is request sent to the whole JSON body read.
- **WADO-RS**: ``GET .../instances/{sop}`` (``multipart/related; type="application/dicom"``)
  read in full, ``reps`` times, next to reading the same stored file from disk with
  ``open().read()`` in this process (both from the page cache after the untimed first
  run): MB/s = file bytes / seconds (10^6 bytes).

Nothing is asserted; the target (QIDO p95 well under a second: 0.5 s) is reported.
"""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import DETECTOR_SOURCE
from benchmarks.common import mb, progress, summarize
from benchmarks.server import HOST, TriageServer

STATIONS = ("BENCH", "ST_NORTH", "ST_SOUTH", "ST_EAST")
FAMILY = ("Nguyen", "Tran", "Le", "Pham", "Hoang", "Phan", "Vu", "Dang", "Bui", "Do", "Ho", "Ngo")
STATION_USER_AE = STATIONS[1]  # the station user's: a quarter of the studies
TARGET_QIDO_P95_MS = 500.0
CHUNK = 1024 * 1024


@dataclass
class DicomwebPlan:
    studies: int
    qido_reps: int
    wado_reps: int

    @classmethod
    def for_mode(cls, quick: bool) -> DicomwebPlan:
        if quick:
            return cls(studies=10_000, qido_reps=10, wado_reps=5)
        return cls(studies=10_000, qido_reps=50, wado_reps=20)


def seed_studies(data_dir: Path, count: int, *, seed: int = 7) -> dict[str, Any]:
    """``count`` studies (one series, one instance each) inserted in bulk through the models."""
    from pydicom.uid import generate_uid
    from sqlalchemy import insert

    from xray_triage.settings import Settings
    from xray_triage.store.db import open_database
    from xray_triage.store.schema import Instance, Series, Study

    rng = random.Random(seed)
    db = open_database(Settings(data_dir=data_dir))
    studies, series, instances = [], [], []
    for n in range(1, count + 1):
        study_uid = generate_uid()
        studies.append(
            {
                "id": n,
                "study_instance_uid": study_uid,
                "patient_id": f"PID{n:06d}",
                "patient_name": f"{rng.choice(FAMILY)}^Van^{n}",
                "patient_sex": rng.choice("MF"),
                "study_date": f"{rng.randint(2020, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                "study_time": "101500",
                "accession_number": f"ACC{n:07d}",
                "description": "CHEST PA",
                "station_ae": STATIONS[n % len(STATIONS)],
                "ai_status": "done",
            }
        )
        series.append(
            {
                "id": n,
                "series_instance_uid": generate_uid(),
                "study_id": n,
                "modality": rng.choice(("DX", "CR")),
            }
        )
        instances.append(
            {
                "id": n,
                "sop_instance_uid": generate_uid(),
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                "series_id": n,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "file_path": f"dicom/{study_uid}/none.dcm",
                "ai_status": "done",
            }
        )
    started = time.perf_counter()
    try:
        with db.session() as session:
            session.execute(insert(Study), studies)
            session.execute(insert(Series), series)
            session.execute(insert(Instance), instances)
    finally:
        db.dispose()
    return {
        "studies": count,
        "seconds": round(time.perf_counter() - started, 2),
        "sample": studies[count // 2],
    }


def store_retrievable(data_dir: Path, work: Path) -> dict[str, Any]:
    """The detector image, uncompressed, stored through the real Ingestor; its UIDs and size."""
    import pydicom

    from xray_triage.settings import Settings
    from xray_triage.store.db import open_database
    from xray_triage.store.ingest import Ingestor, TriagePolicy

    ds = pydicom.dcmread(DETECTOR_SOURCE)
    ds.decompress()  # Explicit VR Little Endian, as a modality sending uncompressed would
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    payload = buffer.getvalue()
    settings = Settings(data_dir=data_dir)
    db = open_database(settings)
    try:
        outcome = Ingestor(data_dir, db, TriagePolicy([], [])).ingest(
            ds,
            payload,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="BENCH",
            peer_address=HOST,
        )
    finally:
        db.dispose()
    if not outcome.ok:
        raise RuntimeError(f"could not store the WADO-RS image: {outcome.message}")
    path = (
        data_dir / "dicom" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    )
    return {
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "sop": str(ds.SOPInstanceUID),
        "path": path,
        "bytes": len(payload),
    }


def _tokens(data_dir: Path) -> dict[str, str]:
    from xray_triage.settings import Settings
    from xray_triage.store.db import open_database
    from xray_triage.store.stations import add_station
    from xray_triage.store.users import add_user, create_api_token

    db = open_database(Settings(data_dir=data_dir))
    try:
        with db.session() as session:  # BENCH is registered by TriageServer.start
            for ae in STATIONS[1:]:
                add_station(session, ae, ae.lower())
        with db.session() as session:
            add_user(session, "bench.admin", "benchmark-password-not-secret", "admin")
            add_user(
                session,
                "bench.station",
                "benchmark-password-not-secret",
                "station",
                station_ae=STATION_USER_AE,
            )
        with db.session() as session:
            return {u: create_api_token(session, u) for u in ("bench.admin", "bench.station")}
    finally:
        db.dispose()


def _queries(sample: dict[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """(name, user, query parameters) of each timed QIDO-RS search on /dicomweb/studies."""
    return [
        ("first 100 studies", "bench.admin", {"limit": "100"}),
        ("all (capped at 1000)", "bench.admin", {}),
        ("last page (offset 9900)", "bench.admin", {"limit": "100", "offset": str(sample["_count"] - 100)}),
        ("PatientID exact", "bench.admin", {"PatientID": sample["patient_id"]}),
        ("PatientName wildcard", "bench.admin", {"PatientName": "nguyen*", "limit": "100"}),
        ("PatientName rare match", "bench.admin", {"PatientName": f"*^{sample['id']}"}),
        ("StudyDate one month", "bench.admin", {"StudyDate": "20230301-20230331", "limit": "100"}),
        ("AccessionNumber", "bench.admin", {"AccessionNumber": sample["accession_number"]}),
        ("ModalitiesInStudy=CR", "bench.admin", {"ModalitiesInStudy": "CR", "limit": "100"}),
        ("StudyInstanceUID", "bench.admin", {"StudyInstanceUID": sample["study_instance_uid"]}),
        ("station user, first 100", "bench.station", {"limit": "100"}),
    ]


def run_dicomweb(model_dir: Path, work: Path, plan: DicomwebPlan) -> tuple[dict[str, Any], list[str]]:
    """Seed, start the server, time QIDO-RS and WADO-RS; returns (figures, failures)."""
    import httpx

    server = TriageServer(
        work, model_dir, name="server-dicomweb", extra_env={"XRAY_TRIAGE_TRIAGE_WORKERS": "0"}
    )
    server.data_dir.mkdir(parents=True, exist_ok=True)
    progress(f"dicomweb: seeding {plan.studies} studies in bulk through the store's models")
    seeded = seed_studies(server.data_dir, plan.studies)
    sample = {**seeded.pop("sample"), "_count": plan.studies}
    image = store_retrievable(server.data_dir, work)
    tokens = _tokens(server.data_dir)
    failures: list[str] = []
    result: dict[str, Any] = {
        "plan": plan.__dict__,
        "seeding": seeded,
        "target_qido_p95_ms": TARGET_QIDO_P95_MS,
    }
    with server:
        base = f"http://{HOST}:{server.http_port}/dicomweb"
        clients = {
            user: httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {t}"}, trust_env=False, timeout=120
            )
            for user, t in tokens.items()
        }
        try:
            result["qido"] = _time_qido(clients, sample, plan.qido_reps, failures)
            result["wado"] = _time_wado(clients["bench.admin"], image, plan.wado_reps, failures)
        finally:
            for client in clients.values():
                client.close()
    worst = max((q["ms"]["p95"] or 0.0) for q in result["qido"])
    result["target"] = {"target": TARGET_QIDO_P95_MS, "value": worst, "met": worst <= TARGET_QIDO_P95_MS}
    if server.exit_code != 0:
        failures.append(
            f"the DICOMweb server exited {server.exit_code} after SIGTERM; log tail:\n{server.log_tail()}"
        )
    return result, failures


def _time_qido(
    clients: dict[str, Any], sample: dict[str, Any], reps: int, failures: list[str]
) -> list[dict[str, Any]]:
    out = []
    for name, user, params in _queries(sample):
        client = clients[user]
        client.get("/studies", params=params)  # untimed: connection and statement caches warm
        times, results = [], 0
        for _ in range(reps):
            t0 = time.perf_counter()
            response = client.get("/studies", params=params)
            body = response.content
            times.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                failures.append(f"QIDO-RS {name}: HTTP {response.status_code} {body[:200]!r}")
                break
            results = len(response.json())
        out.append(
            {"query": name, "user": user, "params": params, "results": results, "ms": summarize(times, 2)}
        )
        progress(f"dicomweb: QIDO {name}: {results} results, p50 {out[-1]['ms']['p50']} ms")
    return out


def _time_wado(client: Any, image: dict[str, Any], reps: int, failures: list[str]) -> dict[str, Any]:
    url = f"/studies/{image['study']}/series/{image['series']}/instances/{image['sop']}"
    headers = {"Accept": 'multipart/related; type="application/dicom"'}

    def retrieve() -> int:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                failures.append(f"WADO-RS instance: HTTP {response.status_code}")
                return 0
            return sum(len(chunk) for chunk in response.iter_bytes(CHUNK))

    def from_disk() -> int:
        with open(image["path"], "rb") as f:
            return len(f.read())

    retrieve()
    from_disk()
    http_s, disk_s, received = [], [], 0
    for _ in range(reps):  # alternate, so a change in machine load hits both alike
        t0 = time.perf_counter()
        received = retrieve()
        http_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        from_disk()
        disk_s.append(time.perf_counter() - t0)
    size = image["bytes"]
    http_mbs = [mb(size) / s for s in http_s]
    disk_mbs = [mb(size) / s for s in disk_s]
    return {
        "file_mb": round(mb(size), 2),
        "response_mb": round(mb(received), 2),
        "wado_mb_per_s": summarize(http_mbs, 1),
        "disk_mb_per_s": summarize(disk_mbs, 1),
        "wado_ms": summarize([s * 1000 for s in http_s], 2),
    }


def markdown_lines(dicomweb: dict[str, Any]) -> list[str]:
    """The report's DICOMweb section."""
    lines = [
        "",
        f"### DICOMweb: QIDO-RS on {dicomweb['seeding']['studies']} studies (ms), WADO-RS instance MB/s",
        "",
        "| query | user | results | p50 | p95 |",
        "|---|---|---|---|---|",
    ]
    for q in dicomweb.get("qido", []):
        lines.append(f"| {q['query']} | {q['user']} | {q['results']} | {q['ms']['p50']} | {q['ms']['p95']} |")
    wado = dicomweb.get("wado") or {}
    if wado:
        lines += [
            "",
            f"WADO-RS instance ({wado['file_mb']} MB, uncompressed 2800x2800): "
            f"p50 {wado['wado_mb_per_s']['p50']} MB/s over HTTP vs {wado['disk_mb_per_s']['p50']} MB/s "
            f"reading the same file from disk (p50 {wado['wado_ms']['p50']} ms per retrieve).",
        ]
    target = dicomweb.get("target")
    if target:
        mark = "met" if target["met"] else "MISSED"
        lines.append(f"Worst QIDO-RS p95: {target['value']} ms, target <= {target['target']} ms ({mark}).")
    return lines
