"""Real-world pixels: every quirky kind of CR/DX/SC file is shown and triaged as dcmtk shows it.

Each kind is checked on the shared example of it (``../shared/data/dicom-realworld``) and on
inputs built here from the shared sample files, against a reference decoder run in the test
itself: dcmtk's ``dcmj2pnm`` (``dcml2pnm`` for JPEG-LS). The grey images must correlate at
>= 0.95 and their means must be within 30 grey levels, for both what the model gets
(``pixels.read_dicom_display``) and what the viewer shows (``render.render``), which also
pins the polarity: a negative image correlates at about -1.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from e2e_helpers import SHARED_DICOM
from xray_triage.pipeline import render as R
from xray_triage.pipeline.pixels import (
    PixelError,
    dataset_to_display,
    parse_decimal_string,
    read_any_display,
    read_dicom_display,
)

REALWORLD = SHARED_DICOM.parent / "dicom-realworld"
CXR_IMAGES = SHARED_DICOM.parent / "cxr" / "images"
MIN_CORRELATION = 0.95
MAX_MEAN_GREY_DIFFERENCE = 30.0

pytestmark = pytest.mark.usefixtures("dcmtk_render")


@pytest.fixture(scope="session")
def dcmtk_render() -> None:
    missing = [tool for tool in ("dcmj2pnm", "dcml2pnm", "img2dcm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"dcmtk tools not installed: {', '.join(missing)} (apt-get install dcmtk)")
    if not REALWORLD.is_dir():
        pytest.skip(f"shared real-world DICOM not found: {REALWORLD}")


def shared(name: str) -> Path:
    (path,) = REALWORLD.glob(f"{name}*.dcm")
    return path


def sample(name: str) -> Dataset:
    return pydicom.dcmread(SHARED_DICOM / f"{name}.dcm")


# -- the reference decoder and the comparison -----------------------------------------------------


def dcmtk_grey(path: Path, tmp_path: Path, *options: str) -> np.ndarray:
    """dcmtk's picture of ``path`` as 0-255 grey (colour output -> BT.601 luminance, as PIL's "L")."""
    ts = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID", "")
    tool = "dcml2pnm" if str(ts).startswith("1.2.840.10008.1.2.4.8") else "dcmj2pnm"
    out = tmp_path / f"{path.stem}.{tool}.png"
    proc = subprocess.run([tool, "+on", *options, str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{tool} {options} {path.name}: {proc.stdout}{proc.stderr}"
    return np.asarray(Image.open(out).convert("L"), dtype=np.float64)


def model_grey(path: Path) -> np.ndarray:
    """What the model is given, before its resize, as 0-255 grey."""
    return read_dicom_display(path).pixels.astype(np.float64) * 255.0


def viewer_grey(path: Path, **window: object) -> np.ndarray:
    """The viewer's default picture at full size, as the render route makes it."""
    image = R.load_image(path)
    picture = R.render(image, size=max(image.shape), fmt="png", **window)  # type: ignore[arg-type]
    return np.asarray(Image.open(io.BytesIO(picture.data)).convert("L"), dtype=np.float64)


def assert_like_reference(ours: np.ndarray, reference: np.ndarray, what: str, mask: np.ndarray | None = None) -> None:
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    a, b = (ours, reference) if mask is None else (ours[mask], reference[mask])
    correlation = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    difference = abs(float(a.mean()) - float(b.mean()))
    assert correlation >= MIN_CORRELATION, f"{what}: correlation {correlation:.3f} with the reference decoder"
    assert difference <= MAX_MEAN_GREY_DIFFERENCE, f"{what}: mean grey {a.mean():.1f} vs reference {b.mean():.1f}"


def assert_shown_like_dcmtk(path: Path, tmp_path: Path, *options: str, mask: np.ndarray | None = None) -> None:
    reference = dcmtk_grey(path, tmp_path, *options)
    assert_like_reference(model_grey(path), reference, f"{path.name}: model input", mask)
    assert_like_reference(viewer_grey(path), reference, f"{path.name}: viewer", mask)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def native_copy(name: str) -> tuple[Dataset, np.ndarray]:
    """A shared sample as an uncompressed dataset and its stored values (uint16)."""
    ds = sample(name)
    values = ds.pixel_array.astype(np.uint16)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = values.tobytes()
    return ds, values


