"""Export torchxrayvision's DenseNet-121 (18 outputs) to ONNX with a model card.

    xray-triage models export-torchxrayvision --weights densenet121-res224-all --out DIR
    xray-triage models export-torchxrayvision --weights FILE.pt --out DIR [--preset NAME]

The ONNX graph gives ``probabilities`` exactly as ``model(x)`` does (sigmoid and
torchxrayvision's operating-point normalisation ``op_norm`` included; outputs that
carry no finding are set to 0) and a class-activation map per label. The card reproduces torchxrayvision's
preprocessing (``normalize`` to [-1024, 1024], ``XRayCenterCrop``,
``XRayResizer(224)``). See ``models/EXPORT.md``.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchxrayvision as xrv
from torch import nn

from model_tools.card_toml import write_card
from model_tools.export.common import (
    HEATMAPS,
    INPUT_NAME,
    PARITY_TOLERANCE,
    PROBABILITIES,
    CamClassifier,
    ExportError,
    Parity,
    check_parity,
    class_activation_maps,
    export_onnx,
    random_inputs,
    verify_with_runner,
)
from xray_triage.inference.card import sha256_file

SIZE = 224
VALUE_RANGE = (-1024.0, 1024.0)  # xrv.utils.normalize(img, 255): [0, 255] -> [-1024, 1024]
UNUSED_THRESHOLD = 1.01  # above any probability: an unused output can never flag
OPERATING_POINT = 0.5  # op_norm maps each label's calibrated operating point to 0.5
URGENT_CANDIDATES = ("Pneumothorax", "Consolidation", "Pneumonia", "Effusion")
URGENT_WHY = (
    "Pneumothorax can need same-day decompression; consolidation/pneumonia need same-day "
    "antibiotics; a new effusion can need drainage. Mass is not urgent: it needs a prompt "
    "work-up, not an emergency slot, so it only makes an image 'abnormal'."
)
NO_PRESET = "none"


# -- which weights ---------------------------------------------------------------------


def densenet_presets() -> dict[str, dict[str, Any]]:
    """torchxrayvision's published DenseNet-121 weights, by every name it accepts."""
    return {
        name: spec
        for name, spec in xrv.models.model_urls.items()
        if "densenet121" in os.path.basename(str(spec.get("weights_url", "")))
    }


def canonical_name(name: str) -> str:
    """``all`` -> ``densenet121-res224-all`` (the name torchxrayvision documents)."""
    presets = densenet_presets()
    spec = presets[name]
    full = [k for k, v in presets.items() if v is spec and k.startswith("densenet121-")]
    return full[0] if full else name


def preset_for_file(path: Path) -> str | None:
    """The preset whose published file has this file's name, if any."""
    for name, spec in densenet_presets().items():
        if os.path.basename(spec["weights_url"]) == path.name:
            return canonical_name(name)
    return None


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "name" (torchxrayvision downloads it) or "file"
    path: Path | None  # the weights file (after download, for a name)
    preset: str  # canonical preset name, or "none"
    preset_reason: str

    def spec(self) -> dict[str, Any] | None:
        return None if self.preset == NO_PRESET else densenet_presets()[self.preset]


def resolve_weights(weights: str, preset: str | None) -> WeightsSource:
    """Decide whether ``weights`` is a local file or a published weights name."""
    presets = densenet_presets()
    if preset is not None and preset != NO_PRESET and preset not in presets:
        raise ExportError(f"unknown --preset {preset!r}; choose one of {sorted(presets)} or {NO_PRESET!r}")
    path = Path(weights).expanduser()
    if path.is_file():
        if preset is not None:
            return WeightsSource("file", path, canonical_name(preset) if preset != NO_PRESET else preset, "--preset")
        inferred = preset_for_file(path)
        if inferred is None:
            raise ExportError(
                f"{path}: cannot tell which torchxrayvision weights this file holds, so its labels and "
                f"operating points are unknown; add --preset NAME (one of {sorted(k for k in presets if k.startswith('densenet'))}) "
                f"or --preset {NO_PRESET} for uncalibrated weights (sigmoid outputs, the 18 default labels)"
            )
        return WeightsSource("file", path, inferred, "file name matches the published file")
    if weights in presets:
        return WeightsSource("name", None, canonical_name(weights), "weights name")
    if os.sep in weights or weights.endswith((".pt", ".pth", ".bin")):
        raise ExportError(f"{weights}: no such weights file")
    raise ExportError(
        f"{weights!r} is neither a file nor a torchxrayvision DenseNet weights name "
        f"(known: {sorted(k for k in presets if k.startswith('densenet'))})"
    )


