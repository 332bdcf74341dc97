"""What only the trio flavour has: cancel scopes, ``nursery.start(serve)``, open_run().

The cross-flavour scenarios live in the other files of this directory; these
tests cover the trio-specific shapes of the API.  Every test body runs under
``trio.fail_after``; the directory's conftest checks descriptors, children
and resource warnings around each test.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import trio

from execproto import Status
from execproto.adapters import (
    RunResult,
    TcpListener,
    UnixListener,
)
from execproto.adapters import trio as flavour

P = ParamSpec("P")

#: Default bound for one test body.
LIMIT = 20.0


def trio_test(
    limit: float = LIMIT,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, None]]:
    """Run an async test under ``trio.run``, failing it after *limit* seconds."""

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            async def main() -> None:
                with trio.fail_after(limit):
                    await fn(*args, **kwargs)

            trio.run(main)

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


async def poll(predicate: Callable[[], bool]) -> None:
    """Wait until *predicate* holds (what it watches has no event to wait for)."""
    while not predicate():  # noqa: ASYNC110 (a process or a file, not a trio object)
        await trio.sleep(0.01)


async def wait_for_pid(path: Path) -> int:
    """Wait until a script has written its pid to *path*."""
    await poll(lambda: path.exists() and path.read_text().endswith("\n"))
    return int(await trio.Path(path).read_text())


async def start_service(nursery: trio.Nursery, listeners: list[Any], script: str,
                        **options: Any) -> list[Any]:
    addresses: list[Any] = await nursery.start(
        functools.partial(flavour.serve, listeners, script, **options))
    return addresses


def target(address: str | tuple[str, int]) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"tcp:{address[0]}:{address[1]}"


# --- serve ---------------------------------------------------------------------


@trio_test()
async def test_start_returns_addresses_and_cancel_cleans_up(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exec /bin/cat\n")
    path = str(tmp_path / "s.sock")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            addresses = await start_service(
                nursery, [UnixListener(path), TcpListener("127.0.0.1", 0)], script)
            assert addresses[0] == path
            host, port = addresses[1]
            assert host == "127.0.0.1" and port > 0
            assert os.stat(path).st_mode & 0o777 == 0o600
            for address in addresses:
                result = await flavour.run(target(address), input=b"hi\n")
                assert result.status is Status.SUCCESS, result
            nursery.cancel_scope.cancel()
    # serve() re-raised the cancellation (nothing else), after removing its file.
    assert not scope.cancelled_caught
    assert not await trio.Path(path).exists()


@trio_test()
async def test_serve_reraises_cancellation_of_an_outer_scope(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    outcome: list[str] = []

    async def service(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await flavour.serve([UnixListener(str(tmp_path / "s"))], script,
                                task_status=task_status)
        except trio.Cancelled:
            outcome.append("cancelled")
            raise
        outcome.append("returned")  # pragma: no cover

    with trio.move_on_after(0.2) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(service)
    assert scope.cancelled_caught
    assert outcome == ["cancelled"]


@trio_test()
async def test_bind_error_is_raised_by_start(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    path = str(tmp_path / "s.sock")
    async with trio.open_nursery() as nursery:
        await start_service(nursery, [UnixListener(path)], script)
        with pytest.raises(OSError) as info:
            await start_service(nursery, [UnixListener(path)], script)
        assert info.value.errno == errno.EADDRINUSE
        result = await flavour.run(f"unix:{path}")
        assert result.status is Status.SUCCESS
        nursery.cancel_scope.cancel()


@trio_test()
async def test_grace_lets_running_scripts_finish(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "slow", f"echo $$ > {started}\n/bin/sleep 0.4\necho done\nexit 0\n")
    results: list[RunResult] = []
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as service_scope:
            async with trio.open_nursery() as nursery:
                (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))],
                                                 script, grace=5.0)

                async def client() -> None:
                    results.append(await flavour.run(target(address)))

                outer.start_soon(client)
                await wait_for_pid(started)
                stop_at = trio.current_time()
                service_scope.cancel()
        stopped_after = trio.current_time() - stop_at
    assert 0.2 < stopped_after < 4.0
    assert results[0].status is Status.SUCCESS and results[0].output == b"done\n"


@pytest.mark.parametrize("ignores_term", [False, True])
@trio_test()
async def test_after_grace_scripts_are_terminated_then_killed(
    tmp_path: Path, ignores_term: bool
) -> None:
    started = tmp_path / "started"
    trap = "trap '' TERM\n" if ignores_term else ""
    script = sh(tmp_path, "stuck", f"{trap}echo $$ > {started}\nexec /bin/sleep 30\n")
    results: list[RunResult] = []
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as service_scope:
            async with trio.open_nursery() as nursery:
                (address,) = await start_service(
                    nursery, [UnixListener(str(tmp_path / "s"))], script, grace=0.2,
                    kill_timeout=0.4)

                async def client() -> None:
                    results.append(await flavour.run(target(address)))

                outer.start_soon(client)
                pid = await wait_for_pid(started)
                stop_at = trio.current_time()
                service_scope.cancel()
        stopped_after = trio.current_time() - stop_at
    assert reaped(pid)
    expected = 0.6 if ignores_term else 0.2
    assert expected - 0.05 < stopped_after < expected + 2.0
    assert results[0].status is Status.FAILURE, results[0]


@trio_test()
async def test_clients_beyond_max_connections_wait(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = sh(tmp_path, "one", f"echo start >> {log}\n/bin/sleep 0.2\n"
                                 f"echo end >> {log}\nexit 0\n")
    results: list[RunResult] = []
    async with trio.open_nursery() as nursery:
        (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))], script,
                                         max_connections=1)

        async def client() -> None:
            results.append(await flavour.run(target(address)))

        began = trio.current_time()
        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(client)
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert [r.status for r in results] == [Status.SUCCESS] * 3
    assert took >= 0.55
    assert log.read_text().split() == ["start", "end"] * 3


@trio_test()
async def test_malformed_header_is_dropped_and_serving_goes_on(tmp_path: Path) -> None:
    script = sh(tmp_path, "ok", "exit 0\n")
    async with trio.open_nursery() as nursery:
        (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))], script)
        with trio.socket.socket(trio.socket.AF_UNIX) as sock:
            await sock.connect(address)
            await sock.send(b"garbage\n\n")
            # Closed without a reply; the unread header may turn it into a reset.
            with contextlib.suppress(ConnectionResetError):
                assert await sock.recv(10) == b""
        result = await flavour.run(target(address))
        assert result.status is Status.SUCCESS
        nursery.cancel_scope.cancel()


# --- run -----------------------------------------------------------------------


@trio_test()
async def test_cancelling_a_fork_run_kills_and_reaps_at_once(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "stuck", f"trap '' TERM\necho $$ > {pidfile}\nexec /bin/sleep 30\n")
    pids: list[int] = []
    cancelled_at: list[float] = []

    async def watch() -> None:
        pids.append(await wait_for_pid(pidfile))
        cancelled_at.append(trio.current_time())
        scope.cancel()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await flavour.run(f"fork:{script}", input=b"x")
    assert scope.cancelled_caught
    # SIGKILL at once (the script ignores SIGTERM), and reaped before returning.
    assert trio.current_time() - cancelled_at[0] < 1.0
    assert reaped(pids[0])


@pytest.mark.parametrize("driver", ["unix", "tcp"])
@trio_test()
async def test_cancelling_a_socket_run_closes_it(tmp_path: Path, driver: str) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "slow",
                f"echo $$ > {started}\n/bin/cat >/dev/null\nprintf '.\\r\\n'\nexit 0\n")
    listener = UnixListener(str(tmp_path / "s")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        (address,) = await start_service(nursery, [listener], script)
        with trio.move_on_after(0.3) as scope:
            await flavour.run(target(address), input=endless())
        assert scope.cancelled_caught
        # The service sees EOF, the script ends, the service goes on.
        pid = await wait_for_pid(started)
        await poll(lambda: reaped(pid))
        result = await flavour.run(target(address))
        assert result.status is Status.SUCCESS
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("driver", ["unix", "fork"])
@trio_test()
async def test_async_iterable_input_and_async_output(tmp_path: Path, driver: str) -> None:
    script = sh(tmp_path, "cat", "exec /bin/cat\n")
    pieces = [bytes([65 + i % 26]) * (1000 + i) for i in range(200)]

    async def payload() -> AsyncIterator[bytes]:
        for piece in pieces:
            await trio.lowlevel.checkpoint()
            yield piece
        yield b""  # empty chunks are skipped

    received: list[bytes] = []

    async def collect(chunk: bytes) -> None:
        await trio.lowlevel.checkpoint()
        received.append(chunk)

    async with trio.open_nursery() as nursery:
        if driver == "fork":
            where = f"fork:{script}"
        else:
            (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))],
                                             script)
            where = target(address)
        result = await flavour.run(where, input=payload(), output=collect)
        nursery.cancel_scope.cancel()
    assert result.status is Status.SUCCESS, result
    assert result.output is None
    assert b"".join(received) == b"".join(pieces)


@pytest.mark.parametrize("driver", ["unix", "fork"])
@trio_test()
async def test_input_errors_propagate_unwrapped(tmp_path: Path, driver: str) -> None:
    pidfile = tmp_path / "pid"
    script = sh(tmp_path, "cat", f"echo $$ > {pidfile}\nexec /bin/cat\n")

    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        await trio.sleep(0.05)
        raise ValueError("the input broke")

    async with trio.open_nursery() as nursery:
        if driver == "fork":
            where = f"fork:{script}"
        else:
            (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))],
                                             script)
            where = target(address)
        with pytest.raises(ValueError, match="the input broke"):
            await flavour.run(where, input=failing())
        with pytest.raises(ZeroDivisionError):
            await flavour.run(where, input=b"x", output=lambda chunk: 1 / 0)
        nursery.cancel_scope.cancel()
    if driver == "fork":
        assert reaped(await wait_for_pid(pidfile))


# --- open_run ------------------------------------------------------------------


@trio_test()
async def test_open_run_streams_before_the_end(tmp_path: Path) -> None:
    script = sh(tmp_path, "two", "echo first\n/bin/sleep 0.5\necho second\nexit 0\n")
    began = trio.current_time()
    arrivals: list[tuple[bytes, float]] = []
    async with flavour.open_run(f"fork:{script}") as chunks:
        assert chunks.result is None
        async for chunk in chunks:
            arrivals.append((chunk, trio.current_time() - began))
    assert b"".join(c for c, _ in arrivals) == b"first\nsecond\n"
    assert arrivals[0][1] < 0.4
    assert chunks.result is not None and chunks.result.status is Status.SUCCESS
    assert chunks.result.output is None and chunks.result.returncode == 0


@pytest.mark.parametrize("driver", ["unix", "tcp", "fork"])
@trio_test(60)
async def test_open_run_big_output_in_bounded_chunks(tmp_path: Path, driver: str) -> None:
    size = 20 * 1024 * 1024
    body = f"/usr/bin/head -c {size} /dev/zero\n"
    if driver == "tcp":  # dot framing: a final CRLF.CRLF
        body += "printf '\\r\\n.\\r\\n'\n"
    script = sh(tmp_path, "big", body + "exit 0\n")
    total, biggest = 0, 0
    async with trio.open_nursery() as nursery:
        if driver == "fork":
            where = f"fork:{script}"
        else:
            listener = UnixListener(str(tmp_path / "s")) if driver == "unix" else \
                TcpListener("127.0.0.1", 0)
            (address,) = await start_service(nursery, [listener], script)
            where = target(address)
        async with flavour.open_run(where) as chunks:
            async for chunk in chunks:
                total += len(chunk)
                biggest = max(biggest, len(chunk))
        nursery.cancel_scope.cancel()
    assert chunks.result is not None and chunks.result.status is Status.SUCCESS, chunks.result
    assert total == size
    assert biggest <= 256 * 1024


@trio_test()
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


@trio_test()
async def test_leaving_open_run_early_closes_the_socket(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = sh(tmp_path, "chatty",
                f"echo $$ > {started}\nwhile echo line; do :; done\nexit 0\n")
    async with trio.open_nursery() as nursery:
        (address,) = await start_service(nursery, [UnixListener(str(tmp_path / "s"))], script)
        async with flavour.open_run(target(address)) as chunks:
            async for _ in chunks:
                break
        # The script's next write fails (EPIPE): it ends, the service goes on.
        pid = await wait_for_pid(started)
        await poll(lambda: reaped(pid))
        nursery.cancel_scope.cancel()


@trio_test()
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
    # An error in the block leaves it as it is, not in an exception group.
    with pytest.raises(KeyError):
        async with flavour.open_run(f"fork:{script}", input=b"x"):
            raise KeyError("mine")
    # Invalid arguments are reported on entry.
    from execproto import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        async with flavour.open_run(f"fork:{script}", ["a\0b"]):
            pass  # pragma: no cover


@trio_test()
async def test_open_run_transport_failure_is_a_result(tmp_path: Path) -> None:
    async with flavour.open_run(f"unix:{tmp_path / 'missing'}") as chunks:
        assert [c async for c in chunks] == []
    assert chunks.result is not None
    assert chunks.result.status is Status.INTERNAL_FAILURE
    assert "No such file or directory" in chunks.result.detail


# --- hygiene -------------------------------------------------------------------


def test_no_resource_warnings_in_any_path(tmp_path: Path) -> None:
    script = sh(tmp_path, "cat", "exec /bin/cat\n")
    slow = sh(tmp_path, "slow", "exec /bin/sleep 5\n")

    async def main() -> None:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                addresses = await start_service(
                    nursery, [UnixListener(str(tmp_path / "s")), TcpListener("127.0.0.1", 0)],
                    script)
                for where in [*(target(a) for a in addresses), f"fork:{script}"]:
                    await flavour.run(where, input=b"x")
                    await flavour.run(where, input=b"x", noreply=True, read_output=False)
                    with trio.move_on_after(0.05):
                        await flavour.run(where, input=[b"x"] * 100000)
                    async with flavour.open_run(where, input=b"x" * 1000000) as chunks:
                        async for _ in chunks:
                            break
                await flavour.run(f"fork:{slow}", timeout=0.1)
                await flavour.run(f"unix:{tmp_path / 'missing'}")
                nursery.cancel_scope.cancel()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trio.run(main)
        gc.collect()
    assert [str(w.message) for w in caught] == []


@trio_test()
async def test_run_timeout_terminates_a_fork_child() -> None:
    began = time.monotonic()
    result = await flavour.run("fork:/bin/sleep", ["5"], timeout=0.2)
    assert result.status is Status.INTERNAL_FAILURE
    assert result.returncode == -15
    assert time.monotonic() - began < 3.0
