"""Small ONNX models built inside the tests, with their cards.

They let tests exercise the card loader, the runner and the triage rules with
known arithmetic (no trained weights, no torch): the probability of label k is
sigmoid(w_k * mean(image) + b_k), so a brighter image scores higher.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xray_triage.inference.card import sha256_file


def build_tiny_model(path: Path, labels: list[str], size: int = 64, weights: list[float] | None = None) -> None:
    n = len(labels)
    w = np.asarray(weights or [4.0 + i for i in range(n)], dtype=np.float32).reshape(1, n)
    b = np.full((n,), -2.0, dtype=np.float32)
    conv_w = np.ones((n, 1, 1, 1), dtype=np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits_nb"]),
        helper.make_node("Add", ["logits_nb", "B"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
        helper.make_node("AveragePool", ["image"], ["coarse"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["coarse", "CW"], ["heatmaps"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n]),
            helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", n, size // 8, size // 8]),
        ],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(conv_w, "CW"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_tiny_model_dir(
    directory: Path,
    labels: tuple[str, ...] = ("Abnormal", "Effusion", "Pneumothorax"),
    *,
    thresholds: dict[str, float] | None = None,
    urgent: tuple[str, ...] = ("Pneumothorax",),
    size: int = 64,
) -> Path:
    """Write ``model.onnx`` and ``model.toml`` into ``directory``; return the card path."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    build_tiny_model(onnx_path, list(labels), size=size)
    thresholds = thresholds or {label: 0.5 for label in labels}
    threshold_lines = "\n".join(f'"{k}" = {v}' for k, v in thresholds.items())
    labels_toml = ", ".join(f'"{label}"' for label in labels)
    urgent_toml = ", ".join(f'"{label}"' for label in urgent)
    card = directory / "model.toml"
    card.write_text(
        f"""[model]
name = "tiny-test"
version = "0.0.1"
onnx_file = "model.onnx"
sha256 = "{sha256_file(onnx_path)}"
intended_use = "Tests only."
labels = [{labels_toml}]

[input]
name = "image"
height = {size}
width = {size}
channels = 1
resize = "squash"
value_range = [0.0, 1.0]

[outputs]
probabilities = "probabilities"
heatmaps = "heatmaps"

[thresholds]
{threshold_lines}

[triage]
abnormal_score = "label:{labels[0]}"
abnormal_threshold = 0.5
urgent_labels = [{urgent_toml}]
""",
        encoding="utf-8",
    )
    return card
