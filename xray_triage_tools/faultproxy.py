"""A fault-injecting TCP proxy: a bad station link reproduced on one machine.

An edge station reaches the centre over a slow link (a few Mbit/s, long delays)
that drops in the middle of a transfer and stays down for a while. The kernel's
``netem`` needs privileges we do not have in tests or CI, so this asyncio proxy
sits between the edge's sender and the centre's DICOM port and does the same at
the TCP level:

- **throttle**: at most N bytes/s in each direction (one token bucket per
  direction, shared by all connections, as one link is);
- **delay**: every chunk is forwarded ``delay_s`` after it arrived (a one-way
  latency that does not reduce throughput);
- **cut**: every open connection is aborted now (both ends get a TCP RST), or
  as soon as N more bytes have been forwarded (``cut_after``: mid-transfer, at
  an exact byte count);
- **down / restore**: while down, a new connection is accepted and at once
  aborted without reaching the target (the sender sees a reset, as behind a
  dead link), until ``restore``.

``FaultProxy`` runs on the caller's event loop; ``ProxyThread`` runs one on its
own loop in a daemon thread with thread-safe controls, for synchronous tests
and benchmarks. ``python -m xray_triage_tools.faultproxy --help`` is the
operator's command line. The server never imports this module.

Time comes from ``clock`` (seconds, monotonic) and waits go through ``sleep``
(an ``asyncio.sleep``-like coroutine function), both injectable so unit tests
can check the pacing without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

log = logging.getLogger("xray_triage_tools.faultproxy")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
T = TypeVar("T")

CHUNK_BYTES = 16384  # largest piece read and forwarded at once: the pacing granularity
UP = "up"  # client -> target (the edge's sender -> the centre)
DOWN = "down"  # target -> client


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped link looks to the peer, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TokenBucket:
    """A byte-rate limiter: how long to wait before ``n`` more bytes may pass.

    ``rate`` in bytes/s (None: unlimited); ``burst`` bytes may pass at once
    after an idle period. A request larger than what is available is granted at
    once and paid for by waiting (the bucket goes into debt), so any chunk size
    works and the long-run rate is exactly ``rate``.
    """

    def __init__(self, rate: float | None, burst: int | None = None, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.rate: float | None = None
        self.burst = 0.0
        self._tokens = 0.0
        self._last = clock()
        self.set_rate(rate, burst)

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s or None, got {rate}")
        self.rate = rate
        self.burst = float(burst if burst is not None else min(CHUNK_BYTES, rate or CHUNK_BYTES))
        self._tokens = self.burst
        self._last = self._clock()

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens; the seconds to wait before sending them."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0


@dataclass
class ProxyStats:
    """Counters since the proxy started. Bytes are those forwarded, per direction."""

    connections: int = 0  # accepted and connected to the target
    refused: int = 0  # accepted while down and aborted at once
    target_failures: int = 0  # the target could not be reached
    cuts: int = 0  # connections aborted by cut_all / cut_after / go_down
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Link:
    """One proxied connection: two pumps (reader -> queue -> writer) per direction."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []
        self.aborted = False

    async def run(self) -> None:
        pipes = ((UP, self.client[0], self.target[1]), (DOWN, self.target[0], self.client[1]))
        for direction, reader, writer in pipes:
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=64)
            self.tasks.append(asyncio.create_task(self._read(direction, reader, queue)))
            self.tasks.append(asyncio.create_task(self._write(direction, writer, queue)))
        try:
            done, pending = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if pending:  # a pump failed (a reset, a refused write): the whole connection goes
                self.abort()
                await asyncio.wait(pending)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("fault proxy connection ended: %r", task.exception())
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            for _, writer in (self.client, self.target):
                writer.close()

    async def _read(
        self, direction: str, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        proxy = self.proxy
        while True:
            data = await reader.read(proxy.chunk_bytes)
            if not data:
                await queue.put(None)
                return
            wait = proxy._buckets[direction].reserve(len(data))
            if wait > 0:
                await proxy._sleep(wait)
            await queue.put((proxy._clock() + proxy.delay_s, data))

    async def _write(
        self, direction: str, writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        proxy = self.proxy
        while True:
            item = await queue.get()
            if item is None:  # the other side closed its sending half: pass the half-close on
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            due, data = item
            wait = due - proxy._clock()
            if wait > 0:
                await proxy._sleep(wait)
            budget = proxy._cut_budget
            if budget is not None:
                data = data[:budget]
                proxy._cut_budget = budget - len(data)
            writer.write(data)
            proxy.stats.bytes_up += len(data) if direction == UP else 0
            proxy.stats.bytes_down += len(data) if direction == DOWN else 0
            if proxy._cut_budget == 0:
                await writer.drain()
                proxy._cut_budget = None
                proxy._fire_cut_after()
                return
            await writer.drain()

    def abort(self) -> None:
        """Cut both ends now (TCP RST) and stop the pumps."""
        if self.aborted:
            return
        self.aborted = True
        for _, writer in (self.client, self.target):
            reset_connection(writer)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port`` with injected faults.

    ``listen_port=0`` picks a free port (read ``port`` after ``start``). ``rate``
    is bytes/s each way (None: unlimited), ``delay_s`` the one-way delay added to
    every chunk. The control methods are plain calls, to be made on the proxy's
    event loop (``ProxyThread`` wraps them for other threads).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rate: float | None = None,
        burst: int | None = None,
        delay_s: float = 0.0,
        chunk_bytes: int = CHUNK_BYTES,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self.delay_s = delay_s
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self._sleep = sleep
        self._buckets = {UP: TokenBucket(rate, burst, clock), DOWN: TokenBucket(rate, burst, clock)}
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._cut_budget: int | None = None
        self._down_after_cut = False
        self.down = False
        self.stats = ProxyStats()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "fault proxy listening on %s:%d -> %s:%d",
            self.listen_host,
            self.port,
            self.target_host,
            self.target_port,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut_all(count=False)
        # The cut connections' handlers end by themselves; cancelling them instead would make
        # Python 3.11's stream callback log a CancelledError traceback.
        if self._handlers:
            _, stragglers = await asyncio.wait(list(self._handlers), timeout=5)
            for task in stragglers:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    # -- controls ---------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        return self._buckets[UP].rate

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        """Throttle to ``rate`` bytes/s each way (None: unlimited)."""
        for bucket in self._buckets.values():
            bucket.set_rate(rate, burst)
        log.info("fault proxy rate %s bytes/s each way", rate if rate is not None else "unlimited")

    def set_delay(self, delay_s: float) -> None:
        """Forward each chunk ``delay_s`` seconds after it arrived (applies to chunks read from now on)."""
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0 s, got {delay_s}")
        self.delay_s = delay_s

    def cut_all(self, *, count: bool = True) -> int:
        """Abort every open connection now (both ends get a reset); the number cut."""
        links = list(self._links)
        for link in links:
            link.abort()
        if count and links:
            self.stats.cuts += len(links)
            log.info("fault proxy cut %d connection(s)", len(links))
        return len(links)

    def go_down(self, *, cut: bool = True) -> int:
        """The link is down: new connections are aborted at once; open ones are cut unless ``cut=False``."""
        self.down = True
        log.info("fault proxy down")
        return self.cut_all() if cut else 0

    def restore(self) -> None:
        """The link is back: new connections reach the target again (the rate and delay stay as set)."""
        self.down = False
        self._cut_budget = None
        self._down_after_cut = False
        log.info("fault proxy restored")

    def cut_after(self, n_bytes: int, *, then_down: bool = False) -> None:
        """Once ``n_bytes`` more bytes (both directions together) are forwarded, cut every connection.

        Exactly ``n_bytes`` are forwarded before the cut. With ``then_down`` the link
        also goes down then, until ``restore``. One-shot.
        """
        if n_bytes < 1:
            raise ValueError(f"n_bytes must be >= 1, got {n_bytes}")
        self._cut_budget = n_bytes
        self._down_after_cut = then_down

    def _fire_cut_after(self) -> None:
        log.info("fault proxy byte budget reached")
        if self._down_after_cut:
            self._down_after_cut = False
            self.go_down()
        else:
            self.cut_all()

    def snapshot(self) -> ProxyStats:
        self.stats.active = len(self._links)
        return ProxyStats(**asdict(self.stats))

    # -- connections ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.stats.refused += 1
            reset_connection(writer)
            return
        try:
            target = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError as exc:
            self.stats.target_failures += 1
            log.warning("fault proxy cannot reach %s:%d: %s", self.target_host, self.target_port, exc)
            reset_connection(writer)
            return
        if self.down:  # went down while we connected
            self.stats.refused += 1
            reset_connection(writer)
            reset_connection(target[1])
            return
        self.stats.connections += 1
        link = _Link(self, (reader, writer), target)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class ProxyThread:
    """A ``FaultProxy`` on its own event loop in a daemon thread; controls callable from any thread.

    Use as a context manager: the port is bound on entry and everything is closed on exit::

        with ProxyThread("127.0.0.1", centre_port, rate=250_000) as proxy:
            ...  # point the edge's destination at 127.0.0.1:proxy.port
            proxy.go_down(); ...; proxy.restore()
    """

    def __init__(self, target_host: str, target_port: int, **kwargs: Any) -> None:
        self._args = (target_host, target_port)
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self.proxy: FaultProxy | None = None

    def __enter__(self) -> ProxyThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

        async def make() -> FaultProxy:
            proxy = FaultProxy(*self._args, **self._kwargs)
            await proxy.start()
            return proxy

        self.proxy = asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self.proxy is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=30)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def port(self) -> int:
        assert self.proxy is not None, "ProxyThread not started"
        return self.proxy.port

    def _call(self, fn: Callable[[FaultProxy], T]) -> T:
        assert self.proxy is not None, "ProxyThread not started"
        proxy = self.proxy

        async def call() -> T:
            return fn(proxy)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        self._call(lambda p: p.set_rate(rate, burst))

    def set_delay(self, delay_s: float) -> None:
        self._call(lambda p: p.set_delay(delay_s))

    def cut_all(self) -> int:
        return self._call(lambda p: p.cut_all())

    def go_down(self, *, cut: bool = True) -> int:
        return self._call(lambda p: p.go_down(cut=cut))

    def restore(self) -> None:
        self._call(lambda p: p.restore())

    def cut_after(self, n_bytes: int, *, then_down: bool = False) -> None:
        self._call(lambda p: p.cut_after(n_bytes, then_down=then_down))

    def stats(self) -> ProxyStats:
        return self._call(lambda p: p.snapshot())


# -- command line ---------------------------------------------------------------------

_RATE_UNITS = {
    "": 1.0,
    "b": 1.0,
    "kb": 1e3,
    "mb": 1e6,
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
}


def parse_rate(text: str) -> float:
    """``"250000"``, ``"250kB"``, ``"2Mbit"`` -> bytes/s (k, M = 10^3, 10^6; bit = 1/8 byte)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)(?:/s)?\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _RATE_UNITS:
        raise argparse.ArgumentTypeError(
            f"rate must be a number with an optional unit (B, kB, MB, bit, kbit, Mbit, Gbit), got {text!r}"
        )
    value = float(match.group(1)) * _RATE_UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0, got {text!r}")
    return value


def parse_host_port(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"PORT"`` for 127.0.0.1) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535 or (sep and not host):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xray_triage_tools.faultproxy",
        description="A TCP proxy that makes a bad link: it throttles, delays, cuts connections "
        "and goes down for a while. Point a sender (an edge station's destination, storescu) at "
        "--listen instead of the real peer at --target. Runs until Ctrl-C / SIGTERM.",
        epilog="Example (a 2 Mbit/s island link with 150 ms delay, cut every 30 s and down for 10 s): "
        "python -m xray_triage_tools.faultproxy --listen 127.0.0.1:11113 --target centre.example:11112 "
        "--rate 2Mbit --delay-ms 150 --cut-every 30 --down-for 10",
    )
    parser.add_argument(
        "--listen",
        type=parse_host_port,
        required=True,
        metavar="HOST:PORT",
        help="where the proxy accepts connections (port 0: any free port, printed at start)",
    )
    parser.add_argument(
        "--target", type=parse_host_port, required=True, metavar="HOST:PORT", help="the real peer"
    )
    parser.add_argument(
        "--rate",
        type=parse_rate,
        metavar="RATE",
        help="throttle each direction to RATE: bytes/s, or with a unit: 250kB, 2Mbit (default: unlimited)",
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="one-way delay added to every chunk (default 0)"
    )
    parser.add_argument(
        "--cut-every",
        type=float,
        metavar="SECONDS",
        help="cut every open connection every SECONDS seconds (mid-transfer, both ends reset)",
    )
    parser.add_argument(
        "--down-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --cut-every: after each cut, refuse new connections for SECONDS (default 0)",
    )
    parser.add_argument(
        "--cut-after-bytes",
        type=int,
        metavar="N",
        help="cut every connection once N bytes have been forwarded (once)",
    )
    return parser


async def _run_cli(args: argparse.Namespace, ready: Callable[[int], None] | None = None) -> None:
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    proxy = FaultProxy(
        target_host,
        target_port,
        listen_host=listen_host,
        listen_port=listen_port,
        rate=args.rate,
        delay_s=args.delay_ms / 1000.0,
    )
    await proxy.start()
    if args.cut_after_bytes:
        proxy.cut_after(args.cut_after_bytes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"listening on {listen_host}:{proxy.port} -> {target_host}:{target_port}", flush=True)
    if ready is not None:
        ready(proxy.port)
    try:
        while not stop.is_set():
            if args.cut_every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.cut_every)
                if stop.is_set():
                    break
                if args.down_for > 0:
                    proxy.go_down()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.down_for)
                    proxy.restore()
                else:
                    proxy.cut_all()
            else:
                await stop.wait()
    finally:
        await proxy.close()
        stats = proxy.snapshot()
        print(
            f"stopped: {stats.connections} connections, {stats.refused} refused, {stats.cuts} cut, "
            f"{stats.bytes_up} bytes up, {stats.bytes_down} bytes down",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        asyncio.run(_run_cli(args))
    except OSError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