def download_published(name: str) -> Path:
    """Fetch (or find in torchxrayvision's cache) the published weights for ``name``."""
    url = densenet_presets()[name]["weights_url"]
    try:
        local = Path(xrv.models.get_weights(name))
    except Exception as exc:
        _remove_partial_download(url)
        raise ExportError(
            f"could not download the torchxrayvision weights {name!r} ({type(exc).__name__}: {exc}). "
            f"Without internet access, download {url} on a machine that has it, copy the file here and "
            f"pass the local file instead: --weights /path/to/{os.path.basename(url)} --allow-pickle "
            "(the published files are whole pickled models), or put it in torchxrayvision's cache "
            f"({_cache_folders()[0]}) and run this command again"
        ) from exc
    if not local.is_file() or local.stat().st_size == 0:
        _remove_partial_download(url)
        raise ExportError(f"torchxrayvision's download of {url} left no usable file at {local}; pass a local file")
    return local


def _remove_partial_download(url: str) -> None:
    """Older torchxrayvision versions open the cache file before downloading: drop an empty one."""
    for folder in _cache_folders():
        candidate = folder / os.path.basename(url)
        if candidate.is_file() and candidate.stat().st_size == 0:
            candidate.unlink()


def _cache_folders() -> list[Path]:
    folders = [Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))]
    get_cache_dir = getattr(xrv.utils, "get_cache_dir", None)  # torchxrayvision >= 1.3
    if callable(get_cache_dir):
        folders.insert(0, Path(get_cache_dir()))
    return folders


# -- the model -------------------------------------------------------------------------


def _read_weights_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A state_dict from ``path``: a saved state_dict, or (with allow_pickle) a whole model."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
        if not allow_pickle:
            raise ExportError(
                f"{path}: not a plain state_dict ({type(exc).__name__}); it is probably a whole pickled model "
                "(the published torchxrayvision .pt files are). Loading a pickle runs code from the file: "
                "if you trust it, add --allow-pickle"
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ExportError(f"{path}: cannot load ({type(exc2).__name__}: {exc2})") from exc2
    except Exception as exc:
        raise ExportError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, nn.Module):
        for module in obj.modules():  # models pickled by old torch versions
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        state = dict(obj.state_dict())
        op = getattr(obj, "op_threshs", None)
        if isinstance(op, torch.Tensor) and "op_threshs" not in state:
            state["op_threshs"] = op
    elif isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        state = dict(obj)
    else:
        raise ExportError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a model")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path}: not a state_dict (some values are not tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_model(source: WeightsSource, *, allow_pickle: bool = False) -> tuple[nn.Module, str]:
    """torchxrayvision's DenseNet with the source's weights, labels and operating points, in eval mode.

    Returns the model and where its operating points (op_threshs) came from.
    """
    if source.kind == "name":
        model = xrv.models.DenseNet(weights=source.preset)
        model.eval()
        return model, f"torchxrayvision model_urls[{source.preset!r}]"
    assert source.path is not None
    state = _read_weights_file(source.path, allow_pickle)
    file_op = state.pop("op_threshs", None)
    spec = source.spec()
    labels = list(spec["labels"]) if spec else list(xrv.models.DenseNet.targets)
    op = file_op if file_op is not None else (torch.tensor(spec["op_threshs"], dtype=torch.float32) if spec and "op_threshs" in spec else None)
    n_out = state.get("classifier.weight", torch.empty(0, 0)).shape[0]
    if n_out != len(labels):
        raise ExportError(
            f"{source.path}: the classifier has {n_out} outputs, torchxrayvision's DenseNet-121 "
            f"({source.preset}) has {len(labels)}; this is not such a state_dict"
        )
    model = xrv.models.DenseNet(weights=None, num_classes=len(labels))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{source.path}: does not fit torchxrayvision's DenseNet-121: {exc}") from exc
    if op is not None:
        if op.numel() != len(labels):
            raise ExportError(f"{source.path}: {op.numel()} operating points for {len(labels)} outputs")
        model.op_threshs = op.to(torch.float32)  # as DenseNet(weights=NAME) sets them
    model.targets = labels
    model.pathologies = labels
    model.eval()
    if op is None:
        op_from = "none: uncalibrated, sigmoid outputs"
    elif file_op is not None:
        op_from = "the weights file (an op_threshs buffer)"
    else:
        op_from = f"torchxrayvision model_urls[{source.preset!r}]"
    return model, op_from