# -- 1. VOI LUT whose descriptor overstates its bit depth -------------------------------------------


def test_shared_voi_lut_with_overstated_bits_is_not_washed_out(tmp_path: Path) -> None:
    assert_shown_like_dcmtk(shared("rwd_01"), tmp_path, "+Wl", "1", "+Mv")


def test_built_voi_lut_with_overstated_bits(tmp_path: Path) -> None:
    """A gamma-shaped 12-bit VOI LUT declared as 16 bits per entry, on a MONOCHROME2 DX."""
    ds, _ = native_copy("dev_01_dx_pa_explicit_window")
    del ds.WindowCenter, ds.WindowWidth
    lut = np.rint(4095 * (np.arange(4096) / 4095.0) ** 0.7).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    path = save(ds, tmp_path / "voi_lut_16_declared_12_used.dcm")
    assert_shown_like_dcmtk(path, tmp_path, "+Wl", "1", "+Mv")
    assert read_dicom_display(path).window == "voi_lut"


def test_voi_lut_whose_descriptor_is_right_keeps_its_range(tmp_path: Path) -> None:
    """A true 16-bit LUT (data up to 65535) is still divided by 65535: nothing is stretched."""
    ds, _ = native_copy("dev_01_dx_pa_explicit_window")
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.rint(np.linspace(0, 65535, 4096)).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    path = save(ds, tmp_path / "voi_lut_16.dcm")
    assert_shown_like_dcmtk(path, tmp_path, "+Wl", "1")


# -- 2. Presentation LUT Shape INVERSE ------------------------------------------------------------


def test_shared_monochrome2_with_inverse_is_positive(tmp_path: Path) -> None:
    assert_shown_like_dcmtk(shared("rwd_02"), tmp_path, "+Wi", "1")


def test_shared_monochrome1_with_inverse_is_inverted_once(tmp_path: Path) -> None:
    assert_shown_like_dcmtk(shared("rwd_03"), tmp_path, "+Wi", "1")


def test_built_monochrome2_with_inverse_and_no_window(tmp_path: Path) -> None:
    """Stored negative (4095 - v) with INVERSE: the same picture as the positive original."""
    ds, values = native_copy("dev_07_dx_pa_utf8_name")
    positive = model_grey(save(ds, tmp_path / "positive.dcm"))
    ds.PixelData = (4095 - values).astype(np.uint16).tobytes()
    ds.PresentationLUTShape = "INVERSE"
    path = save(ds, tmp_path / "mono2_inverse.dcm")
    assert_shown_like_dcmtk(path, tmp_path, "+Wm")
    assert_like_reference(model_grey(path), positive, "same polarity as the positive original")


def test_built_monochrome1_with_inverse_is_inverted_once(tmp_path: Path) -> None:
    ds, _ = native_copy("dev_02_cr_ap_mono1_implicit")
    plain = model_grey(save(ds, tmp_path / "mono1.dcm"))
    ds.PresentationLUTShape = "INVERSE"
    path = save(ds, tmp_path / "mono1_inverse.dcm")
    assert_shown_like_dcmtk(path, tmp_path, "+Wm")
    assert np.array_equal(model_grey(path), plain)


