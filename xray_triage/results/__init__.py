"""The DICOM objects we send to PACS, built with highdicom (IHE AI Results profile).

``ai_sr`` (TID 1500 Comprehensive SR of a triage result), ``ai_gsps`` (the model's flagged
regions as a Grayscale Softcopy Presentation State), ``annotation_gsps`` (a specialist's marks),
``consult_sr`` (a consult's conclusion and thread, Enhanced SR); ``filing`` writes them into the
source image's study; ``producer`` turns outbox events into filed objects.
"""
