"""FHIR resources built from the store's rows (pure: rows in, ``fhir.resources`` models out).

Version and profiles: the models are ``fhir.resources``' R4B package (FHIR 4.3.0, the
R4 technical correction; ImagingStudy, DiagnosticReport, Observation, Device,
ServiceRequest, Patient, Bundle and OperationOutcome have the same structure as in R4
4.0.1). Every resource is validated by its model when built. The profiles followed are
the base R4 resource profiles (``meta.profile`` names them:
``http://hl7.org/fhir/StructureDefinition/<Type>``); no national or IHE profile is
claimed. Conventions from the R4 ImagingStudy page: the Study Instance UID is the
identifier (system ``urn:dicom:uid``, value ``urn:oid:<uid>``), modalities are DICOM
DCM codes (``http://dicom.nema.org/resources/ontology/DCM``), SOP classes are
``urn:ietf:rfc:3986`` codes ``urn:oid:<uid>``.

The patient is a *contained* Patient (``#patient``) with the DICOM Patient ID as its
identifier (system :data:`PATIENT_ID_SYSTEM` plus the sending station's AE title, since
Patient IDs are only unique per issuer), name, sex and birth date: this server keeps no
patient registry of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RFC3986 = "urn:ietf:rfc:3986"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"
# Project code systems (URNs: nothing to resolve, unique to this software).
PATIENT_ID_SYSTEM = "urn:xray-triage:patient-id"  # + ":" + the station's AE title
FINDING_SYSTEM = "urn:xray-triage:model-label"
CONCLUSION_SYSTEM = "urn:xray-triage:consult-conclusion"
CONSULT_ID_SYSTEM = "urn:xray-triage:consult"

PROFILE = "http://hl7.org/fhir/StructureDefinition/"
IMAGING_REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
CONSULT_CODE = {"system": SNOMED, "code": "11429006", "display": "Consultation"}
# DICOM Body Part Examined -> SNOMED CT (PS3.16 Annex L, CID 4031), for what a CXR sends.
BODY_PARTS = {"CHEST": ("51185008", "Thoracic structure")}
# Consult urgency -> FHIR request-priority.
PRIORITY = {"routine": "routine", "urgent": "urgent", "emergency": "stat"}
CONCLUSION_TEXT = {
    "normal": "Normal",
    "follow_up_station": "Follow up at the station",
    "refer_hospital": "Refer to hospital",
    "urgent_transfer": "Urgent transfer",
}
SEX = {"M": "male", "F": "female", "O": "other"}
# DICOM Coding Scheme Designators (PS3.16 Section 8) -> FHIR code system URIs (PS3.16 Table 8-1).
CODING_SCHEMES = {
    "SCT": SNOMED,
    "SRT": SNOMED,
    "LN": LOINC,
    "DCM": DCM_SYSTEM,
    "RADLEX": "http://radlex.org",
    "RADLEX_RID": "http://radlex.org",
}


def coding_from_dicom(scheme: str, value: str, meaning: str) -> dict[str, str] | None:
    """A model card's ``[codes]`` entry (DICOM scheme designator, value, meaning) as a FHIR Coding;
    None for a scheme without a known FHIR system (the label text is used alone then)."""
    system = CODING_SCHEMES.get(scheme.strip().upper())
    if system is None or not value.strip():
        return None
    return {"system": system, "code": value.strip(), "display": meaning.strip() or value.strip()}


# -- rows -------------------------------------------------------------------------------
# Plain data the store layer fills (xray_triage/fhir/records.py); nothing here touches SQL.


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: str = ""


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    modality: str
    series_number: str = ""
    description: str = ""
    body_part: str = ""
    instances: Sequence[InstanceRow] = ()


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    station_ae: str
    patient_id: str = ""
    patient_name: str = ""
    patient_sex: str = ""
    patient_birth_date: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    description: str = ""
    series: Sequence[SeriesRow] = ()


@dataclass(frozen=True)
class Finding:
    """One model label over the study: its highest probability, threshold, flagged anywhere."""

    label: str
    probability: float
    threshold: float
    flagged: bool
    code: dict[str, str] | None = None  # a SNOMED / RadLex coding from the model card, when it has one


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced the results: ``name@version`` and, when it is the loaded card, its sha256."""

    name: str
    version: str
    sha256: str = ""


@dataclass(frozen=True)
class AiResultRow:
    key: int  # the study's row id: the report id is ``ai-<key>`` (a UID with a prefix may pass FHIR's 64)
    study: StudyRow
    status: str  # the study's ai_status: pending, done, failed, not_applicable
    model: ModelInfo | None
    findings: Sequence[Finding] = ()
    issued: datetime | None = None


@dataclass(frozen=True)
class ConsultRow:
    id: int
    study: StudyRow
    status: str  # requested, in_review, answered, closed
    urgency: str
    question: str
    requested_by: str
    created_at: datetime
    updated_at: datetime
    conclusion: str | None = None
    specialist: str = ""
    specialist_text: str = ""  # the specialist's last message, the report's conclusion text
    answered: bool = False  # a specialist has replied or concluded
    extra: dict[str, Any] = field(default_factory=dict)


