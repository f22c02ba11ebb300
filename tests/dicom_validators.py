"""Run dicom3tools' ``dciodvfy`` and dcmtk's ``dsrdump`` on a written object (real tools, no mocks).

``dciodvfy`` must report no error; the warnings we accept are listed in ``ACCEPTED_WARNINGS``
with why. A missing tool skips the test with the install command, except in CI (``CI`` set),
where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Warnings dciodvfy gives that we accept, and why:
ACCEPTED_WARNINGS = (
    # Our private coding scheme (PS3.16 8.1: "99" designators are private, so dciodvfy cannot
    # know them): labels without a standard code, the probability/threshold/priority concepts and
    # the consult's parts (xray_triage/results/codes.py).
    re.compile(r"Unrecognized defined term <99XRAYTRIAGE> for value 1 of attribute <Coding Scheme Designator>"),
)


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def dciodvfy(path: Path) -> list[str]:
    """The warnings dciodvfy gives for ``path`` beyond the accepted ones; fails the test on any error."""
    tool = need_tool("dciodvfy", "dicom3tools")
    run = subprocess.run([tool, "+Pl", "+Pu", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, f"dciodvfy errors for {path.name}: {errors}"
    return [
        line
        for line in lines
        if line.startswith("Warning") and not any(pattern.search(line) for pattern in ACCEPTED_WARNINGS)
    ]


def dsrdump(path: Path) -> str:
    """dcmtk's rendering of an SR; fails the test when dsrdump cannot read it (an invalid tree)."""
    tool = need_tool("dsrdump", "dcmtk")
    run = subprocess.run([tool, "+Pl", "+Pu", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"dsrdump failed on {path.name}: {run.stderr}"
    # dcmtk's VR checker cannot check UTF-8 (ISO_IR 192) text, and says so: not a problem of ours.
    problems = [line for line in run.stderr.splitlines() if line.strip() and "does not support this Specific" not in line]
    assert not problems, problems
    return run.stdout
