"""Model cards: the one description of a model that the rest of the server trusts.

A card is a TOML file next to the ``.onnx`` file. Nothing in the server knows a
particular model: labels, input geometry, normalisation, thresholds and the
triage rules all come from here, so a clinic can drop in a validated model by
writing a card for it.

A model directory may hold faster variants of the same model beside the fp32
card ``model.toml``: ``model.int8.toml`` (INT8, for CPU) and ``model.fp16.toml``
(FP16, for GPU), each a complete card with its own ``onnx_file`` and ``sha256``,
written by ``models/quantize.py``. The ``model_variant`` setting picks one
(:func:`find_card`).

Example (see ``xray_triage/models/default/model.toml`` for a complete one)::

    [model]
    name = "xray-triage-demo"
    version = "0.1.0"
    onnx_file = "model.onnx"
    sha256 = "…64 hex digits…"
    intended_use = "Demonstration only. Not a medical device."
    labels = ["Abnormal", "Pneumonia"]

    [input]
    name = "image"           # ONNX input name
    height = 224
    width = 224
    channels = 1             # grey image repeated over this many channels
    resize = "squash"        # "squash": stretch to height x width
                             # "center_crop": crop the centred square, then resize
    value_range = [0.0, 1.0] # the display image [0, 1] is mapped linearly onto this
    mean = [0.0]             # then (x - mean) / std, per channel
    std = [1.0]

    [outputs]
    probabilities = "probabilities"   # (N, labels) in 0..1
    heatmaps = "heatmaps"             # optional (N, labels, h, w)

    [thresholds]             # per label; a label at or above it is "flagged"
    Abnormal = 0.5

    [triage]
    abnormal_score = "label:Abnormal"  # or "max" (the highest label probability)
    abnormal_threshold = 0.5
    urgent_labels = ["Pneumothorax"]

    [codes.Pneumonia]        # optional: a label's standard code, for the DICOM SR we send to PACS
    scheme = "SCT"           # coding scheme designator (SCT = SNOMED CT, RADLEX, ...)
    value = "233604007"      # code value
    meaning = "Pneumonia"    # code meaning
    # A label without one (here "Abnormal") is coded in the private scheme "99XRAYTRIAGE"
    # (xray_triage/results/codes.py); ModelCard.uncoded_labels lists them.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESIZE_MODES = ("squash", "center_crop")


class ModelCardError(ValueError):
    """A card or its model file is missing, malformed or does not match."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    height: int
    width: int
    channels: int = 1
    resize: str = "squash"
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class TriageRules:
    abnormal_score: str = "max"
    abnormal_threshold: float = 0.5
    urgent_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelCode:
    """A label's standard code (PS3.3 8.8 Code Sequence Macro): scheme designator, value, meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class ModelCard:
    path: Path  # the card file itself
    name: str
    version: str
    onnx_file: Path
    sha256: str
    intended_use: str
    labels: tuple[str, ...]
    input: InputSpec
    probabilities_output: str
    heatmaps_output: str | None
    thresholds: dict[str, float]
    triage: TriageRules
    extra: dict[str, Any] = field(default_factory=dict)  # evaluation, training, …
    codes: dict[str, LabelCode] = field(default_factory=dict)  # label -> standard code ([codes])
    manufacturer: str = ""  # [model].manufacturer: who made the model (DICOM Manufacturer of our objects)

    @property
    def uncoded_labels(self) -> tuple[str, ...]:
        """Labels with no standard code in ``[codes]`` (coded privately in the objects we send)."""
        return tuple(label for label in self.labels if label not in self.codes)

    @property
    def variant(self) -> str:
        """``fp32``, or the ``[variant].name`` of a card written by ``models/quantize.py``."""
        table = self.extra.get("variant")
        return str(table.get("name", "fp32")) if isinstance(table, dict) else "fp32"

    @property
    def model_version(self) -> str:
        """``name@version``: what each triage result records."""
        return f"{self.name}@{self.version}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


VARIANTS = ("fp32", "int8", "fp16")
"""Model variants a directory may hold: ``model.toml`` (fp32) and ``model.<variant>.toml``."""


def variant_card_name(variant: str) -> str:
    """The card file name of a variant: ``model.toml`` for fp32, else ``model.<variant>.toml``."""
    if variant not in VARIANTS:
        raise ModelCardError(f"unknown model variant {variant!r}; choose one of {list(VARIANTS)}")
    return "model.toml" if variant == "fp32" else f"model.{variant}.toml"


def _is_variant_card(path: Path) -> bool:
    return any(path.name.endswith(f".{v}.toml") for v in VARIANTS if v != "fp32")


def list_cards(directory: Path) -> dict[str, Path]:
    """The variants found in a model directory, ``{variant: card path}`` in :data:`VARIANTS` order.

    fp32 is ``model.toml``, or the directory's only card when it holds exactly one
    card that is not a ``*.int8.toml``/``*.fp16.toml`` variant (older layouts).
    """
    directory = Path(directory)
    found: dict[str, Path] = {}
    for variant in VARIANTS:
        path = directory / variant_card_name(variant)
        if path.is_file():
            found[variant] = path
    if "fp32" not in found:
        plain = [c for c in sorted(directory.glob("*.toml")) if not _is_variant_card(c)]
        if len(plain) == 1:
            found = {"fp32": plain[0], **found}
    return found


def find_card(model: Path, variant: str = "fp32") -> Path:
    """The card to load: a card file as given, or the ``variant``'s card in a directory.

    In a directory, fp32 is ``model.toml`` (or, for older layouts, the directory's
    only card); ``int8`` / ``fp16`` are ``model.int8.toml`` / ``model.fp16.toml``.
    A card file named directly is used as is, whatever ``variant`` says.
    """
    model = Path(model)
    card_name = variant_card_name(variant)  # validates the variant name
    if model.is_file():
        if variant != "fp32" and not model.name.endswith(f".{variant}.toml"):
            log.warning(
                "model_dir names a card file, so model_variant is not used to choose the card",
                extra={"card": str(model), "model_variant": variant},
            )
        return model
    if not model.is_dir():
        raise ModelCardError(f"{model}: no such model card or directory")
    cards = sorted(model.glob("*.toml"))
    if not cards:
        raise ModelCardError(f"{model}: no model card (*.toml) in this directory")
    chosen = list_cards(model).get(variant)
    if chosen is not None:
        return chosen
    names = ", ".join(c.name for c in cards)
    present = list(list_cards(model))
    if variant != "fp32":
        hint = "create it with models/quantize.py"
    else:
        hint = "name the card file to use as model_dir"
    hint += f", or set model_variant to one this directory has ({present})" if present else ""
    raise ModelCardError(f"{model}: no {variant} model card {card_name} (cards present: {names}); {hint}")


def load_card(model: Path, *, verify_sha256: bool = True, variant: str = "fp32") -> ModelCard:
    """Load and validate a model card; check the ONNX file's sha256 against it.

    ``variant`` picks ``model.<variant>.toml`` when ``model`` is a directory
    (see :func:`find_card`).
    """
    card_path = find_card(model, variant)
    try:
        raw = tomllib.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelCardError(f"{card_path}: cannot read model card: {exc}") from exc
    card = _parse(card_path, raw)
    if verify_sha256:
        verify_model_file(card)
    return card


def verify_model_file(card: ModelCard) -> None:
    """Raise unless the ONNX file exists and its sha256 is the card's."""
    if not card.onnx_file.is_file():
        raise ModelCardError(
            f"{card.path}: model file {card.onnx_file} is missing; "
            "restore it or point [model].onnx_file at it"
        )
    actual = sha256_file(card.onnx_file)
    if actual != card.sha256:
        raise ModelCardError(
            f"{card.path}: sha256 of {card.onnx_file.name} is {actual}, the card says "
            f"{card.sha256}; the model file was changed or replaced. Restore the original "
            "file, or (only for a model you have validated) update [model].sha256"
        )


