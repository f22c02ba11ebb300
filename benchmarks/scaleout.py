"""Scale-out: ingest with triage on for one process and for split process roles, next to storescp.

Issue 15 asks two things of ``serve --roles``:

1. *ingest MB/s with triage on* for one ``serve`` process (all roles) and for one
   ``--roles gateway,web`` process plus two ``--roles worker`` processes on the same data
   directory and database, next to dcmtk's ``storescp`` receiving the same files in the same
   run (goal >= 0.8x storescp), with the end-to-end p50/p95 per image;
2. *web busy vs idle*: the same 4-station burst twice on one deployment whose web app runs in
   its own process (``--roles gateway`` / ``--roles web`` / two ``--roles worker``), once with
   nobody on the web and once with N users polling the worklist (``worklist_load.WebUser``);
   goal: ingest img/s busy >= 0.8x idle.

Each deployment is a fresh data directory and database: SQLite (WAL) in the data directory,
or a new database on a PostgreSQL server (``XRAY_TRIAGE_TEST_DATABASE_URL``, or a throwaway
cluster from ``scripts/pg-test-cluster.sh`` started here when run as root with PostgreSQL 15
installed). Results are read with SQLAlchemy from whichever it is. Every goal is reported
(met / MISSED), never asserted: a slow machine is not a failure, a lost image is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import mb, median, progress, summarize
from benchmarks.dicom_files import ImageInfo, renew_uids, sop_instance_uid, unique_copies
from benchmarks.server import (
    _LOOKUP_SQL,
    HOST,
    REFERENCE_AE,
    SERVER_AE,
    InstanceRecord,
    ReferenceSCP,
    ResultsDB,
    TriageServer,
    instance_record,
)
from benchmarks.storescu import SendResult
from benchmarks.throughput import send_all, split

TARGET_VS_STORESCP = 0.8  # ingest MB/s with triage on >= 0.8 x storescp's (issue 15); reported, not asserted
TARGET_BUSY_VS_IDLE = 0.8  # ingest img/s with the web busy >= 0.8 x with the web idle (issue 15)
REPO_ROOT = Path(__file__).resolve().parent.parent
PG_CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "pg-test-cluster.sh"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

ONE_PROCESS: tuple[str | None, ...] = (None,)
GATEWAY_WEB_2_WORKERS: tuple[str | None, ...] = ("gateway,web", "worker", "worker")
SPLIT_WEB: tuple[str | None, ...] = ("gateway", "web", "worker", "worker")


@dataclass
class ScalePlan:
    images: int  # per burst, over all stations
    stations: int
    users: int  # web users polling in the busy burst
    studies: int  # seeded before the web comparison, so the worklist has rows
    poll_s: float

    @classmethod
    def for_mode(cls, quick: bool) -> ScalePlan:
        if quick:
            return cls(images=8, stations=4, users=4, studies=8, poll_s=0.5)
        return cls(images=48, stations=4, users=20, studies=100, poll_s=0.5)


# -- pure summaries (unit-tested in tests/unit/test_bench_scaleout.py) --


def rates(n: int, n_bytes: int, seconds: float) -> dict[str, float | None]:
    """images/s and MB/s (10^6 bytes) over ``seconds``; None when the interval is not positive."""
    ok = seconds > 0
    return {
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3) if ok else None,
        "mb_per_s": round(mb(n_bytes) / seconds, 2) if ok else None,
    }


def target(metric: str, measured: float | None, reference: float | None, goal: float) -> dict[str, Any]:
    """``measured / reference`` against ``goal`` (at least): the report's met / MISSED entry.

    A missing or non-positive figure gives ``measured`` None and ``met`` False (nothing to compare).
    """
    ratio = measured / reference if measured is not None and reference else None
    return {
        "metric": metric,
        "target": goal,
        "measured": round(ratio, 3) if ratio is not None else None,
        "met": ratio is not None and ratio >= goal,
    }


def per_image_e2e_s(sent_at: Mapping[str, float], committed_at: Mapping[str, float | None]) -> list[float]:
    """Seconds from each image's ``storescu`` spawn to its result's commit; images without one are left out."""
    return [done - sent_at[uid] for uid, done in committed_at.items() if done is not None and uid in sent_at]


def cpu_split(
    before: Mapping[str, float], mid: Mapping[str, float], after: Mapping[str, float]
) -> dict[str, Any]:
    """CPU seconds per process (user + system) while images arrived (``before`` -> ``mid``) and after
    (``mid`` -> ``after``, triage catching up); a process missing from a reading is left out."""
    return {
        name: {
            "during_ingest_s": round(mid[name] - before[name], 2),
            "after_ingest_s": round(after[name] - mid[name], 2),
        }
        for name in before
        if name in mid and name in after
    }


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from ``/proc/PID/stat`` (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_medians(records: Sequence[InstanceRecord]) -> dict[str, float | None]:
    """Median ms of every server stage timer (``timings_ms``) plus the gateway's receive/store timers."""
    keys = sorted({k for r in records for k, v in r.timings_ms.items() if isinstance(v, int | float)})
    out = {
        k: median(r.timings_ms.get(k) for r in records if isinstance(r.timings_ms.get(k), int | float))
        for k in keys
    }
    out["receive"] = median(r.receive_ms for r in records)
    out["store"] = median(r.store_ms for r in records)
    return out


