"""C-FIND matching and retrieve selection (xray_triage/store/qr_query.py) on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from xray_triage.fhir.search import SearchError, parse
from xray_triage.store.db import Database
from xray_triage.store.qr_query import QueryError, Scope, find, instances_to_retrieve
from xray_triage.store.schema import Instance, Series, Study

ALL = Scope(None)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'qr.db'}")
    db.create_schema()
    rows = [
        ("1.1", "ST1", "P1", "Nguyen^Van An", "20240105", "ACC1", [("1.1.1", "DX", ["1.1.1.1", "1.1.1.2"])]),
        ("1.2", "ST1", "P2", "Tran^Thi Binh", "20240320", "ACC2", [("1.2.1", "CR", ["1.2.1.1"])]),
        ("1.3", "ST2", "P1", "Nguyen^Van An", "", "ACC3", [("1.3.1", "DX", ["1.3.1.1"]), ("1.3.2", "SR", ["1.3.2.1"])]),
    ]
    with db.session() as session:
        for uid, station, pid, name, date, acc, series in rows:
            study = Study(study_instance_uid=uid, station_ae=station, patient_id=pid, patient_name=name, study_date=date, accession_number=acc)
            session.add(study)
            session.flush()
            for suid, modality, sops in series:
                s = Series(series_instance_uid=suid, study_id=study.id, modality=modality)
                session.add(s)
                session.flush()
                for sop in sops:
                    session.add(Instance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", series_id=s.id, file_path=f"{sop}.dcm", transfer_syntax_uid="1.2.840.10008.1.2.1"))
    return db


def identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def study_uids(db: Database, scope: Scope = ALL, **keys: object) -> list[str]:
    with db.read_session() as session:
        return [str(r.StudyInstanceUID) for r in find(session, identifier("STUDY", StudyInstanceUID="", **keys), scope)]


def test_universal_single_wildcard_and_list_matching(db: Database) -> None:
    assert study_uids(db) == ["1.1", "1.2", "1.3"]
    assert study_uids(db, PatientID="P1") == ["1.1", "1.3"]
    assert study_uids(db, PatientName="nguyen*") == ["1.1", "1.3"]  # PN: case-insensitive (PS3.4 C.2.2.2.4)
    assert study_uids(db, PatientName="Tr?n^*") == ["1.2"]
    assert study_uids(db, AccessionNumber="ACC_") == []  # SQL wildcards in the value are literal
    assert study_uids(db, ModalitiesInStudy=["CR", "SR"]) == ["1.2", "1.3"]
    with db.read_session() as session:
        found = list(find(session, identifier("STUDY", StudyInstanceUID=["1.1", "1.3"]), ALL))
    assert [str(r.StudyInstanceUID) for r in found] == ["1.1", "1.3"]


def test_date_ranges_leave_out_studies_without_a_date(db: Database) -> None:
    assert study_uids(db, StudyDate="20240101-20240131") == ["1.1"]
    assert study_uids(db, StudyDate="20240201-") == ["1.2"]
    assert study_uids(db, StudyDate="-20241231") == ["1.1", "1.2"]
    assert study_uids(db, StudyDate="20240320") == ["1.2"]
    with pytest.raises(QueryError):
        study_uids(db, StudyDate="2024-01-01")


def test_scope_limits_every_level_to_the_station(db: Database) -> None:
    assert study_uids(db, Scope("ST2")) == ["1.3"]
    assert study_uids(db, Scope("ST1"), PatientID="P1") == ["1.1"]
    with db.read_session() as session:
        images = list(find(session, identifier("IMAGE", SOPInstanceUID="", SeriesInstanceUID="1.3.1"), Scope("ST1")))
        assert images == []
        moved = instances_to_retrieve(session, identifier("STUDY", StudyInstanceUID="1.3"), Scope("ST1"))
        assert moved == []
        moved = instances_to_retrieve(session, identifier("STUDY", StudyInstanceUID="1.3"), Scope("ST2"))
        assert [m.sop_instance_uid for m in moved] == ["1.3.1.1", "1.3.2.1"]


def test_return_keys_and_counts(db: Database) -> None:
    with db.read_session() as session:
        (study,) = find(session, identifier("STUDY", StudyInstanceUID="1.3", ModalitiesInStudy="", NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="", ReferringPhysicianName=""), ALL)
        (series,) = find(session, identifier("SERIES", SeriesInstanceUID="1.1.1", NumberOfSeriesRelatedInstances="", Modality=""), ALL)
    assert study.ModalitiesInStudy == ["DX", "SR"] and study.NumberOfStudyRelatedInstances == 2
    assert study.NumberOfStudyRelatedSeries == 2
    assert "ReferringPhysicianName" in study and study.ReferringPhysicianName in ("", None)  # asked, unknown: empty
    assert "PatientID" not in study  # not asked: not returned
    assert series.NumberOfSeriesRelatedInstances == 2 and series.Modality == "DX"


def test_bad_identifiers(db: Database) -> None:
    with db.read_session() as session:
        with pytest.raises(QueryError, match="QueryRetrieveLevel"):
            list(find(session, identifier("PATIENT"), ALL))
        with pytest.raises(QueryError, match="SeriesInstanceUID"):
            instances_to_retrieve(session, identifier("SERIES", StudyInstanceUID="1.1"), ALL)


def test_fhir_search_parameters() -> None:
    search = parse([("patient", "urn:x|P1"), ("date", "ge2024-01-01"), ("date", "lt2024-02-01"), ("_count", "500")], 50, 100)
    assert search.patient_id == "P1" and search.count == 100
    assert (search.date_from.isoformat(), search.date_to.isoformat()) == ("2024-01-01", "2024-01-31")  # type: ignore[union-attr]
    with pytest.raises(SearchError, match="unsupported"):
        parse([("colour", "red")], 50, 100)
    with pytest.raises(SearchError):
        parse([("date", "2024-02-30")], 50, 100)


def test_move_destinations_resolve_through_the_delivery_registry(db: Database) -> None:
    from xray_triage.move_destinations import move_resolver
    from xray_triage.store.destinations import DestinationSpec, add_destination

    resolve = move_resolver(db)
    assert resolve("PACS") is None
    with db.session() as session:
        add_destination(session, DestinationSpec("pacs", "PACS", "10.0.0.5", 104, ("images",), tls=True))
        add_destination(session, DestinationSpec("pacs-b", "PACS", "10.0.0.6", 104, ("images",)))
    found = resolve("PACS  ")  # AE titles arrive space-padded
    assert found is not None and (found.name, found.host, found.port, found.tls) == ("pacs", "10.0.0.5", 104, True)
    assert resolve("pacs") is None  # AE titles are case sensitive


def test_fhir_finding_codes_from_the_model_card() -> None:
    from fhir.resources.R4B.observation import Observation

    from xray_triage.fhir.resources import (
        AiResultRow,
        Finding,
        ModelInfo,
        StudyRow,
        ai_report,
        coding_from_dicom,
    )

    assert coding_from_dicom("SCT", "233604007", "Pneumonia") == {"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}
    assert coding_from_dicom("99PRIVATE", "1", "x") is None
    coded = Finding("Pneumonia", 0.8, 0.5, True, coding_from_dicom("SCT", "233604007", "Pneumonia"))
    plain = Finding("Abnormal", 0.2, 0.5, False)
    report = ai_report(AiResultRow(7, StudyRow("1.2.3", "ST1", patient_id="P"), "done", ModelInfo("m", "1"), [coded, plain]))
    observations = {o.code.text: o for o in report.contained if isinstance(o, Observation)}
    assert observations["Pneumonia"].code.coding[0].system == "http://snomed.info/sct"
    assert [c.system for c in observations["Abnormal"].code.coding] == ["urn:xray-triage:model-label"]
    assert report.id == "ai-7" and report.conclusion.startswith("AI flagged: Pneumonia")


def test_too_many_matches_are_refused_before_any_is_sent(db: Database) -> None:
    from xray_triage.store.qr_query import TooManyMatches

    with db.read_session() as session:
        assert len(list(find(session, identifier("STUDY", StudyInstanceUID=""), ALL, limit=3))) == 3
        with pytest.raises(TooManyMatches):
            next(find(session, identifier("STUDY", StudyInstanceUID=""), ALL, limit=2))