def _parse(card_path: Path, raw: dict[str, Any]) -> ModelCard:
    where = str(card_path)
    model = _table(raw, "model", where)
    inp = _table(raw, "input", where)
    outputs = _table(raw, "outputs", where)
    labels = tuple(_require(model, "labels", list, f"{where} [model]"))
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise ModelCardError(f"{where}: [model].labels must be a non-empty list of names")
    if len(set(labels)) != len(labels):
        raise ModelCardError(f"{where}: [model].labels has duplicates")
    sha = str(_require(model, "sha256", str, f"{where} [model]")).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelCardError(f"{where}: [model].sha256 must be 64 hex digits")
    input_spec = _parse_input(inp, f"{where} [input]")
    thresholds = {str(k): float(v) for k, v in raw.get("thresholds", {}).items()}
    unknown = sorted(set(thresholds) - set(labels))
    if unknown:
        raise ModelCardError(f"{where}: [thresholds] names labels the model does not have: {unknown}")
    for label in labels:
        thresholds.setdefault(label, 0.5)
    triage = _parse_triage(raw.get("triage", {}), labels, f"{where} [triage]")
    codes = _parse_codes(raw.get("codes", {}), labels, f"{where} [codes]")
    known = {"model", "input", "outputs", "thresholds", "triage", "codes"}
    return ModelCard(
        path=card_path,
        name=str(_require(model, "name", str, f"{where} [model]")),
        version=str(_require(model, "version", str, f"{where} [model]")),
        onnx_file=card_path.parent / str(_require(model, "onnx_file", str, f"{where} [model]")),
        sha256=sha,
        intended_use=str(model.get("intended_use", "")),
        labels=labels,
        input=input_spec,
        probabilities_output=str(_require(outputs, "probabilities", str, f"{where} [outputs]")),
        heatmaps_output=outputs.get("heatmaps") or None,
        thresholds=thresholds,
        triage=triage,
        extra={k: v for k, v in raw.items() if k not in known},
        codes=codes,
        manufacturer=str(model.get("manufacturer", "")),
    )