# -- reading results from SQLite or PostgreSQL --


class SqlResultsDB(ResultsDB):
    """``ResultsDB`` over SQLAlchemy, so the same lookup reads SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:  # noqa: D107 - no sqlite3 connection here
        from sqlalchemy import create_engine

        self.url = url
        self.engine = create_engine(url, pool_size=1) if not url.startswith("sqlite") else create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def lookup(self, sop_uids: list[str]) -> dict[str, InstanceRecord]:

        from sqlalchemy import bindparam, text


        sql = text(_LOOKUP_SQL.replace("IN ({marks})", "IN :uids")).bindparams(
            bindparam("uids", expanding=True)
        )
        found: dict[str, InstanceRecord] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(sop_uids), 500):
                for row in conn.execute(sql, {"uids": sop_uids[i : i + 500]}):
                    found[row[0]] = instance_record(row)
        return found


# -- PostgreSQL --


@dataclass
class Postgres:
    """A PostgreSQL server to make one fresh database per deployment on; ``source`` says where it came from."""

    url: str  # maintenance URL (database "postgres")
    source: str
    cluster_dir: str | None = None  # set when this benchmark started the cluster (stopped at the end)

    def new_database(self) -> str:
        """A new, empty database at the schema's head (Alembic, as ``xray-triage db upgrade``); its URL."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from xray_triage.store import migrate
        from xray_triage.store.db import Database

        name = f"bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        url = make_url(self.url).set(database=name).render_as_string(hide_password=False)
        db = Database(url)
        try:
            migrate.upgrade(db.engine)
        finally:
            db.dispose()
        return url

    def stop(self) -> None:
        if self.cluster_dir:
            subprocess.run(
                [str(PG_CLUSTER_SCRIPT), "stop", self.cluster_dir], check=False, capture_output=True
            )


