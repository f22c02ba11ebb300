"""``xray-triage models export-torchxrayvision``: ONNX parity with torchxrayvision, card, runner.

Needs the ``export`` extra (torch + torchxrayvision); skipped without it. No
published weights are downloaded: the test makes its own DenseNet-121 weights
(fixed seed, BatchNorm statistics calibrated on random images so the outputs are
not saturated) and labels them as the ``densenet121-res224-nih`` preset, whose
four empty labels and NaN operating points exercise the unused-label convention.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
xrv = pytest.importorskip("torchxrayvision")
requests = pytest.importorskip("requests")  # torchxrayvision's download uses it

from e2e_helpers import SHARED_DATA  # noqa: E402
from xray_triage.inference.card import load_card  # noqa: E402
from xray_triage.inference.runner import ModelRunner  # noqa: E402
from xray_triage.pipeline.pixels import read_any_display  # noqa: E402
from xray_triage.pipeline.preprocess import to_model_input  # noqa: E402
from xray_triage.triage.analyze import analyze_display  # noqa: E402
from xray_triage_server.cli import main  # noqa: E402

SHARED_DATA = SHARED_DATA
PRESET = "densenet121-res224-nih"
TOL = 1e-4


def _op_threshs() -> torch.Tensor:
    return torch.tensor(xrv.models.model_urls[PRESET]["op_threshs"], dtype=torch.float32)


def _make_weights() -> dict[str, torch.Tensor]:
    """A DenseNet-121 state_dict with non-trivial outputs (not a trained model)."""
    torch.manual_seed(1234)
    model = xrv.models.DenseNet(weights=None)
    for module in model.modules():  # BatchNorm running stats = the mean over the calibration batches
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    noise = torch.rand(1, 1, 224, 224) * 2048 - 1024  # like the parity inputs
    smooth = torch.nn.functional.interpolate(torch.rand(1, 1, 14, 14) * 2048 - 1024, size=224, mode="bilinear")
    images = torch.cat([noise, smooth])  # ... and like a radiograph
    model.train()
    with torch.no_grad():
        model.features(images)
        model.classifier.weight.normal_(0.0, 0.05)
        op = _op_threshs()
        centre = torch.where(torch.isnan(op), torch.zeros_like(op), torch.logit(op.nan_to_num(0.5)))
        model.classifier.bias.copy_(centre + 0.5 * torch.randn(op.shape))
    model.eval()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _reference_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Plain torchxrayvision, independent of the exporter's loading code."""
    model = xrv.models.DenseNet(weights=None)
    model.load_state_dict(state)
    model.op_threshs = _op_threshs()  # what DenseNet(weights=PRESET) does after loading
    return model.eval()


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["models", "export-torchxrayvision", *argv])
    return rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return _make_weights()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> dict:
    """The offline path: a state_dict file, labelled with --preset."""
    tmp = tmp_path_factory.mktemp("xrv")
    weights = tmp / "my-densenet.pt"
    torch.save(state, weights)
    out = tmp / "model"
    rc, stdout, stderr = _run_cli(["--weights", str(weights), "--preset", PRESET, "--out", str(out)])
    return {"rc": rc, "out": out, "stdout": stdout, "stderr": stderr, "model": _reference_model(state)}


def test_export_succeeds_and_reports_parity(exported: dict) -> None:
    assert exported["rc"] == 0, exported["stderr"]
    match = re.search(r"max abs diff probabilities (\S+), heatmaps (\S+) ", exported["stdout"])
    assert match, exported["stdout"]
    assert float(match[1]) <= TOL and float(match[2]) <= TOL, match[0]
    assert (exported["out"] / "model.onnx").is_file() and (exported["out"] / "model.toml").is_file()


def test_card_matches_torchxrayvision(exported: dict) -> None:
    card = load_card(exported["out"])  # sha256 verified
    assert len(card.labels) == 18
    preset_labels = xrv.models.model_urls[PRESET]["labels"]
    for i, name in enumerate(preset_labels):
        if name:
            assert card.labels[i] == name
            assert card.thresholds[name] == 0.5
        else:
            assert card.labels[i] == f"unused_{i}"
            assert card.thresholds[f"unused_{i}"] > 1.0
    spec = card.input
    assert (spec.height, spec.width, spec.channels) == (224, 224, 1)
    assert spec.resize == "center_crop"
    assert spec.value_range == (-1024.0, 1024.0)
    assert spec.mean == (0.0,) and spec.std == (1.0,)
    assert card.triage.abnormal_score == "max"
    assert set(card.triage.urgent_labels) <= {"Pneumothorax", "Mass", "Consolidation", "Pneumonia", "Effusion"}
    assert "Pneumothorax" in card.triage.urgent_labels
    assert card.heatmaps_output == "heatmaps"
    assert "validat" in card.intended_use and "torchxrayvision" in card.intended_use
    assert card.extra["export"]["parity_max_abs_diff_probabilities"] <= TOL
    assert card.extra["export"]["parity_max_abs_diff_heatmaps"] <= TOL


