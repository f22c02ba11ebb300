"""Worklist under load: N users polling ``/worklist`` while K stations send a burst.

A fresh server of its own (``server-worklist``) is seeded with S studies (copies of a
1024 px shared image sent by one ``storescu`` and triaged), and N specialist accounts
(made in this process through the store's own ``add_user``, as the CLI does). Each
user logs in through the login form, holds one ``/events`` stream open as a browser
tab does, and requests ``GET /worklist`` (page 1, as rendered for a browser) then
waits ``poll_s``: the rate at which a tab re-fetches its rows while changes arrive.

Three phases:

1. *burst alone*: K ``storescu`` send M images of the throughput image (2800x2800,
   one contiguous share each, one association each), nobody on the web: ingest img/s;
2. *users, no burst*: the users poll for ``idle_s`` seconds: worklist latency on a
   quiet server;
3. *burst + users*: the same burst (new UIDs) while the users poll: worklist latency
   during the burst and ingest img/s beside it.

Latency is per request, from sending it to the whole page read (``perf_counter`` in
the user's thread); ingest time is the first ``storescu`` spawn to the last exit
(every C-STORE acknowledged). Nothing here is asserted: failed requests are counted
and reported, a lost image is a failure like in the other parts.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import mb, progress, summarize
from benchmarks.dicom_files import ImageInfo, renew_uids, sop_instance_uid, unique_copies
from benchmarks.server import HOST, SERVER_AE, ResultsDB, TriageServer
from benchmarks.throughput import send_all, split

PASSWORD = "benchmark-password-not-secret"
LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]*)"')


@dataclass
class LoadPlan:
    studies: int  # seeded before anything is timed
    users: int
    stations: int
    images: int  # per burst, over all stations
    idle_s: float
    poll_s: float

    @classmethod
    def for_mode(cls, quick: bool) -> LoadPlan:
        if quick:
            return cls(studies=60, users=5, stations=4, images=16, idle_s=4.0, poll_s=0.5)
        return cls(studies=420, users=20, stations=4, images=96, idle_s=15.0, poll_s=0.5)


@dataclass
class Sample:
    started: float  # time.time() when the request was sent
    ms: float
    status: int


@dataclass
class WebUser:
    """One logged-in user in a thread: an open /events stream and a worklist poll loop."""

    base_url: str
    username: str
    poll_s: float
    stop: threading.Event
    samples: list[Sample] = field(default_factory=list)
    events: int = 0
    stream_status: int = 0
    error: str = ""

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.base_url, trust_env=False, timeout=120.0) as client:
                token = LOGIN_CSRF.search(client.get("/login").text)
                assert token, "no login form"
                data = {"username": self.username, "password": PASSWORD, "login_csrf": token.group(1)}
                answer = client.post("/login", data=data, follow_redirects=False)
                assert answer.status_code == 303, f"login answered {answer.status_code}"
                stream = threading.Thread(target=self._listen, args=(client.cookies,), daemon=True)
                stream.start()
                while not self.stop.is_set():
                    started, t0 = time.time(), time.perf_counter()
                    response = client.get("/worklist")
                    self.samples.append(Sample(started, (time.perf_counter() - t0) * 1000, response.status_code))
                    self.stop.wait(self.poll_s)
                stream.join(5)
        except Exception as exc:  # reported, never raised: the benchmark carries on
            self.error = f"{type(exc).__name__}: {exc}"

    def _listen(self, cookies: Any) -> None:
        """The browser tab's EventSource: read events until the run stops."""
        import httpx

        try:
            with (
                httpx.Client(base_url=self.base_url, cookies=cookies, trust_env=False, timeout=30.0) as client,
                client.stream("GET", "/events") as response,
            ):
                self.stream_status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("event: change"):
                        self.events += 1
                    if self.stop.is_set():
                        break
        except Exception:  # the server closes streams at shutdown; a read timeout is a quiet stream
            pass


def _add_users(data_dir: Path, count: int, database_url: str | None = None) -> list[str]:
    from xray_triage.settings import Settings
    from xray_triage.store.db import open_database
    from xray_triage.store.users import add_user

    db = open_database(Settings(data_dir=data_dir, database_url=database_url))
    names = [f"bench.user{i:02d}" for i in range(count)]
    try:
        with db.session() as session:
            for name in names:
                add_user(session, name, PASSWORD, "specialist")
    finally:
        db.dispose()
    return names


