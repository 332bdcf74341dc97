"""Client scenarios, for every flavour and every driver (unix, tcp, fork).

On unix and tcp the service is the same flavour's (``test_cross`` mixes them);
fork runs the script directly.  Scripts are written into each test's tmp
directory.  Over tcp a script must write dot-framed output, so the expected
bytes differ per driver.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto import ErrorKind, Status
from execproto.adapters import RunResult, UnixListener

from .flavours import (
    ALL_DRIVERS,
    SOCKET_DRIVERS,
    Flavour,
    dot_roundtrip,
    endpoint,
    read_record,
    recorder_script,
    run_as_nobody,
    sh_script,
    target_of,
)

#: What a script writes for empty output: nothing, or an empty dot stream over tcp.
EMPTY_REPLY = {"unix": b"", "tcp": b".\r\n", "fork": b""}


def assert_result(result: RunResult, status: Status, kind: ErrorKind = ErrorKind.NONE,
                  detail: str | None = "", **fields: Any) -> None:
    """Compare a RunResult with what is expected, showing all of it on failure."""
    problems = []
    if result.status is not status:
        problems.append(f"status {result.status.name} != {status.name}")
    if result.kind is not kind:
        problems.append(f"kind {result.kind.name} != {kind.name}")
    if detail is not None and result.detail != detail:
        problems.append(f"detail {result.detail!r} != {detail!r}")
    for name, value in fields.items():
        if getattr(result, name) != value:
            problems.append(f"{name} {getattr(result, name)!r:.200} != {value!r:.200}")
    assert not problems, f"{'; '.join(problems)} in {result!r:.600}"


# --- verdicts ----------------------------------------------------------------


@ALL_DRIVERS
def test_success(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Exit 0: SUCCESS; output ending in ``+\\n`` is output, not the verdict (CV-22)."""
    script_out = {"unix": "OUT\\n+\\n", "tcp": "OUT\\r\\n+\\r\\n.\\r\\n", "fork": "OUT\\n+\\n"}
    client_out = {"unix": b"OUT\n+\n", "tcp": b"OUT\r\n+", "fork": b"OUT\n+\n"}
    script = sh_script(tmp_path, "ok", f"/bin/cat >/dev/null\nprintf '{script_out[driver]}'\n")
    with endpoint(flavour, driver, tmp_path, script) as target:
        result = flavour.run(target, ["one", "two words"], input=b"payload\n")
    assert_result(result, Status.SUCCESS, output=client_out[driver], target=target,
                  returncode=0 if driver == "fork" else None)
    assert result.ok


