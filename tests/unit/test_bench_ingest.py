"""The ingest benchmark's pure parts: receiver rotation, spreads over rounds, within-round ratios,
goals (met / MISSED), the small test image and the Orthanc configuration.

Speed itself is never asserted in a test (benchmarks/README.md): these check the arithmetic the
report's figures and its verdicts come from.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pydicom
import pytest

from benchmarks import ingest
from benchmarks.common import BenchSetupError
from benchmarks.dicom_files import EXPLICIT_LE, ImageInfo
from benchmarks.ingest import (
    RECEIVERS,
    SMALL_SOURCE,
    IngestPlan,
    Workload,
    at_least,
    at_most,
    build_workloads,
    cpu_per_image,
    make_small_image,
    markdown_lines,
    per_round_ratios,
    ratio,
    rotation,
    spread,
    summarize_workload,
    workload_targets,
)
from benchmarks.orthanc import CONFIG_KEYS_SET, OrthancReceiver, orthanc_config


def _info(name: str, size: int) -> ImageInfo:
    return ImageInfo(name, Path(f"/x/{name}.dcm"), EXPLICIT_LE, 512, 512, size)


def _rates(mb_s: float, img_s: float, **extra: float) -> dict[str, float]:
    return {"mb_per_s": mb_s, "images_per_s": img_s, **extra}


def test_rotation_puts_every_receiver_first_once_over_as_many_rounds() -> None:
    orders = [rotation(RECEIVERS, r) for r in range(len(RECEIVERS))]
    assert [o[0] for o in orders] == list(RECEIVERS)
    assert all(sorted(o) == sorted(RECEIVERS) for o in orders)
    assert rotation(RECEIVERS, len(RECEIVERS) + 1) == orders[1]
    assert rotation([], 3) == []


def test_spread_is_median_min_max_and_leaves_out_missing_rounds() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([1.0, None, 2.0, float("nan")]) == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    assert spread([None]) == {"median": None, "min": None, "max": None, "n": 0}


def test_ratio_is_none_without_a_positive_denominator() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_ratios_are_taken_within_each_round_not_across_rounds() -> None:
    rounds = [
        {"ours_on": _rates(10.0, 1), "orthanc": _rates(20.0, 1)},
        {"ours_on": _rates(30.0, 1), "orthanc": _rates(10.0, 1)},
        {"ours_on": _rates(30.0, 1), "orthanc": None},  # Orthanc n/a this round
    ]
    assert per_round_ratios(rounds, "ours_on", "orthanc", "mb_per_s") == [0.5, 3.0, None]
    # the median of per-round ratios (1.75), not the ratio of medians (30 / 15 = 2.0)
    assert spread(per_round_ratios(rounds, "ours_on", "orthanc", "mb_per_s"))["median"] == 1.75


def test_goals_are_met_at_the_goal_and_missed_below_or_unmeasured() -> None:
    assert at_least("w", "m", 1.0, 1.0)["met"] is True
    assert at_least("w", "m", 0.999, 1.0)["met"] is False
    assert at_least("w", "m", None, 1.0) == {
        "where": "w",
        "metric": "m",
        "target": 1.0,
        "measured": None,
        "met": False,
    }
    assert at_most("w", "rss", 500.0, 500.0)["met"] is True
    assert at_most("w", "rss", 500.1, 500.0)["met"] is False
    assert at_most("w", "rss", None, 500.0)["met"] is False


def test_cpu_per_image_needs_both_readings() -> None:
    assert cpu_per_image(10.0, 12.0, 4) == 0.5
    assert cpu_per_image(None, 12.0, 4) is None
    assert cpu_per_image(10.0, None, 4) is None
    assert cpu_per_image(10.0, 12.0, 0) is None


def test_workload_summary_spreads_each_receiver_and_keeps_the_rounds() -> None:
    w = Workload("small-k4", _info("small", 500_000), 40, 4)
    rounds = [
        {
            "storescp": _rates(100.0, 200.0),
            "orthanc": _rates(40.0, 80.0, cpu_s_per_image=0.01, peak_rss_mb=300.0),
            "ours_off": _rates(50.0, 100.0, cpu_s_per_image=0.02),
            "ours_on": _rates(20.0, 40.0, all_triaged_s=8.0),
        },
        {
            "storescp": _rates(120.0, 240.0),
            "orthanc": _rates(40.0, 80.0, cpu_s_per_image=0.03, peak_rss_mb=310.0),
            "ours_off": _rates(60.0, 120.0, cpu_s_per_image=0.02),
            "ours_on": _rates(40.0, 80.0, all_triaged_s=6.0),
        },
    ]
    s = summarize_workload(w, rounds)
    assert s["label"] == "40 x 0.5 MB, 4 senders"
    assert s["receivers"]["storescp"]["mb_per_s"] == {"median": 110.0, "min": 100.0, "max": 120.0, "n": 2}
    assert "cpu_s_per_image" not in s["receivers"]["storescp"]  # never measured: absent, not zero
    assert s["receivers"]["orthanc"]["cpu_s_per_image"]["median"] == 0.02
    assert s["receivers"]["ours_on"]["all_triaged_s"]["median"] == 7.0
    assert s["ratios"]["ours_off/orthanc"] == {"median": 1.375, "min": 1.25, "max": 1.5, "n": 2}
    assert s["ratios"]["ours_on/storescp"]["median"] == pytest.approx((0.2 + 1 / 3) / 2, abs=1e-3)
    assert s["per_round"] == rounds


def test_a_receiver_absent_in_every_round_is_none() -> None:
    w = Workload("small-k1", _info("small", 500_000), 40, 1)
    s = summarize_workload(
        w, [{"storescp": _rates(1.0, 2.0), "orthanc": None, "ours_off": None, "ours_on": None}]
    )
    assert s["receivers"]["orthanc"] is None
    assert s["ratios"]["ours_on/orthanc"]["median"] is None


def test_targets_come_from_the_workloads_the_issue_names() -> None:
    big, small = _info("big", 15_700_000), _info("small", 500_000)
    rounds_big = [{"ours_on": _rates(30.0, 2), "orthanc": _rates(20.0, 1)}]
    rounds_small = [
        {
            "ours_on": _rates(9.0, 18),
            "ours_off": _rates(12.0, 24),
            "ours_multi": _rates(15.0, 30),
            "orthanc": _rates(10.0, 20),
        }
    ]
    summaries = [
        summarize_workload(Workload("big-k1", big, 48, 1), rounds_big),
        summarize_workload(Workload("big-k4", big, 48, 4), rounds_big),
        summarize_workload(Workload("small-k4", small, 400, 4), rounds_small),
    ]
    targets = workload_targets(summaries)
    assert [(t["metric"], t["measured"], t["met"]) for t in targets] == [
        ("MB/s vs Orthanc", 1.5, True),  # big, 4 senders, triage on
        ("img/s vs Orthanc", 1.2, True),  # small, 4 senders, triage off
        ("img/s vs Orthanc", 0.9, False),  # small, 4 senders, triage on (acknowledged)
        ("img/s vs Orthanc", 1.5, True),  # small, 4 senders, triage on, several gateway processes
    ]
    assert "triage off" in targets[1]["where"] and "triage on" in targets[2]["where"]
    assert "gateway processes" in targets[3]["where"]


def test_quick_plan_has_only_the_small_workloads() -> None:
    big, small = _info("big", 15_700_000), _info("small", 500_000)
    quick = build_workloads(IngestPlan.for_mode(True), big, small)
    assert [(w.key, w.images, w.senders) for w in quick] == [("small-k1", 40, 1), ("small-k4", 40, 4)]
    full = build_workloads(IngestPlan.for_mode(False), big, small)
    assert [w.key for w in full] == ["big-k1", "big-k4", "small-k1", "small-k4"]
    assert build_workloads(IngestPlan.for_mode(False), None, small)[0].key == "small-k1"


def test_small_image_is_the_source_averaged_2x2_in_explicit_le(tmp_path: Path) -> None:
    if not SMALL_SOURCE.is_file():
        pytest.skip(f"shared test data missing: {SMALL_SOURCE}")
    info = make_small_image(SMALL_SOURCE, tmp_path / "small.dcm")
    src, ds = pydicom.dcmread(SMALL_SOURCE), pydicom.dcmread(info.path)
    assert (info.rows, info.cols, info.transfer_syntax) == (512, 512, EXPLICIT_LE)
    assert 0.5e6 < info.size_bytes < 0.6e6
    assert ds.BitsAllocated == 16 and ds.pixel_array.dtype == src.pixel_array.dtype
    expected = src.pixel_array.astype(float).reshape(512, 2, 512, 2).mean(axis=(1, 3))
    assert np.abs(ds.pixel_array.astype(float) - expected).max() <= 0.5
    assert [float(v) for v in ds.ImagerPixelSpacing] == [2 * float(v) for v in src.ImagerPixelSpacing]


def test_orthanc_config_sets_exactly_the_listed_keys(tmp_path: Path) -> None:
    config = orthanc_config(tmp_path, 4242, 8042)
    assert tuple(config) == CONFIG_KEYS_SET
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is False
    assert config["DicomCheckCalledAet"] is False and config["Plugins"] == []
    assert (config["DicomPort"], config["HttpPort"]) == (4242, 8042)
    json.dumps(config)  # Orthanc reads it as JSON


def test_report_says_n_a_for_a_missing_orthanc() -> None:
    w = Workload("small-k4", _info("small", 500_000), 40, 4)
    s = summarize_workload(
        w,
        [
            {
                "storescp": _rates(100.0, 200.0),
                "orthanc": None,
                "ours_off": _rates(50.0, 100.0),
                "ours_on": None,
            }
        ],
    )
    text = "\n".join(
        markdown_lines({"plan": {"rounds": 1}, "workloads": [s], "orthanc": None, "targets": []})
    )
    assert "Orthanc (n/a)" in text
    row = next(line for line in text.splitlines() if line.startswith("| 40 x 0.5 MB"))
    assert row.count("n/a") >= 3  # Orthanc's column, ours on, and the ratios against them
    assert "100.0 MB/s, 200.0 img/s" in row and "0.50" in row  # off / storescp


def test_a_missing_orthanc_is_a_warning_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "orthanc_binary", lambda: None)
    warnings: list[str] = []
    with ExitStack() as stack:
        assert ingest._start_orthanc(tmp_path, stack, warnings) is None
    assert len(warnings) == 1 and "n/a" in warnings[0]


def test_orthanc_receiver_without_the_binary_raises_the_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("benchmarks.orthanc.orthanc_binary", lambda: None)
    with pytest.raises(BenchSetupError, match="Orthanc not installed"):
        OrthancReceiver(tmp_path).start()
