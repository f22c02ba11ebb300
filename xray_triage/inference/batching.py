"""Micro-batching: concurrent single-image requests share one model call.

On a GPU one ``session.run`` of 8 images costs little more than one of a single
image, so when several triage workers infer at the same time it pays to stack
their images into one batch. :class:`MicroBatcher` does that with one
background thread:

- a caller hands one item (e.g. a ``(C, H, W)`` tensor) to
  :meth:`~MicroBatcher.submit` and gets a :class:`concurrent.futures.Future`;
  :meth:`~MicroBatcher.infer` submits and waits;
- the thread takes the oldest waiting item and waits until ``max_size`` items
  are queued or ``max_wait_ms`` have passed since that item arrived, whichever
  comes first, then runs the batch (``np.stack`` of the items) through
  ``run_batch`` and hands row ``i`` of every output to caller ``i``;
- if ``run_batch`` raises, every caller in that batch gets the exception;
- :meth:`~MicroBatcher.stop` runs what is already queued without waiting,
  then ends the thread; items submitted afterwards are refused.

So a request waits at most ``max_wait_ms`` for company, plus the model call.

Tuning (settings ``batch_max_size``, ``batch_max_wait_ms``, ``triage_workers``):

- The callers are the triage workers, each working one image at a time, so a
  batch can only fill when ``triage_workers >= batch_max_size``; with fewer
  workers every batch waits the full ``batch_max_wait_ms`` and gains nothing.
- CPU (the default): ``batch_max_size = 1`` - no batcher, each worker calls the
  model directly; ONNX Runtime already uses all cores for one image.
- GPU preset: ``triage_workers = 8``, ``batch_max_size = 8``,
  ``batch_max_wait_ms = 5`` (with ``model_variant = "fp16"``). Decoding and
  preprocessing stay parallel in the workers; only the model call is shared.
- Batching needs a model whose input batch axis is dynamic; the runner calls
  the model directly when it is fixed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], Sequence[np.ndarray | None]]


class BatcherStopped(RuntimeError):
    """The batcher was stopped; the request was not run."""


@dataclass
class _Request:
    item: np.ndarray
    arrived: float  # time.monotonic()
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Collects single items into batches of up to ``max_size`` for ``run_batch``.

    ``run_batch`` gets a stacked ``(N, ...)`` array and returns a sequence of
    outputs, each with N rows along axis 0 (or ``None`` for an absent output);
    a caller's result is the tuple of its rows (``None`` stays ``None``).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_size: int,
        max_wait_ms: float,
        name: str = "model-batcher",
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self.run_batch = run_batch
        self.max_size = int(max_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.batch_sizes: Counter[int] = Counter()  # batch size -> number of run_batch calls
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------

    def submit(self, item: np.ndarray) -> Future:
        """Queue one item; the future's result is the tuple of its output rows."""
        request = _Request(item=item, arrived=time.monotonic())
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the model batcher is stopped")
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def infer(self, item: np.ndarray) -> tuple[np.ndarray | None, ...]:
        """Submit one item and wait for its outputs; re-raises ``run_batch``'s exception."""
        return self.submit(item).result()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Run what is queued (without waiting for more), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("model batcher did not stop in time", extra={"timeout_s": timeout_s})

    # -- the batching thread -------------------------------------------------------

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch to fill or its oldest request's wait to end; None = stop."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_size, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        # A caller that cancelled its future (it never waits for it) is skipped.
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            stacked = np.stack([r.item for r in batch])
            outputs = list(self.run_batch(stacked))
            for out in outputs:
                if out is not None and len(out) != len(batch):
                    raise RuntimeError(
                        f"the model returned {len(out)} rows for a batch of {len(batch)} images"
                    )
        except BaseException as exc:  # every caller of this batch gets the error; the thread goes on
            for request in batch:
                request.future.set_exception(exc)
            return
        finally:
            self.batch_sizes[len(batch)] += 1
        for i, request in enumerate(batch):
            request.future.set_result(tuple(None if out is None else out[i].copy() for out in outputs))
