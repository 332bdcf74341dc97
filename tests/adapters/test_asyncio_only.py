"""What only the asyncio flavour has: task cancellation, ``ready=``, open_run(), awaitables.

The cross-flavour scenarios live in the other files of this directory; these
tests cover the asyncio-specific shapes of the API.  Every test body runs
under ``asyncio.run`` with a time limit and fails on anything the loop only
logs (an exception never retrieved, a task destroyed while pending); the
directory's conftest checks descriptors, children and resource warnings
around each test.  Nothing here needs Python 3.11 (no TaskGroup, no
``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from execproto import ErrorKind, LocalProtocolError, Status
from execproto.adapters import (
    RunResult,
    TcpListener,
    UnixListener,
)
from execproto.adapters import asyncio as flavour

P = ParamSpec("P")

#: Default bound for one test body.
LIMIT = 20.0

Address = Any  # str | tuple[str, int]


def asyncio_test(
    limit: float = LIMIT,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, None]]:
    """Run an async test under ``asyncio.run`` within *limit* seconds.

    The loop's exception handler makes anything it would only log a failure.
    """

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            reported: list[str] = []

            async def main() -> None:
                loop = asyncio.get_running_loop()
                loop.set_exception_handler(lambda _, context: reported.append(str(context)))
                await asyncio.wait_for(fn(*args, **kwargs), limit)
                stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                assert not stray, f"tasks left running: {stray}"

            asyncio.run(main())
            assert not reported, f"the loop reported: {reported}"

        return wrapper

    return decorate


def sh(directory: Path, name: str, body: str) -> str:
    """Write an executable /bin/sh script (scripts get no PATH)."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def reaped(pid: int) -> bool:
    """True when *pid* is gone for good (a zombie still counts as present)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def read_pid(path: Path) -> int | None:
    text = path.read_text() if path.exists() else ""
    return int(text) if text.endswith("\n") else None


async def wait_for_pid(path: Path) -> int:
    """Wait until a script has written its pid to *path*."""
    while True:
        pid = read_pid(path)
        if pid is not None:
            return pid
        await asyncio.sleep(0.01)


async def wait_reaped(pid: int) -> None:
    while True:
        if reaped(pid):
            return
        await asyncio.sleep(0.01)


def leftover_files(listeners: list[Any]) -> list[str]:
    return [spec.path for spec in listeners
            if isinstance(spec, UnixListener) and os.path.lexists(spec.path)]


def target(address: Address) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"tcp:{address[0]}:{address[1]}"


class Serving:
    """``serve()`` running as a task of the test's loop."""

    def __init__(self, listeners: list[Any], script: str, **options: Any) -> None:
        self.listeners = listeners
        self.script = script
        self.options = options
        self.task: asyncio.Task[None] | None = None
        self.addresses: list[Address] = []

    async def start(self) -> list[Address]:
        ready: asyncio.Future[list[Address]] = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(flavour.serve(
            self.listeners, self.script, ready=ready.set_result, **self.options))
        waiting: set[asyncio.Future[Any]] = {ready, self.task}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            ready.cancel()
            await self.task  # raises what serve() raised
            raise AssertionError("serve() returned")  # pragma: no cover
        self.addresses = ready.result()
        return self.addresses

    async def stop(self) -> float:
        """Cancel serve(); check it re-raised the cancellation; return how long it took."""
        assert self.task is not None
        began = time.monotonic()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.task.cancelled(), "serve() must re-raise the cancellation"
        assert leftover_files(self.listeners) == []
        return time.monotonic() - began

    async def __aenter__(self) -> list[Address]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if not self.task.done():
            await self.stop()


