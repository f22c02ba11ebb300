"""ONNX Runtime session for one model card: created once, warmed up, then shared.

Why one session per model: creating a session parses and optimises the graph
(hundreds of ms) and allocates arenas; doing it per image would dominate the
latency a station waits for. ``InferenceSession.run`` is thread-safe, so the
triage workers share the session.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

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
                "execution providers not available in this onnxruntime build, skipped: %s "
                "(available: %s)",
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
        if warm_up:
            self.warm_up()

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
            extra={"model": self.card.model_version, "providers": self.providers, "ms": round(elapsed * 1000, 1)},
        )
        return elapsed

    def run(self, batch: np.ndarray) -> ModelOutputs:
        """Run a (N, C, H, W) float32 batch."""
        results = self.session.run(self._output_names, {self.card.input.name: batch})
        heatmaps = results[1] if len(results) > 1 else None
        return ModelOutputs(probabilities=np.asarray(results[0], dtype=np.float32), heatmaps=heatmaps)