@ALL_DRIVERS
def test_failure_exit_3(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Exit 3: FAILURE (``-\\n`` from the service; exit code for fork)."""
    script_out = {"unix": "bad\\n", "tcp": "bad\\r\\n.\\r\\n", "fork": "bad\\n"}
    client_out = {"unix": b"bad\n", "tcp": b"bad", "fork": b"bad\n"}
    script = sh_script(tmp_path, "fail",
                       f"/bin/cat >/dev/null\nprintf '{script_out[driver]}'\nexit 3\n")
    with endpoint(flavour, driver, tmp_path, script) as target:
        result = flavour.run(target, input=b"x")
    if driver == "fork":
        assert_result(result, Status.FAILURE, detail="terminated with non-zero exit code 3",
                      output=client_out[driver], returncode=3)
    else:
        assert_result(result, Status.FAILURE, output=client_out[driver], returncode=None)


@ALL_DRIVERS
def test_killed_by_signal(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """SIGKILL: ``-\\n`` through a service (CV-21); fork: INTERNAL_FAILURE (8.2)."""
    script_out = {"unix": "partial\\n", "tcp": "partial\\r\\n.\\r\\n", "fork": "partial\\n"}
    client_out = {"unix": b"partial\n", "tcp": b"partial", "fork": b"partial\n"}
    script = sh_script(tmp_path, "killed",
                       f"/bin/cat >/dev/null\nprintf '{script_out[driver]}'\nkill -9 $$\n")
    with endpoint(flavour, driver, tmp_path, script) as target:
        result = flavour.run(target)
    if driver == "fork":
        assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.IO,
                      "terminated abnormally with signal 9", output=client_out[driver],
                      returncode=-9)
    else:
        assert_result(result, Status.FAILURE, output=client_out[driver])


# --- noreply -----------------------------------------------------------------


@ALL_DRIVERS
def test_noreply_reading_output(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """noreply + read_output: all output, SUCCESS whatever the exit (4.3).

    The fork driver has no noreply (Dovecot's is remote-only): exit code decides.
    """
    script_out = {"unix": "hello\\n", "tcp": "hello\\r\\n.\\r\\n", "fork": "hello\\n"}
    client_out = {"unix": b"hello\n", "tcp": b"hello", "fork": b"hello\n"}
    script = sh_script(tmp_path, "noreply",
                       f"/bin/cat >/dev/null\nprintf '{script_out[driver]}'\nexit 3\n")
    with endpoint(flavour, driver, tmp_path, script) as target:
        result = flavour.run(target, input=b"data", noreply=True, read_output=True)
    if driver == "fork":
        assert_result(result, Status.FAILURE, detail="terminated with non-zero exit code 3",
                      output=b"hello\n", returncode=3)
    else:
        assert_result(result, Status.SUCCESS, output=client_out[driver])


@ALL_DRIVERS
def test_noreply_without_output(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """noreply, read_output=False: close after the payload, SUCCESS at once; script still runs."""
    script, record = recorder_script(tmp_path, code=3)
    with endpoint(flavour, driver, tmp_path, script) as target:
        started = time.monotonic()
        result = flavour.run(target, ["a"], input=b"payload\n", noreply=True,
                             read_output=False)
        elapsed = time.monotonic() - started
        seen = read_record(record)
    stdin = {"unix": b"payload\n", "tcp": b"payload\r\n.\r\n", "fork": b"payload\n"}
    assert seen["stdin"] == stdin[driver]
    assert seen["cmdline"][2:] == [b"a"]
    if driver == "fork":
        assert_result(result, Status.FAILURE, detail="terminated with non-zero exit code 3",
                      output=None, returncode=3)
    else:
        assert_result(result, Status.SUCCESS, output=None)
        assert elapsed < 2.0



@SOCKET_DRIVERS
@pytest.mark.parametrize("noreply", [False, True], ids=["reply", "noreply"])
@pytest.mark.parametrize("prints", [False, True], ids=["silent", "prints"])
def test_silent_or_printing_script(flavour: Flavour, driver: str, tmp_path: Path,
                                   noreply: bool, prints: bool) -> None:
    """A script that prints nothing: with noreply, SUCCESS over unix and tcp alike.

    With noreply nothing dot-encodes what the script writes, so a silent
    script sends zero bytes: no output, not a missing dot line (4.3).  With
    a result code, tcp keeps Dovecot's rule: the script must frame even
    empty output (a bare ``+\\n`` has no dot line).
    """
    script_out = {"unix": "hello\\n", "tcp": "hello\\r\\n.\\r\\n"}[driver] if prints else ""
    script = sh_script(tmp_path, "script", f"/bin/cat >/dev/null\nprintf '{script_out}'\n")
    with endpoint(flavour, driver, tmp_path, script) as target:
        result = flavour.run(target, ["a"], noreply=noreply)
    output = {"unix": b"hello\n", "tcp": b"hello"}[driver] if prints else b""
    if driver == "tcp" and not prints and not noreply:
        assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL,
                      "dot-input stream ends without '.' line", output=b"")
    else:
        assert_result(result, Status.SUCCESS, output=output, target=target)


# --- input and output --------------------------------------------------------


@ALL_DRIVERS
def test_output_callback(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """output=callable: every chunk goes to it, in order; nothing is collected."""
    data = b"".join(b"line %d\n" % i for i in range(20000))
    chunks: list[bytes] = []
    with endpoint(flavour, driver, tmp_path, "/bin/cat") as target:
        result = flavour.run(target, input=data, output=chunks.append)
    expected = dot_roundtrip(data) if driver == "tcp" else data
    assert_result(result, Status.SUCCESS, output=None)
    assert all(isinstance(c, bytes) and c for c in chunks)
    assert b"".join(chunks) == expected


def _generator(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 1000):
        yield data[i : i + 1000]


@ALL_DRIVERS
def test_input_kinds(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Input as bytes, bytearray, memoryview, a list or generator of chunks, a file."""
    data = b"".join(b"%d: .dot\n" % i for i in range(3000))
    kinds: dict[str, Any] = {
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(data),
        "list": lambda: [data[:5], b"", data[5:]],
        "generator": lambda: _generator(data),
        "file": lambda: io.BytesIO(data),
        "none": lambda: None,
    }
    with endpoint(flavour, driver, tmp_path, "/bin/cat") as target:
        for kind, make in kinds.items():
            result = flavour.run(target, input=make())
            sent = b"" if kind == "none" else data
            expected = dot_roundtrip(sent) if driver == "tcp" else sent
            assert result.status is Status.SUCCESS, (kind, result)
            assert result.output == expected, kind


# --- args and environment ----------------------------------------------------

#: Every byte the protocol can carry in an argument (NUL cannot be sent).
EVERY_BYTE_ARGS = [bytes([b]) for b in range(1, 256)] + [
    b"", bytes(range(1, 256)), b"a\tb", b"\r\n", b"\x01", b"\x01\x01", b"\x011", b"", b" ",
    b"-", b"noreply", b"VERSION\tscript\t4\t0", b"\n\n",
]


@ALL_DRIVERS
def test_args_every_byte_value(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Args with bytes 1..255, empty args, TAB, LF, CR, SOH reach argv unchanged."""
    script, record = recorder_script(tmp_path, reply=EMPTY_REPLY[driver])
    options = {} if driver == "fork" else {"script_args": ("svc one", "svc\ttwo")}
    with endpoint(flavour, driver, tmp_path, script, **options) as target:
        result = flavour.run(target, EVERY_BYTE_ARGS)
        seen = read_record(record)
    assert_result(result, Status.SUCCESS, output=b"")
    service_args = [] if driver == "fork" else [b"svc one", b"svc\ttwo"]
    assert seen["cmdline"][1] == script.encode()
    assert seen["cmdline"][2:] == service_args + EVERY_BYTE_ARGS
    assert seen["stdin"] == (b"\r\n.\r\n" if driver == "tcp" else b"")


CANARY = "EXECPROTO_TEST_CANARY"


@ALL_DRIVERS
def test_env_allowlist_and_no_leak(flavour: Flavour, driver: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's environment is exactly the allowed client entries (fork: all of them).

    Nothing of the service's (or the client's) own environment leaks, not
    even an allowlisted name the client did not send.
    """
    monkeypatch.setenv(CANARY, "leaked")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "/bin"))
    every = bytes(range(1, 256))
    env = [("FOO", "first"), ("FOO", "foo"), ("ALL", every), ("EMPTY", ""), ("QUX", "q"),
           ("TAB", "a\tb\nc\x01")]
    script, record = recorder_script(tmp_path, reply=EMPTY_REPLY[driver])
    options = {} if driver == "fork" else {
        "env_allowlist": ("FOO", "ALL", "EMPTY", "TAB", CANARY, "PATH")}
    with endpoint(flavour, driver, tmp_path, script, **options) as target:
        result = flavour.run(target, env=env)
        seen = read_record(record)
    assert_result(result, Status.SUCCESS, output=b"")
    expected = {b"FOO": b"foo", b"ALL": every, b"EMPTY": b"", b"TAB": b"a\tb\nc\x01"}
    if driver == "fork":
        expected[b"QUX"] = b"q"
    assert seen["environ"] == expected
    assert CANARY.encode() not in seen["environb"]


# --- big data ----------------------------------------------------------------


@ALL_DRIVERS
def test_50mb_through_cat(flavour: Flavour, driver: str, tmp_path: Path,
                          big_payload: bytes) -> None:
    """50 MB in and 50 MB out through ``cat``, byte-identical (tcp: dot framing applied)."""
    data = big_payload.replace(b"\r", b"") if driver == "tcp" else big_payload
    with endpoint(flavour, driver, tmp_path, "/bin/cat") as target:
        started = time.monotonic()
        result = flavour.run(target, input=data, limit=60)
        elapsed = time.monotonic() - started
    expected = dot_roundtrip(data) if driver == "tcp" else data
    assert result.status is Status.SUCCESS, result.detail
    assert result.output is not None
    if result.output != expected:
        first = _first_difference(result.output, expected)
        pytest.fail(f"output differs at byte {first}: {len(result.output)} bytes, "
                    f"expected {len(expected)}", pytrace=False)
    print(f"{flavour.name} {driver}: 50 MB in {elapsed:.2f} s")


def _first_difference(a: bytes, b: bytes) -> int:
    step = 1 << 20
    for start in range(0, min(len(a), len(b)), step):
        if a[start : start + step] != b[start : start + step]:
            return next(i for i in range(start, start + step) if a[i] != b[i])
    return min(len(a), len(b))


# --- connection failures -----------------------------------------------------


@contextlib.contextmanager
def _unlistened(driver: str, directory: Path) -> Iterator[str]:
    """A target with a bound socket that does not listen: ECONNREFUSED."""
    if driver == "unix":
        path = str(directory / "dead")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path)
            yield f"unix:{path}"
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield target_of(sock.getsockname())


