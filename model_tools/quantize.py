#!/usr/bin/env python3
"""Make the faster variants of a model: INT8 (for CPU) and FP16 (for GPU), with their cards.

From ``<model-dir>/model.toml`` (the fp32 card) this writes, beside it:

- ``model.int8.onnx`` + ``model.int8.toml``: static INT8 quantisation with
  ``onnxruntime.quantization.quantize_static`` (QDQ format, U8 activations,
  S8 weights, ``reduce_range`` for CPUs without VNNI), calibrated on
  ``--calib-n`` seeded TRAIN images (never the evaluation set), each read and
  preprocessed by the server's own pipeline
  (``read_picture_display`` + ``to_model_input``). Several configurations
  (per-tensor / per-channel weights; model head quantised or kept in float) are
  tried and the one closest to fp32 on *other* held-out TRAIN images is kept.
- ``model.fp16.onnx`` + ``model.fp16.toml``: FP16 weights and activations with
  float32 inputs/outputs (``convert_float_to_float16(keep_io_types=True)`` from
  ``onnxconverter_common``, else the copy in ``onnxruntime.transformers``).

Each card is a copy of the fp32 card with its own ``onnx_file``, ``sha256`` and
``version`` (``<version>-int8``), plus a ``[variant]`` table: base model sha256,
method, calibration data, speed-up vs fp32 (median of ``--repeats`` batch-1
runs through ``ModelRunner`` on the CPU provider, fp32 and variant interleaved,
warm-up excluded) and the abnormal-vs-normal AUROC of fp32 and the variant on
the evaluation set (``--eval-data``), with the largest probability change.

Run from the repository root in the project venv::

    .venv/bin/python models/quantize.py                 # both variants of the shipped model
    .venv/bin/python models/quantize.py --variants int8
    .venv/bin/python models/quantize.py --remeasure      # keep the files, time them again

On a GPU host, ``--remeasure`` still times the CPU provider; the FP16 GPU speed-up
is not measured by this script.

Re-run it whenever ``model.onnx`` changes: a variant card records the sha256 of
the fp32 model it was made from (``[variant].base_sha256``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_tools.card_toml import toml_dumps, toml_value
from xray_triage.evaluation.metrics import auroc
from xray_triage.inference.card import ModelCard, load_card, sha256_file, variant_card_name
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import read_picture_display
from xray_triage.pipeline.preprocess import to_model_input
from xray_triage.settings import DEFAULT_MODEL_DIR
from xray_triage.triage.scoring import score

# The checkout this file is in (an editable install): ../shared/data beside it.
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CALIB = SHARED / "cxr-train" / "images"
DEFAULT_EVAL = SHARED / "cxr"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def progress(message: str) -> None:
    print(f"[quantize {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def patient_of(name: str) -> str:
    """NIH file names are ``<patient>_<followup>.png``."""
    return Path(name).name.split("_")[0]


def eval_patients(eval_dir: Path) -> set[str]:
    labels = eval_dir / "labels.csv"
    if not labels.is_file():
        return set()
    with open(labels, newline="", encoding="utf-8") as f:
        return {patient_of(row["file"]) for row in csv.DictReader(f)}


def seeded_train_images(
    calib_dir: Path, n_calib: int, n_select: int, seed: int, exclude: set[str]
) -> tuple[list[Path], list[Path]]:
    """Two disjoint seeded draws of TRAIN images: calibration, then configuration choice.

    Images of patients who are in the evaluation set are never drawn.
    """
    files = sorted(
        p
        for p in calib_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and patient_of(p.name) not in exclude
    )
    if len(files) < n_calib + n_select:
        raise SystemExit(f"{calib_dir}: {len(files)} usable images, need {n_calib + n_select}")
    order = np.random.default_rng(seed).permutation(len(files))
    calib = [files[i] for i in sorted(order[:n_calib])]
    select = [files[i] for i in sorted(order[n_calib : n_calib + n_select])]
    return calib, select


def tensors(paths: list[Path], card: ModelCard) -> np.ndarray:
    """The server's own decode + preprocessing: (N, C, H, W) float32."""
    return np.stack([to_model_input(read_picture_display(p).pixels, card.input) for p in paths]).astype(
        np.float32
    )


