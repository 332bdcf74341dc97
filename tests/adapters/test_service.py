"""Service scenarios, for every flavour's ``serve()`` over unix and tcp.

Most requests here are raw bytes on a plain socket, so the service is tested
on its own; the flavour's client is used where a well-behaved client is all
that is needed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto import Request, Status, encode_request
from execproto.adapters import Listener, TcpListener, UnixListener

from .flavours import (
    SOCKET_DRIVERS,
    Address,
    Flavour,
    LogCapture,
    connect_raw,
    exchange,
    py_script,
    read_record,
    read_reply,
    recorder_script,
    sh_script,
    target_of,
    wait_for_file,
)

V = b"VERSION\tscript\t4\t0\n"


def _listener(driver: str, directory: Path) -> Listener:
    return UnixListener(str(directory / "sock")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)


@contextlib.contextmanager
def _service(flavour: Flavour, driver: str, directory: Path, script: str,
             **options: Any) -> Iterator[tuple[Address, LogCapture]]:
    log = LogCapture()
    with flavour.serving([_listener(driver, directory)], script, logger=log.logger,
                         **options) as addresses:
        yield addresses[0], log


def _still_serving(flavour: Flavour, address: Address, driver: str) -> None:
    """A normal run through the service works (it survived the previous abuse)."""
    result = flavour.run(target_of(address), input=b"alive\n", timeout=10)
    assert result.status is Status.SUCCESS, result
    assert result.output == (b"alive" if driver == "tcp" else b"alive\n")


def _assert_dropped(reply: bytes, how: str) -> None:
    assert reply == b"", f"expected no reply, got {reply!r} ({how})"


# --- passthrough ---------------------------------------------------------------


@SOCKET_DRIVERS
def test_passthrough(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """``-p``: the script reads the raw request; no client args, empty env, no result code."""
    trailer = b".\r\n+\n" if driver == "tcp" else b"+\n"
    script, record = recorder_script(tmp_path, reply=trailer)
    with _service(flavour, driver, tmp_path, script, script_args=("passthru",),
                  passthrough=True, env_allowlist=("FOO",)) as (address, _):
        result = flavour.run(target_of(address), ["foo"], input=b"D\n", env={"FOO": "foo"})
        seen = read_record(record)
    assert result.status is Status.SUCCESS, result
    assert result.output == b""
    payload = b"D\r\n.\r\n" if driver == "tcp" else b"D\n"
    assert seen["stdin"] == V + b"env_FOO=foo\n-\nfoo\n\n" + payload
    assert seen["cmdline"][2:] == [b"passthru"]
    assert seen["environ"] == {}


# --- alarm=N -------------------------------------------------------------------

_ALARMED = """\
import os, signal, time
def term(signum, frame):
    os.write(1, b"late\\n")
    os._exit(1)
