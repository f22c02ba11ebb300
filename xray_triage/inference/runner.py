"""ONNX Runtime session for one model card: created once, warmed up, then shared.

Why one session per model: creating a session parses and optimises the graph
(hundreds of ms) and allocates arenas; doing it per image would dominate the
latency a station waits for. ``InferenceSession.run`` is thread-safe, so the
triage workers share the session.

Two ways in: :meth:`ModelRunner.run` runs a batch the caller built;
:meth:`ModelRunner.infer_one` runs one image and, when ``batch_max_size > 1``,
shares the model call with other threads' images through a
:class:`~xray_triage.inference.batching.MicroBatcher` (see that module for
tuning: the triage workers are the concurrent callers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from xray_triage.inference.batching import MicroBatcher
from xray_triage.inference.card import ModelCard, ModelCardError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOutputs:
    probabilities: np.ndarray  # (N, labels) float32 in 0..1
    heatmaps: np.ndarray | None  # (N, labels, h, w) or None when the model has none


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: list[str] | None) -> list[str]:
    """Requested providers that this onnxruntime build has; default CUDA then CPU."""
    available = available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning(
                "execution providers not available in this onnxruntime build, skipped: %s (available: %s)",
                missing,
                available,
            )
        chosen = [p for p in requested if p in available]
    else:
        chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def default_intra_op_threads() -> int:
    """All cores the process may use: triage of one image is the latency that matters."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ModelRunner:
    """Runs a card's ONNX model on preprocessed batches."""

    def __init__(
        self,
        card: ModelCard,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        warm_up: bool = True,
        batch_max_size: int = 1,
        batch_max_wait_ms: float = 5.0,
    ) -> None:
        import onnxruntime as ort

        self.card = card
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.providers = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(
                str(card.onnx_file), sess_options=options, providers=self.providers
            )
        except Exception as exc:
            raise ModelCardError(f"{card.onnx_file}: ONNX Runtime cannot load the model: {exc}") from exc
        self._check_signature()
        self._output_names = [card.probabilities_output] + (
            [card.heatmaps_output] if card.heatmaps_output else []
        )
        self.batcher: MicroBatcher | None = None
        self.batch_max_size = 1  # what infer_one batches up to: 1 = direct calls
        if batch_max_size > 1:
            if self.batch_axis_is_dynamic():
                self.batch_max_size = batch_max_size
            else:
                log.warning(
                    "batch_max_size > 1 but the model's input has a fixed batch size; "
                    "images are run one at a time",
                    extra={"input_shape": str(self.session.get_inputs()[0].shape)},
                )
        if warm_up:
            self.warm_up()
        if self.batch_max_size > 1:
            self.batcher = MicroBatcher(
                self._run_rows, max_size=self.batch_max_size, max_wait_ms=batch_max_wait_ms
            )
            log.info(
                "micro-batching on",
                extra={"batch_max_size": self.batch_max_size, "batch_max_wait_ms": batch_max_wait_ms},
            )

    def _check_signature(self) -> None:
        card = self.card
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if card.input.name not in inputs:
            raise ModelCardError(
                f"{card.path}: input {card.input.name!r} not in the model (it has {sorted(inputs)})"
            )
        for name in filter(None, (card.probabilities_output, card.heatmaps_output)):
            if name not in outputs:
                raise ModelCardError(
                    f"{card.path}: output {name!r} not in the model (it has {sorted(outputs)})"
                )
        n_labels = outputs[card.probabilities_output].shape[-1]
        if isinstance(n_labels, int) and n_labels != len(card.labels):
            raise ModelCardError(
                f"{card.path}: the model outputs {n_labels} probabilities but the card lists "
                f"{len(card.labels)} labels"
            )

    def batch_axis_is_dynamic(self) -> bool:
        """Whether the model accepts any batch size (its input's first axis is symbolic)."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        shape = inputs[self.card.input.name].shape
        return bool(shape) and not isinstance(shape[0], int)

    def warm_up(self) -> float:
        """Run one dummy batch so the first real image pays no allocation cost."""
        spec = self.card.input
        dummy = np.zeros((1, spec.channels, spec.height, spec.width), dtype=np.float32)
        start = time.perf_counter()
        out = self.run(dummy)
        elapsed = time.perf_counter() - start
        if out.probabilities.shape != (1, len(self.card.labels)):
            raise ModelCardError(
                f"{self.card.path}: the model returned probabilities of shape "
                f"{out.probabilities.shape}, expected (1, {len(self.card.labels)})"
            )
        log.info(
            "model warmed up",
            extra={
                "model": self.card.model_version,
                "providers": self.providers,
                "ms": round(elapsed * 1000, 1),
            },
        )
        if self.batch_max_size > 1:  # also the full batch shape (GPU kernels are chosen per shape)
            self.run(np.zeros((self.batch_max_size, *dummy.shape[1:]), dtype=np.float32))
        return elapsed

    def run(self, batch: np.ndarray) -> ModelOutputs:
        """Run a (N, C, H, W) float32 batch."""
        results = self.session.run(self._output_names, {self.card.input.name: batch})
        heatmaps = results[1] if len(results) > 1 else None
        return ModelOutputs(probabilities=np.asarray(results[0], dtype=np.float32), heatmaps=heatmaps)

    def _run_rows(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.run(batch)
        return out.probabilities, out.heatmaps

    def infer_one(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one ``(C, H, W)`` image: ``(probabilities (labels,), heatmaps (labels, h, w) or None)``.

        Safe to call from many threads at once; with micro-batching on, concurrent
        calls share one model call (results are the same as one image at a time).
        """
        spec = self.card.input
        expected = (spec.channels, spec.height, spec.width)
        tensor = np.asarray(tensor, dtype=np.float32)
        if tensor.shape != expected:
            raise ValueError(f"infer_one expects one image of shape {expected}, got {tensor.shape}")
        batcher = self.batcher
        if batcher is not None:
            probabilities, heatmaps = batcher.infer(tensor)
            assert probabilities is not None
            return probabilities, heatmaps
        out = self.run(tensor[None])
        return out.probabilities[0], None if out.heatmaps is None else out.heatmaps[0]

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the micro-batcher (if any) after the images it holds.

        ``run`` and ``infer_one`` keep working afterwards, one image per model call.
        """
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher.stop(timeout_s)
