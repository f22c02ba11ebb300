"""``python -m benchmarks.outbox_writes [--instances 50] [--senders 4]``: write transactions per
ingested instance in one process, with the server's outbox consumers running.

What the gateway process does on SQLite, without the network: ``--senders`` threads ingest
``--instances`` new instances (copies of a shared test image with fresh UIDs) through
``Ingestor`` while the ``delivery`` consumer (no destination configured: images go nowhere) and
the ``results`` consumer (``results_enabled``) run in their background threads, exactly as
``serve`` builds them (``DeliveryRuntime``, ``serve.results_consumer``). Every write
transaction is a ``BEGIN IMMEDIATE`` on the database's write engine (SQLite's one write lock,
and a WAL fsync at its commit); an SQLAlchemy ``begin`` listener counts them by thread, the
consumers' threads being ``outbox-<name>``. Once every consumer has read up to the newest
event, the consumers are stopped (``stop`` may write a skipped-ahead position once) and the
counts are printed. A count, not a time: it is the same on a busy machine, apart from how many
events each consumer batch happens to take. Needs ``../shared/data/dicom``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import event as sa_event

from benchmarks import DEFAULT_MODEL_DIR, SHARED_DICOM
from xray_triage.inference.card import load_card
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.settings import Settings
from xray_triage.store import outbox
from xray_triage.store.db import open_database
from xray_triage.store.ingest import Ingestor, TriagePolicy
from xray_triage_server.delivery import DeliveryRuntime
from xray_triage_server.serve import results_consumer

IMAGE = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"
SETTLE_TIMEOUT_S = 60.0


def _copies(count: int) -> list[tuple[pydicom.Dataset, bytes]]:
    """``count`` copies of ``IMAGE`` with new Study/Series/SOP Instance UIDs, encoded as sent."""
    copies = []
    for _ in range(count):
        ds = pydicom.dcmread(IMAGE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append((ds, buffer.getvalue()))
    return copies


def _read_up_to(consumer: OutboxConsumer, latest: int) -> bool:
    """Whether ``consumer`` has worked off or skipped every event up to ``latest`` (before this
    change consumers had no in-memory position: their stored cursor says it)."""
    position = getattr(consumer, "position", None)
    if position is None:
        with consumer.db.read_session() as session:
            position = outbox.cursor(session, consumer.name)
    return position >= latest


def measure(data_dir: Path, instances: int, senders: int) -> dict[str, int]:
    """Write transactions by thread: ``ingest``, ``outbox-<consumer>``, ``stop`` (at ``stop``)."""
    settings = Settings(data_dir=data_dir, results_enabled=True)
    db = open_database(settings)
    delivery = DeliveryRuntime(settings, db)
    results = results_consumer(settings, db, load_card(DEFAULT_MODEL_DIR))
    consumers = [delivery.consumer] + ([results] if results is not None else [])
    ingestor = Ingestor(data_dir, db, TriagePolicy(settings.triage_modalities, settings.triage_body_parts))
    copies = _copies(instances)
    counts: Counter[str] = Counter()
    phase = {"name": "run"}

    def on_begin(_conn: object) -> None:
        thread = threading.current_thread().name
        counts[
            "stop" if phase["name"] == "stop" else "ingest" if thread.startswith("ingest") else thread
        ] += 1

    for consumer in consumers:
        consumer.start()
    sa_event.listen(db.engine, "begin", on_begin)

    def send(part: list[tuple[pydicom.Dataset, bytes]]) -> None:
        for ds, encoded in part:
            outcome = ingestor.ingest(
                ds, encoded, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="BENCH",
                peer_address="127.0.0.1",
            )  # fmt: skip
            if not outcome.ok:
                raise RuntimeError(f"not stored: {outcome}")

    threads = [
        threading.Thread(target=send, args=(copies[n::senders],), name=f"ingest-{n}") for n in range(senders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with db.read_session() as session:
        latest = outbox.latest_id(session)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not all(_read_up_to(c, latest) for c in consumers):
        if time.monotonic() > deadline:
            raise RuntimeError("the consumers did not catch up")
        time.sleep(0.05)
    phase["name"] = "stop"
    for consumer in consumers:
        consumer.stop()
    sa_event.remove(db.engine, "begin", on_begin)
    db.dispose()
    return dict(counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outbox_writes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--senders", type=int, default=4, help="concurrent ingest threads (default 4)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="outbox-writes-") as tmp:
        counts = measure(Path(tmp), args.instances, args.senders)
    total = sum(counts.values())
    print(f"{args.instances} instances, {args.senders} ingest threads; write transactions (BEGIN IMMEDIATE):")
    print("| by | count | per instance |\n|---|---:|---:|")
    for name in sorted(counts):
        print(f"| {name} | {counts[name]} | {counts[name] / args.instances:.2f} |")
    print(f"| all | {total} | {total / args.instances:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