class Keep(logging.Handler):
    """Keeps the log records it gets."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def unix(tmp_path: Path, name: str = "s") -> UnixListener:
    return UnixListener(str(tmp_path / name))


async def where(tmp_path: Path, driver: str, script: str, stack: contextlib.AsyncExitStack,
                **options: Any) -> str:
    """A target for *script* through *driver*, starting a service if needed."""
    if driver == "fork":
        return f"fork:{script}"
    listener = unix(tmp_path) if driver == "unix" else TcpListener("127.0.0.1", 0)
    (address,) = await stack.enter_async_context(Serving([listener], script, **options))
    return target(address)


# --- serve ---------------------------------------------------------------------


@asyncio_test()
async def test_ready_gets_addresses_and_cancel_cleans_up(tmp_path: Path) -> None:
    script = sh(tmp_path, "cat", "exec /bin/cat\n")
    path = str(tmp_path / "s.sock")
    service = Serving([UnixListener(path), TcpListener("127.0.0.1", 0)], script)
    addresses = await service.start()
    assert addresses[0] == path
    host, port = addresses[1]
    assert host == "127.0.0.1" and port > 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    for address, echoed in zip(addresses, [b"hi\n", b"hi"], strict=True):  # tcp: dot framing
        result = await flavour.run(target(address), input=b"hi\n")
        assert result.status is Status.SUCCESS and result.output == echoed, result
    await service.stop()
    # Nothing listens any more.
    result = await flavour.run(f"tcp:{host}:{port}", connect_timeout=2)
    assert result.status is Status.INTERNAL_FAILURE and "refused" in result.detail


@asyncio_test()
async def test_serve_under_wait_for_reraises_the_timeout(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    began = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(flavour.serve([unix(tmp_path)], script), 0.2)
    assert time.monotonic() - began < 2.0
    assert not (tmp_path / "s").exists()


@asyncio_test()
async def test_bind_error_is_raised_by_serve(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    async with Serving([unix(tmp_path)], script) as (address,):
        called: list[object] = []
        with pytest.raises(OSError) as info:
            await flavour.serve([unix(tmp_path)], script, ready=called.append)
        assert info.value.errno == errno.EADDRINUSE
        assert called == []
        result = await flavour.run(target(address))
        assert result.status is Status.SUCCESS


@asyncio_test()
async def test_grace_lets_running_scripts_finish(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "slow", f"echo $$ > {started}\n/bin/sleep 0.4\necho done\nexit 0\n")
    service = Serving([unix(tmp_path)], script, grace=5.0)
    (address,) = await service.start()
    client = asyncio.ensure_future(flavour.run(target(address)))
    await wait_for_pid(started)
    stopped_after = await service.stop()
    result = await client
    assert 0.2 < stopped_after < 4.0
    assert result.status is Status.SUCCESS and result.output == b"done\n", result


@pytest.mark.parametrize("ignores_term", [False, True])
@asyncio_test()
async def test_after_grace_scripts_are_terminated_then_killed(
    tmp_path: Path, ignores_term: bool
) -> None:
    started = tmp_path / "started"
    trap = "trap '' TERM\n" if ignores_term else ""
    script = sh(tmp_path, "stuck", f"{trap}echo $$ > {started}\nexec /bin/sleep 30\n")
    service = Serving([unix(tmp_path)], script, grace=0.2, kill_timeout=0.4)
    (address,) = await service.start()
    client = asyncio.ensure_future(flavour.run(target(address)))
    pid = await wait_for_pid(started)
    stopped_after = await service.stop()
    result = await client
    assert reaped(pid)
    expected = 0.6 if ignores_term else 0.2
    assert expected - 0.05 < stopped_after < expected + 2.0
    # The script was ended by a signal: the client is answered "-".
    assert result.status is Status.FAILURE, result


@asyncio_test()
async def test_a_second_cancel_skips_the_grace(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "stuck", f"trap '' TERM\necho $$ > {started}\nexec /bin/sleep 30\n")
    service = Serving([unix(tmp_path)], script, grace=30.0, kill_timeout=30.0)
    (address,) = await service.start()
    client = asyncio.ensure_future(flavour.run(target(address)))
    pid = await wait_for_pid(started)
    assert service.task is not None
    service.task.cancel()
    await asyncio.sleep(0.2)
    assert not service.task.done()  # in its grace period
    stopped_after = await service.stop()  # cancels again
    await client
    assert stopped_after < 2.0
    assert reaped(pid)


@asyncio_test()
async def test_clients_beyond_max_connections_wait(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = sh(tmp_path, "one", f"echo start >> {log}\n/bin/sleep 0.2\n"
                                 f"echo end >> {log}\nexit 0\n")
    async with Serving([unix(tmp_path)], script, max_connections=1) as (address,):
        began = time.monotonic()
        results = await asyncio.gather(*(flavour.run(target(address)) for _ in range(3)))
        took = time.monotonic() - began
    assert [r.status for r in results] == [Status.SUCCESS] * 3
    assert took >= 0.55
    assert log.read_text().split() == ["start", "end"] * 3


@asyncio_test()
async def test_malformed_header_is_dropped_and_serving_goes_on(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(f"execproto.test.asyncio.{os.getpid()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Keep(records)
    logger.addHandler(handler)
    try:
        async with Serving([unix(tmp_path)], script, logger=logger) as (address,):
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, b"garbage\n\n")
                # Closed without a reply (a reset: the header was not read).
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(loop.sock_recv(sock, 10), 5) == b""
            result = await flavour.run(target(address))
            assert result.status is Status.SUCCESS
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2, messages
    assert records[0].levelno == logging.WARNING and "unix:" in messages[0]
    assert "exit 0" in messages[1]


@asyncio_test()
async def test_service_does_not_block_the_loop(tmp_path: Path) -> None:
    script = sh(tmp_path, "slow", "/bin/sleep 0.5\nexit 0\n")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(ticker())
    try:
        async with Serving([unix(tmp_path)], script) as (address,):
            results = await asyncio.gather(
                flavour.run(target(address)), flavour.run(f"fork:{script}"))
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    assert [r.status for r in results] == [Status.SUCCESS] * 2
    assert ticks >= 25  # ~50 in 0.5 s when nothing blocks


# --- run -----------------------------------------------------------------------


@asyncio_test()
async def test_cancelling_a_fork_run_kills_and_reaps_at_once(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "stuck", f"trap '' TERM\necho $$ > {pidfile}\nexec /bin/sleep 30\n")
    task = asyncio.ensure_future(flavour.run(f"fork:{script}", input=b"x"))
    pid = await wait_for_pid(pidfile)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # SIGKILL at once (the script ignores SIGTERM), and reaped before returning.
    assert time.monotonic() - cancelled_at < 1.0
    assert reaped(pid)


@pytest.mark.parametrize("driver", ["unix", "tcp"])
@asyncio_test()
async def test_cancelling_a_socket_run_closes_it(tmp_path: Path, driver: str) -> None:
    started = tmp_path / "started"
    end = "printf '\\r\\n.\\r\\n'\n" if driver == "tcp" else ""  # tcp: dot framing
    script = sh(tmp_path, "slow", f"echo $$ > {started}\n/bin/cat >/dev/null\n{end}exit 0\n")

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0.01)

    async with contextlib.AsyncExitStack() as stack:
        remote = await where(tmp_path, driver, script, stack)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(flavour.run(remote, input=endless()), 0.3)
        # The service sees EOF, the script ends, the service goes on.
        await wait_reaped(await wait_for_pid(started))
        result = await flavour.run(remote)
        assert result.status is Status.SUCCESS


@asyncio_test()
async def test_cancelling_while_connecting(tmp_path: Path) -> None:
    # A listener whose backlog is full: the unix connect gets EAGAIN and retries.
    path = str(tmp_path / "full")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued: list[socket.socket] = []
    try:
        listener.bind(path)
        listener.listen(0)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
            assert len(queued) < 100
        began = time.monotonic()
        result = await flavour.run(f"unix:{path}", connect_timeout=0.35)
        assert result.kind is ErrorKind.CONNECT_TIMEOUT, result
        assert 0.2 < time.monotonic() - began < 2.0
        task = asyncio.ensure_future(flavour.run(f"unix:{path}"))
        await asyncio.sleep(0.25)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        for sock in queued:
            sock.close()
        listener.close()


@pytest.mark.parametrize("driver", ["unix", "tcp", "fork"])
@asyncio_test()
async def test_async_iterable_input_and_async_output(tmp_path: Path, driver: str) -> None:
    script = sh(tmp_path, "cat", "exec /bin/cat\n")
    pieces = [bytes([65 + i % 26]) * (1000 + i) for i in range(200)]
    if driver == "tcp":  # a valid dot stream comes back as it went
        pieces = [p + b"\r\n" for p in pieces]

    async def payload() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece
        yield b""  # empty chunks are skipped

    received: list[bytes] = []

    async def collect(chunk: bytes) -> None:
        await asyncio.sleep(0)
        received.append(chunk)

    async with contextlib.AsyncExitStack() as stack:
        remote = await where(tmp_path, driver, script, stack)
        result = await flavour.run(remote, input=payload(), output=collect)
    assert result.status is Status.SUCCESS, result
    assert result.output is None
    expected = b"".join(pieces)
    assert b"".join(received) == (expected[:-2] if driver == "tcp" else expected)


@pytest.mark.parametrize("driver", ["unix", "fork"])
@asyncio_test()
async def test_slow_async_output_counts_against_the_timeout(tmp_path: Path,
                                                            driver: str) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "talk", f"echo $$ > {pidfile}\necho hello\nexec /bin/sleep 30\n")

    async def slow(chunk: bytes) -> None:
        await asyncio.sleep(30)

    async with contextlib.AsyncExitStack() as stack:
        remote = await where(tmp_path, driver, script, stack, grace=0.1, kill_timeout=0.1) \
            if driver != "fork" else f"fork:{script}"
        began = time.monotonic()
        result = await flavour.run(remote, output=slow, timeout=0.3)
        assert time.monotonic() - began < 7.0
        assert result.kind is ErrorKind.RUN_TIMEOUT, result
        assert result.output is None
        if driver == "fork":
            assert result.returncode == -15
            assert reaped(await wait_for_pid(pidfile))


@pytest.mark.parametrize("driver", ["unix", "fork"])
@asyncio_test()
async def test_input_errors_propagate_unwrapped(tmp_path: Path, driver: str) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "cat", f"echo $$ > {pidfile}\nexec /bin/cat\n")

    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        await asyncio.sleep(0.05)
        raise ValueError("the input broke")

    async with contextlib.AsyncExitStack() as stack:
        remote = await where(tmp_path, driver, script, stack)
        with pytest.raises(ValueError, match="the input broke"):
            await flavour.run(remote, input=failing())
        with pytest.raises(ZeroDivisionError):
            await flavour.run(remote, input=b"x", output=lambda chunk: 1 / 0)
    if driver == "fork":
        assert reaped(await wait_for_pid(pidfile))


@asyncio_test()
async def test_run_timeout_terminates_a_fork_child() -> None:
    began = time.monotonic()
    result = await flavour.run("fork:/bin/sleep", ["5"], timeout=0.2)
    assert result.status is Status.INTERNAL_FAILURE and result.kind is ErrorKind.RUN_TIMEOUT
    assert result.returncode == -15
    assert time.monotonic() - began < 3.0


# --- open_run ------------------------------------------------------------------


@asyncio_test()
async def test_open_run_streams_before_the_end(tmp_path: Path) -> None:
    script = sh(tmp_path, "two", "echo first\n/bin/sleep 0.5\necho second\nexit 0\n")
    began = time.monotonic()
    arrivals: list[tuple[bytes, float]] = []
    async with flavour.open_run(f"fork:{script}") as chunks:
        assert chunks.result is None
        async for chunk in chunks:
            arrivals.append((chunk, time.monotonic() - began))
    assert b"".join(c for c, _ in arrivals) == b"first\nsecond\n"
    assert arrivals[0][1] < 0.4
    assert chunks.result is not None and chunks.result.status is Status.SUCCESS
    assert chunks.result.output is None and chunks.result.returncode == 0


@pytest.mark.parametrize("driver", ["unix", "tcp", "fork"])
@asyncio_test(60)
async def test_open_run_big_output_in_bounded_chunks(tmp_path: Path, driver: str) -> None:
    size = 20 * 1024 * 1024
    body = f"/usr/bin/head -c {size} /dev/zero\n"
    if driver == "tcp":  # dot framing: a final CRLF.CRLF
        body += "printf '\\r\\n.\\r\\n'\n"
    script = sh(tmp_path, "big", body + "exit 0\n")
    total, biggest = 0, 0
    async with contextlib.AsyncExitStack() as stack:
        remote = await where(tmp_path, driver, script, stack)
        async with flavour.open_run(remote) as chunks:
            async for chunk in chunks:
                total += len(chunk)
                biggest = max(biggest, len(chunk))
    assert chunks.result is not None and chunks.result.status is Status.SUCCESS, chunks.result
    assert total == size  # tcp: the CRLF before the end line belongs to it
    assert biggest <= 256 * 1024


@asyncio_test()
async def test_open_run_waits_for_its_consumer(tmp_path: Path) -> None:
    # The producer is paused while nobody iterates: nothing piles up here.
    script = sh(tmp_path, "endless", "exec /usr/bin/head -c 100000000 /dev/zero\n")
    async with flavour.open_run(f"fork:{script}") as chunks:
        first = await chunks.__anext__()
        await asyncio.sleep(0.3)
        second = await chunks.__anext__()
    assert 0 < len(first) <= 256 * 1024 and 0 < len(second) <= 256 * 1024
    assert chunks.result is None


@asyncio_test()
async def test_leaving_open_run_early_kills_the_fork_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "stuck",
                f"trap '' TERM\necho $$ > {pidfile}\necho first\nexec /bin/sleep 30\n")
    async with flavour.open_run(f"fork:{script}") as chunks:
        async for chunk in chunks:
            assert chunk == b"first\n"
            break
    assert chunks.result is None
    assert reaped(await wait_for_pid(pidfile))


@asyncio_test()
async def test_leaving_open_run_early_closes_the_socket(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "chatty",
                f"echo $$ > {started}\nwhile echo line; do :; done\nexit 0\n")
    async with Serving([unix(tmp_path)], script) as (address,):
        async with flavour.open_run(target(address)) as chunks:
            async for _ in chunks:
                break
        # The script's next write fails (EPIPE): it ends, the service goes on.
        await wait_reaped(await wait_for_pid(started))


@asyncio_test()
async def test_open_run_errors(tmp_path: Path) -> None:
    script = sh(tmp_path, "cat", "exec /bin/cat\n")

    async def failing() -> AsyncIterator[bytes]:
        yield b"x"
        raise ValueError("the input broke")

    # An error of the input is raised by the iteration.
    with pytest.raises(ValueError, match="the input broke"):
        async with flavour.open_run(f"fork:{script}", input=failing()) as chunks:
            async for _ in chunks:
                pass
    # An error in the block is left as it is.
    with pytest.raises(KeyError):
        async with flavour.open_run(f"fork:{script}", input=b"x"):
            raise KeyError("mine")
    # Invalid arguments are reported at once.
    with pytest.raises(LocalProtocolError):
        async with flavour.open_run(f"fork:{script}", ["a\0b"]):
            pass  # pragma: no cover


@asyncio_test()
async def test_open_run_transport_failure_is_a_result(tmp_path: Path) -> None:
    async with flavour.open_run(f"unix:{tmp_path / 'missing'}") as chunks:
        assert [c async for c in chunks] == []
    assert chunks.result is not None
    assert chunks.result.status is Status.INTERNAL_FAILURE
    assert "No such file or directory" in chunks.result.detail


@asyncio_test()
async def test_cancelling_the_task_inside_open_run(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "stuck", f"echo $$ > {pidfile}\necho first\nexec /bin/sleep 30\n")
    results: list[RunResult | None] = []

    async def consume() -> None:
        async with flavour.open_run(f"fork:{script}") as chunks:
            try:
                async for _ in chunks:
                    pass
            finally:
                results.append(chunks.result)

    task = asyncio.ensure_future(consume())
    pid = await wait_for_pid(pidfile)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert results == [None]
    assert reaped(pid)


# --- hygiene -------------------------------------------------------------------

_EVERY_PATH = """
import asyncio, logging, sys
from execproto.adapters import asyncio as flavour, TcpListener, UnixListener