def test_inverse_window_drag_preview_knows_the_polarity(tmp_path: Path) -> None:
    """The viewer's client-side window preview reads ``inverted`` from the windows info."""
    info = R.windows_info(R.load_image(shared("rwd_02")))
    assert info["inverted"] is True and info["photometric"] == "MONOCHROME2"
    assert R.windows_info(R.load_image(SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"))["inverted"] is False


# -- 3. Pixel Padding with no window ----------------------------------------------------------------


def test_shared_padding_is_left_out_of_the_window(tmp_path: Path) -> None:
    path = shared("rwd_04")
    ds = pydicom.dcmread(path)
    inside = ds.pixel_array != int(ds.PixelPaddingValue)
    assert_shown_like_dcmtk(path, tmp_path, "+Wn", mask=inside)
    # The lungs get the grey levels (with the padding in the window: a few dozen of them).
    grey = model_grey(path)[inside]
    assert np.percentile(grey, 99) - np.percentile(grey, 1) > 150


def test_built_padding_range_is_left_out_of_every_derived_window(tmp_path: Path) -> None:
    """Padding 0..50 (Pixel Padding Range Limit) around data shifted to 1000..5095."""
    ds, values = native_copy("dev_07_dx_pa_utf8_name")
    data = values.astype(np.uint16) + 1000
    rng = np.random.default_rng(7)
    border = np.zeros(data.shape, dtype=bool)
    border[:100, :] = border[-100:, :] = border[:, :120] = border[:, -120:] = True
    data[border] = rng.integers(0, 51, size=int(border.sum()), dtype=np.uint16)
    ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelData = data.tobytes()
    ds.PixelPaddingValue = 0
    ds.PixelPaddingRangeLimit = 50
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        ds[keyword].VR = "US"
    path = save(ds, tmp_path / "padding_range.dcm")
    lo, hi = float(data[~border].min()), float(data[~border].max())
    assert_shown_like_dcmtk(path, tmp_path, "+Ww", str((lo + hi) / 2), str(hi - lo), mask=~border)
    # The viewer's derived presets and value range ignore the padding too.
    image = R.load_image(path)
    assert image.value_range == (lo, hi)
    assert all(window.center - window.width / 2 >= lo - 1 for window in image.presets.values())


# -- 4. Colour images of a chest ------------------------------------------------------------------


def test_shared_rgb_secondary_capture_is_shown_and_triaged(tmp_path: Path) -> None:
    path = shared("rwd_05")
    assert_shown_like_dcmtk(path, tmp_path)
    assert read_dicom_display(path).window == "colour"


def test_built_jpeg_baseline_ybr_full_422_screenshot(tmp_path: Path) -> None:
    """A console's JPEG screenshot wrapped by dcmtk's img2dcm: JPEG baseline, YBR_FULL_422."""
    png = sorted(CXR_IMAGES.glob("*.png"))[0]
    jpeg = tmp_path / "screenshot.jpg"
    Image.open(png).convert("RGB").resize((640, 640)).save(jpeg, quality=90, subsampling=1)  # 4:2:2
    path = tmp_path / "screenshot.dcm"
    proc = subprocess.run(
        ["img2dcm", "-k", "BodyPartExamined=CHEST", "-k", "Modality=OT", str(jpeg), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.SamplesPerPixel == 3
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    assert_shown_like_dcmtk(path, tmp_path)


def test_built_rgb_planar_configuration_1(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared("rwd_05"))
    rgb = ds.pixel_array
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    path = save(ds, tmp_path / "rgb_planar.dcm")
    assert_shown_like_dcmtk(path, tmp_path)


def test_inconsistent_samples_per_pixel_is_a_clear_error() -> None:
    ds = sample("dev_01_dx_pa_explicit_window")
    ds.PhotometricInterpretation = "RGB"  # but one sample per pixel
    with pytest.raises(PixelError, match=r"\(0028,0002\).*\(0028,0004\)") as error:
        dataset_to_display(ds, source="image 1")
    assert error.value.kind == "unsupported"


# -- 5. Invalid decimal strings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,0", 1.0), ("2047,5", 2047.5), ("-1024,0", -1024.0), (" 0,25 ", 0.25), ("1.5", 1.5), ("3", 3.0)],
)
def test_decimal_comma_is_read_where_unambiguous(text: str, expected: float) -> None:
    assert parse_decimal_string(text) == expected


@pytest.mark.parametrize("text", ["1,000", "1.234,5", "abc", "", "nan", "inf", "1,2,3"])
def test_ambiguous_or_invalid_decimal_strings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_decimal_string(text)


def test_shared_comma_decimals_are_read(tmp_path: Path) -> None:
    path = shared("rwd_06")
    assert_shown_like_dcmtk(path, tmp_path, "+Ww", "2047.5", "4096")
    image = read_dicom_display(path)
    assert image.window == "window" and any("2047,5" in note for note in image.notes)


def test_built_comma_decimals_in_rescale_and_window_of_a_jpeg_ls_file(tmp_path: Path) -> None:
    """dev_04: Rescale 2 / -1024 and a window, all written with commas, JPEG-LS pixel data."""
    ds = sample("dev_04_cr_pa_rescale_jpegls")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = dataset_to_display(sample("dev_04_cr_pa_rescale_jpegls")).pixels
    for keyword, text in (
        ("RescaleSlope", "2,0"),
        ("RescaleIntercept", "-1024,0"),
        ("WindowCenter", f"{center:.1f}".replace(".", ",")),
        ("WindowWidth", f"{width:.1f}".replace(".", ",")),
    ):
        ds[keyword]._value = text  # written as the device wrote it, bypassing pydicom's validation
    path = save(ds, tmp_path / "comma_jpegls.dcm")
    assert b"-1024,0" in path.read_bytes()
    image = read_dicom_display(path)
    assert np.abs(image.pixels - expected).max() < 1e-3
    assert_like_reference(viewer_grey(path), expected * 255.0, "viewer")


def test_ambiguous_rescale_is_ignored_with_a_note_and_the_image_still_shown(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared("rwd_06"))
    ds["RescaleSlope"]._value = "1,000"
    ds["WindowWidth"]._value = "wide"
    path = save(ds, tmp_path / "ambiguous.dcm")
    image = read_dicom_display(path)
    assert image.window == "minmax"
    assert any("RescaleSlope" in note and "ignored" in note for note in image.notes)
    assert any("WindowWidth" in note and "ignored" in note for note in image.notes)
    assert_shown_like_dcmtk(path, tmp_path, "+Wm")


# -- 6. High Bit not Bits Stored - 1 -----------------------------------------------------------


def test_samples_at_the_top_of_the_word_are_shifted_down_as_dcmtk_does(tmp_path: Path) -> None:
    ds, values = native_copy("dev_07_dx_pa_utf8_name")
    plain = model_grey(save(ds, tmp_path / "plain.dcm"))
    ds.HighBit = 15
    ds.PixelData = ((values << 4) | 0x5).astype(np.uint16).tobytes()  # junk in the 4 low bits
    path = save(ds, tmp_path / "high_bit_15.dcm")
    assert_shown_like_dcmtk(path, tmp_path, "+Wm")
    assert np.array_equal(model_grey(path), plain)


def test_impossible_high_bit_is_refused_with_the_tag_named(tmp_path: Path) -> None:
    ds, _ = native_copy("dev_07_dx_pa_utf8_name")
    ds.HighBit = 5  # below Bits Stored - 1
    with pytest.raises(PixelError, match=r"High Bit \(0028,0102\) 5 .*Bits Stored \(0028,0101\) 12"):
        dataset_to_display(ds, source="image 1")


# -- 7. Files with no preamble and no File Meta ---------------------------------------------------


def test_shared_raw_data_set_is_read_by_offline_tools(tmp_path: Path) -> None:
    path = shared("rwd_07")
    assert path.read_bytes()[128:132] != b"DICM"
    assert_shown_like_dcmtk(path, tmp_path, "+Wm")


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_built_raw_data_sets_read_like_the_file(tmp_path: Path, implicit: bool) -> None:
    ds, _ = native_copy("dev_01_dx_pa_explicit_window")
    expected = model_grey(save(ds, tmp_path / "with_meta.dcm"))
    raw = tmp_path / "raw.dcm"
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(raw, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert raw.read_bytes()[:4] == b"\x08\x00\x05\x00"  # starts with (0008,0005): no preamble
    assert np.array_equal(model_grey(raw), expected)


def test_predict_reads_a_raw_data_set(tmp_path: Path, tiny_model: Path) -> None:
    from e2e_helpers import run_cli

    proc = run_cli("predict", shared("rwd_07"), "--model", tiny_model, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"probabilities"' in proc.stdout


# -- decompression bombs and huge images (hardening) ----------------------------------------------


def test_declared_huge_image_is_refused_before_decoding() -> None:
    ds = sample("dev_07_dx_pa_utf8_name")
    ds.Rows = ds.Columns = 16000  # 256 megapixels declared; the pixel data is far too short
    with pytest.raises(PixelError, match=r"16000 x 16000 pixels \(256 megapixels\).*not decoded") as error:
        dataset_to_display(ds, source="image 1")
    assert error.value.kind == "too_large"
    with pytest.raises(PixelError, match="megapixels"):
        dataset_to_display(ds, source="image 1", max_frame_pixels=10**9 // 10)  # 100 MP limit: still over


def test_compressed_stream_declaring_more_than_the_header_is_refused(tmp_path: Path) -> None:
    """A JPEG-LS stream of 3000 x 3000 inside a header saying 64 x 64: never handed to a decoder."""
    import jpeg_ls
    from pydicom.encaps import encapsulate

    ds = sample("dev_04_cr_pa_rescale_jpegls")
    ds.Rows = ds.Columns = 64
    ds.PixelData = encapsulate([bytes(jpeg_ls.encode(np.zeros((3000, 3000), dtype=np.uint16)))])
    with pytest.raises(PixelError, match=r"compressed stream is 3000 x 3000 pixels.*64 x 64"):
        dataset_to_display(ds, source="image 1")
    with pytest.raises(PixelError, match=r"compressed stream declares 3000 x 3000.*over the limit"):
        dataset_to_display(ds, source="image 1", max_frame_pixels=1_000_000)


def test_frame_limit_applies_to_the_viewer_and_to_pictures(tmp_path: Path) -> None:
    path = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"  # 1024 x 1024 = 1.05 megapixels
    with pytest.raises(PixelError, match="over the limit of 1 megapixels"):
        R.load_image(path, max_frame_pixels=1_000_000)
    assert R.load_image(path, max_frame_pixels=2_000_000).shape == (1024, 1024)
    png = tmp_path / "big.png"
    Image.new("L", (1200, 1000)).save(png)
    with pytest.raises(PixelError, match="over the limit"):
        read_any_display(png, max_frame_pixels=1_000_000)


def test_only_the_first_frame_of_a_multiframe_image_is_decoded() -> None:
    ds, values = native_copy("dev_07_dx_pa_utf8_name")
    expected = dataset_to_display(ds).pixels
    ds.NumberOfFrames = 3
    ds.PixelData = np.concatenate([values, 4095 - values, values]).tobytes()
    assert np.array_equal(dataset_to_display(ds).pixels, expected)


# -- no error inside pixel handling escapes as anything but PixelError ----------------------------


HOSTILE_EDITS = {
    "window width not a number": lambda ds: setattr(ds["WindowWidth"], "_value", "abc"),
    "window width zero": lambda ds: setattr(ds, "WindowWidth", 0),
    "rescale slope NaN": lambda ds: setattr(ds["RescaleSlope"], "_value", "NaN"),
    "bits stored zero": lambda ds: setattr(ds, "BitsStored", 0),
    "rows zero": lambda ds: setattr(ds, "Rows", 0),
    "rows too many": lambda ds: setattr(ds, "Rows", 2048),
    "empty VOI LUT data": lambda ds: setattr(ds, "VOILUTSequence", Sequence([_empty_lut()])),
    "unknown photometric": lambda ds: setattr(ds, "PhotometricInterpretation", "HSV"),
    "padding value text": lambda ds: setattr(ds, "PixelPaddingValue", 0),
    "presentation LUT shape odd": lambda ds: setattr(ds, "PresentationLUTShape", "LIN OD"),
    "truncated pixel data": lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]),
}


def _empty_lut() -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [0, 0, 16]
    item.LUTData = b""
    return item


@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_hostile_headers_give_an_image_or_a_pixel_error(edit: str) -> None:
    ds = sample("dev_01_dx_pa_explicit_window")
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    HOSTILE_EDITS[edit](ds)
    try:
        image = dataset_to_display(ds, source="image 1")
    except PixelError as exc:
        assert str(exc).startswith("image 1: "), str(exc)
    else:
        assert np.isfinite(image.pixels).all() and image.pixels.min() >= 0 and image.pixels.max() <= 1
