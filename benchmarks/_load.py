"""The client side of ``bench_e2e.py``: a load generator and client micro-benchmarks.

It runs as its own process (``python benchmarks/_load.py``) so that it does
not share a GIL with anything it measures: it reads one JSON job per line on
stdin and answers each with one JSON line on stdout.  Byte strings travel
base64-encoded.  Jobs:

``requests``
    A closed loop of *concurrency* requests in flight, on raw non-blocking
    sockets driven by one epoll loop, sending precomputed request bytes and
    checking every reply byte for byte (a wrong reply fails the job).  Runs
    for ``warmup`` seconds and at least ``warmup_requests`` replies unmeasured,
    then ``duration`` seconds measured (or exactly ``count`` requests one at
    a time).
``stream``
    One request carrying ``total`` bytes through an echoing script; sends and
    receives at once and checks the echoed bytes as they arrive.
``client``
    Sequential requests (concurrency 1) made through the library's ``run()``
    of one flavour (the asyncio and trio ones all in one event loop), or
    through a minimal blocking raw-socket client (connect, send, half-close,
    read to EOF).
``fork``
    Sequential ``run("exec:/bin/true")`` of one flavour, or a bare
    ``os.posix_spawn`` + ``os.waitpid``.

Every job also reports the CPU time this process used, so the report can
show the load generator was not the bottleneck.
"""

from __future__ import annotations

import base64
import errno
import importlib
import json
import math
import os
import random
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

KiB = 1024
MiB = 1024 * KiB

#: Size of one send/recv on the streaming path.
CHUNK = 256 * KiB
#: The streamed payload repeats one block of this size.
BLOCK = MiB
#: Seconds before a unix connect refused with EAGAIN (backlog full) is retried.
RETRY_DELAY = 0.001

Job = dict[str, Any]


class Failure(Exception):
    """A wrong reply, a timeout or an I/O error: the job (and the bench) fails."""


def b64(data: bytes) -> str:
    """Encode bytes for a JSON job."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Decode bytes from a JSON job."""
    return base64.b64decode(text)