# -- helpers -----------------------------------------------------------------------------


def _meta(kind: str) -> dict[str, Any]:
    return {"profile": [PROFILE + kind]}


def _fhir_date(dicom_date: str) -> str | None:
    if len(dicom_date) == 8 and dicom_date.isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return None


def _instant(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _unsigned(value: str) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


def study_reference(study_uid: str) -> dict[str, Any]:
    return {"reference": f"ImagingStudy/{study_uid}"}


def patient(study: StudyRow) -> dict[str, Any]:
    """The contained Patient (id ``patient``) from the study's DICOM patient module."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": "patient"}
    if study.patient_id:
        resource["identifier"] = [
            {"system": f"{PATIENT_ID_SYSTEM}:{study.station_ae}", "value": study.patient_id}
        ]
    if study.patient_name:
        family, _, given = study.patient_name.split("=")[0].partition("^")
        name: dict[str, Any] = {"text": " ".join(p for p in study.patient_name.split("=")[0].split("^") if p)}
        if family:
            name["family"] = family
        if given:
            name["given"] = [g for g in given.split("^") if g][:1] or None
        resource["name"] = [{k: v for k, v in name.items() if v}]
    if study.patient_sex in SEX:
        resource["gender"] = SEX[study.patient_sex]
    if birth := _fhir_date(study.patient_birth_date):
        resource["birthDate"] = birth
    return resource


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


# -- builders ----------------------------------------------------------------------------


def imaging_study(study: StudyRow) -> ImagingStudy:
    """ImagingStudy (R4 base profile): id = the Study Instance UID, series and instances."""
    modalities = sorted({s.modality for s in study.series if s.modality})
    series = []
    for s in study.series:
        item: dict[str, Any] = {
            "uid": s.series_instance_uid,
            "modality": _modality(s.modality or "OT"),
            "numberOfInstances": len(s.instances),
            "instance": [
                {
                    "uid": i.sop_instance_uid,
                    "sopClass": {"system": RFC3986, "code": f"urn:oid:{i.sop_class_uid}"},
                    **({"number": n} if (n := _unsigned(i.instance_number)) is not None else {}),
                }
                for i in s.instances
            ]
            or None,
        }
        if (number := _unsigned(s.series_number)) is not None:
            item["number"] = number
        if s.description:
            item["description"] = s.description
        if s.body_part.upper() in BODY_PARTS:
            code, display = BODY_PARTS[s.body_part.upper()]
            item["bodySite"] = {"system": SNOMED, "code": code, "display": display}
        series.append({k: v for k, v in item.items() if v is not None})
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.study_instance_uid,
        "meta": _meta("ImagingStudy"),
        "contained": [patient(study)],
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.study_instance_uid}"}],
        "status": "available",
        "subject": {"reference": "#patient"},
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(len(s.instances) for s in study.series),
    }
    if study.accession_number:
        resource["identifier"].append(
            {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": study.accession_number}
        )
    if modalities:
        resource["modality"] = [_modality(m) for m in modalities]
    if started := _fhir_date(study.study_date):
        resource["started"] = started
    if study.description:
        resource["description"] = study.description
    if series:
        resource["series"] = series
    return ImagingStudy.model_validate(resource)


AI_STATUS = {"done": "final", "failed": "cancelled", "pending": "registered", "not_applicable": "cancelled"}


def ai_report(row: AiResultRow) -> DiagnosticReport:
    """The AI triage of one study as a DiagnosticReport with contained Observations and Device.

    One Observation per model label: value = the highest probability over the study's
    images (UCUM unit ``1``), interpretation POS/NEG by the label's threshold (given as
    ``referenceRange.high``: at or above it the label is flagged), the model as
    ``Observation.device``. Status: ``final`` once triaged, ``registered`` while
    pending, ``cancelled`` when it failed or does not apply (not a chest X-ray).
    """
    study = row.study
    contained: list[dict[str, Any]] = [patient(study)]
    if row.model is not None:
        device: dict[str, Any] = {
            "resourceType": "Device",
            "id": "model",
            "deviceName": [{"name": row.model.name, "type": "model-name"}],
            "version": [{"value": row.model.version}],
            "type": {"text": "AI chest X-ray triage model (decision support, not a diagnosis)"},
        }
        if row.model.sha256:
            device["identifier"] = [{"system": "urn:xray-triage:model-sha256", "value": row.model.sha256}]
        contained.append(device)
    results = []
    for n, finding in enumerate(row.findings, start=1):
        coding = [{"system": FINDING_SYSTEM, "code": finding.label, "display": finding.label}]
        if finding.code:
            coding.insert(0, finding.code)
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"finding-{n}",
            "status": "final",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
            "code": {"coding": coding, "text": finding.label},
            "subject": {"reference": "#patient"},
            "derivedFrom": [study_reference(study.study_instance_uid)],
            "valueQuantity": {
                "value": round(finding.probability, 6),
                "unit": "probability",
                "system": UCUM,
                "code": "1",
            },
            "interpretation": [
                {"coding": [{"system": V3_INTERPRETATION, "code": "POS" if finding.flagged else "NEG"}]}
            ],
            "referenceRange": [
                {
                    "high": {"value": round(finding.threshold, 6), "system": UCUM, "code": "1"},
                    "text": "decision threshold",
                }
            ],
        }
        if row.model is not None:
            observation["device"] = {"reference": "#model"}
        contained.append(observation)
        results.append({"reference": f"#finding-{n}"})
    flagged = [f.label for f in row.findings if f.flagged]
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": f"ai-{row.key}",
        "meta": _meta("DiagnosticReport"),
        "contained": contained,
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.study_instance_uid}"}],
        "status": AI_STATUS.get(row.status, "registered"),
        "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
        "code": {"coding": [IMAGING_REPORT_CODE], "text": "AI triage of a chest X-ray"},
        "subject": {"reference": "#patient"},
        "imagingStudy": [study_reference(study.study_instance_uid)],
    }
    if row.model is not None:
        resource["performer"] = [{"reference": "#model", "display": f"{row.model.name}@{row.model.version}"}]
    if results:
        resource["result"] = results
    if effective := _fhir_date(study.study_date):
        resource["effectiveDateTime"] = effective
    if row.issued is not None:
        resource["issued"] = _instant(row.issued)
    if row.status == "done":
        resource["conclusion"] = (
            "AI flagged: " + ", ".join(flagged) if flagged else "AI flagged no finding"
        ) + " (decision support, not a diagnosis)"
    return DiagnosticReport.model_validate(resource)


def consult_report(row: ConsultRow) -> DiagnosticReport:
    """An answered consult's specialist conclusion as a DiagnosticReport, basedOn its ServiceRequest."""
    study = row.study
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": f"consult-{row.id}",
        "meta": _meta("DiagnosticReport"),
        "contained": [patient(study)],
        "identifier": [{"system": CONSULT_ID_SYSTEM, "value": str(row.id)}],
        "basedOn": [{"reference": f"ServiceRequest/consult-{row.id}"}],
        "status": "final" if row.conclusion else "preliminary",
        "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
        "code": {"coding": [IMAGING_REPORT_CODE], "text": "Teleconsult opinion on a chest X-ray"},
        "subject": {"reference": "#patient"},
        "imagingStudy": [study_reference(study.study_instance_uid)],
        "issued": _instant(row.updated_at),
    }
    if row.specialist:
        resource["resultsInterpreter"] = [{"display": row.specialist}]
    if effective := _fhir_date(study.study_date):
        resource["effectiveDateTime"] = effective
    text = row.specialist_text.strip()
    if row.conclusion:
        label = CONCLUSION_TEXT.get(row.conclusion, row.conclusion)
        resource["conclusionCode"] = [
            {
                "coding": [{"system": CONCLUSION_SYSTEM, "code": row.conclusion, "display": label}],
                "text": label,
            }
        ]
        text = f"{label}. {text}" if text else label
    if text:
        resource["conclusion"] = text
    return DiagnosticReport.model_validate(resource)


