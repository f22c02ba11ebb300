"""Model variants (model.int8.toml / model.fp16.toml) and micro-batching in the runner.

Fast: everything but the last tests runs on the tiny models of ``onnx_factory``.
The shipped INT8/FP16 variants are checked only if ``models/quantize.py`` wrote
them. No test asserts wall-clock time: batching is observed by counting the
model calls and their batch sizes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_factory import write_tiny_model_dir
from xray_triage.inference.batching import BatcherStopped, MicroBatcher
from xray_triage.inference.card import ModelCardError, find_card, list_cards, load_card, sha256_file
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import DisplayImage, read_any_display
from xray_triage.pipeline.preprocess import to_model_input
from xray_triage.settings import DEFAULT_MODEL_DIR, SettingsError, load_settings
from xray_triage.triage.analyze import analyze_display
from xray_triage_server.cli import main as cli_main

DEFAULT_MODEL = DEFAULT_MODEL_DIR
LONG_WAIT_MS = 60_000.0  # a batch that must fill before it runs: only a full batch flushes it
# Largest |p_variant - p_fp32| accepted on the shared DICOMs (models/quantize.py measures
# the same on the 200 evaluation images and writes it into each card's [variant.accuracy]).
# Measured on the demo model: int8 0.050 on the 200 DEV images, 0.024 on the shared DICOMs;
# fp16 0.0015 and 0.0008.
VARIANT_TOLERANCE = {"int8": 0.08, "fp16": 0.02}


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    write_tiny_model_dir(tmp_path / "m")
    return tmp_path / "m"


def add_variant_card(directory: Path, variant: str) -> Path:
    """A variant card for the tiny model: same ONNX file, own version."""
    text = (directory / "model.toml").read_text(encoding="utf-8")
    card = directory / f"model.{variant}.toml"
    card.write_text(text.replace('version = "0.0.1"', f'version = "0.0.1-{variant}"'), encoding="utf-8")
    return card


def images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """n distinct (1, size, size) images with distinct means, so rows cannot be mixed up unnoticed."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1, size, size), dtype=np.float32) * 0.2
    return (base + np.linspace(0.0, 0.8, n, dtype=np.float32)[:, None, None, None]).astype(np.float32)


class SessionSpy:
    """Wraps an InferenceSession: records the batch size of every run, can raise."""

    def __init__(self, session, input_name: str) -> None:  # type: ignore[no-untyped-def]
        self._session = session
        self._input_name = input_name
        self.batch_sizes: list[int] = []
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def run(self, names, feed):  # type: ignore[no-untyped-def]
        with self._lock:
            self.batch_sizes.append(int(feed[self._input_name].shape[0]))
        if self.error is not None:
            raise self.error
        return self._session.run(names, feed)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._session, name)


def spied_runner(model_dir: Path, **kwargs) -> tuple[ModelRunner, SessionSpy]:  # type: ignore[no-untyped-def]
    runner = ModelRunner(load_card(model_dir), intra_op_threads=1, **kwargs)
    spy = SessionSpy(runner.session, runner.card.input.name)
    runner.session = spy  # type: ignore[assignment]
    return runner, spy


def call_concurrently(fn, args_per_thread: list) -> list:  # type: ignore[no-untyped-def]
    """Run fn(arg) in one thread per arg, all released together; results (or exceptions) in order."""
    results: list = [None] * len(args_per_thread)
    barrier = threading.Barrier(len(args_per_thread))

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(args_per_thread[i])
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args_per_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a caller never got its result"
    return results


# --------------------------------------------------------------------------- variant selection


def test_variant_cards_are_chosen_by_name(model_dir: Path) -> None:
    add_variant_card(model_dir, "int8")
    assert find_card(model_dir) == model_dir / "model.toml"
    assert find_card(model_dir, "fp32") == model_dir / "model.toml"
    assert find_card(model_dir, "int8") == model_dir / "model.int8.toml"
    assert load_card(model_dir, variant="int8").model_version == "tiny-test@0.0.1-int8"
    assert load_card(model_dir).model_version == "tiny-test@0.0.1"
    assert list(list_cards(model_dir)) == ["fp32", "int8"]


