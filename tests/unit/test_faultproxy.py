"""The fault-injecting proxy (xray_triage_tools/faultproxy.py) over real sockets on 127.0.0.1.

Pacing and delay are checked with an injected clock and sleep (what the proxy
asked to wait), never with wall-clock time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable

import pytest

from xray_triage_tools.faultproxy import FaultProxy, ProxyThread, TokenBucket, parse_host_port, parse_rate

DEADLINE_S = 20.0


class FakeTime:
    """A clock that moves only when the proxy sleeps; records every requested sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Target:
    """A real TCP server: records what each connection sent; echoes it back when ``echo``."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.received: list[bytearray] = []
        self.ended: list[str] = []  # per finished connection: "eof" or "reset"
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        try:
            while data := await reader.read(65536):
                buf += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.ended.append("eof")
            writer.close()
        except OSError:
            self.ended.append("reset")
            writer.transport.abort()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Bounded polling for a condition (fails with ``what`` after DEADLINE_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read_all(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until EOF; and whether the connection ended with a reset."""
    out = bytearray()
    try:
        while data := await asyncio.wait_for(reader.read(65536), DEADLINE_S):
            out += data
    except ConnectionResetError:
        return bytes(out), True
    return bytes(out), False


def run(
    scenario: Callable[[FaultProxy, Target], Awaitable[None]], *, echo: bool = True, **proxy_kwargs: object
) -> None:
    async def main() -> None:
        target = Target(echo)
        await target.start()
        proxy = FaultProxy("127.0.0.1", target.port, **proxy_kwargs)  # type: ignore[arg-type]
        await proxy.start()
        try:
            await scenario(proxy, target)
        finally:
            await proxy.close()
            await target.close()

    asyncio.run(main())


async def exchange(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send ``payload``, half-close, read until EOF: (what came back, whether the connection was reset)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:  # reset before connect() returned (a refused connection, on a busy machine)
        return b"", True
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await read_all(reader)
    finally:
        writer.close()


PAYLOAD = os.urandom(200_000)


def test_forwards_both_ways_with_half_close() -> None:
    async def scenario(proxy: FaultProxy, target: Target) -> None:
        echoed, reset = await exchange(proxy.port, PAYLOAD)
        assert (echoed == PAYLOAD, reset) == (True, False)
        await until(lambda: target.ended == ["eof"], "the target to see the client's EOF")
        stats = proxy.snapshot()
        assert (stats.connections, stats.bytes_up, stats.bytes_down, stats.cuts) == (1, 200_000, 200_000, 0)

    run(scenario)


def test_cut_all_resets_both_ends_then_new_connections_pass() -> None:
    async def scenario(proxy: FaultProxy, target: Target) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"first part")
        await writer.drain()
        await until(
            lambda: [bytes(b) for b in target.received] == [b"first part"], "the first bytes at the target"
        )
        assert await reader.readexactly(10) == b"first part"
        assert proxy.cut_all() == 1
        rest, reset = await read_all(reader)
        assert (rest, reset) == (b"", True)
        writer.close()
        await until(lambda: target.ended == ["reset"], "the target to see the reset")
        echoed, reset = await exchange(proxy.port, b"after the cut")
        assert (echoed, reset) == (b"after the cut", False)
        assert proxy.snapshot().cuts == 1

    run(scenario)


def test_down_refuses_without_reaching_the_target_until_restored() -> None:
    async def scenario(proxy: FaultProxy, target: Target) -> None:
        proxy.go_down()
        echoed, reset = await exchange(proxy.port, b"while down")
        assert echoed == b"" and reset
        assert target.received == []
        assert proxy.snapshot().refused == 1
        proxy.restore()
        echoed, reset = await exchange(proxy.port, b"restored")
        assert (echoed, reset) == (b"restored", False)
        assert len(target.received) == 1

    run(scenario)


