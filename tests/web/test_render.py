"""Server-side rendering for the viewer: same pixels as the model, windows, sizes, errors, cache.

Unit tests run ``xray_triage.pipeline.render`` on the shared DICOM files; the last
tests go through the HTTP routes (``consult_web/routes/images.py``) on a temporary
database.
"""

from __future__ import annotations

import io
import math
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from web_helpers import add_station_row, add_user_row, client_for, make_web_env, store_dicom

from e2e_helpers import SampleFile
from xray_triage.pipeline import render as R
from xray_triage.pipeline.pixels import PixelError, read_dicom_display
from xray_triage.store.schema import Instance

BIG = "dev_08_dx_pa_2800px_jpegls.dcm"
MONO1 = "dev_02_cr_ap_mono1_implicit.dcm"
RESCALED = "dev_04_cr_pa_rescale_jpegls.dcm"


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im, dtype=np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _model_display_at(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The model pipeline's display image (0..255), resized like a render of ``shape``."""
    pixels = read_dicom_display(path).pixels
    if pixels.shape != shape:
        pixels = np.asarray(Image.fromarray(pixels, mode="F").resize(shape[::-1], Image.Resampling.BILINEAR))
    return pixels * 255.0


@pytest.fixture(scope="module")
def loaded(samples: list[SampleFile]) -> dict[str, R.LoadedImage]:
    return {s.name: R.load_image(s.path) for s in samples}


def _path(samples: list[SampleFile], name: str) -> Path:
    return next(s.path for s in samples if s.name == name)


def test_every_shared_file_renders_what_the_model_sees(samples: list[SampleFile], loaded: dict) -> None:
    """The default (``dicom``) render is the model pipeline's display image, for every codec."""
    for sample in samples:
        image = loaded[sample.name]
        assert image.shape == (sample.rows, sample.cols)
        picture = R.render(image, size=max(image.shape), fmt="png")
        ours = _decode(picture.data)
        model = _model_display_at(sample.path, ours.shape)
        assert np.abs(ours - model).max() <= 1.0, sample.name  # only 8-bit rounding differs
        first = _decode(R.render(image).data)
        assert max(first.shape) == min(1024, max(image.shape))
        assert _corr(first, _model_display_at(sample.path, first.shape)) > 0.99, sample.name


def test_monochrome1_is_bone_bright_in_every_window(samples: list[SampleFile], loaded: dict) -> None:
    image = loaded[MONO1]
    assert image.photometric == "MONOCHROME1"
    for preset in R.PRESETS:
        picture = _decode(R.render(image, preset=preset, size=512).data)
        reference = _model_display_at(_path(samples, MONO1), picture.shape)
        inside = (picture > 0) & (picture < 255)  # windowing clips the rest, but must never invert
        assert inside.mean() > 0.2 and _corr(picture[inside], reference[inside]) > 0.9, preset
    dicom = _decode(R.render(image, preset="dicom", size=512).data)
    assert _corr(dicom, _model_display_at(_path(samples, MONO1), dicom.shape)) > 0.95
    # An explicit window is in stored/modality units: the air (high values in MONOCHROME1) is dark.
    lo, hi = image.value_range
    explicit = _decode(R.render(image, wc=(lo + hi) / 2, ww=hi - lo, size=512).data)
    assert _corr(explicit, dicom) > 0.95


def test_window_values_are_in_modality_lut_units(loaded: dict, samples: list[SampleFile]) -> None:
    """dev_04 has Rescale Slope 2 / Intercept -1024 and its window in rescaled units."""
    image = loaded[RESCALED]
    ds = pydicom.dcmread(_path(samples, RESCALED), stop_before_pixels=True)
    assert float(ds.RescaleSlope) == 2 and float(ds.RescaleIntercept) == -1024
    window = R.windows_info(image)["presets"]["dicom"]
    assert window == {"wc": float(ds.WindowCenter), "ww": float(ds.WindowWidth)}
    assert image.value_range[0] < 0  # rescaled values, not stored ones
    by_dataset = _decode(R.render(image, preset="dicom", size=512).data)
    by_numbers = _decode(R.render(image, wc=window["wc"], ww=window["ww"], size=512).data)
    assert np.abs(by_dataset - by_numbers).mean() < 1.5


def test_presets_differ_and_are_ordered_by_brightness(loaded: dict) -> None:
    """Lung sits over the darker values, mediastinum on brighter soft tissue, bone on the bright tail."""
    for name, image in loaded.items():
        info = R.windows_info(image)["presets"]
        sign = -1.0 if image.photometric == "MONOCHROME1" else 1.0  # MONOCHROME1: high values are dark
        centres = [sign * info[p]["wc"] for p in ("lung", "mediastinum", "bone")]
        assert centres == sorted(centres) and len(set(centres)) == 3, (name, info)
        assert info["bone"]["ww"] < info["lung"]["ww"], (name, info)
        means = [_decode(R.render(image, preset=p, size=256).data).mean() for p in ("lung", "mediastinum", "bone")]
        assert means[0] > means[1] > means[2], (name, means)  # a brighter window shows a darker picture


def test_size_is_clamped_and_keeps_the_aspect_ratio(loaded: dict) -> None:
    image = loaded[BIG]
    assert R.output_shape(image, 10) == (64, 64)
    assert R.output_shape(image, 10**9) == (2800, 2800)
    assert R.output_shape(image, 2048) == (2048, 2048)
    wide = R.LoadedImage(
        values=np.zeros((300, 600), np.float32), header=pydicom.Dataset(), photometric="MONOCHROME2",
        dicom_voi="minmax", presets={p: R.Window(0.5, 1.0) for p in R.PRESETS}, value_range=(0.0, 1.0),
    )
    assert R.output_shape(wide, 100) == (50, 100)
    picture = R.render(wide, size=100)
    assert (picture.width, picture.height) == (100, 50)


def test_first_view_of_the_2800px_jpegls_file_is_small_and_fast(samples: list[SampleFile]) -> None:
    path = _path(samples, BIG)
    started = time.perf_counter()
    image = R.load_image(path)
    decoded = time.perf_counter()
    picture = R.render(image)
    done = time.perf_counter()
    print(
        f"\n{BIG}: decode {1000 * (decoded - started):.0f} ms, first render {1000 * (done - decoded):.0f} ms, "
        f"{len(picture.data) / 1024:.0f} KB, {picture.width}x{picture.height}"
    )
    assert max(picture.width, picture.height) <= 1024
    assert len(picture.data) < 400 * 1024
    zoomed = R.render(image, size=2048)
    assert (zoomed.width, zoomed.height) == (2048, 2048)
    assert len(R.render(image, size=2800, fmt="png").data) > len(picture.data)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wc": 100.0}, "both"),
        ({"ww": 100.0}, "both"),
        ({"wc": 100.0, "ww": 0.0}, "greater than 0"),
        ({"wc": 100.0, "ww": -5.0}, "greater than 0"),
        ({"wc": math.nan, "ww": 100.0}, "finite"),
        ({"wc": 100.0, "ww": math.inf}, "finite"),
        ({"wc": 1e12, "ww": 100.0}, "out of range"),
        ({"preset": "brain"}, "unknown preset"),
        ({"fmt": "gif"}, "unknown format"),
    ],
)
def test_bad_render_parameters_are_rejected(loaded: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(R.RenderError, match=message):
        R.render(loaded[RESCALED], **kwargs)


def test_undecodable_and_missing_files_raise_pixel_errors(tmp_path: Path, samples: list[SampleFile]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(PixelError, match="not a readable DICOM"):
        R.load_image(junk)
    with pytest.raises(PixelError, match="missing"):
        R.ImageCache(2).get(tmp_path / "gone.dcm")
    ds = pydicom.dcmread(_path(samples, RESCALED))  # JPEG-LS with its code stream cut short
    ds.PixelData = ds.PixelData[:200]
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    with pytest.raises(PixelError):
        R.load_image(broken)


def test_cache_is_an_lru_and_decodes_once_under_concurrency(
    monkeypatch: pytest.MonkeyPatch, samples: list[SampleFile]
) -> None:
    calls: list[Path] = []
    real = R.load_image
    arrived = threading.Semaphore(0)

    class ArrivalCountingDict(dict):  # type: ignore[type-arg]
        """The cache's in-flight table: each caller that found no cached image registers here."""

        def setdefault(self, key, default=None):  # type: ignore[no-untyped-def]
            arrived.release()
            return super().setdefault(key, default)

    def counting(path: Path, **kwargs: object) -> R.LoadedImage:
        calls.append(path)
        if len(calls) == 1:  # the first decode waits until all 6 callers are in (no sleep racing them)
            for _ in range(6):
                assert arrived.acquire(timeout=60), "the other callers never arrived"
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(R, "load_image", counting)
    cache = R.ImageCache(2)
    cache._loading = ArrivalCountingDict()
    paths = [s.path for s in samples[:3]]
    results: list[R.LoadedImage] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(paths[0]))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and all(r is results[0] for r in results)
    cache.get(paths[1])
    cache.get(paths[0])  # refreshes paths[0]
    cache.get(paths[2])  # evicts paths[1], the least recently used
    assert len(calls) == 3
    cache.get(paths[0])
    assert len(calls) == 3
    cache.get(paths[1])
    assert len(calls) == 4
    uncached = R.ImageCache(0)
    uncached.get(paths[0])
    uncached.get(paths[0])
    assert len(calls) == 6


def test_repeated_renders_do_not_alter_the_cached_values(loaded: dict) -> None:
    image = loaded[RESCALED]
    before = image.values.copy()
    first = R.render(image, size=300).data
    R.render(image, preset="bone", size=300)
    R.render(image, wc=10.0, ww=20.0, size=300)
    assert np.array_equal(image.values, before)
    assert R.render(image, size=300).data == first


# -- the HTTP routes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path):  # type: ignore[no-untyped-def]
    env = make_web_env(tmp_path_factory.mktemp("render-web"))
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_station_row(env, "STATION2", "Trạm Y tế Cần Giờ")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    env.big = store_dicom(env, shared_dicom / BIG, "STATION1")  # type: ignore[attr-defined]
    env.other = store_dicom(env, shared_dicom / MONO1, "STATION2")  # type: ignore[attr-defined]
    env.broken = store_dicom(env, shared_dicom / RESCALED, "STATION1")  # type: ignore[attr-defined]
    with env.db.session() as session:
        instance = session.query(Instance).filter(Instance.sop_instance_uid == env.broken[1]).one()
        (env.data_dir / instance.file_path).write_bytes(b"DICM? no: this file was damaged on disk")
    return env


def _url(study_sop: tuple[str, str], suffix: str = "render") -> str:
    return f"/studies/{study_sop[0]}/images/{study_sop[1]}/{suffix}"


def test_render_route_serves_a_small_private_jpeg(web) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_for(web, "st1")
    started = time.perf_counter()
    response = client.get(_url(web.big))
    elapsed = time.perf_counter() - started
    print(f"\nfirst view over HTTP of {BIG}: {len(response.content) / 1024:.0f} KB in {1000 * elapsed:.0f} ms")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"].startswith("private")
    assert max(_decode(response.content).shape) == 1024 and len(response.content) < 400 * 1024
    bigger = client.get(_url(web.big), params={"size": 2048, "preset": "lung"})
    assert _decode(bigger.content).shape == (2048, 2048)
    tiny = client.get(_url(web.big), params={"size": 1, "format": "png"})
    assert tiny.headers["content-type"] == "image/png" and _decode(tiny.content).shape == (64, 64)
    custom = client.get(_url(web.big), params={"wc": 2000, "ww": 1500})
    assert custom.status_code == 200 and custom.headers["x-window"].startswith("wc=")


def test_windows_route_lists_the_presets(web) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_for(web, "spec")
    info = client.get("/api" + _url(web.big, "windows")).json()
    assert set(info["presets"]) == {"dicom", "lung", "mediastinum", "bone"}
    assert (info["rows"], info["columns"], info["photometric"]) == (2800, 2800, "MONOCHROME2")


def test_render_route_errors_are_clear(web) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_for(web, "st1")
    bad = client.get(_url(web.big), params={"wc": 100, "ww": -1})
    assert bad.status_code == 422 and "greater than 0" in bad.text and "Traceback" not in bad.text
    assert client.get(_url(web.big), params={"wc": "nan", "ww": 10}).status_code == 422
    assert client.get(_url(web.big), params={"preset": "brain"}).status_code == 422
    broken = client.get(_url(web.broken))
    assert broken.status_code == 422
    assert "cannot be displayed" in broken.text and "Traceback" not in broken.text
    assert str(web.data_dir) not in broken.text  # no server paths in the message
    api = client.get("/api" + _url(web.broken, "windows"))
    assert api.status_code == 422 and "cannot be displayed" in api.json()["detail"]


def test_a_station_cannot_render_another_stations_image(web) -> None:  # type: ignore[no-untyped-def]
    client, _ = client_for(web, "st1")
    assert client.get(_url(web.other)).status_code == 404
    assert client.get("/api" + _url(web.other, "windows")).status_code == 404
    assert client.get(_url((web.big[0], web.other[1]))).status_code == 404  # image of another study
    anonymous, _ = client_for(web)
    assert anonymous.get("/api" + _url(web.big, "windows")).status_code == 401