# -- labels, head, reference -----------------------------------------------------------


@dataclass(frozen=True)
class LabelPlan:
    labels: list[str]  # card labels, index-aligned with the model's outputs
    used: list[bool]
    original: list[str]  # model.pathologies as torchxrayvision has them
    unused_reason: dict[str, str] = field(default_factory=dict)  # card label -> why


def op_threshs_of(model: nn.Module) -> np.ndarray | None:
    op = getattr(model, "op_threshs", None)
    if op is None:
        return None
    return np.asarray(torch.as_tensor(op, dtype=torch.float32).cpu().numpy(), dtype=np.float32).reshape(-1)


def plan_labels(model: nn.Module) -> LabelPlan:
    """Card labels: torchxrayvision's names, with ``unused_<i>`` for outputs that carry no finding.

    An output is unused when its name is empty (the weights were not trained on it)
    or its operating point is NaN (``op_norm`` then returns a constant 0.5).
    """
    original = [str(x) for x in getattr(model, "pathologies", getattr(model, "targets", []))]
    op = op_threshs_of(model)
    labels, used, reasons = [], [], {}
    for i, name in enumerate(original):
        if not name:
            reason = "empty label in torchxrayvision: these weights were not trained on this output"
        elif op is not None and math.isnan(float(op[i])):
            reason = f"{name!r} has no operating point (NaN op_thresh): torchxrayvision returns a constant 0.5"
        else:
            labels.append(name)
            used.append(True)
            continue
        labels.append(f"unused_{i}")
        used.append(False)
        reasons[f"unused_{i}"] = reason
    if len(set(labels)) != len(labels):
        raise ExportError(f"the model's labels have duplicates: {original}")
    return LabelPlan(labels, used, original, reasons)


def returns_probabilities(model: nn.Module) -> bool:
    """Whether ``model(x)`` ends in a sigmoid (apply_sigmoid or op_threshs); else it returns logits."""
    return bool(getattr(model, "apply_sigmoid", False)) or op_threshs_of(model) is not None


