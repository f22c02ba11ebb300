"""The machine and software a run measured: figures mean nothing without them."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import REPO_ROOT
from benchmarks.common import tool_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _cgroup_cpu_limit() -> str | None:
    """A container CPU quota, if any (``max`` = none): cores visible are not always cores usable."""
    try:
        return Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        return None


def _gpus() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, type and device holding ``path``: fsync costs nothing on tmpfs and a lot on a slow disk."""
    best: dict[str, str] = {}
    try:
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best.get("mount", "")):
                best = {"mount": mount, "type": fstype, "device": device}
    except (OSError, ValueError):
        pass
    return best


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def describe_machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    onnx_providers: list[str] = []
    try:
        import onnxruntime as ort

        onnx_providers = list(ort.get_available_providers())
    except ImportError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cgroup_cpu_max": _cgroup_cpu_limit(),
        "ram_gib": _mem_total_gib(),
        "gpus": _gpus(),
        "load_average_at_start": load_average(),
        "versions": {
            "python": platform.python_version(),
            "xray_triage": _version("xray-triage"),
            "xray_triage_git": _git_commit(),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "onnxruntime_providers": onnx_providers,
            "pynetdicom": _version("pynetdicom"),
            "pydicom": _version("pydicom"),
            "numpy": _version("numpy"),
            "pylibjpeg": _version("pylibjpeg"),
            "pylibjpeg_libjpeg": _version("pylibjpeg-libjpeg"),
            "pylibjpeg_openjpeg": _version("pylibjpeg-openjpeg"),
            "pylibjpeg_rle": _version("pylibjpeg-rle"),
            "sqlalchemy": _version("sqlalchemy"),
            "dcmtk": tool_version(["storescu", "--version"]),
            "gdcm": tool_version(["gdcmconv", "--version"]),
        },
    }