def test_absent_variant_is_a_clear_error_listing_the_cards(model_dir: Path) -> None:
    add_variant_card(model_dir, "int8")
    with pytest.raises(ModelCardError, match=r"no fp16 model card model\.fp16\.toml") as info:
        load_card(model_dir, variant="fp16")
    assert "model.int8.toml, model.toml" in str(info.value)
    assert "quantize.py" in str(info.value)


def test_unknown_variant_is_refused(model_dir: Path) -> None:
    with pytest.raises(ModelCardError, match="int4"):
        find_card(model_dir, "int4")


def test_single_card_directory_still_works_for_fp32(model_dir: Path) -> None:
    (model_dir / "model.toml").rename(model_dir / "cxr-v3.toml")
    assert find_card(model_dir) == model_dir / "cxr-v3.toml"
    assert load_card(model_dir).name == "tiny-test"
    with pytest.raises(ModelCardError, match="cxr-v3.toml"):
        find_card(model_dir, "int8")


def test_a_lone_variant_card_is_not_taken_for_fp32(model_dir: Path) -> None:
    (model_dir / "model.toml").rename(model_dir / "model.int8.toml")
    with pytest.raises(ModelCardError, match=r"no fp32 model card model\.toml .*model\.int8\.toml"):
        find_card(model_dir)
    assert find_card(model_dir, "int8") == model_dir / "model.int8.toml"


def test_several_plain_cards_need_a_choice(model_dir: Path) -> None:
    add_variant_card(model_dir, "int8").rename(model_dir / "other.toml")
    (model_dir / "model.toml").rename(model_dir / "first.toml")
    with pytest.raises(ModelCardError, match="first.toml, other.toml"):
        find_card(model_dir)


def test_a_card_file_path_is_used_as_given(model_dir: Path) -> None:
    card = add_variant_card(model_dir, "int8")
    assert find_card(card) == card
    assert find_card(model_dir / "model.toml", "int8") == model_dir / "model.toml"  # explicit file wins
    assert load_card(card).version == "0.0.1-int8"


def test_settings_accept_variants_and_batching(tmp_path: Path) -> None:
    settings = load_settings(model_variant="int8", batch_max_size=8, batch_max_wait_ms=2.5, data_dir=tmp_path)
    assert (settings.model_variant, settings.batch_max_size, settings.batch_max_wait_ms) == ("int8", 8, 2.5)
    defaults = load_settings(data_dir=tmp_path)
    assert (defaults.model_variant, defaults.batch_max_size) == ("fp32", 1)
    with pytest.raises(SettingsError, match="model_variant"):
        load_settings(model_variant="int4", data_dir=tmp_path)
    with pytest.raises(SettingsError, match="batch_max_size"):
        load_settings(batch_max_size=0, data_dir=tmp_path)