@SOCKET_DRIVERS
def test_connect_refused(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """Nothing listening: INTERNAL_FAILURE naming the target; IO on unix, OTHER on tcp (Dovecot)."""
    with _unlistened(driver, tmp_path) as target:
        result = flavour.run(target, connect_timeout=5)
    kind = ErrorKind.OTHER if driver == "tcp" else ErrorKind.IO
    assert_result(result, Status.INTERNAL_FAILURE, kind,
                  f"connect({target}) failed: Connection refused", output=None,
                  target=target)


def test_wrong_socket_path(flavour: Flavour, tmp_path: Path) -> None:
    """A socket path that does not exist: IO, ENOENT text."""
    target = f"unix:{tmp_path}/no/such/socket"
    result = flavour.run(target, connect_timeout=5)
    assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.IO,
                  f"connect({target}) failed: No such file or directory", target=target)


def test_fork_program_missing(flavour: Flavour, tmp_path: Path) -> None:
    """fork of a missing program: FAILURE like Dovecot's exit 84 (CV 11.7), nothing started."""
    path = f"{tmp_path}/no-such-program"
    result = flavour.run(f"fork:{path}", ["a"], input=b"x")
    assert_result(result, Status.FAILURE,
                  detail=f"execvp({path}) failed: No such file or directory",
                  target=f"fork:{path}", returncode=None)


