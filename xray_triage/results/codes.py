"""Coded concepts of the objects we make (PS3.3 8.8, PS3.16).

Standard codes where one exists (SNOMED CT ``SCT``, LOINC ``LN``, DICOM ``DCM``, UCUM); the
rest are in the private coding scheme ``99XRAYTRIAGE`` (PS3.16 8.1: a designator starting with
"99" is private), each listed here: a label the model card gives no code (``[codes]`` of the
card), the probability and threshold measurements, the triage priority and the consult
conclusions.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

from xray_triage.inference.card import ModelCard

PRIVATE_SCHEME = "99XRAYTRIAGE"

# PS3.16 / SNOMED CT: the procedure every result is about.
CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
# TID 1500 row 12 / TID 1501: an AI probability (0..1) and the operating point it is compared to.
PROBABILITY = CodedConcept("AIPROB", PRIVATE_SCHEME, "AI model probability")
THRESHOLD = CodedConcept("AITHRESH", PRIVATE_SCHEME, "AI model decision threshold")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
# The study-level triage priority (xray_triage.priority) as a qualitative evaluation.
TRIAGE_PRIORITY = CodedConcept("TRIAGEPRIO", PRIVATE_SCHEME, "AI triage priority")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
PRIORITIES = {
    "urgent": CodedConcept("URGENT", PRIVATE_SCHEME, "Urgent"),
    "abnormal": CodedConcept("ABNORMAL", PRIVATE_SCHEME, "Abnormal"),
    "normal": CodedConcept("NORMAL", PRIVATE_SCHEME, "Normal"),
}
# Consult SR (Enhanced SR): LOINC's consult note, its parts, the specialist's conclusion.
CONSULT_NOTE = CodedConcept("11488-4", "LN", "Consult note")
CONSULT_QUESTION = CodedConcept("CONSULTQ", PRIVATE_SCHEME, "Consult question")
CONSULT_MESSAGE = CodedConcept("CONSULTMSG", PRIVATE_SCHEME, "Consult message")
CONSULT_CONCLUSION = CodedConcept("CONSULTCONC", PRIVATE_SCHEME, "Consult conclusion")
CONCLUSIONS = {
    "normal": CodedConcept("NORMAL", PRIVATE_SCHEME, "Normal"),
    "follow_up_station": CodedConcept("FUSTATION", PRIVATE_SCHEME, "Follow up at the station"),
    "refer_hospital": CodedConcept("REFERHOSP", PRIVATE_SCHEME, "Refer to hospital"),
    "urgent_transfer": CodedConcept("URGTRANSFER", PRIVATE_SCHEME, "Urgent transfer"),
}


def label_concept(card: ModelCard, label: str) -> CodedConcept:
    """The label's code from the card's ``[codes]``, else a private code named after the label."""
    code = card.codes.get(label)
    if code is not None:
        return CodedConcept(code.value, code.scheme, code.meaning)
    value = "".join(ch for ch in label.upper() if ch.isalnum())[:16] or "LABEL"
    return CodedConcept(value, PRIVATE_SCHEME, label[:64])