def _address(target: list[Any]) -> tuple[int, Any]:
    """``["unix", path]`` or ``["tcp", host, port]`` -> (family, address)."""
    if target[0] == "unix":
        return socket.AF_UNIX, target[1]
    return socket.AF_INET, (target[1], int(target[2]))


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The value below which *fraction* of the sorted values lie (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# --- requests: the load generator ----------------------------------------------


class _Request:
    __slots__ = ("buf", "connected", "pending", "sock", "started")

    def __init__(self, sock: socket.socket, started: float, request: bytes) -> None:
        self.sock = sock
        self.started = started
        self.pending = memoryview(request)
        self.buf = bytearray()
        self.connected = False


def requests_job(job: Job) -> Job:
    """Drive a closed loop of raw requests; check every reply."""
    family, address = _address(job["target"])
    request = unb64(job["request"])
    expect = unb64(job["expect"])
    concurrency = int(job.get("concurrency", 1))
    count = job.get("count")
    warmup = float(job.get("warmup", 0.0))
    warmup_requests = int(job.get("warmup_requests", 0))
    duration = float(job.get("duration", 1.0))
    timeout = float(job.get("timeout", 30.0))
    sel = selectors.EpollSelector()
    cpu0 = time.process_time()
    start = time.monotonic()
    # The measured window opens once the warm-up time has passed *and*
    # warmup_requests replies came back (steady state: no pre-started
    # processes left over from before the cell).
    measure_from = start if count is not None else math.inf
    stop_at = math.inf
    latencies: list[float] = []
    completed = 0
    launched = 0
    active: set[_Request] = set()
    retry: list[tuple[float, float]] = []  # (when, started)

    def more() -> bool:
        if count is not None:
            return launched < int(count)
        return time.monotonic() < stop_at

    def launch(started: float) -> None:
        nonlocal launched
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        req = _Request(sock, started, request)
        try:
            sock.connect(address)
        except BlockingIOError as exc:
            if exc.errno == errno.EAGAIN and family == socket.AF_UNIX:
                sock.close()  # listen backlog full: retry like Dovecot's client
                retry.append((time.monotonic() + RETRY_DELAY, started))
                return
            launched += 1
            active.add(req)
            sel.register(sock, selectors.EVENT_WRITE, req)
            return
        except OSError as exc:
            sock.close()
            raise Failure(f"connect({address}) failed: {exc}") from None
        launched += 1
        req.connected = True
        active.add(req)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, req)

    def finish(req: _Request) -> None:
        nonlocal completed
        now = time.monotonic()
        sel.unregister(req.sock)
        req.sock.close()
        active.discard(req)
        if bytes(req.buf) != expect:
            raise Failure(f"wrong reply from {address}: got {len(req.buf)} bytes "
                          f"{bytes(req.buf[:60])!r}..., expected {len(expect)} bytes "
                          f"{expect[:60]!r}...")
        completed += 1
        if measure_from <= now <= stop_at:
            latencies.append(now - req.started)

    def open_window() -> None:
        nonlocal measure_from, stop_at
        now = time.monotonic()
        if now >= start + warmup and completed >= warmup_requests:
            measure_from, stop_at = now, now + duration
        elif now > start + timeout:
            raise Failure(f"warm-up of {address} not done within {timeout} s")

    try:
        while True:
            if measure_from == math.inf:
                open_window()
            while len(active) + len(retry) < (1 if count is not None else concurrency) and more():
                launch(time.monotonic())
            if not active and not retry:
                break
            now = time.monotonic()
            wait = 0.05
            if retry:
                retry.sort()
                while retry and retry[0][0] <= now:
                    _, started = retry.pop(0)
                    launch(started)
                if retry:
                    wait = min(wait, max(retry[0][0] - now, 0.0))
            for key, mask in sel.select(wait):
                req = key.data
                assert isinstance(req, _Request)
                sock = req.sock
                if not req.connected:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise Failure(f"connect({address}) failed: {os.strerror(err)}")
                    req.connected = True
                    sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, req)
                if mask & selectors.EVENT_WRITE and req.pending:
                    try:
                        sent = sock.send(req.pending)
                    except BlockingIOError:
                        sent = 0
                    except OSError as exc:
                        raise Failure(f"send to {address} failed: {exc}") from None
                    req.pending = req.pending[sent:]
                    if not req.pending:
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ, req)
                    continue
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise Failure(f"recv from {address} failed: {exc}") from None
                    if data:
                        req.buf += data
                        if len(req.buf) > len(expect):
                            finish(req)  # raises: the reply is too long
                    else:
                        finish(req)
            now = time.monotonic()
            for req in active:
                if now - req.started > timeout:
                    raise Failure(f"no complete reply from {address} within {timeout} s")
    finally:
        for req in active:
            req.sock.close()
        sel.close()
    latencies.sort()
    measured_time = duration if count is None else time.monotonic() - start
    return {
        "completed": completed,
        "measured": len(latencies),
        "rate": len(latencies) / measured_time,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "client_cpu": time.process_time() - cpu0,
        "wall": time.monotonic() - start,
    }


# --- stream: bulk throughput through an echoing script ---------------------------


def stream_block(dot: bool) -> bytes:
    """The repeated payload block: random bytes, or (for dot framing) CRLF text lines.

    The text lines never start with a dot, so their dot encoding is the text
    itself and the encoded payload ends with the ``.\\r\\n`` end line only.
    """
    rng = random.Random(20251125)
    if not dot:
        return rng.randbytes(BLOCK)
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    line_count = BLOCK // 64
    return b"".join(bytes(rng.choices(alphabet, k=62)) + b"\r\n" for _ in range(line_count))