def find_postgres() -> tuple[Postgres | None, str]:
    """The PostgreSQL server to use, or None and why not."""
    url = os.environ.get("XRAY_TRIAGE_TEST_DATABASE_URL")
    if url:
        return Postgres(url, "XRAY_TRIAGE_TEST_DATABASE_URL"), ""
    if os.geteuid() != 0:
        return None, "not root and no XRAY_TRIAGE_TEST_DATABASE_URL: PostgreSQL rows skipped"
    if not (PG_BIN / "initdb").exists():
        return None, f"no PostgreSQL 15 in {PG_BIN} (apt-get install postgresql): PostgreSQL rows skipped"
    done = subprocess.run([str(PG_CLUSTER_SCRIPT), "start"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"scripts/pg-test-cluster.sh start failed: {done.stderr.strip()[-300:]}"
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return (
        Postgres(
            env["XRAY_TRIAGE_TEST_DATABASE_URL"], "scripts/pg-test-cluster.sh (fsync off)", env["PG_TEST_DIR"]
        ),
        "",
    )


# -- deployments --


@dataclass
class Deployment:
    """``serve`` processes with the given roles on one data directory and one database."""

    name: str
    layout: tuple[str | None, ...]
    work_dir: Path
    model_dir: Path
    database_url: str | None  # None: SQLite in the data directory
    processes: list[TriageServer] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.work_dir / f"{self.name}-data"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'xray-triage.db').resolve()}"

    def _with_role(self, role: str) -> TriageServer:
        return next(p for p in self.processes if p.roles is None or role in p.roles)

    @property
    def gateway(self) -> TriageServer:
        return self._with_role("gateway")

    @property
    def web(self) -> TriageServer:
        return self._with_role("web")

    def alive(self) -> bool:
        return all(p.alive() for p in self.processes)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each process, by its name (``scaleout0-0-all``, ``...-1-worker``)."""
        readings = {p.name.split("-", 1)[1]: proc_cpu_s(p.pid) for p in self.processes}
        return {name: value for name, value in readings.items() if value is not None}

    def start(self) -> None:
        env = {"XRAY_TRIAGE_DATABASE_URL": self.database_url} if self.database_url else {}
        for i, roles in enumerate(self.layout):
            server = TriageServer(
                self.work_dir,
                self.model_dir,
                name=f"{self.name}-{i}-{(roles or 'all').replace(',', '+')}",
                extra_env=env,
                roles=roles,
                data_dir=self.data_dir,
                register_station=i == 0,
            )
            self.processes.append(server)
            server.start()  # one after the other: the first prepares the storage and the schema

    def stop(self) -> list[str]:
        """SIGTERM the gateway first (nothing new arrives), then the others; failures for non-zero exits."""
        order = sorted(self.processes, key=lambda p: 0 if p.roles is None or "gateway" in p.roles else 1)
        failures = []
        for p in order:
            code = p.stop()
            if code != 0:
                failures.append(
                    f"{p.name} exited {code} after SIGTERM (expected 0); log tail:\n{p.log_tail()}"
                )
        return failures


@contextmanager
def deployment(
    name: str,
    layout: tuple[str | None, ...],
    work_dir: Path,
    model_dir: Path,
    database_url: str | None,
    failures: list[str],
) -> Iterator[tuple[Deployment, SqlResultsDB]]:
    dep = Deployment(name, layout, work_dir, model_dir, database_url)
    db: SqlResultsDB | None = None
    try:
        dep.start()
        db = SqlResultsDB(dep.url)
        yield dep, db
    finally:
        if db is not None:
            db.close()
        failures += dep.stop()
        if not failures:
            shutil.rmtree(dep.data_dir, ignore_errors=True)


def _sender_of(shares: list[list[Path]], sends: list[SendResult]) -> dict[str, float]:
    return {sop_instance_uid(p): s.started_at for share, s in zip(shares, sends, strict=True) for p in share}


def ingest(
    label: str, dep: Deployment, db: SqlResultsDB, files: list[Path], info: ImageInfo, stations: int
) -> tuple[dict[str, Any], list[str]]:
    """One burst: ``stations`` storescu in parallel to the gateway, then wait until all are triaged."""
    shares = split(files, stations)
    uids = [sop_instance_uid(p) for p in files]
    timeout_s = 120.0 + 10.0 * len(files)
    os.sync()
    cpu_before = dep.cpu_s()
    sends = send_all(shares, info.storescu_flag, dep.gateway.dicom_port, SERVER_AE, timeout_s)
    cpu_mid = dep.cpu_s()
    t0, t1 = min(s.started_at for s in sends), max(s.exited_at for s in sends)
    records, _ = db.wait_settled(uids, time.monotonic() + timeout_s, 0.1, dep.alive)
    cpu_after = dep.cpu_s()
    failures = [
        f"scaleout {label}: storescu exited {s.returncode}: {s.output[-300:]}" for s in sends if not s.ok
    ]
    triaged = [r for r in records.values() if r.triaged]
    if len(records) != len(files) or len(triaged) != len(files):
        failures.append(f"scaleout {label}: {len(files)} sent, {len(records)} stored, {len(triaged)} triaged")
    n_bytes = sum(p.stat().st_size for p in files)
    e2e = per_image_e2e_s(_sender_of(shares, sends), {r.sop_uid: r.result_created_at for r in triaged})
    last = max((r.result_created_at for r in triaged if r.result_created_at), default=None)
    return {
        "window": (t0, t1),
        "images": len(files),
        "total_mb": round(mb(n_bytes), 2),
        "ingest": rates(len(files), n_bytes, t1 - t0),
        "all_triaged_s": round(last - t0, 3) if last else None,
        "e2e_s": summarize(e2e, 3),
        "stages_ms_median": stage_medians(triaged),
        "cpu_s": cpu_split(cpu_before, cpu_mid, cpu_after),
    }, failures


def _storescp(
    files: list[Path], info: ImageInfo, work_dir: Path, stations: int
) -> tuple[dict[str, Any], list[str]]:
    n_bytes = sum(p.stat().st_size for p in files)
    os.sync()
    with ReferenceSCP(work_dir / "scaleout-storescp", work_dir / "storescp.log") as ref:
        sends = send_all(split(files, stations), info.storescu_flag, ref.port, REFERENCE_AE, 600.0)
        stored, _ = ref.stored()
    shutil.rmtree(work_dir / "scaleout-storescp", ignore_errors=True)
    seconds = max(s.exited_at for s in sends) - min(s.started_at for s in sends)
    failures = [f"scaleout storescp: storescu exited {s.returncode}" for s in sends if not s.ok]
    if stored != len(files):
        failures.append(f"scaleout storescp: {len(files)} sent, {stored} written")
    return {"stored": stored, "ingest": rates(len(files), n_bytes, seconds)}, failures


def _warm(dep: Deployment, db: SqlResultsDB, info: ImageInfo, work_dir: Path) -> None:
    """One untimed image, so first-image costs (lazy imports, first decode in each worker) stay outside."""
    warm = unique_copies(info.path, work_dir / "scaleout-warm", 2, "warm")
    send_all([[p] for p in warm], info.storescu_flag, dep.gateway.dicom_port, SERVER_AE, 120.0)
    db.wait_settled([sop_instance_uid(p) for p in warm], time.monotonic() + 120.0, 0.1, dep.alive)
    shutil.rmtree(work_dir / "scaleout-warm", ignore_errors=True)


def _web_comparison(
    dep: Deployment,
    db: SqlResultsDB,
    files: list[Path],
    info: ImageInfo,
    seed: ImageInfo,
    work_dir: Path,
    plan: ScalePlan,
) -> tuple[dict[str, Any], list[str]]:
    from benchmarks.worklist_load import WebUser, _add_users, _latency

    failures: list[str] = []
    seeds = unique_copies(seed.path, work_dir / "scaleout-seed", plan.studies, "seed")
    send_all([seeds], seed.storescu_flag, dep.gateway.dicom_port, SERVER_AE, 600.0)
    db.wait_settled([sop_instance_uid(p) for p in seeds], time.monotonic() + 600.0, 0.2, dep.alive)
    shutil.rmtree(work_dir / "scaleout-seed", ignore_errors=True)
    names = _add_users(dep.data_dir, plan.users, database_url=dep.database_url)

    idle, f = ingest("web idle", dep, db, files, info, plan.stations)
    failures += f
    idle.pop("window")
    progress(f"scaleout: split roles, web idle: {idle['ingest']['images_per_s']} img/s")

    stop = threading.Event()
    users = [WebUser(f"http://{HOST}:{dep.web.http_port}", n, plan.poll_s, stop) for n in names]
    threads = [threading.Thread(target=u.run, daemon=True) for u in users]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while any(not u.samples and not u.error for u in users) and time.monotonic() < deadline:
        time.sleep(0.05)
    renew_uids(files)
    busy, f = ingest("web busy", dep, db, files, info, plan.stations)
    failures += f
    stop.set()
    for thread in threads:
        thread.join(150)
    busy["worklist"] = _latency(users, *busy.pop("window"))
    failures += [f"scaleout web user: {e}" for e in sorted({u.error for u in users if u.error})]
    progress(
        f"scaleout: split roles, web busy ({plan.users} users): {busy['ingest']['images_per_s']} img/s, "
        f"worklist p95 {busy['worklist']['ms']['p95']} ms"
    )
    return {
        "layout": list(r or "all" for r in dep.layout),
        "users": plan.users,
        "studies_seeded": plan.studies,
        "web_idle": idle,
        "web_busy": busy,
        "target": target(
            "ingest img/s with the web busy / idle",
            busy["ingest"]["images_per_s"],
            idle["ingest"]["images_per_s"],
            TARGET_BUSY_VS_IDLE,
        ),
    }, failures


def run_scaleout(
    model_dir: Path, burst_image: ImageInfo, seed_image: ImageInfo, work_dir: Path, plan: ScalePlan
) -> tuple[dict[str, Any], list[str]]:
    failures: list[str] = []
    warnings: list[str] = []
    postgres, why_not = find_postgres()
    if postgres is None:
        warnings.append(why_not)
    progress(
        f"scaleout: {plan.images} x {burst_image.name} from {plan.stations} stations; PostgreSQL: "
        f"{postgres.source if postgres else why_not}"
    )
    files = unique_copies(burst_image.path, work_dir / "scaleout-burst", plan.images, "so")
    result: dict[str, Any] = {
        "plan": plan.__dict__,
        "image": burst_image.name,
        "postgres": postgres.source if postgres else None,
        "warnings": warnings,
        "rows": [],
    }
    try:
        ref, f = _storescp(files, burst_image, work_dir, plan.stations)
        failures += f
        result["storescp"] = ref
        progress(f"scaleout: storescp {ref['ingest']['mb_per_s']} MB/s")
        cases: list[tuple[str, tuple[str | None, ...], str | None, str]] = [
            ("1 process", ONE_PROCESS, None, "sqlite"),
            ("gateway,web + 2 workers", GATEWAY_WEB_2_WORKERS, None, "sqlite"),
        ]
        if postgres is not None:
            cases += [
                ("1 process", ONE_PROCESS, "pg", "postgresql"),
                ("gateway,web + 2 workers", GATEWAY_WEB_2_WORKERS, "pg", "postgresql"),
            ]
        for i, (label, layout, pg, db_name) in enumerate(cases):
            url = postgres.new_database() if pg and postgres else None
            with deployment(f"scaleout{i}", layout, work_dir, model_dir, url, failures) as (dep, db):
                _warm(dep, db, burst_image, work_dir)
                row, f = ingest(f"{label} ({db_name})", dep, db, files, burst_image, plan.stations)
                failures += f
                row.pop("window")
            row.update(
                {
                    "layout": label,
                    "database": db_name,
                    "target": target(
                        "ingest MB/s with triage on / storescp's",
                        row["ingest"]["mb_per_s"],
                        ref["ingest"]["mb_per_s"],
                        TARGET_VS_STORESCP,
                    ),
                }
            )
            result["rows"].append(row)
            progress(
                f"scaleout: {label} ({db_name}): {row['ingest']['mb_per_s']} MB/s "
                f"({row['ingest']['images_per_s']} img/s, x{row['target']['measured']} storescp), "
                f"e2e p95 {row['e2e_s']['p95']} s"
            )
        url = postgres.new_database() if postgres else None
        with deployment("scaleout-web", SPLIT_WEB, work_dir, model_dir, url, failures) as (dep, db):
            _warm(dep, db, burst_image, work_dir)
            web, f = _web_comparison(dep, db, files, burst_image, seed_image, work_dir, plan)
            failures += f
        web["database"] = "postgresql" if postgres else "sqlite"
        result["web"] = web
    finally:
        shutil.rmtree(work_dir / "scaleout-burst", ignore_errors=True)
        if postgres is not None:
            postgres.stop()
    return result, failures


def markdown_lines(scaleout: dict[str, Any]) -> list[str]:
    def f(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    plan = scaleout["plan"]
    ref = scaleout.get("storescp") or {}
    lines = [
        "",
        f"### Scale-out: {plan['images']} x {scaleout['image']} from {plan['stations']} stations, triage on",
        "",
        "| receiver | database | MB/s | img/s | x storescp (goal >= 0.8) | e2e p50 s | e2e p95 s | all triaged s |",
        "|---|---|---|---|---|---|---|---|",
        f"| storescp (no fsync, no DB) | | {f(ref.get('ingest', {}).get('mb_per_s'), 1)} | "
        f"{f(ref.get('ingest', {}).get('images_per_s'), 2)} | 1.00 | | | |",
    ]
    for r in scaleout.get("rows", []):
        t = r["target"]
        lines.append(
            f"| {r['layout']} | {r['database']} | {f(r['ingest']['mb_per_s'], 1)} | {f(r['ingest']['images_per_s'], 2)} | "
            f"{f(t['measured'], 2)} ({'met' if t['met'] else 'MISSED'}) | {f(r['e2e_s']['p50'], 2)} | "
            f"{f(r['e2e_s']['p95'], 2)} | {f(r['all_triaged_s'], 1)} |"
        )
    lines += ["", "Server stage medians, ms (store = write + fsync + commit; queue = row -> claim):", ""]
    stages = ["receive", "store", "queue", "decode", "preprocess", "inference"]
    lines += ["| receiver | database | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for r in scaleout.get("rows", []):
        s = r["stages_ms_median"]
        lines.append(
            f"| {r['layout']} | {r['database']} | " + " | ".join(f(s.get(k), 0) for k in stages) + " |"
        )
    lines += [
        "",
        "CPU seconds per process (user + system) while the images arrived / after, until all were triaged:",
        "",
    ]
    for r in scaleout.get("rows", []):
        cpu = ", ".join(
            f"{name} {v['during_ingest_s']:.1f} / {v['after_ingest_s']:.1f}"
            for name, v in r.get("cpu_s", {}).items()
        )
        lines.append(f"- {r['layout']} ({r['database']}): {cpu}")
    web = scaleout.get("web")
    if web:
        t = web["target"]
        wl = web["web_busy"].get("worklist", {})
        lines += [
            "",
            f"### Web busy vs idle: processes {' / '.join(web['layout'])} ({web['database']}), "
            f"{web['users']} users polling the worklist",
            "",
            "| burst | img/s | MB/s | e2e p95 s | all triaged s | worklist requests | worklist p95 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, key in (("web idle", "web_idle"), ("web busy", "web_busy")):
            b = web[key]
            lines.append(
                f"| {label} | {f(b['ingest']['images_per_s'], 2)} | {f(b['ingest']['mb_per_s'], 1)} | "
                f"{f(b['e2e_s']['p95'], 2)} | {f(b['all_triaged_s'], 1)} | "
                + (
                    f"{wl.get('requests')} | {f((wl.get('ms') or {}).get('p95'), 0)} |"
                    if key == "web_busy"
                    else " | |"
                )
            )
        lines += [
            "",
            f"Busy / idle: {f(t['measured'], 2)} (goal >= {t['target']}: {'met' if t['met'] else 'MISSED'}).",
        ]
    return lines
