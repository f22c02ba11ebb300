"""Triage priorities: the words the triage rules assign and the worklist sorts by.

They belong to the triage domain (``triage/scoring.py`` decides them from a model
card); the store persists them (``store/schema.py``, ``store/records.py``). This tiny
module sits below both, so the store keeps them without importing the triage package
(which itself builds on the store: see the layers contract in ``pyproject.toml``).
"""

from __future__ import annotations

PRIORITY_URGENT = "urgent"
PRIORITY_ABNORMAL = "abnormal"
PRIORITY_NORMAL = "normal"
# Worklist order: a study's rank is that of its most urgent image; 0 before any result.
PRIORITY_RANK = {PRIORITY_URGENT: 3, PRIORITY_ABNORMAL: 2, PRIORITY_NORMAL: 1, None: 0}
