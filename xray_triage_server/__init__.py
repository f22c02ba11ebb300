"""The composition root: the one place that wires core, gateway and web app together.

``xray_triage`` (core: store, pipeline, inference, triage, consult and annotation
rules) knows nothing of ``dicom_gateway`` or ``consult_web``; they both build on
core and not on each other. This package sits above all three: ``serve.py`` wires
settings, database, model runner, triage workers, gateway and web app into one
process, and ``cli.py`` is the ``xray-triage`` command line. Nothing imports it.
"""