@pytest.mark.parametrize("blocked_by", ["socket-mode", "directory"])
def test_permission_denied(flavour: Flavour, blocked_by: str) -> None:
    """EACCES names the path and the missing permission (6.3).

    As root the client runs in a child that dropped to uid 65534 (root is
    never refused); otherwise the test process itself is refused.
    """
    root = os.geteuid() == 0
    top = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        directory = top
        if blocked_by == "directory":
            directory = os.path.join(top, "locked")
            os.mkdir(directory)
        path = os.path.join(directory, "sock")
        mode = 0o600 if root else 0o000
        with flavour.serving([UnixListener(path, mode=mode)], "/bin/cat"):
            if blocked_by == "directory":
                os.chmod(directory, 0o700 if root else 0o600)
            target = f"unix:{path}"
            try:
                if root:
                    result = run_as_nobody(flavour, target, connect_timeout=5)
                else:
                    result = flavour.run(target, connect_timeout=5)
            finally:
                os.chmod(directory, 0o755)
        missing = f"missing +x perm: {directory}" if blocked_by == "directory" else \
            f"missing +w perm: {path}"
        assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.IO, detail=None)
        assert result.detail.startswith(f"net_connect_unix({path}) failed: permission denied")
        assert result.detail.endswith(f"{missing})"), result.detail
    finally:
        for sub in ("locked/sock", "sock"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(top, sub))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(top, "locked"))
        os.rmdir(top)