signal.signal(signal.SIGTERM, term)
with open({pidfile!r} + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename({pidfile!r} + ".tmp", {pidfile!r})
os.write(1, b"started\\n")
time.sleep(30)
os.write(1, b"never\\n")
"""


@SOCKET_DRIVERS
def test_alarm_kills_script_before_replying(flavour: Flavour, driver: str,
                                            tmp_path: Path) -> None:
    """``alarm=1``: the script is ended, then ``-\\n`` is sent and nothing after it (Q9).

    The script writes ``late`` when it gets SIGTERM, so its last output must
    come before the result code.  In noreply mode there is no result code.
    Both modes run at the same time, on two services.
    """
    replies: dict[str, tuple[bytes, str, float, bool]] = {}

    def client(mode: str, address: Address, pidfile: Path) -> None:
        started = time.monotonic()
        with connect_raw(address) as sock:
            sock.sendall(V + b"alarm=1\n" + mode.encode() + b"\n\n")
            sock.shutdown(socket.SHUT_WR)
            reply, how = read_reply(sock, timeout=10)
            elapsed = time.monotonic() - started
            pid = int(pidfile.read_text()) if pidfile.exists() else -1
            alive = pid > 0 and Path(f"/proc/{pid}").exists()
            replies[mode] = (reply, how, elapsed, alive)

    with contextlib.ExitStack() as stack:
        threads = []
        for mode in ("-", "noreply"):
            directory = tmp_path / ("reply" if mode == "-" else mode)
            directory.mkdir()
            pidfile = directory / "pid"
            script = py_script(directory, "alarmed", _ALARMED.format(pidfile=str(pidfile)))
            address, _ = stack.enter_context(_service(flavour, driver, directory, script))
            threads.append(threading.Thread(target=client, args=(mode, address, pidfile)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert set(replies) == {"-", "noreply"}, "a client did not finish"
    reply, how, elapsed, alive = replies["-"]
    assert reply == b"started\nlate\n-\n", (reply, how)
    assert how == "eof"
    assert not alive, "the script was still running when the result code arrived"
    assert 0.9 <= elapsed < 4.0, elapsed
    reply, how, elapsed, alive = replies["noreply"]
    assert reply == b"started\nlate\n", (reply, how)
    assert not alive
    assert 0.9 <= elapsed < 4.0, elapsed


# --- header limits -------------------------------------------------------------


@SOCKET_DRIVERS
def test_header_timeout(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """An incomplete header is dropped after header_timeout, idle or trickling (Q2: total)."""
    results: dict[str, tuple[bytes, str, float]] = {}

    def idle(address: Address) -> None:
        started = time.monotonic()
        with connect_raw(address) as sock:
            sock.sendall(V + b"-\narg")
            reply, how = read_reply(sock, timeout=10)
        results["idle"] = (reply, how, time.monotonic() - started)

    def trickle(address: Address) -> None:
        started = time.monotonic()
        with connect_raw(address) as sock:
            sock.sendall(V + b"-\n")
            reply, how = b"", "sending"
            with contextlib.suppress(OSError):
                for _ in range(100):  # one byte every 50 ms: never idle for long
                    sock.sendall(b"a")
                    time.sleep(0.05)
            with contextlib.suppress(OSError):
                reply, how = read_reply(sock, timeout=10)
        results["trickle"] = (reply, how, time.monotonic() - started)

    with _service(flavour, driver, tmp_path, "/bin/cat", header_timeout=0.3) as (address, log):
        threads = [threading.Thread(target=f, args=(address,)) for f in (idle, trickle)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        _still_serving(flavour, address, driver)
        warnings = log.wait_for(lambda m: True, logging.WARNING)
    assert set(results) == {"idle", "trickle"}
    for name, (reply, how, elapsed) in results.items():
        _assert_dropped(reply, f"{name}: {how}")
        assert 0.25 <= elapsed < 3.0, (name, elapsed)
    assert len(warnings) >= 2, warnings


def _header(args: list[bytes]) -> bytes:
    return encode_request(Request(args=args))


@SOCKET_DRIVERS
def test_oversized_header(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """max_header_bytes: a header of exactly the limit passes, one byte more is dropped (Q1)."""
    limit = 1024
    script, record = recorder_script(tmp_path, reply=b".\r\n" if driver == "tcp" else b"")
    base = len(_header([b""]))
    exact = [b"x" * (limit - base + 1)]
    assert len(_header(exact)) == limit
    over = [b"x" * (limit - base + 2)]
    with _service(flavour, driver, tmp_path, script, max_header_bytes=limit) as (address, log):
        target = target_of(address)
        result = flavour.run(target, over, input=b"payload " * 1000)
        assert result.status is Status.INTERNAL_FAILURE, result
        assert log.wait_for(lambda m: True, logging.WARNING), "the drop was not logged"
        assert not record.exists(), "the script ran for an oversized header"
        result = flavour.run(target, exact, input=b"payload")
        assert result.status is Status.SUCCESS, result
        seen = read_record(record)
    assert seen["cmdline"][2:] == exact
    assert seen["stdin"] == (b"payload\r\n.\r\n" if driver == "tcp" else b"payload")


@SOCKET_DRIVERS
def test_malformed_headers_dropped(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Fatal headers (2.4, 2.10, CV-17): no reply, the script never runs, one log line each."""
    bad = [
        b"VERSION\tscript\t5\t0\n-\n\n",
        b"VERSION\tscript\t4\t0\r\n-\n\n",
        b"version\tscript\t4\t0\n-\n\n",
        V + b"env_FOO\n-\n\n",
        V + b"alarm=x\n-\n\n",
        V + b"alarm=5\n\n",
        V + b"env_FOO=x\n\nDATA\n",
        b"\n\n" + V + b"-\n\n",
        V + b"\x00\n\nDATA\n",
        V + b"-\na\n",  # EOF inside the header
    ]
    script, record = recorder_script(tmp_path, reply=b".\r\n" if driver == "tcp" else b"")
    with _service(flavour, driver, tmp_path, script, env_allowlist=("FOO",)) as (address, log):
        for request in bad:
            reply, how = exchange(address, request)
            assert reply == b"", (request, reply, how)
        warnings = log.wait_for(lambda m: len(log.messages(logging.WARNING)) >= len(bad),
                                logging.WARNING)
        assert not record.exists(), "a script ran for a malformed header"
        _check_alive_with_recorder(flavour, address, record)
    assert len(warnings) == len(bad), warnings


def _check_alive_with_recorder(flavour: Flavour, address: Address, record: Path) -> None:
    result = flavour.run(target_of(address), ["ok"], input=b"x")
    assert result.status is Status.SUCCESS, result
    assert read_record(record)["cmdline"][2:] == [b"ok"]


# --- peers going away ----------------------------------------------------------


@SOCKET_DRIVERS
@pytest.mark.parametrize("close", ["close", "reset"])
def test_disconnect_mid_header(flavour: Flavour, driver: str, close: str,
                               tmp_path: Path) -> None:
    """A client that goes away inside the header: logged, dropped, service keeps serving."""
    with _service(flavour, driver, tmp_path, "/bin/cat") as (address, log):
        for _ in range(3):
            sock = connect_raw(address)
            sock.sendall(V + b"-\nhalf")
            time.sleep(0.05)
            if close == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert log.wait_for(lambda m: len(log.messages(logging.WARNING)) >= 3, logging.WARNING)
        _still_serving(flavour, address, driver)


@SOCKET_DRIVERS
@pytest.mark.parametrize("close", ["close", "reset"])
def test_disconnect_mid_payload(flavour: Flavour, driver: str, close: str,
                                tmp_path: Path) -> None:
    """A client that goes away inside the payload: the script ends, the service keeps serving."""
    marker = tmp_path / "done"
    script = sh_script(tmp_path, "drain", f"/bin/cat\necho done > {marker}\n")
    with _service(flavour, driver, tmp_path, script) as (address, _):
        sock = connect_raw(address)
        sock.sendall(V + b"-\n\n" + b"partial payload\n" * 10000)
        time.sleep(0.1)
        if close == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert wait_for_file(marker), "the script did not see the client go"
        _still_serving(flavour, address, driver)


# --- unread payload (Q8) ---------------------------------------------------------


@SOCKET_DRIVERS
def test_unread_payload_is_drained(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A script that exits without reading its input still gets ``+`` through, no reset."""
    script = sh_script(tmp_path, "lazy", "printf 'hi\\r\\n.\\r\\n'\n" if driver == "tcp"
                       else "echo hi\n")
    with _service(flavour, driver, tmp_path, script) as (address, _):
        result = flavour.run(target_of(address), input=b"unread\n" * 300000,
                             lenient_reset=False)
    assert result.status is Status.SUCCESS, result
    assert result.output == (b"hi" if driver == "tcp" else b"hi\n")


@SOCKET_DRIVERS
def test_script_gets_a_blocking_socket(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Scripts read stdin and write stdout as plain blocking files, as under Dovecot.

    The script sets its stdin non-blocking on the way out: the service's own
    reply and drain do not depend on the mode it leaves behind.
    """
    script = py_script(tmp_path, "modes", (
        "import os\n"
        "modes = b'%d%d' % (os.get_blocking(0), os.get_blocking(1))\n"
        "os.write(1, modes + (b'\\r\\n.\\r\\n' if os.environ.get('TCP') else b''))\n"
        "os.set_blocking(0, False)\n"))
    with _service(flavour, driver, tmp_path, script, env_allowlist=("TCP",)) as (address, _):
        for _ in range(2):
            result = flavour.run(target_of(address), env={"TCP": "1"} if driver == "tcp" else {},
                                 timeout=10)
            assert result.status is Status.SUCCESS, result
            assert result.output == b"11"


# --- script problems -----------------------------------------------------------------


@SOCKET_DRIVERS
def test_script_cannot_start(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """An unexecutable script: ``-\\n`` with no output (CV-21, exec failure), logged."""
    script = str(tmp_path / "not-executable")
    Path(script).write_text("#!/bin/sh\necho hi\n")
    with _service(flavour, driver, tmp_path, script) as (address, log):
        reply, how = exchange(address, V + b"-\n\n")
        assert log.wait_for(lambda m: True, logging.WARNING)
    assert reply == b"-\n", (reply, how)


# --- connection limit, stopping, logging ---------------------------------------------

@SOCKET_DRIVERS
def test_max_connections(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """max_connections=1: the second client waits for the first; scripts never overlap."""
    running, overlap, count = tmp_path / "running", tmp_path / "overlap", tmp_path / "count"
    out = "printf '.\\r\\n'\n" if driver == "tcp" else ""
    script = sh_script(tmp_path, "exclusive",
                       f"[ -e {running} ] && echo > {overlap}\necho > {running}\n"
                       f"/bin/sleep 0.2\n/bin/rm {running}\necho >> {count}\n{out}")
    with _service(flavour, driver, tmp_path, script, max_connections=1) as (address, _):
        results = flavour.run_many([(target_of(address), {"timeout": 20})] * 2)
    assert all(r.status is Status.SUCCESS for r in results), results
    assert count.read_text() == "\n\n"
    assert not overlap.exists(), "two scripts ran at the same time"


@SOCKET_DRIVERS
def test_stop_lets_running_script_finish(flavour: Flavour, driver: str,
                                         tmp_path: Path) -> None:
    """Stopping waits up to ``grace`` for a running script; its client gets the result."""
    started = tmp_path / "started"
    out = "done\\r\\n.\\r\\n" if driver == "tcp" else "done\\n"
    script = sh_script(tmp_path, "slow",
                       f"echo > {started}\n/bin/sleep 0.3\nprintf '{out}'\n")
    with _service(flavour, driver, tmp_path, script, grace=5.0) as (address, _):
        sock = connect_raw(address)
        sock.sendall(V + b"-\n\n")
        sock.shutdown(socket.SHUT_WR)
        assert wait_for_file(started)
        stop_started = time.monotonic()
    stopped_after = time.monotonic() - stop_started
    with sock:
        reply, how = read_reply(sock)
    expected = b"done\r\n.\r\n+\n" if driver == "tcp" else b"done\n+\n"
    assert reply == expected, (reply, how)
    assert stopped_after < 4.0


@SOCKET_DRIVERS
def test_stop_terminates_after_grace(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A script still running after ``grace`` is terminated and reaped; its client is released."""
    pidfile = tmp_path / "pid"
    script = sh_script(tmp_path, "stuck", f"echo $$ > {pidfile}\nexec /bin/sleep 30\n")
    with _service(flavour, driver, tmp_path, script, grace=0.3) as (address, _):
        sock = connect_raw(address)
        sock.sendall(V + b"-\n\n")
        sock.shutdown(socket.SHUT_WR)
        assert wait_for_file(pidfile)
        stop_started = time.monotonic()
    stopped_after = time.monotonic() - stop_started
    with sock:
        reply, how = read_reply(sock, timeout=5)
    assert reply == b"-\n", (reply, how)  # a killed script is a failure (4.1)
    assert stopped_after < 3.0, stopped_after
    assert not Path(f"/proc/{int(pidfile.read_text())}").exists()


_IGNORES_TERM = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open({pidfile!r} + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename({pidfile!r} + ".tmp", {pidfile!r})
time.sleep(30)
"""


@SOCKET_DRIVERS
def test_stop_kills_after_kill_timeout(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A script ignoring SIGTERM gets SIGKILL ``kill_timeout`` after it; reaped, client released."""
    pidfile = tmp_path / "pid"
    script = py_script(tmp_path, "stubborn", _IGNORES_TERM.format(pidfile=str(pidfile)))
    with _service(flavour, driver, tmp_path, script, grace=0.2,
                  kill_timeout=0.3) as (address, _):
        sock = connect_raw(address)
        sock.sendall(V + b"-\n\n")
        sock.shutdown(socket.SHUT_WR)
        assert wait_for_file(pidfile)
        stop_started = time.monotonic()
    stopped_after = time.monotonic() - stop_started
    with sock:
        reply, how = read_reply(sock, timeout=5)
    assert reply == b"-\n", (reply, how)
    assert 0.45 <= stopped_after < 3.0, stopped_after
    assert not Path(f"/proc/{int(pidfile.read_text())}").exists()


@SOCKET_DRIVERS
def test_one_log_line_per_request(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Each request is logged once: peer, sanitized args, how the script ended."""
    script = sh_script(tmp_path, "exit3", "exit 3\n")
    with _service(flavour, driver, tmp_path, script) as (address, log):
        flavour.run(target_of(address), ["a b", "c\nd"])
        lines = log.wait_for(lambda m: "args=[" in m)
        time.sleep(0.1)
        lines = [m for m in log.messages() if "args=[" in m]
    assert len(lines) == 1, lines
    assert "args=[a b c\\nd] exit 3 duration=" in lines[0], lines[0]
    peer = f"unix:{address}" if driver == "unix" else "127.0.0.1:"
    assert lines[0].startswith(peer), lines[0]
