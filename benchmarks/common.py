"""Small helpers shared by the benchmark modules: progress lines, statistics, tool calls."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

T = TypeVar("T")

_START = time.monotonic()


class BenchSetupError(Exception):
    """The benchmark cannot run here (a tool is missing, the server will not start): exit 2."""


def progress(message: str) -> None:
    """One progress line with the time since start, flushed at once so CI logs show it live."""
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", flush=True)


def dcmtk_env() -> dict[str, str]:
    """Environment for every dcmtk process, ours and the reference's alike.

    Debian's dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set, which
    stalls each C-STORE response by a delayed-ACK timeout (~40-60 ms) on
    loopback: it would dominate small-image latency and hide real differences.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def require_tools(names: Iterable[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise BenchSetupError(
            f"missing command-line tools: {', '.join(missing)} "
            "(Debian/Ubuntu: apt-get install dcmtk libgdcm-tools)"
        )


def run_tool(args: Sequence[str], *, timeout_s: float = 300.0) -> str:
    """Run a helper tool to completion; raise with its own error output if it fails."""
    try:
        done = subprocess.run(
            list(args), env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchSetupError(f"{args[0]}: {exc}") from exc
    if done.returncode != 0:
        raise BenchSetupError(
            f"{' '.join(map(str, args[:3]))} ... exited {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}"
        )
    return done.stdout


def tool_version(args: Sequence[str]) -> str | None:
    """First non-empty output line of a ``--version`` call, or None if the tool is absent."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip().strip("$").strip()
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without needing numpy here."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, float | int | None]:
    """n, min, p50, p95, max, mean of a sample; None entries are dropped."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"n": 0, "min": None, "p50": None, "p95": None, "max": None, "mean": None}
    return {
        "n": len(clean),
        "min": round(min(clean), digits),
        "p50": round(percentile(clean, 50), digits),
        "p95": round(percentile(clean, 95), digits),
        "max": round(max(clean), digits),
        "mean": round(sum(clean) / len(clean), digits),
    }


def median(values: Iterable[float | None]) -> float | None:
    clean = [float(v) for v in values if v is not None]
    return round(percentile(clean, 50), 3) if clean else None


def parse_db_time(value: object) -> float | None:
    """A timestamp read from the server's SQLite DB as POSIX seconds.

    The server writes UTC; SQLite keeps no zone, so a value without an offset
    is taken as UTC (the server's ``UTCDateTime`` column type does the same).
    """
    if value is None:
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def mb(n_bytes: float) -> float:
    """Megabytes as 10^6 bytes (network convention), used for every MB and MB/s figure."""
    return n_bytes / 1e6


def timed_ms(fn: Callable[[], T]) -> tuple[float, T]:
    """Run ``fn`` once; its wall time in ms and its value."""
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000, value


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, as an init system would, then wait (SIGKILL after ``timeout_s``); the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