def test_models_list_shows_every_variant(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_variant_card(model_dir, "int8")
    args = ["--data-dir", str(tmp_path / "data"), "--model", str(model_dir)]
    assert cli_main(["models", "list", *args, "--variant", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-test@0.0.1-int8")
    assert "fp32" in out and "model.toml" in out and "model.int8.toml" in out
    assert cli_main(["models", "verify", *args, "--variant", "fp16"]) == 2
    assert "model.fp16.toml" in capsys.readouterr().err


# --------------------------------------------------------------------------- micro-batching


def test_infer_one_without_batching_is_a_direct_call(model_dir: Path) -> None:
    runner, spy = spied_runner(model_dir)
    assert runner.batcher is None
    x = images(3)
    reference = runner.run(x)
    for i in range(3):
        probs, heatmaps = runner.infer_one(x[i])
        assert np.allclose(probs, reference.probabilities[i], atol=1e-6)
        assert heatmaps is not None and np.allclose(heatmaps, reference.heatmaps[i], atol=1e-6)
    assert spy.batch_sizes == [3, 1, 1, 1]
    with pytest.raises(ValueError, match="shape"):
        runner.infer_one(x)  # a batch is not one image


def test_concurrent_callers_get_their_own_results_in_order(model_dir: Path) -> None:
    n_threads, per_thread = 8, 6
    x = images(n_threads * per_thread)
    plain = ModelRunner(load_card(model_dir), intra_op_threads=1)
    expected = [plain.run(x[i : i + 1]) for i in range(len(x))]  # one image per model call
    runner, spy = spied_runner(model_dir, batch_max_size=4, batch_max_wait_ms=20.0)
    assert runner.batcher is not None

    def caller(t: int) -> list:
        return [runner.infer_one(x[t * per_thread + k]) for k in range(per_thread)]

    results = call_concurrently(caller, list(range(n_threads)))
    for t, outputs in enumerate(results):
        assert not isinstance(outputs, Exception), outputs
        for k, (probs, heatmaps) in enumerate(outputs):
            want = expected[t * per_thread + k]
            assert np.allclose(probs, want.probabilities[0], rtol=1e-5, atol=1e-6)
            assert np.allclose(heatmaps, want.heatmaps[0], rtol=1e-5, atol=1e-6)
    assert sum(spy.batch_sizes) == n_threads * per_thread
    assert max(spy.batch_sizes) <= 4
    assert sum(runner.batcher.batch_sizes.values()) == len(spy.batch_sizes)
    runner.close()


def test_a_full_batch_is_one_model_call(model_dir: Path) -> None:
    runner, spy = spied_runner(model_dir, batch_max_size=4, batch_max_wait_ms=LONG_WAIT_MS)
    x = images(4)
    results = call_concurrently(runner.infer_one, list(x))
    assert spy.batch_sizes == [4]  # the batch only runs when full: the wait is a minute
    reference = runner.run(x)
    for i, (probs, _) in enumerate(results):
        assert np.allclose(probs, reference.probabilities[i], rtol=1e-5, atol=1e-6)
    assert runner.batcher is not None and runner.batcher.batch_sizes == {4: 1}
    runner.close()


def test_the_wait_flushes_a_partial_batch(model_dir: Path) -> None:
    runner, spy = spied_runner(model_dir, batch_max_size=8, batch_max_wait_ms=10.0)
    x = images(3)
    probs, _ = runner.infer_one(x[0])  # alone: flushed by the wait, not by a full batch
    assert spy.batch_sizes == [1]
    batcher = runner.batcher
    assert batcher is not None
    futures = [batcher.submit(x[i]) for i in range(3)]
    outputs = [f.result(timeout=60) for f in futures]
    assert sum(spy.batch_sizes[1:]) == 3 and all(size < 8 for size in spy.batch_sizes)
    reference = runner.run(x)
    for i, (p, h) in enumerate(outputs):
        assert np.allclose(p, reference.probabilities[i], rtol=1e-5, atol=1e-6)
        assert h is not None and h.shape == (3, 8, 8)
    runner.close()


def test_a_model_error_reaches_every_caller_of_the_batch(model_dir: Path) -> None:
    runner, spy = spied_runner(model_dir, batch_max_size=4, batch_max_wait_ms=LONG_WAIT_MS)
    spy.error = RuntimeError("boom: device lost")
    results = call_concurrently(runner.infer_one, list(images(4)))
    assert spy.batch_sizes == [4]
    assert all(isinstance(r, RuntimeError) and "boom" in str(r) for r in results)
    spy.error = None  # the batcher survives and serves the next batch
    results = call_concurrently(runner.infer_one, list(images(4)))
    assert not any(isinstance(r, Exception) for r in results)
    runner.close()


def test_stop_runs_what_is_queued_then_refuses(model_dir: Path) -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow_double(batch: np.ndarray) -> tuple[np.ndarray, None]:
        calls.append(len(batch))
        release.wait(60)
        return batch * 2, None

    batcher = MicroBatcher(slow_double, max_size=1, max_wait_ms=0.0)
    first = batcher.submit(np.array([1.0]))
    queued = [batcher.submit(np.array([float(i)])) for i in (2, 3)]
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    release.set()
    stopper.join(60)
    assert not stopper.is_alive() and not batcher.running
    assert first.result(0)[0][0] == 2.0
    assert [(float(f.result(0)[0][0]), f.result(0)[1]) for f in queued] == [(4.0, None), (6.0, None)]
    assert calls == [1, 1, 1]
    with pytest.raises(BatcherStopped):
        batcher.submit(np.array([4.0]))
    batcher.stop()  # twice is fine


def test_runner_close_stops_the_batcher_and_falls_back_to_direct_calls(model_dir: Path) -> None:
    runner, spy = spied_runner(model_dir, batch_max_size=4, batch_max_wait_ms=5.0)
    batcher = runner.batcher
    assert batcher is not None and batcher.running
    runner.close()
    assert not batcher.running and runner.batcher is None
    probs, _ = runner.infer_one(images(1)[0])
    assert probs.shape == (3,) and spy.batch_sizes == [1]


def test_batcher_rejects_a_wrong_row_count() -> None:
    batcher = MicroBatcher(lambda batch: (batch[:1],), max_size=2, max_wait_ms=LONG_WAIT_MS)
    futures = [batcher.submit(np.zeros(2)) for _ in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match="1 rows for a batch of 2"):
            f.result(60)
    batcher.stop()


def test_a_fixed_batch_axis_means_direct_calls(model_dir: Path) -> None:
    path = model_dir / "model.onnx"
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    card = model_dir / "model.toml"
    text = card.read_text(encoding="utf-8")
    old_sha = text.split('sha256 = "')[1].split('"')[0]
    card.write_text(text.replace(old_sha, sha256_file(path)), encoding="utf-8")
    runner = ModelRunner(load_card(model_dir), intra_op_threads=1, batch_max_size=8)
    assert not runner.batch_axis_is_dynamic() and runner.batcher is None
    probs, heatmaps = runner.infer_one(images(1)[0])
    assert probs.shape == (3,) and heatmaps is not None and heatmaps.shape == (3, 8, 8)


def test_analysis_is_the_same_with_batching(model_dir: Path) -> None:
    image = DisplayImage(
        pixels=np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200),
        source_shape=(300, 200),
        window="minmax",
    )
    plain = analyze_display(image, ModelRunner(load_card(model_dir), intra_op_threads=1), decode_ms=0.0)
    runner = ModelRunner(load_card(model_dir), intra_op_threads=1, batch_max_size=2, batch_max_wait_ms=1.0)
    batched = analyze_display(image, runner, decode_ms=0.0)
    runner.close()
    assert batched.score.probabilities == pytest.approx(plain.score.probabilities, abs=1e-6)
    assert batched.score.priority == plain.score.priority
    assert batched.heatmaps.keys() == plain.heatmaps.keys()


# --------------------------------------------------------------------------- shipped variants


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_shipped_variant_matches_fp32(variant: str, shared_dicom: Path) -> None:
    if not (DEFAULT_MODEL / f"model.{variant}.toml").is_file():
        pytest.skip(f"the shipped model has no {variant} variant (make it with models/quantize.py)")
    base = load_card(DEFAULT_MODEL)
    card = load_card(DEFAULT_MODEL, variant=variant)  # verifies the variant's own sha256
    assert card.variant == variant and card.version == f"{base.version}-{variant}"
    assert card.labels == base.labels and card.input == base.input
    assert card.extra["variant"]["base_sha256"] == base.sha256, (
        f"model.{variant}.onnx was made from another model.onnx: re-run models/quantize.py"
    )
    try:
        runner = ModelRunner(card, providers=["CPUExecutionProvider"], intra_op_threads=1)
    except ModelCardError as exc:
        if variant == "fp16":
            pytest.skip(f"this onnxruntime CPU build cannot run the FP16 model (it is meant for GPUs): {exc}")
        raise
    fp32 = ModelRunner(base, providers=["CPUExecutionProvider"], intra_op_threads=1)
    files = sorted(shared_dicom.glob("*.dcm"))[:4]
    assert files
    for path in files:
        tensor = to_model_input(read_any_display(path).pixels, base.input)
        probs, heatmaps = runner.infer_one(tensor)
        want, want_heatmaps = fp32.infer_one(tensor)
        assert np.abs(probs - want).max() <= VARIANT_TOLERANCE[variant], path.name
        assert heatmaps is not None and want_heatmaps is not None and heatmaps.shape == want_heatmaps.shape