def _burst(
    server: TriageServer, db: ResultsDB, files: list[Path], info: ImageInfo, stations: int
) -> tuple[dict[str, Any], list[str]]:
    uids = [sop_instance_uid(p) for p in files]
    timeout_s = 120.0 + 10.0 * len(files)
    sends = send_all(split(files, stations), info.storescu_flag, server.dicom_port, SERVER_AE, timeout_s)
    t0, t1 = min(s.started_at for s in sends), max(s.exited_at for s in sends)
    records, settled = db.wait_settled(uids, time.monotonic() + timeout_s, 0.1, server.alive)
    failures = [f"worklist burst: storescu exited {s.returncode}: {s.output[-300:]}" for s in sends if not s.ok]
    triaged = [r for r in records.values() if r.triaged]
    if len(records) != len(files) or len(triaged) != len(files):
        failures.append(f"worklist burst: {len(files)} sent, {len(records)} stored, {len(triaged)} triaged")
    n_bytes = sum(p.stat().st_size for p in files)
    seconds = t1 - t0
    return {
        "window": (t0, t1),
        "images": len(files),
        "ingest_s": round(seconds, 3),
        "ingest_images_per_s": round(len(files) / seconds, 3) if seconds > 0 else None,
        "ingest_mb_per_s": round(mb(n_bytes) / seconds, 2) if seconds > 0 else None,
        "all_triaged_s": round(settled - t0, 3),
    }, failures


def _latency(users: list[WebUser], t0: float, t1: float) -> dict[str, Any]:
    inside = [s for u in users for s in u.samples if t0 <= s.started <= t1]
    return {
        "requests": len(inside),
        "not_ok": sum(1 for s in inside if s.status != 200),
        "ms": summarize([s.ms for s in inside if s.status == 200], 1),
    }


def run_worklist_load(
    model_dir: Path, seed_image: ImageInfo, burst_image: ImageInfo, work_dir: Path, plan: LoadPlan
) -> tuple[dict[str, Any], list[str]]:
    failures: list[str] = []
    progress(
        f"worklist: {plan.studies} studies, {plan.users} users polling every {plan.poll_s} s, "
        f"{plan.stations} stations sending {plan.images} x {burst_image.name}"
    )
    seed = unique_copies(seed_image.path, work_dir / "worklist-seed", plan.studies, "seed")
    burst = unique_copies(burst_image.path, work_dir / "worklist-burst", plan.images, "burst")
    result: dict[str, Any] = {"plan": plan.__dict__, "seed_image": seed_image.name, "burst_image": burst_image.name}
    with TriageServer(work_dir, model_dir, name="server-worklist") as server:
        db = ResultsDB(server.db_path)
        try:
            seeded, seed_failures = _burst(server, db, seed, seed_image, 1)
            failures += [f.replace("burst", "seeding") for f in seed_failures]
            shutil.rmtree(work_dir / "worklist-seed", ignore_errors=True)
            progress(f"worklist: seeded {plan.studies} studies in {seeded['all_triaged_s']} s")
            names = _add_users(server.data_dir, plan.users)

            alone, burst_failures = _burst(server, db, burst, burst_image, plan.stations)
            failures += burst_failures
            progress(f"worklist: burst alone {alone['ingest_images_per_s']} img/s")

            stop = threading.Event()
            users = [WebUser(f"http://{HOST}:{server.http_port}", n, plan.poll_s, stop) for n in names]
            threads = [threading.Thread(target=u.run, daemon=True) for u in users]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 120
            while any(not u.samples and not u.error for u in users) and time.monotonic() < deadline:
                time.sleep(0.05)  # every user logged in and polling
            idle_t0 = time.time()
            time.sleep(plan.idle_s)
            idle = _latency(users, idle_t0, time.time())
            progress(f"worklist: users only, p95 {idle['ms']['p95']} ms over {idle['requests']} requests")

            renew_uids(burst)
            loaded, burst_failures = _burst(server, db, burst, burst_image, plan.stations)
            failures += burst_failures
            stop.set()
            for thread in threads:
                thread.join(150)
            during = _latency(users, *loaded.pop("window"))
            alone.pop("window")
            progress(
                f"worklist: burst + users, p95 {during['ms']['p95']} ms over {during['requests']} requests, "
                f"ingest {loaded['ingest_images_per_s']} img/s"
            )
            errors = sorted({u.error for u in users if u.error})
            failures += [f"worklist user: {e}" for e in errors]
            refused = sum(1 for u in users if u.stream_status not in (0, 200))
            result.update(
                {
                    "burst_alone": alone,
                    "users_only": idle,
                    "burst_with_users": {**loaded, "worklist": during},
                    "studies_at_end": plan.studies + 2 * plan.images,
                    "events_received_per_user_median": sorted(u.events for u in users)[len(users) // 2],
                    "event_streams_refused": refused,
                }
            )
        finally:
            db.close()
            shutil.rmtree(work_dir / "worklist-burst", ignore_errors=True)
    if server.exit_code != 0:
        failures.append(f"the worklist server exited {server.exit_code} after SIGTERM (expected 0)")
    return result, failures
