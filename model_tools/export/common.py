"""Architecture-independent export helpers: CAM wrapper, ONNX export, parity check, card.

Everything here needs torch (the ``export`` extra); the card itself is written by
``model_tools.card_toml.write_card``, the project's one card writer. An exporter for one model family (see
``torchxrayvision_export.py``) only has to say how to get the model's last
feature map and its linear classifier; this module turns that into an ONNX file
the server can run (``probabilities`` + class-activation ``heatmaps``), checks
it against PyTorch, and writes the model card beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

INPUT_NAME = "image"
PROBABILITIES = "probabilities"
HEATMAPS = "heatmaps"
PARITY_TOLERANCE = 1e-4


class ExportError(Exception):
    """An export that cannot be done or did not verify; the message says what to do."""


# -- the exported module ---------------------------------------------------------------


class CamClassifier(nn.Module):
    """Wrap a "features -> global average pool -> linear" classifier for export.

    ``features`` maps the input (N, C, H, W) to the last feature map (N, K, h, w)
    *after* its final activation, i.e. exactly what the model pools. The module
    returns

    * ``probabilities`` = ``head(classifier(avgpool(features(x))))``, with the
      outputs where ``used`` is False set to 0.0 (placeholder outputs that carry
      no finding must never flag nor raise a ``max`` abnormal score), and
    * ``heatmaps`` (N, labels, h, w): the class-activation map of every label,
      ``CAM[l] = sum_k W[l, k] * F[k]`` (classifier weights, no bias), computed
      in the graph as a 1x1 convolution.
    """

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Linear,
        head: nn.Module | None = None,
        used: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.head = head if head is not None else nn.Identity()
        n = classifier.out_features
        mask = torch.ones(n, dtype=torch.bool) if used is None else torch.tensor(list(used), dtype=torch.bool)
        if mask.shape != (n,):
            raise ExportError(f"used mask has {mask.numel()} entries, the classifier has {n} outputs")
        self.register_buffer("used", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        pooled = F.adaptive_avg_pool2d(fmap, (1, 1)).flatten(1)
        probabilities = self.head(self.classifier(pooled))
        probabilities = torch.where(self.used, probabilities, torch.zeros_like(probabilities))
        cam_weight = self.classifier.weight[:, :, None, None]
        heatmaps = F.conv2d(fmap, cam_weight)
        return probabilities, heatmaps


def class_activation_maps(fmap: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference CAM in plain torch: (N, K, h, w) x (labels, K) -> (N, labels, h, w).

    Summed in float64, so the parity check measures the exported graph's rounding, not
    the reference's (a float32 sum over 1024 channels is itself off by ~1e-5).
    """
    return torch.einsum("nkyx,lk->nlyx", fmap.double(), weight.double()).to(fmap.dtype)


# -- ONNX export -----------------------------------------------------------------------


def export_onnx(module: nn.Module, path: Path, example: torch.Tensor, *, opset: int = 17) -> None:
    """Export ``module`` (returning probabilities, heatmaps) with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs nothing beyond
    torch and writes one self-contained file, which the card's sha256 pins. If a
    future torch drops it, the ``torch.export`` exporter is used instead (it needs
    ``onnxscript``).
    """
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [PROBABILITIES, HEATMAPS]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                opset_version=opset,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "N"}, PROBABILITIES: {0: "N"}, HEATMAPS: {0: "N"}},
                **names,
            )
        except ImportError:  # no TorchScript exporter in this torch
            batch = torch.export.Dim("N", min=1, max=1024)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),
                **names,
            )
    _check_onnx_signature(path)


def _check_onnx_signature(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.input) + list(model.graph.output)
    }
    for name in (INPUT_NAME, PROBABILITIES, HEATMAPS):
        if name not in dims:
            raise ExportError(f"{path}: exported graph has no {name!r} (it has {sorted(dims)})")
        if not isinstance(dims[name][0], str):
            raise ExportError(f"{path}: {name!r} has a fixed batch size {dims[name][0]}, expected a dynamic one")


# -- parity ----------------------------------------------------------------------------


def ort_session(path: Path) -> Any:
    """An ONNX Runtime CPU session with the same graph optimisations as the server's runner."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Parity:
    max_abs_diff_probabilities: float
    max_abs_diff_heatmaps: float
    batch_sizes: tuple[int, ...]
    max_abs_heatmap: float = 0.0  # the reference heatmaps' largest magnitude, for scale
    tolerance: float = PARITY_TOLERANCE

    @property
    def ok(self) -> bool:
        return max(self.max_abs_diff_probabilities, self.max_abs_diff_heatmaps) <= self.tolerance


def random_inputs(shape: tuple[int, int, int], batch_sizes: Sequence[int], value_range: tuple[float, float], seed: int = 0) -> list[torch.Tensor]:
    """Reproducible uniform random batches in the model's input range."""
    generator = torch.Generator().manual_seed(seed)
    low, high = value_range
    return [torch.rand((n, *shape), generator=generator) * (high - low) + low for n in batch_sizes]


def check_parity(
    onnx_path: Path,
    reference: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    *,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """Max abs difference between ONNX Runtime and ``reference(x)`` (PyTorch) over ``inputs``."""
    session = ort_session(onnx_path)
    diff_p = diff_h = scale = 0.0
    for x in inputs:
        with torch.no_grad():
            ref_p, ref_h = (t.detach().cpu().numpy() for t in reference(x))
        got_p, got_h = session.run([PROBABILITIES, HEATMAPS], {INPUT_NAME: x.numpy()})
        if got_p.shape != ref_p.shape or got_h.shape != ref_h.shape:
            raise ExportError(
                f"ONNX output shapes {got_p.shape}, {got_h.shape} differ from PyTorch's {ref_p.shape}, {ref_h.shape}"
            )
        diff_p = max(diff_p, float(np.max(np.abs(got_p - ref_p))))
        diff_h = max(diff_h, float(np.max(np.abs(got_h - ref_h))))
        scale = max(scale, float(np.max(np.abs(ref_h))))
    return Parity(diff_p, diff_h, tuple(int(x.shape[0]) for x in inputs), scale, tolerance)


# -- the model card --------------------------------------------------------------------

def verify_with_runner(directory: Path, batch: np.ndarray) -> tuple[Any, Any]:
    """Load the card as the server does (sha256 included) and run ``batch`` through ModelRunner."""
    from xray_triage.inference.card import load_card
    from xray_triage.inference.runner import ModelRunner

    card = load_card(directory)
    runner = ModelRunner(card)
    return card, runner.run(batch)
