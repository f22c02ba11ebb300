"""Core QIDO-RS pieces: the DICOM JSON model built from rows, query parsing, matching on real SQLite,
and the additive QIDO indexes on a database made before them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import inspect, true

from xray_triage.store import dicomweb_query as Q
from xray_triage.store.db import Database
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, Series, Study

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _study(**overrides: object) -> Study:
    values = dict(
        id=1,
        study_instance_uid="1.2.3",
        patient_id="PID1",
        patient_name="Nguyễn^Văn^A",
        patient_sex="M",
        patient_birth_date="19700101",
        patient_age="054Y",
        study_date="20240105",
        study_time="101500",
        accession_number="ACC1",
        description="CHEST PA",
        institution_name="",
        station_ae="S1",
    )
    values.update(overrides)
    return Study(**values)


def test_study_json_is_what_pydicom_makes_of_the_same_values() -> None:
    ours = Q.study_json(_study(), ["DX", "CR"], 2, 3, base_url="http://h/dicomweb")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240105", "101500", "ACC1"
    ds.add_new(0x00080080, "LO", None)  # InstitutionName, empty
    ds.add_new(0x00080090, "PN", None)  # ReferringPhysicianName, empty
    ds.StudyDescription, ds.PatientName, ds.PatientID = "CHEST PA", "Nguyễn^Văn^A", "PID1"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19700101", "M", "054Y"
    ds.StudyInstanceUID = "1.2.3"
    ds.add_new(0x00200010, "SH", None)  # StudyID, empty
    ds.ModalitiesInStudy = ["DX", "CR"]
    ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances = 2, 3
    ds.RetrieveURL = "http://h/dicomweb/studies/1.2.3"
    assert ours == ds.to_json_dict()


def test_instance_json_numbers_and_empty_values_match_pydicom() -> None:
    row = SimpleNamespace(
        series_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_uid="1.2.3.4.5",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        instance_number="7",
        view_position="PA",
        rows=2048,
        columns=1024,
    )
    ours = Q.instance_json(row, "1.2.3")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = row.sop_class_uid, row.sop_uid
    ds.AvailableTransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.InstanceNumber, ds.ViewPosition, ds.Rows, ds.Columns = "7", "PA", 2048, 1024
    assert ours == ds.to_json_dict()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("limit", "-1")], "limit"),
        ([("offset", "x")], "offset"),
        ([("NotADicomKeyword", "1")], "unknown"),
        ([("fuzzymatching", "maybe")], "fuzzymatching"),
    ],
)
def test_bad_queries_are_refused(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(Q.QueryError, match=message):
        Q.parse_query(params, Q.LEVEL_STUDY, max_limit=10)


def test_limit_is_capped_and_unsupported_keys_are_ignored_with_their_names() -> None:
    query = Q.parse_query(
        [("limit", "5000"), ("00100020", "P*"), ("ReferringPhysicianName", "x"), ("includefield", "all")],
        Q.LEVEL_STUDY,
        max_limit=100,
    )
    assert query.limit == 100 and query.matches == {"PatientID": "P*"} and query.include_all
    assert query.ignored == ["ReferringPhysicianName"]
    with pytest.raises(Q.QueryError, match="wildcards"):
        Q.match_clause("StudyInstanceUID", Study.study_instance_uid, "1.2.*")


def test_matching_on_real_sqlite(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.create_schema()
    rows = [
        ("1.1", "Nguyen^A", "20240105", "DX"),
        ("1.2", "nguyen^b", "20240220", "CR"),
        ("1.3", "Tran^C", "", "CR"),
    ]
    with db.session() as session:
        for n, (uid, name, date, modality) in enumerate(rows, 1):
            session.add(_study(id=n, study_instance_uid=uid, patient_name=name, study_date=date, patient_id=f"P{n}",
                               accession_number=f"A_{n}"))  # fmt: skip
            session.add(Series(id=n, series_instance_uid=f"{uid}.1", study_id=n, modality=modality))
            session.add(
                Instance(
                    id=n, sop_instance_uid=f"{uid}.1.1", sop_class_uid=DX_CLASS, series_id=n, file_path="x"
                )
            )
    with db.session() as session:  # after the studies (no relationship orders the inserts)
        # An AI SR this server made for study 1.3, filed like a received instance (result_objects).
        session.add(ResultObject(study_id=3, kind="ai-sr", category="ai-results", source_key="ai-sr:1.3.1.1",
                                 content_sha256="0", sop_instance_uid="1.3.9.1", sop_class_uid=COMPREHENSIVE_SR,
                                 series_instance_uid="1.3.9", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                 file_path="dicom/1.3/1.3.9/1.3.9.1.dcm"))  # fmt: skip

    def found(*params: tuple[str, str]) -> list[str]:
        with db.read_session() as session:
            page = Q.search_studies(session, Q.parse_query(params, Q.LEVEL_STUDY, max_limit=10), true())
        return [r["0020000D"]["Value"][0] for r in page.results]

    assert found(("PatientName", "NGUYEN*")) == ["1.1", "1.2"]
    assert found(("PatientName", "nguyen^a")) == ["1.1"]
    assert found(("StudyDate", "20240101-20240131")) == ["1.1"]
    assert found(("StudyDate", "-20241231")) == ["1.1", "1.2"]  # an empty date never matches a range
    assert found(("ModalitiesInStudy", "CR")) == ["1.2", "1.3"]
    assert found(("AccessionNumber", "A_1")) == ["1.1"]  # "_" is a literal, not SQL's wildcard
    assert found(("AccessionNumber", "A?1")) == ["1.1"]
    assert found(("limit", "1"), ("offset", "1")) == ["1.2"]
    assert found(("ModalitiesInStudy", "SR")) == ["1.3"]  # our own SR counts as the study's

    with db.read_session() as session:
        query = Q.parse_query([], Q.LEVEL_INSTANCE, max_limit=10)
        instances = Q.search_instances(session, query, true(), study_uid="1.3").results
        series = Q.search_series(
            session, Q.parse_query([], Q.LEVEL_SERIES, max_limit=10), true(), study_uid="1.3"
        )
        (study,) = Q.search_studies(
            session, Q.parse_query([("StudyInstanceUID", "1.3")], Q.LEVEL_STUDY, max_limit=10), true()
        ).results
        files = Q.instance_files(session, true(), "1.3")
    assert [i["00080018"]["Value"][0] for i in instances] == ["1.3.1.1", "1.3.9.1"]  # received first
    assert [(s["0020000E"]["Value"][0], s["00080060"]["Value"][0]) for s in series.results] == [
        ("1.3.1", "CR"),
        ("1.3.9", "SR"),
    ]
    assert study["00201206"]["Value"] == [2] and study["00201208"]["Value"] == [2]
    assert study["00080061"]["Value"] == ["CR", "SR"]
    assert files[-1] == ("1.3", "1.3.9", "1.3.9.1", "dicom/1.3/1.3.9/1.3.9.1.dcm")
    db.dispose()


def test_db_upgrade_adds_the_qido_indexes_to_an_older_database(tmp_path: Path) -> None:
    """A database at the schema before the QIDO indexes (migration 0002) gets them from ``db upgrade``."""
    from xray_triage.store import migrate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    migrate.upgrade(db.engine, "0002_job_leases")
    names = {i["name"] for i in inspect(db.engine).get_indexes("studies")}
    assert "ix_studies_patient_id" not in names
    assert migrate.schema_state(db.engine).state == migrate.OUTDATED
    db.upgrade_schema()  # `xray-triage db upgrade`
    names = {i["name"] for i in inspect(db.engine).get_indexes("studies")}
    assert {"ix_studies_patient_id", "ix_studies_accession_number", "ix_studies_study_date", "ix_studies_patient_name"} <= names
    db.dispose()
