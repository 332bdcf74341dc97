"""200 concurrent clients, thousands of requests, every byte checked, on every flavour.

For each flavour and transport, the flavour's service runs ``/bin/cat`` with
its default settings (64 scripts at once, the rest wait in the backlog) and
200 clients of the same flavour send :data:`REQUESTS` distinct payloads,
200 at any time.  Every reply is compared byte for byte; the number of
failures must be zero.  Afterwards the process's descriptor count and its
child processes (zombies included) must be back to what they were.

Over tcp ``cat`` echoes the dot-encoded payload unchanged, which is valid
dot-framed output, so the client's output is the payload after a dot-framing
round trip (bare LF becomes CRLF, the last line break is trimmed); the
payloads there carry no CR and many lines that start with a dot.

``EXECPROTO_LOAD_REQUESTS`` changes the number of requests per flavour and
transport (default 1000: the six runs take about 30 s on two busy cores).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

import trio

from execproto import Status
from execproto.adapters import Listener, RunResult, TcpListener, UnixListener

from ..adapters.flavours import (
    SOCKET_DRIVERS,
    Flavour,
    GuardTimeout,
    LogCapture,
    children,
    dot_roundtrip,
    open_fds,
    target_of,
)

REQUESTS = int(os.environ.get("EXECPROTO_LOAD_REQUESTS", "1000"))
CONCURRENCY = 200
#: Bound for one flavour/transport run of REQUESTS requests.
LIMIT = 60.0
#: Bound for one request (connect + run).
RUN_TIMEOUT = 30.0
#: How long descriptors and children may take to settle after the service stopped.
SETTLE = 5.0


def _payloads(count: int, seed: str) -> list[bytes]:
    """*count* distinct payloads without CR: text with dot-lines, binary, a few large ones."""
    rng = random.Random(seed)
    payloads = []
    for i in range(count):
        head = b"request %d\n" % i
        kind = i % 4
        if kind == 0:
            body = b""
        elif kind == 1:
            body = b"".join(rng.choice((b".", b"..", b"", b"a.")) + b"line %d\n" % n
                            for n in range(rng.randrange(1, 60)))
        elif kind == 2:
            body = rng.randbytes(rng.randrange(1, 4096)).replace(b"\r", b"")
        else:
            size = 256 * 1024 if i % 100 == 3 else rng.randrange(1, 2048)
            body = rng.randbytes(size).replace(b"\r", b"") + rng.choice((b"", b"\n"))
        payloads.append(head + body)
    return payloads


class _Tally:
    """Results of one load run: latencies and failure descriptions (thread-safe)."""

    def __init__(self, expected: list[bytes]) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def check(self, index: int, result: RunResult, seconds: float) -> None:
        want = self.expected[index]
        problem = ""
        if result.status is not Status.SUCCESS:
            problem = f"{result.status.name} {result.kind.name} {result.detail!r}"
        elif result.output != want:
            got = result.output or b""
            at = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                      min(len(got), len(want)))
            problem = f"output {len(got)} bytes, expected {len(want)}, first difference at {at}"
        with self._lock:
            self.latencies.append(seconds)
            if problem:
                self.failures.append(f"request {index}: {problem}")


def _jobs(count: int) -> Iterator[int]:
    yield from range(count)


def _drive_blocking(flavour: Flavour, target: str, payloads: list[bytes],
                    tally: _Tally) -> None:
    def one(index: int) -> None:
        started = time.monotonic()
        result: RunResult = flavour.module.run(target, input=payloads[index],
                                               timeout=RUN_TIMEOUT)
        tally.check(index, result, time.monotonic() - started)

    pool = ThreadPoolExecutor(max_workers=CONCURRENCY)
    try:
        futures = [pool.submit(one, i) for i in range(len(payloads))]
        _, pending = wait_futures(futures, timeout=LIMIT)
        if pending:
            raise GuardTimeout(f"{len(pending)} requests still running after {LIMIT} s")
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _drive_asyncio(flavour: Flavour, target: str, payloads: list[bytes],
                   tally: _Tally) -> None:
    errors: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: errors.append(str(context)))
        jobs = _jobs(len(payloads))

        async def worker() -> None:
            for index in jobs:
                started = time.monotonic()
                result = await flavour.module.run(target, input=payloads[index],
                                                  timeout=RUN_TIMEOUT)
                tally.check(index, result, time.monotonic() - started)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), LIMIT)

    asyncio.run(main())
    assert not errors, f"the asyncio loop reported errors: {errors}"


def _drive_trio(flavour: Flavour, target: str, payloads: list[bytes], tally: _Tally) -> None:
    async def main() -> None:
        jobs = _jobs(len(payloads))

        async def worker() -> None:
            for index in jobs:
                started = time.monotonic()
                result = await flavour.module.run(target, input=payloads[index],
                                                  timeout=RUN_TIMEOUT)
                tally.check(index, result, time.monotonic() - started)

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENCY):
                    nursery.start_soon(worker)

    trio.run(main)


_DRIVERS: dict[str, Callable[[Flavour, str, list[bytes], _Tally], None]] = {
    "blocking": _drive_blocking,
    "asyncio": _drive_asyncio,
    "trio": _drive_trio,
}


def _settled(fds_before: int, children_before: set[int]) -> tuple[int, dict[int, str]]:
    """Wait (bounded) for descriptors and children to return to the baseline."""
    deadline = time.monotonic() + SETTLE
    while True:
        fds = len(open_fds())
        extra = {pid: state for pid, state in children().items()
                 if pid not in children_before or state == "Z"}
        if (fds <= fds_before and not extra) or time.monotonic() > deadline:
            return fds, extra
        time.sleep(0.05)


@SOCKET_DRIVERS
def test_200_concurrent_clients(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """REQUESTS distinct payloads through ``cat``, 200 clients at a time: zero failures."""
    payloads = _payloads(REQUESTS, seed=f"{flavour.name}-{driver}")
    expected = [dot_roundtrip(p) for p in payloads] if driver == "tcp" else payloads
    assert len(set(payloads)) == len(payloads)
    tally = _Tally(expected)
    log = LogCapture()
    log.logger.setLevel(logging.WARNING)  # one INFO line per request is too many to keep
    listener: Listener = UnixListener(str(tmp_path / "sock")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)
    fds_before = len(open_fds())
    children_before = set(children())
    with flavour.serving([listener], "/bin/cat", logger=log.logger) as addresses:
        target = target_of(addresses[0])
        started = time.monotonic()
        _DRIVERS[flavour.name](flavour, target, payloads, tally)
        elapsed = time.monotonic() - started
    fds_after, extra_children = _settled(fds_before, children_before)
    latencies = sorted(tally.latencies)
    p50 = statistics.median(latencies) if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
    total = sum(len(p) for p in payloads)
    print(f"\nLOAD {flavour.name} {driver}: {len(latencies)} requests ({total / 1e6:.1f} MB) "
          f"from {CONCURRENCY} clients in {elapsed:.2f} s ({len(latencies) / elapsed:.0f}/s), "
          f"latency p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms, "
          f"{len(tally.failures)} failures; fds {fds_before} -> {fds_after}, "
          f"new children {extra_children}")
    assert not tally.failures, f"{len(tally.failures)} failures: {tally.failures[:10]}"
    assert len(latencies) == REQUESTS
    assert not log.messages(logging.WARNING), log.messages(logging.WARNING)[:10]
    assert fds_after <= fds_before, f"descriptors: {fds_before} before, {fds_after} after"
    assert not extra_children, f"children left (Z = zombie): {extra_children}"


def test_payloads_are_distinct_and_cr_free() -> None:
    """The generator gives what the tcp expectation needs (no CR) and what checking needs."""
    payloads = _payloads(400, seed="check")
    assert len(set(payloads)) == len(payloads)
    assert not any(b"\r" in p for p in payloads)
    assert any(b"\n." in p for p in payloads)