@SOCKET_DRIVERS
def test_connect_timeout(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A full backlog: unix retries EAGAIN every 100 ms, tcp SYNs go unanswered; both time out."""
    fillers: list[socket.socket] = []
    family = socket.AF_UNIX if driver == "unix" else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind(str(tmp_path / "full") if driver == "unix" else ("127.0.0.1", 0))
        listener.listen(0)
        target = target_of(listener.getsockname())
        try:
            for _ in range(8):  # fill the backlog
                filler = socket.socket(family)
                fillers.append(filler)
                filler.settimeout(0.1)
                try:
                    filler.connect(listener.getsockname())
                except OSError:
                    break
            else:
                pytest.fail("could not fill the listen backlog")
            started = time.monotonic()
            result = flavour.run(target, connect_timeout=0.3)
            elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.CONNECT_TIMEOUT,
                  f"connect({target}) timed out after 0.3 s")
    # Dovecot's connect timer fires at the timeout, retries or not.
    assert 0.28 <= elapsed < 2.5, elapsed


# --- run timeout -------------------------------------------------------------


@ALL_DRIVERS
def test_run_timeout(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A total run limit (Q16): RUN_TIMEOUT; fork: the child is terminated and reaped."""
    pidfile = tmp_path / "pid"
    # Through a service the script ticks, so that it ends (EPIPE) once the
    # client has gone; the fork child must be ended by the client.
    body = "exec /bin/sleep 30\n" if driver == "fork" else \
        "while echo tick; do /bin/sleep 0.05; done\n"
    script = sh_script(tmp_path, "sleepy", f"echo $$ > {pidfile}\n{body}")
    with endpoint(flavour, driver, tmp_path, script) as target:
        started = time.monotonic()
        result = flavour.run(target, timeout=0.3)
        elapsed = time.monotonic() - started
    assert_result(result, Status.INTERNAL_FAILURE, ErrorKind.RUN_TIMEOUT,
                  "execution timed out (> 0.3 s)")
    assert 0.25 <= elapsed < 3.0, elapsed
    if driver == "fork":
        assert result.returncode == -15
        pid = int(pidfile.read_text())
        assert not os.path.exists(f"/proc/{pid}"), "the child was not reaped"


# --- concurrency -------------------------------------------------------------


@ALL_DRIVERS
def test_100_concurrent_clients(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """100 runs at once through ``cat``; each gets its own data back."""
    payloads = [b"client %d\n" % i * (50 + i) for i in range(100)]
    with endpoint(flavour, driver, tmp_path, "/bin/cat") as target:
        started = time.monotonic()
        results = flavour.run_many([(target, {"input": p, "timeout": 30}) for p in payloads])
        elapsed = time.monotonic() - started
    for payload, result in zip(payloads, results, strict=True):
        expected = dot_roundtrip(payload) if driver == "tcp" else payload
        assert result.status is Status.SUCCESS, result
        assert result.output == expected
    print(f"{flavour.name} {driver}: 100 clients in {elapsed:.2f} s")
