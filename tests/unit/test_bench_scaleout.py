"""The scale-out benchmark's pure summaries: rates, goal ratios (met / MISSED), per-image e2e, stage medians.

Speed itself is never asserted in a test (benchmarks/README.md): these check the arithmetic the
report's figures and its met / MISSED verdicts come from.
"""

from __future__ import annotations

import math

from benchmarks.scaleout import cpu_split, per_image_e2e_s, proc_cpu_s, rates, stage_medians, target
from benchmarks.server import InstanceRecord


def _record(
    uid: str, timings: dict[str, float], receive: float | None, store: float | None
) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=uid,
        ai_status="done",
        transfer_syntax="1.2.840.10008.1.2.1",
        file_size=1,
        received_at=None,
        job_started_at=None,
        job_finished_at=None,
        result_created_at=1.0,
        timings_ms=timings,
        receive_ms=receive,
        store_ms=store,
    )


def test_rates_are_per_second_in_megabytes_of_ten_to_the_six() -> None:
    assert rates(8, 16_000_000, 2.0) == {"seconds": 2.0, "images_per_s": 4.0, "mb_per_s": 8.0}


def test_rates_of_an_empty_interval_are_none_not_infinite() -> None:
    assert rates(8, 16_000_000, 0.0)["images_per_s"] is None
    assert rates(8, 16_000_000, -1.0)["mb_per_s"] is None


def test_target_is_met_at_and_above_the_goal_and_missed_below() -> None:
    assert target("x", 80.0, 100.0, 0.8) == {"metric": "x", "target": 0.8, "measured": 0.8, "met": True}
    below = target("x", 79.0, 100.0, 0.8)
    assert below["measured"] == 0.79 and below["met"] is False
    assert target("x", 150.0, 100.0, 0.8)["measured"] == 1.5


def test_target_without_a_figure_is_missed_with_nothing_measured() -> None:
    for measured, reference in ((None, 100.0), (80.0, None), (80.0, 0.0)):
        verdict = target("x", measured, reference, 0.8)
        assert verdict["measured"] is None and verdict["met"] is False


def test_per_image_e2e_runs_from_its_own_senders_spawn_and_skips_untriaged_images() -> None:
    sent = {"a": 100.0, "b": 100.0, "c": 103.0}
    committed = {"a": 101.5, "b": None, "c": 104.25, "stranger": 200.0}
    assert sorted(per_image_e2e_s(sent, committed)) == [1.25, 1.5]


def test_stage_medians_take_every_timer_and_the_gateways_own() -> None:
    records = [
        _record("a", {"decode": 10, "inference": 100}, receive=5.0, store=20.0),
        _record("b", {"decode": 30, "inference": 300, "queue": 7}, receive=15.0, store=None),
        _record("c", {"decode": 20, "inference": "n/a"}, receive=10.0, store=40.0),
    ]
    medians = stage_medians(records)
    assert medians["decode"] == 20.0
    assert medians["inference"] == 200.0  # a non-number is left out, not counted as zero
    assert medians["queue"] == 7.0
    assert medians["receive"] == 10.0
    assert medians["store"] == 30.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in medians.values())


def test_cpu_split_is_per_process_during_and_after_ingest() -> None:
    before = {"0-gateway": 10.0, "1-worker": 5.0, "2-worker": 1.0}
    mid = {"0-gateway": 14.5, "1-worker": 6.0, "2-worker": 1.5}
    after = {"0-gateway": 15.0, "1-worker": 9.25}  # 2-worker gone: left out, not a negative figure
    assert cpu_split(before, mid, after) == {
        "0-gateway": {"during_ingest_s": 4.5, "after_ingest_s": 0.5},
        "1-worker": {"during_ingest_s": 1.0, "after_ingest_s": 3.25},
    }


def test_proc_cpu_s_reads_this_process_and_none_for_a_missing_one() -> None:
    import os

    start = proc_cpu_s(os.getpid())
    assert start is not None and start >= 0
    sum(i * i for i in range(200_000))  # some CPU so the counter cannot go backwards
    later = proc_cpu_s(os.getpid())
    assert later is not None and later >= start
    assert proc_cpu_s(2**22 + 12345) is None