def stream_job(job: Job) -> Job:
    """Send *total* payload bytes through a ``cat`` service, checking the echo."""
    family, address = _address(job["target"])
    header = unb64(job["header"])
    total = int(job["total"])
    dot = bool(job.get("dot", False))
    timeout = float(job.get("timeout", 120.0))
    if total % BLOCK:
        raise Failure(f"stream size must be a multiple of {BLOCK}")
    block = stream_block(dot)
    doubled = block + block
    tail = b".\r\n" if dot else b""
    suffix = tail + b"+\n"
    expect_total = total + len(suffix)

    def expected(offset: int, size: int) -> bytes:
        if offset + size <= total:
            start = offset % BLOCK
            return doubled[start : start + size]
        head = b""
        if offset < total:
            head = expected(offset, total - offset)
            size -= total - offset
            offset = total
        return head + suffix[offset - total : offset - total + size]

    def outgoing() -> Any:
        yield memoryview(header)
        view = memoryview(block)
        for _ in range(total // BLOCK):
            for i in range(0, BLOCK, CHUNK):
                yield view[i : i + CHUNK]
        if tail:
            yield memoryview(tail)

    cpu0 = time.process_time()
    started = time.monotonic()
    deadline = started + timeout
    sock = socket.socket(family, socket.SOCK_STREAM)
    sel = selectors.EpollSelector()
    received = 0
    rbuf = bytearray(CHUNK)
    rview = memoryview(rbuf)
    try:
        sock.settimeout(10)
        sock.connect(address)
        sock.setblocking(False)
        pieces = outgoing()
        pending: memoryview | None = next(pieces)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        done = False
        while not done:
            if time.monotonic() > deadline:
                raise Failure(f"stream through {address} not done within {timeout} s")
            for _, mask in sel.select(1.0):
                if mask & selectors.EVENT_WRITE and pending is not None:
                    try:
                        while pending is not None:
                            sent = sock.send(pending)
                            pending = pending[sent:]
                            if not pending:
                                pending = next(pieces, None)
                    except BlockingIOError:
                        pass
                    if pending is None:
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        n = sock.recv_into(rview)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        done = True
                        break
                    if received + n > expect_total or rbuf[:n] != expected(received, n):
                        raise Failure(f"stream through {address}: wrong bytes at offset "
                                      f"{received}")
                    received += n
    except OSError as exc:
        raise Failure(f"stream through {address} failed: {exc}") from None
    finally:
        sel.close()
        sock.close()
    elapsed = time.monotonic() - started
    if received != expect_total:
        raise Failure(f"stream through {address}: {received} of {expect_total} bytes came back")
    return {"bytes": total, "elapsed": elapsed, "mbps": total / elapsed / 1e6,
            "client_cpu": time.process_time() - cpu0}


# --- client and fork: sequential calls, timed one by one ---------------------------


def _timed_loop(call: Callable[[], None], warmup: float, duration: float) -> Job:
    end_warmup = time.monotonic() + warmup
    while time.monotonic() < end_warmup:
        call()
    times: list[float] = []
    children0 = os.times()
    cpu0 = time.process_time()
    start = time.monotonic()
    stop_at = start + duration
    now = start
    while now < stop_at:
        call()
        after = time.monotonic()
        times.append(after - now)
        now = after
    return _loop_result(times, now - start, time.process_time() - cpu0, children0)


async def _timed_loop_async(call: Callable[[], Awaitable[None]], warmup: float,
                            duration: float) -> Job:
    end_warmup = time.monotonic() + warmup
    while time.monotonic() < end_warmup:
        await call()
    times: list[float] = []
    children0 = os.times()
    cpu0 = time.process_time()
    start = time.monotonic()
    stop_at = start + duration
    now = start
    while now < stop_at:
        await call()
        after = time.monotonic()
        times.append(after - now)
        now = after
    return _loop_result(times, now - start, time.process_time() - cpu0, children0)


def _loop_result(times: list[float], elapsed: float, cpu: float,
                 children0: os.times_result) -> Job:
    children1 = os.times()
    child_cpu = (children1.children_user - children0.children_user
                 + children1.children_system - children0.children_system)
    times.sort()
    n = len(times)
    return {
        "calls": n,
        "per_call": elapsed / n,
        "p50": percentile(times, 0.50),
        "p99": percentile(times, 0.99),
        "cpu_per_call": cpu / n,
        "child_cpu_per_call": child_cpu / n,
        "median": statistics.median(times),
    }


def _run_flavour(flavour: str, make_call: Callable[[Any], Any], check: Callable[[Any], None],
                 warmup: float, duration: float) -> Job:
    """Time ``make_call(module)`` of one library flavour, checking each result."""
    if flavour not in ("blocking", "asyncio", "trio"):
        raise Failure(f"unknown flavour {flavour!r}")
    module = importlib.import_module(f"execproto.adapters.{flavour}")
    result: Job
    if flavour == "blocking":

        def call() -> None:
            check(make_call(module))

        result = _timed_loop(call, warmup, duration)
    else:

        async def acall() -> None:
            check(await make_call(module))

        if flavour == "asyncio":
            import asyncio

            result = asyncio.run(_timed_loop_async(acall, warmup, duration))
        else:
            import trio

            result = trio.run(_timed_loop_async, acall, warmup, duration)
    # Which checkout was measured: the caller checks it is the one it meant.
    result["module"] = module.__file__
    return result


def client_job(job: Job) -> Job:
    """Sequential requests through the library client, or a raw-socket client."""
    variant = job["variant"]
    payload = unb64(job["payload"])
    expect = unb64(job["expect"])
    warmup = float(job.get("warmup", 0.2))
    duration = float(job.get("duration", 1.0))
    family, address = _address(job["target"])
    if variant == "raw":
        request = unb64(job["request"])

        def raw() -> None:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(address)
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                reply = bytearray()
                while chunk := sock.recv(65536):
                    reply += chunk
            if reply != expect + b"+\n":
                raise Failure(f"raw client: wrong reply {bytes(reply[:60])!r}")

        return _timed_loop(raw, warmup, duration)
    uri = f"unix:{address}" if family == socket.AF_UNIX else f"tcp:{address[0]}:{address[1]}"
    data = payload or None

    def check(result: Any) -> None:
        if not result.ok or result.output != expect:
            raise Failure(f"{variant} client: {result.status.name} {result.kind.value} "
                          f"{result.detail!r} output {(result.output or b'')[:60]!r}")

    return _run_flavour(variant, lambda mod: mod.run(uri, input=data), check,
                        warmup, duration)


def fork_job(job: Job) -> Job:
    """Sequential ``exec:/bin/true`` through the fork driver, or a bare spawn."""
    variant = job["variant"]
    warmup = float(job.get("warmup", 0.2))
    duration = float(job.get("duration", 1.0))
    program = job.get("program", "/bin/true")
    if variant == "bare":
        path = os.fsencode(program)

        def bare() -> None:
            pid = os.posix_spawn(path, [path], {})
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise Failure(f"bare spawn: wait status {status}")

        return _timed_loop(bare, warmup, duration)

    def check(result: Any) -> None:
        if not result.ok or result.returncode != 0:
            raise Failure(f"{variant} fork driver: {result.status.name} {result.detail!r}")

    return _run_flavour(variant, lambda mod: mod.run(f"exec:{program}"), check,
                        warmup, duration)


JOBS: dict[str, Callable[[Job], Job]] = {
    "requests": requests_job,
    "stream": stream_job,
    "client": client_job,
    "fork": fork_job,
}


def main() -> int:
    """Serve jobs from stdin until it closes."""
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = JOBS[job["job"]](job)
            result["ok"] = True
        except Failure as exc:
            result = {"ok": False, "error": str(exc)}
        except Exception as exc:  # report, keep serving: the caller decides
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