def read_eval_set(eval_dir: Path) -> tuple[list[Path], np.ndarray, str]:
    labels_csv = eval_dir / "labels.csv"
    with open(labels_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    paths = [eval_dir / "images" / r["file"] for r in rows]
    y = np.array([int(r["abnormal"]) for r in rows], dtype=int)
    return paths, y, sha256_file(labels_csv)


# --------------------------------------------------------------------------- running


def predict(runner: ModelRunner, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """One image per call (the server's batch 1): probabilities (N, L), heatmaps (N, L, h, w)."""
    probs, heats = [], []
    for image in x:
        p, h = runner.infer_one(image)
        probs.append(p)
        heats.append(h)
    return np.stack(probs), (None if heats[0] is None else np.stack(heats))


def abnormal_scores(card: ModelCard, probs: np.ndarray) -> np.ndarray:
    return np.array([score(p, card).abnormal_score for p in probs])


def priorities(card: ModelCard, probs: np.ndarray) -> list[str]:
    return [score(p, card).priority for p in probs]


def median_ms_interleaved(
    runners: list[ModelRunner], x1: np.ndarray, repeats: int, warmup: int
) -> list[float]:
    """Median ms per batch-1 call for each runner; calls interleaved, order alternating (ABBA)."""
    for runner in runners:
        for _ in range(warmup):
            runner.run(x1)
    times: list[list[float]] = [[] for _ in runners]
    for rep in range(repeats):
        order = range(len(runners)) if rep % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            start = time.perf_counter()
            runners[i].run(x1)
            times[i].append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def kernel_ms_by_op(runner: ModelRunner, x1: np.ndarray, runs: int = 20) -> dict[str, float]:
    """Mean kernel ms per run by op type (op types above 0.5 ms), from an onnxruntime profile."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = runner.session.get_session_options().intra_op_num_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(runner.card.onnx_file), options, providers=["CPUExecutionProvider"]
        )
        for _ in range(runs):
            session.run(None, {runner.card.input.name: x1})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000.0 / runs
    return {op: ms for op, ms in sorted(totals.items(), key=lambda kv: -kv[1]) if ms >= 0.5}


def cpu_runner(card: ModelCard, threads: int | None) -> ModelRunner:
    return ModelRunner(card, providers=["CPUExecutionProvider"], intra_op_threads=threads)


# --------------------------------------------------------------------------- INT8


class TensorReader:
    """``CalibrationDataReader`` over preprocessed tensors, a few images per call."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 10) -> None:
        self.input_name = input_name
        self.x = x
        self.batch = batch
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.x):
            return None
        chunk = self.x[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def head_nodes(model) -> list[str]:  # type: ignore[no-untyped-def]
    """Names of the nodes between the shared trunk and each graph output.

    From every output walk back while a node has one non-constant input that no
    other node reads (here: Sigmoid <- Gemm <- ReduceMean for ``probabilities``,
    the final 1x1 Conv for ``heatmaps``).
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    names: list[str] = []
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.name not in names:
            names.append(node.name)
            dynamic = [i for i in node.input if i and i not in constants]
            if len(dynamic) != 1 or readers.get(dynamic[0], 0) != 1:
                break
            node = producer.get(dynamic[0])
    return names


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def stem_nodes(model) -> list[str]:  # type: ignore[no-untyped-def]
    """Names of the nodes before the first Conv/Gemm/MatMul: in-graph input normalisation.

    (Graph order is topological.) For a model that normalises its input inside
    the graph (e.g. percentiles by sorting the pixels) this is arithmetic on the
    raw input that 8 bits or fp16 would only blur, at no gain in speed; worse, index
    arithmetic (a percentile's position among 50176 pixels) breaks in fp16, whose
    integers stop being exact at 2048.
    """
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            break
        if node.name and node.op_type != "Constant":
            names.append(node.name)
    return names


def float_ends(model) -> list[str]:  # type: ignore[no-untyped-def]
    """Input block (:func:`stem_nodes`) and output head (:func:`head_nodes`)."""
    return list(dict.fromkeys(stem_nodes(model) + head_nodes(model)))


@dataclass
class Int8Config:
    per_channel: bool
    float_ends: bool
    calibrate_method: str = "MinMax"

    @property
    def label(self) -> str:
        weights = "per-channel" if self.per_channel else "per-tensor"
        ends = "input block and head float" if self.float_ends else "all int8"
        return f"{weights} weights, {ends}, {self.calibrate_method} calibration"


def quantize_int8(
    src: Path, dst: Path, calib: np.ndarray, input_name: str, cfg: Int8Config, workdir: Path
) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "prepared.onnx"
    if not prepared.is_file():
        try:  # ONNX shape inference + graph optimisation; symbolic shape inference needs sympy, not needed here
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - quantisation still works without it
            progress(f"quant_pre_process failed ({exc}); quantising the model as it is")
            prepared.write_bytes(src.read_bytes())
    model = onnx.load(str(prepared))
    excluded = float_ends(model) if cfg.float_ends else []
    ops = {node.name: node.op_type for node in model.graph.node}
    stem = set(stem_nodes(model))
    quantize_static(
        str(prepared),
        str(dst),
        TensorReader(input_name, calib),
        quant_format=QuantFormat.QDQ,
        per_channel=cfg.per_channel,
        reduce_range=True,  # 7-bit weights: no u8s8 saturation on x86 CPUs without VNNI
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        calibrate_method=getattr(CalibrationMethod, cfg.calibrate_method),
        extra_options={"CalibMaxIntermediateOutputs": 20} if cfg.calibrate_method == "MinMax" else {},
        # activation ranges depend only on the method: calibrate once per method
        calibration_cache_path=workdir / f"calibration-{cfg.calibrate_method}.json",
    )
    return {
        "format": "QDQ",
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "reduce_range": True,
        "per_channel": cfg.per_channel,
        "calibrate_method": cfg.calibrate_method,
        "nodes_kept_float": len(excluded),
        "input_block_kept_float_ops": sorted({ops[n] for n in excluded if n in stem}),
        "head_kept_float": [n for n in excluded if n not in stem],
        "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process(skip_symbolic_shape=True)",
    }


# --------------------------------------------------------------------------- FP16


def convert_fp16(src: Path, dst: Path) -> dict:
    import importlib.metadata
    import warnings

    import onnx

    try:
        from onnxconverter_common import float16

        version = importlib.metadata.version("onnxconverter-common")
        tool = f"onnxconverter_common.float16.convert_float_to_float16 (onnxconverter-common {version})"
    except ImportError:
        from onnxruntime.transformers import float16  # type: ignore[no-redef]

        tool = (
            "onnxruntime.transformers.float16.convert_float_to_float16 (onnxconverter-common not installed)"
        )
    model = onnx.load(str(src))
    blocked = stem_nodes(model)  # in-graph input normalisation stays float32
    # the converter warns once per tiny weight it clamps to fp16's range: count them instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    clamped = sum("will be truncated" in str(w.message) for w in caught)
    fixed = fix_casts_to_float(converted)
    onnx.save(converted, str(dst))
    return {
        "tool": tool,
        "keep_io_types": True,
        "nodes_kept_float32": len(blocked),
        "nodes_kept_float32_ops": sorted({n.op_type for n in model.graph.node if n.name in set(blocked)}),
        "casts_retargeted_to_fp16": fixed,
        "weights_clamped": clamped,
        "weights_clamped_note": "non-zero float32 weights with |w| < 1e-7 become +-1e-7 (fp16 cannot hold them); "
        "larger ones are rounded to fp16",
    }


def fix_casts_to_float(model) -> int:  # type: ignore[no-untyped-def]
    """Retarget ``Cast(to=float)`` nodes whose output the converter declared float16.

    The converter retypes every float tensor inside the converted region but
    leaves a Cast's ``to`` attribute alone (e.g. int64 shape arithmetic cast to
    float), which onnxruntime then refuses to load. Returns how many were fixed.
    """
    from onnx import TensorProto

    declared = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or declared.get(node.output[0]) != TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
                fixed += 1
    return fixed


# --------------------------------------------------------------------------- cards


CARD_DIGITS = 6  # floats in a variant card: 6 decimals, as in the fp32 card


def variant_card_text(base: ModelCard, variant: str, onnx_path: Path, variant_table: dict) -> str:
    """The fp32 card's text with [model].version/onnx_file/sha256 replaced and [variant] appended."""
    text = base.path.read_text(encoding="utf-8")
    body = text[text.index("[model]") :]  # drop the fp32 card's header comment
    head, sep, rest = body.partition("\n[")  # [model] table, then everything else
    for key, value in (
        ("version", f"{base.version}-{variant}"),
        ("onnx_file", onnx_path.name),
        ("sha256", sha256_file(onnx_path)),
    ):
        head, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {toml_value(value, CARD_DIGITS)}", head, count=1)
        if n != 1:
            raise SystemExit(f"{base.path}: no [model].{key} line to replace")
    purpose = "CPU" if variant == "int8" else "GPU"
    header = (
        f"# {variant.upper()} variant (for {purpose}) of the model in {base.path.name}; written by models/quantize.py,\n"
        "# do not edit by hand. Select it with model_variant = "
        f'"{variant}" (schema: xray_triage/inference/card.py).\n'
        f"# Only [model].version/onnx_file/sha256 and [variant] are this file's own. Everything else is\n"
        f"# copied from {base.path.name}: labels, thresholds and triage rules are the fp32 model's, and\n"
        "# [evaluation], [runtime] etc. describe the fp32 model (sha256 = [variant].base_sha256).\n"
        "# [variant] holds what was measured for this file against fp32.\n\n"
    )
    variant = toml_dumps({"variant": variant_table}, digits=CARD_DIGITS)
    text = header + head + sep + rest.rstrip("\n") + "\n\n" + variant
    tomllib.loads(text)  # the whole card must still be valid TOML
    return text


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write INT8 (CPU) and FP16 (GPU) variants of a model with their cards, "
        "measured against the fp32 model (speed on CPU, AUROC on the evaluation set).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="directory with model.toml (fp32)"
    )
    p.add_argument("--variants", nargs="+", choices=("int8", "fp16"), default=["int8", "fp16"])
    p.add_argument("--calib-data", type=Path, default=DEFAULT_CALIB, help="TRAIN images for INT8 calibration")
    p.add_argument("--calib-n", type=int, default=100, help="calibration images")
    p.add_argument(
        "--select-n", type=int, default=100, help="other TRAIN images to choose the INT8 configuration on"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    p.add_argument(
        "--eval-data", type=Path, default=DEFAULT_EVAL, help="evaluation set: images/ and labels.csv"
    )
    p.add_argument(
        "--calibrate-methods",
        nargs="+",
        choices=("MinMax", "Percentile", "Entropy"),
        default=["MinMax", "Percentile"],
        help="INT8 calibration methods to try (each with per-channel/per-tensor weights, input block and "
        "head int8/float); "
        "Entropy gave exactly MinMax's results on the demo model",
    )
    p.add_argument("--repeats", type=int, default=50, help="timed batch-1 runs per model (>= 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model first")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="keep the existing variant files; only measure speed and AUROC again and rewrite [variant.speed] "
        "and [variant.accuracy] (e.g. on a quiet machine)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: all cores, as the server)"
    )
    return p.parse_args(argv)


def shared_rel(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[parts.index("shared") :]) if "shared" in parts else str(path)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    if args.repeats < 30:
        raise SystemExit("--repeats must be at least 30")
    model_dir = args.model_dir.resolve()
    base = load_card(model_dir, variant="fp32")
    progress(
        f"base model {base.model_version}: {base.onnx_file} ({base.onnx_file.stat().st_size / 1e6:.1f} MB)"
    )
    threads = args.threads
    base_runner = cpu_runner(base, threads)
    threads_used = base_runner.session.get_session_options().intra_op_num_threads

    eval_paths, y_eval, labels_sha = read_eval_set(args.eval_data)
    t = time.perf_counter()
    x_eval = tensors(eval_paths, base)
    progress(
        f"evaluation set: {len(eval_paths)} images ({int(y_eval.sum())} abnormal) preprocessed in {time.perf_counter() - t:.1f}s"
    )
    p_base, h_base = predict(base_runner, x_eval)
    auroc_base = auroc(y_eval, abnormal_scores(base, p_base))
    prio_base = priorities(base, p_base)
    progress(f"fp32 abnormal AUROC {auroc_base:.4f}")
    machine = (
        f"{platform.machine()} {_cpu_name()}, {threads_used} intra-op threads, onnxruntime {ort.__version__}"
    )

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        workdir = Path(tmp)
        for variant in args.variants:
            onnx_path = model_dir / f"model.{variant}.onnx"
            card_path = model_dir / variant_card_name(variant)
            if args.remeasure:
                table = existing_variant_table(model_dir, variant, base)
                onnx_path = load_card(model_dir, variant=variant).onnx_file
                progress(f"{variant}: re-measuring the existing {onnx_path.name}")
                runner = try_cpu_runner(load_card(model_dir, variant=variant), threads, variant)
                table["speed"] = measure_speed(args, base_runner, runner, x_eval[:1], machine, variant)
                table["accuracy"] = measure_accuracy(
                    args,
                    base,
                    runner,
                    x_eval,
                    y_eval,
                    labels_sha,
                    p_base,
                    h_base,
                    auroc_base,
                    prio_base,
                    variant,
                )
                card_path.write_text(variant_card_text(base, variant, onnx_path, table), encoding="utf-8")
                load_card(model_dir, variant=variant)
                progress(f"updated {card_path.name}")
                continue
            table = {
                "name": variant,
                "base_card": base.path.name,
                "base_version": base.version,
                "base_sha256": base.sha256,
                "intended_hardware": "CPU (onnxruntime CPUExecutionProvider)"
                if variant == "int8"
                else "NVIDIA GPU (CUDAExecutionProvider)",
            }
            if variant == "int8":
                table.update(make_int8(args, base, onnx_path, workdir))
            else:
                progress("FP16: converting")
                table["method"] = "FP16 weights and activations, float32 inputs and outputs"
                table.update(convert_fp16(base.onnx_file, onnx_path))
            table["onnx_size_bytes"] = onnx_path.stat().st_size
            # a provisional card so that ModelRunner loads the variant exactly as the server would
            card_path.write_text(variant_card_text(base, variant, onnx_path, table), encoding="utf-8")
            runner = try_cpu_runner(load_card(model_dir, variant=variant), threads, variant)
            table["speed"] = measure_speed(args, base_runner, runner, x_eval[:1], machine, variant)
            table["accuracy"] = measure_accuracy(
                args, base, runner, x_eval, y_eval, labels_sha, p_base, h_base, auroc_base, prio_base, variant
            )
            card_path.write_text(variant_card_text(base, variant, onnx_path, table), encoding="utf-8")
            load_card(model_dir, variant=variant)  # must load with the server's loader
            progress(f"wrote {onnx_path.name} ({table['onnx_size_bytes'] / 1e6:.1f} MB) and {card_path.name}")
    return 0


def try_cpu_runner(card: ModelCard, threads: int | None, variant: str) -> ModelRunner | None:
    try:
        return cpu_runner(card, threads)
    except Exception as exc:  # noqa: BLE001 - e.g. an FP16 graph this CPU build cannot run
        progress(f"{variant}: onnxruntime cannot run it on CPU here: {exc}")
        return None


def existing_variant_table(model_dir: Path, variant: str, base: ModelCard) -> dict:
    """The [variant] table of an existing variant card, for --remeasure (refused if stale)."""
    card = load_card(model_dir, variant=variant)  # verifies the variant's sha256
    table = dict(card.extra.get("variant", {}))
    if table.get("base_sha256") != base.sha256:
        raise SystemExit(
            f"{card.path.name} was made from another model.onnx (base_sha256 {table.get('base_sha256')}, "
            f"model.toml says {base.sha256}): run without --remeasure to make it again"
        )
    table.pop("speed", None)
    table.pop("accuracy", None)
    return table


def make_int8(args: argparse.Namespace, base: ModelCard, onnx_path: Path, workdir: Path) -> dict:
    calib_paths, select_paths = seeded_train_images(
        args.calib_data, args.calib_n, args.select_n, args.seed, eval_patients(args.eval_data)
    )
    progress(
        f"INT8: preprocessing {len(calib_paths)} calibration + {len(select_paths)} selection TRAIN images"
    )
    x_calib = tensors(calib_paths, base)
    x_select = tensors(select_paths, base)
    base_runner = cpu_runner(base, args.threads)
    p_select, _ = predict(base_runner, x_select)
    candidates = [
        Int8Config(pc, fh, method)
        for method in args.calibrate_methods
        for fh in (True, False)
        for pc in (True, False)
    ]
    results = []
    for i, cfg in enumerate(candidates):
        path = workdir / f"candidate{i}.onnx"
        progress(f"INT8: quantising, {cfg.label}")
        details = quantize_int8(base.onnx_file, path, x_calib, base.input.name, cfg, workdir)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        p = np.concatenate(
            [
                session.run([base.probabilities_output], {base.input.name: x_select[j : j + 1]})[0]
                for j in range(len(x_select))
            ]
        )
        diff = np.abs(p - p_select)
        results.append((float(diff.mean()), float(diff.max()), cfg, path, details))
        progress(
            f"INT8: {cfg.label}: |p - p_fp32| on selection images mean {diff.mean():.4f} max {diff.max():.4f}"
        )
    mean_diff, max_diff, cfg, path, details = min(results, key=lambda r: r[0])
    onnx_path.write_bytes(path.read_bytes())
    progress(f"INT8: chose {cfg.label}")
    return {
        "method": "static INT8 quantisation, onnxruntime.quantization.quantize_static",
        **details,
        "calibration": {
            "data": shared_rel(args.calib_data),
            "n_images": len(calib_paths),
            "seed": args.seed,
            "draw": "numpy default_rng(seed).permutation of the sorted file names; first n = calibration, "
            "next select_n = configuration choice; images of evaluation-set patients excluded",
            "preprocessing": "xray_triage.pipeline.pixels.read_picture_display + "
            "xray_triage.pipeline.preprocess.to_model_input with this card's [input]",
        },
        "configuration_choice": {
            "data": f"{len(select_paths)} other TRAIN images of the same draw (not the evaluation set)",
            "criterion": "smallest mean |p_int8 - p_fp32| over all labels",
            "chosen": cfg.label,
            **{
                re.sub(r"[^a-z0-9]+", "_", c.label.lower()).strip("_"): {
                    "mean_abs_prob_diff": m,
                    "max_abs_prob_diff": x,
                }
                for m, x, c, _, _ in results
            },
        },
    }


def measure_speed(args, base_runner, runner, x1, machine: str, variant: str) -> dict:  # type: ignore[no-untyped-def]
    speed: dict = {
        "provider": "CPUExecutionProvider",
        "batch": 1,
        "repeats": args.repeats,
        "warmup_runs_excluded": args.warmup,
        "statistic": "median ms per ModelRunner.run call, fp32 and variant interleaved (ABBA) in the same run",
        "measured_on": machine,
    }
    if runner is None:
        speed.update(
            {
                "fp32_ms": nan(),
                "variant_ms": nan(),
                "speedup_vs_fp32": nan(),
                "note": "does not run on the CPU provider here",
            }
        )
    else:
        progress(f"{variant}: timing {args.repeats} batch-1 runs each, fp32 and {variant} interleaved")
        # other work on the CPU skews timings; this average includes this script's own work just before
        speed["load_average_1min_before"] = round(os.getloadavg()[0], 2)
        fp32_ms, variant_ms = median_ms_interleaved([base_runner, runner], x1, args.repeats, args.warmup)
        speed.update({"fp32_ms": fp32_ms, "variant_ms": variant_ms, "speedup_vs_fp32": fp32_ms / variant_ms})
        speed["kernel_ms_by_op"] = {
            "note": "onnxruntime profile of 20 batch-1 runs (first run included), mean kernel ms per run, op types "
            "above 0.5 ms: "
            "shows where the time goes (e.g. float ops that the variant leaves as they were)",
            "fp32": kernel_ms_by_op(base_runner, x1),
            variant: kernel_ms_by_op(runner, x1),
        }
        progress(
            f"{variant}: fp32 {fp32_ms:.2f} ms, {variant} {variant_ms:.2f} ms, speed-up x{fp32_ms / variant_ms:.2f} (CPU)"
        )
    if variant == "fp16":
        speed["gpu_speedup"] = "not measured: no GPU was available where this card was written"
        speed["cpu_note"] = (
            "FP16 is meant for GPUs: the CPU numbers only show that it runs on the CPU provider "
            "and are no guide to the GPU speed-up; on CPUs use int8"
        )
    return speed


def measure_accuracy(
    args, base, runner, x_eval, y_eval, labels_sha, p_base, h_base, auroc_base, prio_base, variant
) -> dict:  # type: ignore[no-untyped-def]
    acc: dict = {
        "data": shared_rel(args.eval_data),
        "labels_sha256": labels_sha,
        "n_images": len(y_eval),
        "n_abnormal": int(y_eval.sum()),
        "n_normal": int(len(y_eval) - y_eval.sum()),
        "score": f"abnormal score per the card's [triage].abnormal_score ({base.triage.abnormal_score})",
        "how": "same ModelRunner (CPU provider, batch 1) for fp32 and the variant; AUROC from xray_triage.evaluation.metrics",
        "auroc_abnormal_fp32": auroc_base,
    }
    if runner is None:
        acc.update(
            {
                "auroc_abnormal_variant": nan(),
                "auroc_change": nan(),
                "note": "not measured: the variant does not run on the CPU provider here",
            }
        )
        return acc
    p, h = predict(runner, x_eval)
    auroc_v = auroc(y_eval, abnormal_scores(base, p))
    diff = np.abs(p - p_base)
    agree = float(np.mean([a == b for a, b in zip(priorities(base, p), prio_base, strict=True)]))
    acc.update(
        {
            "auroc_abnormal_variant": auroc_v,
            "auroc_change": auroc_v - auroc_base,
            "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()),
            "priority_agreement": agree,
        }
    )
    if h is not None and h_base is not None:
        acc["max_abs_heatmap_diff"] = float(np.abs(h - h_base).max())
        acc["heatmap_value_range_fp32"] = [float(h_base.min()), float(h_base.max())]
    progress(
        f"{variant}: AUROC fp32 {auroc_base:.4f} -> {variant} {auroc_v:.4f} ({auroc_v - auroc_base:+.4f}); "
        f"max |dp| {diff.max():.4f}; priority agreement {agree:.3f}"
    )
    return acc


def nan() -> float:
    return float("nan")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
