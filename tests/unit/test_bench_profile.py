"""The gateway profile's stage sorting (benchmarks/profile_ingest.py), on py-spy's raw format."""

from __future__ import annotations

from benchmarks.profile_ingest import OTHER, breakdown, stage_of

RECEIVE = "thread (1): Thread-3;Thread.run (threading.py:982);DULServiceProvider.run_reactor (pynetdicom/dul.py:419)"
COMMIT = (
    "thread (2): AcceptorThread;Association._run_reactor (pynetdicom/association.py:730);"
    "DicomGateway._on_store (dicom_gateway/scp.py:550);Ingestor.ingest_file (xray_triage/store/ingest.py:200);"
    "Ingestor._commit (xray_triage/store/ingest.py:250);Ingestor._file_batch (xray_triage/store/ingest.py:290)"
)
RENAME = COMMIT + ";Ingestor._file_one (xray_triage/store/ingest.py:400);place_staged (xray_triage/store/files.py:140)"
CHECK = (
    "thread (2): AcceptorThread;DicomGateway._on_store (dicom_gateway/scp.py:550);"
    "Ingestor.ingest_file (xray_triage/store/ingest.py:190);incompleteness (xray_triage/store/completeness.py:99)"
)


def test_a_stack_goes_to_its_innermost_named_stage_in_table_order() -> None:
    assert stage_of(RENAME).startswith("file write")  # the rename inside the commit is file work
    assert stage_of(COMMIT).startswith("placement, rows, commit")
    assert stage_of(CHECK) == "completeness check"
    assert stage_of(RECEIVE).startswith("pynetdicom receive")
    assert stage_of("thread (9): MainThread;Server.run (uvicorn/server.py:60)") == OTHER


def test_breakdown_gives_shares_of_samples() -> None:
    raw = f"{RECEIVE} 30\n{COMMIT} 50\n{CHECK} 20\nnot a sample line\n"
    shares = breakdown(raw)
    assert shares["completeness check"] == 20.0
    assert shares["placement, rows, commit (SQLAlchemy, SQLite)"] == 50.0
    assert sum(shares.values()) == 100.0
    assert breakdown("")[OTHER] == 0.0
