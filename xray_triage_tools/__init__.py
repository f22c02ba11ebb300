"""Operator and test tools that run beside the server, never inside it.

Nothing in the server (``xray_triage``, ``xray_triage_server``, ``dicom_gateway``,
``consult_web``) imports this package; ``lint-imports`` checks it.
"""