def test_onnx_matches_pytorch_for_a_batch_of_3(exported: dict) -> None:
    import onnxruntime as ort

    model = exported["model"]
    session = ort.InferenceSession(str(exported["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "N"  # dynamic batch
    x = torch.rand(3, 1, 224, 224, generator=torch.Generator().manual_seed(7)) * 2048 - 1024
    probs, heatmaps = session.run(["probabilities", "heatmaps"], {"image": x.numpy()})
    assert probs.shape == (3, 18) and heatmaps.shape == (3, 18, 7, 7)

    with torch.no_grad():
        expected = model(x.clone()).numpy()  # torchxrayvision's own forward, op_norm included
        fmap = torch.relu(model.features(x.clone()))
        weight = model.classifier.weight.double()
        cam = (weight[None, :, :, None, None] * fmap.double()[:, None]).sum(dim=2).numpy()  # sum_c w[l, c] F[c, y, x]
        pooled_logits = (cam.mean(axis=(2, 3)) + model.classifier.bias.numpy()[None])
    used = np.array([bool(n) for n in xrv.models.model_urls[PRESET]["labels"]])
    assert np.max(np.abs(probs[:, used] - expected[:, used])) <= TOL
    assert np.all(probs[:, ~used] == 0.0)  # torchxrayvision gives a constant 0.5 there
    assert np.allclose(expected[:, ~used], 0.5)
    assert np.max(np.abs(heatmaps - cam)) <= TOL
    # the CAM comes from the map the classifier pools: its spatial mean + bias is the logit
    with torch.no_grad():
        logits = model.classifier(torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1)).numpy()
    assert np.max(np.abs(pooled_logits - logits)) <= 1e-3
    assert float(probs[:, used].min()) > 0.0 and float(probs[:, used].max()) < 1.0  # outputs are not saturated


def test_runner_triages_a_real_dicom(exported: dict) -> None:
    dicom = SHARED_DATA / "dicom" / "dev_01_dx_pa_explicit_window.dcm"
    if not dicom.is_file():
        pytest.skip(f"shared DICOM test data not found: {dicom}")
    card = load_card(exported["out"])
    runner = ModelRunner(card, intra_op_threads=2)
    image = read_any_display(dicom)
    analysis = analyze_display(image, runner, decode_ms=0.0)
    assert set(analysis.score.probabilities) == set(card.labels)
    assert all(analysis.score.probabilities[f"unused_{i}"] == 0.0 for i in range(14, 18))
    assert not any(label.startswith("unused_") for label in analysis.score.flagged)
    # the same preprocessed tensor through torchxrayvision gives the same probabilities
    tensor = torch.from_numpy(to_model_input(image.pixels, card.input)[None])
    assert float(tensor.min()) >= -1024.0 - 1e-3 and float(tensor.max()) <= 1024.0 + 1e-3
    with torch.no_grad():
        expected = exported["model"](tensor).numpy()[0]
    for i, label in enumerate(card.labels):
        if not label.startswith("unused_"):
            assert math.isclose(analysis.score.probabilities[label], float(expected[i]), abs_tol=2e-4)
    for label, record in analysis.heatmaps.items():
        assert label in analysis.score.flagged
        assert np.asarray(record["grid"]).shape == (7, 7)
        assert record["box"] == [0, 0, 1024, 1024]


def test_weights_name_goes_through_torchxrayvision_download_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: dict[str, torch.Tensor]
) -> None:
    """--weights NAME: torchxrayvision's own get_weights + DenseNet(weights=NAME), with the
    download faked by copying a whole pickled model (what the published .pt files are)."""
    model = xrv.models.DenseNet(weights=None)
    model.load_state_dict(state)
    published = tmp_path / "published.pt"
    torch.save(model, published)
    downloads: list[str] = []

    def fake_download(url: str, filename: str) -> None:
        downloads.append(url)
        shutil.copyfile(published, filename)

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # torchxrayvision's cache: ~/.torchxrayvision
    monkeypatch.setattr(xrv.utils, "download", fake_download)
    out = tmp_path / "out"
    rc, stdout, stderr = _run_cli(["--weights", "all", "--out", str(out)])
    assert rc == 0, stderr
    assert downloads == [xrv.models.model_urls["densenet121-res224-all"]["weights_url"]]
    card = load_card(out)
    assert list(card.labels) == xrv.models.model_urls["densenet121-res224-all"]["labels"]  # all 18 used
    assert card.name == "torchxrayvision-densenet121-res224-all"
    assert card.triage.urgent_labels == ("Pneumothorax", "Consolidation", "Pneumonia", "Effusion")
    assert card.extra["source"]["weights_url"] == downloads[0]
    assert "arxiv.org/abs/2002.02497" in card.intended_use  # the weights' own description
    assert "parity" in stdout

    # the same pickled file given as a FILE is refused unless --allow-pickle
    rc, _, stderr = _run_cli(["--weights", str(published), "--preset", "all", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "--allow-pickle" in stderr


def test_weights_name_without_network_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise ConnectionError("network disabled by the test")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty torchxrayvision cache
    monkeypatch.setattr(requests, "get", no_network)  # what torchxrayvision's download calls
    rc, _, err = _run_cli(["--weights", "densenet121-res224-all", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "could not download" in err and "--weights /path/to/" in err
    assert not (tmp_path / "out" / "model.toml").exists()
    leftovers = [p for p in (tmp_path / "home").rglob("*.pt") if p.stat().st_size == 0]
    assert not leftovers  # no empty cache file that would break the next run


def test_file_of_unknown_weights_needs_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "whatever.pt"
    torch.save({"classifier.weight": torch.zeros(18, 1024)}, weights)
    rc = main(["models", "export-torchxrayvision", "--weights", str(weights), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "--preset" in capsys.readouterr().err


def test_missing_export_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import raises ImportError
    rc = main(["models", "export-torchxrayvision", "--weights", "x", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "pip install -e '.[export]'" in capsys.readouterr().err
