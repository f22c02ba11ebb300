"""Triage worker threads: take jobs from the durable queue and run the model.

Workers are woken at once when the gateway queues a job (``notify``) and also
poll every second, so jobs queued by another process (``serve --roles gateway``
elsewhere) or left by a dead worker are never stranded. Each thread claims under
the id ``host:pid/n``; one renewer thread extends the leases of the jobs in hand
every third of ``job_lease_s`` (``jobs.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import DEFAULT_MAX_FRAME_PIXELS, PixelError
from xray_triage.store.db import Database
from xray_triage.store.reasons import image_label, user_reason
from xray_triage.triage import jobs
from xray_triage.triage.analyze import analyze_file

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class TriageWorkers:
    def __init__(
        self,
        db: Database,
        runner: ModelRunner,
        data_dir: Path,
        *,
        count: int = 1,
        max_attempts: int = 3,
        reduced_decode: bool = True,
        max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
        lease_s: float = jobs.DEFAULT_LEASE_S,
        nice: int = 0,
    ) -> None:
        """``nice``: the worker threads' scheduling niceness (Linux, per thread; 0 = as the process).

        Positive values let the gateway's association threads win the CPU while triage catches
        up behind them: the station's image is acknowledged first, triaged next (issue 17).
        """
        self.db = db
        self.nice = nice
        self.reduced_decode = reduced_decode
        self.max_frame_pixels = max_frame_pixels
        self.runner = runner
        self.data_dir = data_dir
        self.count = count
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.lease_s = lease_s
        self.worker_id = jobs.process_worker_id()
        self._in_hand: dict[str, jobs.ClaimedJob] = {}
        self._in_hand_lock = threading.Lock()

    def notify(self) -> None:
        """Called by the gateway when a job was queued."""
        self._wake.set()

    def start(self) -> None:
        recovered = jobs.recover_dead_local(self.db)
        if recovered:
            log.info(
                "re-queued jobs interrupted by a process that is gone (shutdown or crash)",
                extra={"jobs": recovered},
            )
        for n in range(self.count):
            name = f"{self.worker_id}/{n}"
            thread = threading.Thread(target=self._loop, name=f"triage-worker-{n}", args=(name,), daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.count:
            renewer = threading.Thread(target=self._renew_loop, name="triage-lease-renewer", daemon=True)
            renewer.start()
            self._threads.append(renewer)
        self._wake.set()
        if self.count == 0:
            log.warning("triage_workers = 0: images are stored and queued but not triaged")
        else:
            log.info(
                "triage workers started",
                extra={
                    "workers": self.count,
                    "worker_id": self.worker_id,
                    "model": self.runner.card.model_version,
                },
            )

    def _renew_loop(self) -> None:
        """Keep the leases of the jobs in hand alive while their threads work on them."""
        while not self._stop.wait(self.lease_s / 3):
            with self._in_hand_lock:
                in_hand = list(self._in_hand.values())
            for job in in_hand:
                try:
                    if not jobs.renew_lease(self.db, job, lease_s=self.lease_s):
                        log.warning("lost the lease of a job in hand", extra={"job_id": job.job_id})
                except Exception:
                    log.exception("could not renew a triage lease; retrying")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the job in hand, then stop. Unstarted jobs stay queued in the database."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()

    def _loop(self, name: str) -> None:
        if self.nice:
            _lower_priority(self.nice)
        while not self._stop.is_set():
            self._wake.wait(POLL_INTERVAL_S)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self.run_one(name):
                    pass
            except Exception:  # the database may be briefly unavailable; keep the worker alive
                log.exception("triage worker error; retrying shortly")
                time.sleep(POLL_INTERVAL_S)

    def _reason(self, message: str, job: jobs.ClaimedJob, label: str) -> str:
        """The failure as users see it (study page, API, CLI): the image's label, no server path."""
        return user_reason(message, file_path=job.file_path, label=label, data_dir=self.data_dir) or message

    def run_one(self, name: str = "worker") -> bool:
        """Process one queued job; return False when the queue is empty."""
        job = jobs.claim_next(self.db, name, lease_s=self.lease_s)
        if job is None:
            return False
        with self._in_hand_lock:
            self._in_hand[name] = job
        try:
            return self._process(job)
        finally:
            with self._in_hand_lock:
                self._in_hand.pop(name, None)

    def _process(self, job: jobs.ClaimedJob) -> bool:
        path = self.data_dir / job.file_path
        label = image_label(job.sop_instance_uid)
        try:
            analysis = analyze_file(
                path,
                self.runner,
                reduced_decode=self.reduced_decode,
                max_frame_pixels=self.max_frame_pixels,
                source=label,
            )
        except PixelError as exc:
            reason = self._reason(str(exc), job, label)
            jobs.fail(self.db, job, reason, permanent=True, max_attempts=self.max_attempts)
            log.warning(
                "triage failed: image cannot be decoded",
                extra={"instance_id": job.instance_id, "file": str(path), "error": str(exc)},
            )
            return True
        except Exception as exc:
            reason = self._reason(f"{type(exc).__name__}: {exc}", job, label)
            final = jobs.fail(self.db, job, reason, permanent=False, max_attempts=self.max_attempts)
            log.exception("triage error", extra={"instance_id": job.instance_id, "final": final})
            return True
        jobs.complete(self.db, job, analysis)
        log.info(
            "triage done",
            extra={
                "instance_id": job.instance_id,
                "priority": analysis.score.priority,
                "abnormal_score": analysis.score.abnormal_score,
                "flagged": ",".join(analysis.score.flagged) or "-",
                **{f"{k}_ms": v for k, v in analysis.timings_ms.items()},
            },
        )
        return True


def _lower_priority(nice: int) -> None:
    """Give the calling thread ``nice`` more niceness (on Linux ``setpriority`` with a thread id
    affects that thread alone); logged and ignored where the platform does not allow it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (OSError, AttributeError) as exc:
        log.warning("cannot lower the triage worker's priority", extra={"nice": nice, "error": str(exc)})