def _parse_codes(raw: Any, labels: tuple[str, ...], where: str) -> dict[str, LabelCode]:
    """``[codes.LABEL]`` tables: scheme, value and meaning, all non-empty strings."""
    if not isinstance(raw, dict):
        raise ModelCardError(f"{where}: must be a table of label = {{scheme, value, meaning}}")
    unknown = sorted(set(raw) - set(labels))
    if unknown:
        raise ModelCardError(f"{where}: names labels the model does not have: {unknown}")
    codes: dict[str, LabelCode] = {}
    for label, entry in raw.items():
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) and entry[key].strip() for key in ("scheme", "value", "meaning")
        ):
            raise ModelCardError(f"{where}: {label!r} needs scheme, value and meaning (non-empty strings)")
        codes[label] = LabelCode(entry["scheme"].strip(), entry["value"].strip(), entry["meaning"].strip())
    return codes


def _parse_input(inp: dict[str, Any], where: str) -> InputSpec:
    channels = int(inp.get("channels", 1))
    resize = str(inp.get("resize", "squash"))
    if resize not in RESIZE_MODES:
        raise ModelCardError(f"{where}: resize must be one of {RESIZE_MODES}, not {resize!r}")
    mean = tuple(float(x) for x in inp.get("mean", [0.0]))
    std = tuple(float(x) for x in inp.get("std", [1.0]))
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ModelCardError(f"{where}: mean/std need 1 or {channels} values")
    if any(s == 0 for s in std):
        raise ModelCardError(f"{where}: std must not be 0")
    value_range = tuple(float(x) for x in inp.get("value_range", [0.0, 1.0]))
    if len(value_range) != 2:
        raise ModelCardError(f"{where}: value_range needs two numbers [low, high]")
    return InputSpec(
        name=str(_require(inp, "name", str, where)),
        height=int(_require(inp, "height", int, where)),
        width=int(_require(inp, "width", int, where)),
        channels=channels,
        resize=resize,
        value_range=value_range,  # type: ignore[arg-type]
        mean=mean,
        std=std,
    )


def _parse_triage(raw: dict[str, Any], labels: tuple[str, ...], where: str) -> TriageRules:
    rule = str(raw.get("abnormal_score", "max"))
    if rule != "max" and not (rule.startswith("label:") and rule[6:] in labels):
        raise ModelCardError(
            f"{where}: abnormal_score must be 'max' or 'label:NAME' with NAME one of {list(labels)}"
        )
    urgent = tuple(str(x) for x in raw.get("urgent_labels", []))
    unknown = sorted(set(urgent) - set(labels))
    if unknown:
        raise ModelCardError(f"{where}: urgent_labels names labels the model does not have: {unknown}")
    return TriageRules(
        abnormal_score=rule,
        abnormal_threshold=float(raw.get("abnormal_threshold", 0.5)),
        urgent_labels=urgent,
    )


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ModelCardError(f"{where}: missing table [{key}]")
    return value


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ModelCardError(f"{where}: missing key {key!r}")
    value = table[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ModelCardError(f"{where}: {key!r} must be a {kind.__name__}")
    return value