class XrvHead(nn.Module):
    """torchxrayvision's output stage (``DenseNet.forward``, 1.5.x), export-friendly.

    With ``op_threshs``: sigmoid, then ``op_norm``: a probability p below its label's
    operating point t becomes p / 2t, otherwise 1 - (1 - p) / 2(1 - t), and a NaN t
    gives 0.5. Without: the sigmoid only (``apply_sigmoid``). Models that would
    return logits (neither) get the sigmoid too, so the output is always a
    probability. Same arithmetic as ``xrv.models.op_norm``, but with ``torch.where``
    instead of boolean indexing so that it exports with a dynamic batch.
    """

    def __init__(self, op_threshs: np.ndarray | None) -> None:
        super().__init__()
        self.has_op = op_threshs is not None
        op = np.full(1, 0.5, np.float32) if op_threshs is None else np.asarray(op_threshs, np.float32)
        valid = ~np.isnan(op)
        self.register_buffer("thresh", torch.from_numpy(np.where(valid, op, 0.5).astype(np.float32)), persistent=False)
        self.register_buffer("valid", torch.from_numpy(valid), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # not torch.sigmoid: ONNX Runtime's Sigmoid kernel is accurate to ~1e-7 absolute, which
        # op_norm multiplies by 1/2t (up to ~1100 for the smallest operating points); 1/(1+exp(-x))
        # keeps the *relative* error at float32 level, like PyTorch's sigmoid.
        out = 1.0 / (1.0 + torch.exp(-logits))
        if self.has_op:
            t = self.thresh
            scaled = torch.where(out < t, out / (t * 2), 1.0 - ((1.0 - out) / ((1 - t) * 2)))
            out = torch.where(self.valid, scaled, torch.full_like(scaled, 0.5))
        return out


def build_export_module(model: nn.Module, plan: LabelPlan) -> CamClassifier:
    """The module that is exported: last feature map (after the final ReLU) -> probabilities + CAMs."""
    features = nn.Sequential(model.features, nn.ReLU())
    head = XrvHead(op_threshs_of(model))
    return CamClassifier(features, model.classifier, head, plan.used).eval()


def reference_outputs(model: nn.Module, plan: LabelPlan) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """What the ONNX graph must reproduce, computed with torchxrayvision itself.

    probabilities = ``model(x)`` (sigmoid applied if the model returns logits),
    unused outputs set to 0; heatmaps = sum_k W[l, k] * relu(features(x))[k].
    """
    used = torch.tensor(plan.used, dtype=torch.bool)
    logits_only = not returns_probabilities(model)

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            probs = model(x.clone())
            if logits_only:
                probs = torch.sigmoid(probs)
            probs = torch.where(used, probs, torch.zeros_like(probs))
            fmap = torch.relu(model.features(x.clone()))
            return probs, class_activation_maps(fmap, model.classifier.weight)

    return reference


# -- the card --------------------------------------------------------------------------


def card_tables(
    *,
    name: str,
    version: str,
    onnx_file: Path,
    plan: LabelPlan,
    source: WeightsSource,
    weights_sha256: str,
    op_threshs: np.ndarray | None,
    op_from: str,
    logits_only: bool,
    parity: Parity,
    opset: int,
) -> dict[str, dict[str, Any]]:
    spec = source.spec() or {}
    used_labels = [label for label, u in zip(plan.labels, plan.used, strict=True) if u]
    calibrated = op_threshs is not None
    published = source.kind == "name" or source.preset_reason != "--preset"  # the published weights themselves
    if source.kind == "name":
        provenance = f"the published torchxrayvision weights {source.preset!r} ({spec.get('weights_url', '')})"
    elif source.preset != NO_PRESET:
        provenance = (
            f"the local weights file {source.path.name} (sha256 {weights_sha256[:16]}…), "
            + (f"named as the published {source.preset!r} file" if published else f"labelled as torchxrayvision's {source.preset!r}")
        )
    else:
        provenance = f"the local weights file {source.path.name} (sha256 {weights_sha256[:16]}…), uncalibrated (no operating points)"
    description = spec.get("description", "").strip() if published else ""
    if description and not description.endswith("."):
        description += "."
    intended_use = (
        f"NOT A MEDICAL DEVICE. torchxrayvision DenseNet-121 with {provenance}. "
        + (f"{description} " if description else "")
        + (
            "These are research weights trained on public chest X-ray datasets with text-mined labels; "
            if published
            else "Where and on what these weights were trained is not recorded here; "
        )
        + "xray-triage exported them unchanged and has not validated them. Before any clinical use the "
        "clinic must validate this model on its own patients, devices and finding mix and set its own "
        "thresholds; until then the output is decision support for research, not a diagnosis."
    )
    thresholds = {label: (OPERATING_POINT if u else UNUSED_THRESHOLD) for label, u in zip(plan.labels, plan.used, strict=True)}
    urgent = [label for label in URGENT_CANDIDATES if label in used_labels]
    source_table: dict[str, Any] = {
        "framework": "torchxrayvision",
        "torchxrayvision_version": str(getattr(xrv, "__version__", "unknown")),
        "architecture": "DenseNet-121 (xrv.models.DenseNet), 1 input channel, 224 x 224",
        "weights": source.preset if source.kind == "name" else str(source.path.name),
        "weights_kind": source.kind,
        "weights_sha256": weights_sha256,
        "preset": source.preset,
        "preset_from": source.preset_reason,
        "pathologies": plan.original,
        "op_threshs_from": op_from,
    }
    if spec.get("weights_url"):
        source_table["weights_url"] = spec["weights_url"]
    if calibrated:
        source_table["op_threshs"] = [float(f"{x:.9g}") for x in op_threshs]  # float32, shortest exact
    tables: dict[str, dict[str, Any]] = {
        "model": {
            "name": name,
            "version": version,
            "onnx_file": onnx_file.name,
            "sha256": sha256_file(onnx_file),
            "intended_use": intended_use,
            "labels": plan.labels,
        },
        "input": {
            "name": INPUT_NAME,
            "height": SIZE,
            "width": SIZE,
            "channels": 1,
            "resize": "center_crop",
            "value_range": list(VALUE_RANGE),
            "mean": [0.0],
            "std": [1.0],
        },
        "outputs": {"probabilities": PROBABILITIES, "heatmaps": HEATMAPS},
        "thresholds": thresholds,
        "triage": {"abnormal_score": "max", "abnormal_threshold": OPERATING_POINT, "urgent_labels": urgent},
        "triage_notes": {
            "urgent_labels": urgent,
            "why": URGENT_WHY,
            "abnormal_score": "max over the labels: torchxrayvision has no 'No Finding' output; unused outputs are 0",
            "thresholds": (
                "0.5 on every used label: torchxrayvision's op_norm maps each label's operating point "
                "(op_threshs, chosen by its authors on their test data) to 0.5"
                if calibrated
                else "0.5 on an uncalibrated sigmoid: a placeholder, NOT an operating point; set thresholds from the clinic's validation"
            ),
        },
        "unused_labels": {
            "convention": (
                "outputs that carry no finding keep their index but are named unused_<index>, exported "
                f"as probability 0 and given threshold {UNUSED_THRESHOLD} so they never flag"
            ),
            **{label: reason for label, reason in plan.unused_reason.items()},
        },
        "source": source_table,
        "preprocessing": {
            "equivalent_to": "xrv.utils.normalize(img, 255) (alias xrv.datasets.normalize) -> xrv.datasets.XRayCenterCrop() -> xrv.datasets.XRayResizer(224)",
            "value_range": "the display image [0, 1] (after Modality LUT, VOI window, MONOCHROME1 inversion) -> [-1024, 1024], as normalize maps 8-bit [0, 255]",
            "resize": "center_crop: the centred square (XRayCenterCrop; same to within one pixel), then an antialiased bilinear resize to 224 (XRayResizer uses skimage, the server PIL: interpolation-level differences)",
        },
        "export": {
            "exporter": "torch.onnx (TorchScript) via xray-triage models export-torchxrayvision",
            "torch_version": torch.__version__,
            "opset": opset,
            "dynamic_batch": True,
            "probabilities": (
                "sigmoid(DenseNet.forward(x)): forward returns logits for these weights"
                if logits_only
                else "exactly DenseNet.forward(x) (sigmoid and op_norm included)"
            )
            + ", unused outputs set to 0",
            "heatmaps": "class-activation maps (N, labels, 7, 7): sum_c W[label, c] * F[c, y, x] over the last feature map F (after the final ReLU, before pooling), classifier weights W, no bias",
            "parity_max_abs_diff_probabilities": parity.max_abs_diff_probabilities,
            "parity_max_abs_diff_heatmaps": parity.max_abs_diff_heatmaps,
            "parity_batch_sizes": list(parity.batch_sizes),
            "parity_max_abs_heatmap": parity.max_abs_heatmap,
            "parity_inputs": "uniform random in [-1024, 1024], seed 0; ONNX Runtime CPU vs PyTorch",
            "parity_tolerance": parity.tolerance,
        },
    }
    if not plan.unused_reason:
        tables["unused_labels"]["none"] = "every output of these weights is used"
    return tables


# -- the command -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    onnx_path: Path
    card_path: Path
    parity: Parity
    labels: list[str]


def export_torchxrayvision(
    weights: str,
    out: Path,
    *,
    opset: int = 17,
    name: str | None = None,
    version: str | None = None,
    preset: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """The whole export: weights -> ONNX -> parity -> card -> load_card + ModelRunner."""
    out = Path(out)
    onnx_path, card_path = out / "model.onnx", out / "model.toml"
    _check_out_dir(out, force)
    source = resolve_weights(weights, preset)
    if source.kind == "name":
        log(f"weights {source.preset}: torchxrayvision download/cache")
        source = WeightsSource("name", download_published(source.preset), source.preset, source.preset_reason)
    assert source.path is not None
    weights_sha = sha256_file(source.path)
    torch.manual_seed(0)
    model, op_from = load_model(source, allow_pickle=allow_pickle)
    plan = plan_labels(model)
    op = op_threshs_of(model)
    log(f"model: torchxrayvision DenseNet-121, {len(plan.labels)} outputs, {sum(plan.used)} used; operating points: {op_from}")

    module = build_export_module(model, plan)
    example = random_inputs((1, SIZE, SIZE), [2], VALUE_RANGE, seed=1)[0]
    export_onnx(module, onnx_path, example, opset=opset)
    log(f"exported {onnx_path} (opset {opset}, dynamic batch)")

    inputs = random_inputs((1, SIZE, SIZE), [3, 1], VALUE_RANGE, seed=0)
    parity = check_parity(onnx_path, reference_outputs(model, plan), inputs)
    log(
        f"parity ONNX Runtime vs PyTorch (batches {list(parity.batch_sizes)}): max abs diff "
        f"probabilities {parity.max_abs_diff_probabilities:.3g}, heatmaps {parity.max_abs_diff_heatmaps:.3g} "
        f"(tolerance {parity.tolerance:g}; heatmap values up to {parity.max_abs_heatmap:.3g})"
    )
    if not parity.ok:
        card_path.unlink(missing_ok=True)
        raise ExportError(
            f"parity check failed: max abs diff probabilities {parity.max_abs_diff_probabilities:.3g}, "
            f"heatmaps {parity.max_abs_diff_heatmaps:.3g} > {PARITY_TOLERANCE:g}; no card written"
        )

    default_name = f"torchxrayvision-{source.preset}" if source.preset != NO_PRESET else "torchxrayvision-densenet121-custom"
    tables = card_tables(
        name=name or default_name,
        version=version or f"w{weights_sha[:12]}",
        onnx_file=onnx_path,
        plan=plan,
        source=source,
        weights_sha256=weights_sha,
        op_threshs=op,
        op_from=op_from,
        logits_only=not returns_probabilities(model),
        parity=parity,
        opset=opset,
    )
    write_card(card_path, tables, header=_CARD_HEADER)
    card, outputs = verify_with_runner(out, inputs[1].numpy())
    runner_diff = float(np.max(np.abs(outputs.probabilities - reference_outputs(model, plan)(inputs[1])[0].numpy())))
    if runner_diff > PARITY_TOLERANCE:
        raise ExportError(f"ModelRunner disagrees with PyTorch by {runner_diff:.3g} on the loaded card")
    log(f"card {card_path}: load_card ok, ModelRunner ok ({card.model_version}, {len(card.labels)} labels)")
    return ExportResult(out, onnx_path, card_path, parity, plan.labels)


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse a directory the server could not load the new card from, or one we would overwrite."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if not out.exists():
        return
    others = sorted(p.name for p in out.glob("*.toml") if p.name != "model.toml")
    if others:
        raise ExportError(f"{out}: already holds other model cards ({', '.join(others)}); use an empty directory")
    existing = [p.name for p in (out / "model.onnx", out / "model.toml") if p.exists()]
    if existing and not force:
        raise ExportError(f"{out}: already has {', '.join(existing)}; pass --force to overwrite")


_CARD_HEADER = """\
Model card written by `xray-triage models export-torchxrayvision` (see models/EXPORT.md).
Schema: xray_triage/inference/card.py. The sha256 pins model.onnx; re-export rather than edit.

NOT A MEDICAL DEVICE. Research weights; the clinic must validate them before clinical use."""