def test_cut_after_forwards_exactly_n_bytes_then_cuts_and_can_stay_down() -> None:
    async def scenario(proxy: FaultProxy, target: Target) -> None:
        proxy.cut_after(30_000, then_down=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(PAYLOAD)
            await writer.drain()
        _, reset = await read_all(reader)
        writer.close()
        assert reset
        await until(lambda: len(target.ended) == 1, "the target's connection to end")
        assert len(target.received[0]) == 30_000
        assert target.received[0] == PAYLOAD[:30_000]
        stats = proxy.snapshot()
        assert (stats.cuts, stats.bytes_up, proxy.down) == (1, 30_000, True)
        echoed, reset = await exchange(proxy.port, b"still down")
        assert echoed == b"" and reset and len(target.received) == 1
        proxy.restore()
        assert await exchange(proxy.port, b"up again") == (b"", False)  # the sink target echoes nothing
        await until(lambda: len(target.received) == 2, "the second connection")

    run(scenario, echo=False)


def test_rate_paces_each_direction_by_the_injected_clock() -> None:
    fake = FakeTime()

    async def scenario(proxy: FaultProxy, target: Target) -> None:
        payload = PAYLOAD[:50_000]
        assert await exchange(proxy.port, payload) == (b"", False)
        await until(lambda: target.ended == ["eof"], "the target to get everything")
        assert bytes(target.received[0]) == payload
        # 1000 bytes of burst pass at once, the other 49 000 at 10 000 bytes/s: 4.9 s of waiting asked for,
        # however the socket happened to chunk them.
        assert sum(fake.sleeps) == pytest.approx(4.9)
        assert all(s > 0 for s in fake.sleeps)

    run(scenario, echo=False, rate=10_000, burst=1000, clock=fake.clock, sleep=fake.sleep)


def test_delay_holds_each_chunk_by_the_injected_clock() -> None:
    fake = FakeTime()

    async def scenario(proxy: FaultProxy, target: Target) -> None:
        assert await exchange(proxy.port, b"ping") == (b"", False)
        await until(lambda: target.ended == ["eof"], "the target to get the chunk")
        assert bytes(target.received[0]) == b"ping"
        assert fake.sleeps == [pytest.approx(0.25)]

    run(scenario, echo=False, delay_s=0.25, clock=fake.clock, sleep=fake.sleep)


def test_token_bucket() -> None:
    fake = FakeTime()
    bucket = TokenBucket(1000, burst=100, clock=fake.clock)
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(50) == pytest.approx(0.05)
    fake.now += 0.05
    assert bucket.reserve(100) == pytest.approx(0.1)
    fake.now += 10  # idle: refills to the burst, not beyond
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(1) == pytest.approx(0.001)
    bucket.set_rate(None)
    assert bucket.reserve(10**9) == 0.0
    with pytest.raises(ValueError):
        bucket.set_rate(0)


def test_parse_rate_and_host_port() -> None:
    assert parse_rate("2Mbit") == 250_000
    assert parse_rate("250kB") == 250_000
    assert parse_rate("1.5MB/s") == 1_500_000
    assert parse_rate("800") == 800
    for bad in ("fast", "2 Mbps", "-1", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rate(bad)
    assert parse_host_port("10.0.0.1:11112") == ("10.0.0.1", 11112)
    assert parse_host_port("11113") == ("127.0.0.1", 11113)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_host_port("host:port")


def test_proxy_thread_controls_from_another_thread() -> None:
    """ProxyThread: what synchronous tests and the benchmark use (blocking sockets, real clock)."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def echo_once() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                got.append(data)
                conn.sendall(data)

    thread = threading.Thread(target=echo_once, daemon=True)
    thread.start()
    with ProxyThread("127.0.0.1", listener.getsockname()[1]) as proxy:
        proxy.go_down()
        # Reset at once: seen by connect() itself or by the first recv(), as the scheduler has it.
        with (
            contextlib.suppress(ConnectionResetError),
            socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE_S) as sock,
        ):
            assert sock.recv(10) == b""
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"hello")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b"hello"
        thread.join(DEADLINE_S)
        stats = proxy.stats()
        assert (stats.refused, stats.connections, stats.bytes_up, stats.bytes_down) == (1, 1, 5, 5)
    listener.close()
    assert b"".join(got) == b"hello"


def test_command_line_help_and_run() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "xray_triage_tools.faultproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for option in ("--listen", "--target", "--rate", "--delay-ms", "--cut-every", "--down-for"):
        assert option in help_text

    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xray_triage_tools.faultproxy",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{listener.getsockname()[1]}",
            "--rate",
            "100Mbit",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.match(r"listening on 127\.0\.0\.1:(\d+) ->", first)
        assert match, first + proc.stderr.read() if proc.stderr else first
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=DEADLINE_S) as sock:
            listener.settimeout(DEADLINE_S)
            conn, _ = listener.accept()
            with conn:
                sock.sendall(b"through the proxy")
                sock.shutdown(socket.SHUT_WR)
                conn.settimeout(DEADLINE_S)
                received = b""
                while data := conn.recv(100):
                    received += data
        assert received == b"through the proxy"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0
        assert "stopped: 1 connections" in out and "17 bytes up" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()
