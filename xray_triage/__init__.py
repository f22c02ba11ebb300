"""xray-triage: AI-assisted chest X-ray triage and teleconsult server."""

__version__ = "0.1.0"
