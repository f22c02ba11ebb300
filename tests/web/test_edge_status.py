"""An edge station's worklist says what is still waiting to be sent to the centre (both locales)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from web_helpers import add_station_row, add_user_row, client_for, make_web_env, store_dicom

from xray_triage.store.delivery_schema import CATEGORY_AI_RESULTS, CATEGORY_IMAGES, DELIVERY_SENT, Delivery
from xray_triage.store.destinations import DestinationSpec, add_destination

OLDEST = datetime(2026, 11, 30, 7, 5, tzinfo=UTC)  # 14:05 in Asia/Ho_Chi_Minh, the default zone


def test_worklist_shows_images_waiting_for_the_centre(tmp_path: Path, shared_dicom: Path) -> None:
    env = make_web_env(tmp_path)
    add_station_row(env, "STATION1")
    add_user_row(env, "doctor_en", "station", "STATION1", language="en")
    add_user_row(env, "doctor_vi", "station", "STATION1", language="vi")
    uids = [
        store_dicom(env, shared_dicom / "dev_03_dx_pa_jpeg_lossless_sv1.dcm", "STATION1") for _ in range(3)
    ]
    with env.db.session() as session:
        centre = add_destination(
            session, DestinationSpec("centre", "XRAY_TRIAGE", "centre.example", 11112, (CATEGORY_IMAGES,))
        )
        session.flush()
        for n, (study, sop) in enumerate(uids):
            session.add(
                Delivery(
                    destination_id=centre.id,
                    sop_instance_uid=sop,
                    study_uid=study,
                    category=CATEGORY_IMAGES,
                    event_id=n + 1,
                    created_at=OLDEST.replace(minute=5 + n),
                )  # fmt: skip
            )
        # Not counted: an AI result object (not an image) still pending.
        session.add(
            Delivery(
                destination_id=centre.id,
                sop_instance_uid="1.2.3.4",
                study_uid=uids[0][0],
                category=CATEGORY_AI_RESULTS,
                event_id=9,
                created_at=OLDEST,
            )  # fmt: skip
        )

    en, _ = client_for(env, "doctor_en")
    vi, _ = client_for(env, "doctor_vi")
    assert "3 images waiting to be sent to centre, oldest since 2026-11-30 14:05" in en.get("/worklist").text
    assert "3 ảnh đang chờ gửi đến centre, ảnh cũ nhất từ 30/11/2026 14:05" in vi.get("/worklist").text

    with env.db.session() as session:
        first = session.query(Delivery).filter_by(sop_instance_uid=uids[0][1]).one()
        first.state = DELIVERY_SENT
    assert "2 images waiting to be sent to centre, oldest since 2026-11-30 14:06" in en.get("/worklist").text

    with env.db.session() as session:
        session.query(Delivery).filter_by(category=CATEGORY_IMAGES).update({"state": DELIVERY_SENT})
    assert "waiting to be sent" not in en.get("/worklist").text