SERVICE_REQUEST_STATUS = {
    "requested": "active",
    "in_review": "active",
    "answered": "active",
    "closed": "completed",
}


def service_request(row: ConsultRow) -> ServiceRequest:
    """A consult request: priority from its urgency, the clinical question as reasonCode text."""
    study = row.study
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": f"consult-{row.id}",
        "meta": _meta("ServiceRequest"),
        "contained": [patient(study)],
        "identifier": [{"system": CONSULT_ID_SYSTEM, "value": str(row.id)}],
        "status": SERVICE_REQUEST_STATUS.get(row.status, "unknown"),
        "intent": "order",
        "priority": PRIORITY.get(row.urgency, "routine"),
        "code": {"coding": [CONSULT_CODE], "text": "Teleconsultation on a chest X-ray"},
        "subject": {"reference": "#patient"},
        "authoredOn": _instant(row.created_at),
        "requester": {"display": row.requested_by},
        "reasonCode": [{"text": row.question}],
        "supportingInfo": [study_reference(study.study_instance_uid)],
    }
    if row.specialist:
        resource["performer"] = [{"display": row.specialist}]
    return ServiceRequest.model_validate(resource)


def searchset(
    resources: Iterable[Any], total: int, self_url: str, base_url: str, next_url: str | None = None
) -> Bundle:
    """A ``searchset`` Bundle of ``resources`` (each a match), with self and next links."""
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    entries = [
        {
            "fullUrl": f"{base_url}/{r.get_resource_type()}/{r.id}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": links,
            "entry": entries or None,
        }
    )


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> OperationOutcome:
    """An OperationOutcome with one issue (``code`` from the R4 issue-type value set)."""
    return OperationOutcome.model_validate(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
        }
    )