cat, slow, tmp = sys.argv[1:4]
logging.getLogger("execproto").addHandler(logging.NullHandler())
logging.getLogger("execproto").propagate = False

async def main():
    asyncio.get_running_loop().slow_callback_duration = 1.0
    ready = asyncio.get_running_loop().create_future()
    service = asyncio.ensure_future(flavour.serve(
        [UnixListener(tmp + "/s"), TcpListener("127.0.0.1", 0)], cat, ready=ready.set_result))
    addresses = await ready
    targets = ["unix:" + addresses[0], "tcp:%s:%d" % addresses[1], "fork:" + cat]
    for where in targets:
        await flavour.run(where, input=b"x")
        await flavour.run(where, input=b"x", noreply=True, read_output=False)
        try:
            await asyncio.wait_for(flavour.run(where, input=[b"x"] * 100000), 0.05)
        except asyncio.TimeoutError:
            pass
        async with flavour.open_run(where, input=b"x" * 1000000) as chunks:
            async for _ in chunks:
                break
    await flavour.run("fork:" + slow, timeout=0.1)
    await flavour.run("unix:" + tmp + "/missing")
    await flavour.run("tcp:localhost:1", connect_timeout=1)
    service.cancel()
    try:
        await service
    except asyncio.CancelledError:
        pass

asyncio.run(main(), debug=True)
print("done")
"""


def test_no_resource_warnings_in_any_path(tmp_path: Path) -> None:
    cat = sh(tmp_path, "cat", "exec /bin/cat 2>/dev/null\n")
    slow = sh(tmp_path, "slow", "exec /bin/sleep 5\n")
    # A separate interpreter: warnings emitted at shutdown are seen too.
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", _EVERY_PATH,
         cat, slow, str(tmp_path)],
        capture_output=True, timeout=60, check=False)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert proc.stdout == b"done\n"
    assert stderr == ""
