"""The tap between execproto's own clients and services, and scripted peers.

Unix and tcp: bytes out equal bytes in, both ways, byte for byte; half-closes
and resets are passed on; a bad header is forwarded unchanged; an unreachable
service is a close for the client; the records say what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto import (
    DotEncoder,
    ExchangeObserver,
    Request,
    TcpTarget,
    UnixTarget,
    encode_request,
)
from execproto.adapters import TcpListener, UnixListener, blocking
from execproto.adapters._common import ServiceConfig
from execproto.adapters.trace import (
    Peer,
    RecordWriter,
    TraceRecord,
    escape,
    record_json,
    record_text,
)

from .helpers import (
    LIMIT,
    TraceProcess,
    Upstream,
    address_of,
    connect,
    exchange,
    running_tap,
    wait_for,
)

TRANSPORTS = ("unix", "tcp")


def listener(transport: str, directory: Path, name: str) -> UnixListener | TcpListener:
    if transport == "unix":
        return UnixListener(str(directory / f"{name}.sock"))
    return TcpListener("127.0.0.1", 0)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="trace-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def request_bytes(payload: bytes, *, dot: bool, noreply: bool = False,
                  args: tuple[str, ...] = ("hello", "two words")) -> bytes:
    header = encode_request(Request(args=args, env={"USER": "frank", "PATH": "/evil"},
                                    noreply=noreply))
    if dot:
        encoder = DotEncoder()
        payload = encoder.encode(payload) + encoder.finish()
    return header + payload


def test_bytes_pass_unchanged_both_ways(transport: str, short_dir: Path) -> None:
    rng = random.Random(11)
    payload = rng.randbytes(300_000)
    reply = rng.randbytes(200_000) + b"+\n"
    request = request_bytes(payload, dot=transport == "tcp")
    with Upstream(listener(transport, short_dir, "up"), reply=reply) as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target,
                        env_allowlist=(b"USER",)) as (tap, records):
        received = exchange(address_of(tap), request)
        wait_for(lambda: records, "the record")
    assert received == reply
    (seen,) = up.exchanges
    assert seen.received == request and seen.eof
    (record,) = records
    s = record.summary
    assert s.header is not None and s.header.args == (b"hello", b"two words")
    assert [(e.name, e.status) for e in s.env] == [(b"USER", "kept"), (b"PATH", "dropped")]
    assert s.payload_bytes == len(request) - s.header.header_size
    assert s.payload_sha256 == hashlib.sha256(request[s.header.header_size:]).hexdigest()
    assert (s.reply_bytes, s.output_bytes) == (len(reply), len(reply) - 2)
    assert record.result == "+"
    assert record.dot is (transport == "tcp")
    if transport == "tcp":
        assert s.payload_dot_end is True
        assert "the output's dot stream ends without '.' line" in record.notes  # random output
    else:
        assert record.notes == ()


def test_reply_before_the_payload_ends(transport: str, short_dir: Path) -> None:
    """A script that answers before reading: both ways move at once (no deadlock)."""
    payload = b"x" * 4_000_000
    reply = b"y" * 4_000_000 + b"-\n"
    request = request_bytes(payload, dot=False)
    with Upstream(listener(transport, short_dir, "up"), reply=reply, reply_early=True) as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target) as (tap, records):
        received = exchange(address_of(tap), request)
        wait_for(lambda: records, "the record")
    assert received == reply
    assert up.exchanges[0].received == request
    assert records[0].result == "-"


def test_execproto_client_and_service(transport: str, short_dir: Path) -> None:
    """execproto's client through the tap to execproto's service: the same as directly."""
    script = short_dir / "echo.sh"
    # Over tcp the dot-encoded payload, echoed, is a valid dot stream.
    script.write_text("#!/bin/sh\nprintf '%s\\r\\n' \"$*\"\nexec /bin/cat\n")
    script.chmod(0o755)
    config = ServiceConfig(script=str(script), script_args=("one",), env_allowlist=("USER",))
    payload = b"line 1\n.line 2\n"
    with blocking.Service([listener(transport, short_dir, "svc")], config) as service:
        thread = threading.Thread(target=service.serve_forever, daemon=True)
        thread.start()
        address = service.addresses[0]
        target: UnixTarget | TcpTarget = (
            UnixTarget(address) if isinstance(address, str) else TcpTarget(*address))
        direct = blocking.run(target, ["a\tb"], input=payload, env={"USER": "u"}, timeout=LIMIT)
        with running_tap(listener(transport, short_dir, "tap"), target,
                         env_allowlist=(b"USER",), keep=6) as (tap, records):
            tapped = blocking.run(address_of(tap), ["a\tb"], input=payload, env={"USER": "u"},
                                  timeout=LIMIT)
            noreply = blocking.run(address_of(tap), ["q"], noreply=True, read_output=False,
                                   timeout=LIMIT)
            wait_for(lambda: len(records) == 2, "two records")
        service.stop()
        thread.join(LIMIT)
    assert (tapped.status, tapped.output) == (direct.status, direct.output)
    assert direct.ok and direct.output is not None and b"one a\tb" in direct.output
    assert noreply.ok
    by_args = {r.summary.header.args: r for r in records if r.summary.header is not None}
    reply = by_args[(b"a\tb",)]
    assert reply.result == "+"
    assert reply.summary.payload_head == b"line 1"
    text = record_text(reply, show_payload=True)
    assert 'args=["a\\tb"]' in text and 'env=[USER="u"(kept)]' in text
    assert "result=+" in text and 'head="line 1"' in text
    quiet = by_args[(b"q",)]
    assert quiet.result == "noreply"
    assert quiet.summary.header is not None and quiet.summary.header.noreply


def test_noreply_close(transport: str, short_dir: Path) -> None:
    """A quota warning: the request, then a close; the service's output goes nowhere."""
    request = request_bytes(b"", dot=transport == "tcp", noreply=True, args=("10", "frank"))
    with Upstream(listener(transport, short_dir, "up"), reply=b"recorded\n") as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target) as (tap, records):
        exchange(address_of(tap), request, close=True)
        wait_for(lambda: records, "the record")
        wait_for(lambda: up.exchanges and up.exchanges[0].eof, "the upstream's EOF")
    assert up.exchanges[0].received == request
    (record,) = records
    assert record.result == "noreply"
    assert record.summary.header is not None
    assert record.summary.header.args == (b"10", b"frank")


def test_bad_header_forwarded(transport: str, short_dir: Path) -> None:
    request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\nbody"
    with Upstream(listener(transport, short_dir, "up"), reply=b"") as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target, keep=4) as (
                tap, records):
        assert exchange(address_of(tap), request) == b""
        wait_for(lambda: records, "the record")
    assert up.exchanges[0].received == request
    (record,) = records
    assert record.result == "bad-header"
    assert "Client not compatible" in record.detail
    assert record.summary.request_bytes == len(request)
    assert json.loads(json.dumps(record_json(record, show_payload=True)))["payload_head"] == "GET "


def test_upstream_down_is_a_close(transport: str, short_dir: Path) -> None:
    gone = UnixTarget(str(short_dir / "nobody.sock"))
    request = request_bytes(b"payload", dot=False)
    with running_tap(listener(transport, short_dir, "tap"), gone) as (tap, records):
        with connect(address_of(tap)) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # a close, not ECONNRESET
        wait_for(lambda: records, "the record")
    (record,) = records
    assert record.result == "upstream-down"
    assert "No such file or directory" in record.detail
    # What the client asked for is still shown.
    assert record.summary.header is not None
    assert record.summary.header.args == (b"hello", b"two words")
    assert json.loads(json.dumps(record_json(record)))["result"] == "upstream-down"


def test_half_close_passed_on(transport: str, short_dir: Path) -> None:
    """The client's half-close reaches the service, which still answers afterwards."""
    request = request_bytes(b"data", dot=False)
    with Upstream(listener(transport, short_dir, "up"), reply=b"late\n+\n", hold=0.3) as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target) as (tap, records):
        with connect(address_of(tap)) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: up.exchanges and up.exchanges[0].eof, "the upstream's EOF")
            received = b""
            while data := sock.recv(100):
                received += data
        wait_for(lambda: records, "the record")
    assert received == b"late\n+\n"
    assert records[0].result == "+"


def test_client_reset_closes_upstream(short_dir: Path) -> None:
    with Upstream(TcpListener("127.0.0.1", 0), reply=b"") as up, \
            running_tap(TcpListener("127.0.0.1", 0), up.target) as (tap, records):
        sock = connect(address_of(tap))
        sock.sendall(b"VERSION\tscript\t4\t0\n-\n")
        wait_for(lambda: up.exchanges and up.exchanges[0].count, "the forwarded bytes")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # an abortive close: RST
        wait_for(lambda: records, "the record")
        wait_for(lambda: up.exchanges[0].eof, "the upstream's close")
    (record,) = records
    assert "client reset the connection" in record.notes
    assert record.result == "bad-header"  # the header never ended


def test_upstream_reset_after_the_result_code(transport: str, short_dir: Path) -> None:
    """A script that leaves payload unread (Q8): the result code still reaches the client."""
    request = request_bytes(b"z" * 8_000_000, dot=False)
    with Upstream(listener(transport, short_dir, "up"), reply=b"early\n+\n",
                  read_limit=100) as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target) as (tap, records):
        with connect(address_of(tap)) as sock:
            reader_got: list[bytes] = []

            def read() -> None:
                with contextlib.suppress(OSError):
                    while data := sock.recv(1 << 16):
                        reader_got.append(data)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            with contextlib.suppress(OSError):  # the tap stops reading: EPIPE or a reset
                sock.sendall(request)
            reader.join(LIMIT)
            assert not reader.is_alive()
        wait_for(lambda: records, "the record")
    assert b"".join(reader_got) == b"early\n+\n"
    (record,) = records
    assert record.result == "+"
    assert any("upstream" in note for note in record.notes), record.notes


def test_stop_cuts_open_connections(short_dir: Path) -> None:
    with Upstream(UnixListener(str(short_dir / "up.sock")), reply=b"") as up, \
            running_tap(UnixListener(str(short_dir / "tap.sock")), up.target,
                        grace=0.2) as (tap, records), \
            connect(address_of(tap)) as sock:
        sock.sendall(b"VERSION\tscript\t4\t0\n-\n\n")
        wait_for(lambda: up.exchanges and up.exchanges[0].count, "the forwarded bytes")
        tap.stop()
        assert sock.recv(10) == b""
        wait_for(lambda: records, "the record")
    assert "cut by the stop of the tap" in records[0].notes
    assert not (short_dir / "tap.sock").exists()


def test_idle_timeout(transport: str, short_dir: Path) -> None:
    with Upstream(listener(transport, short_dir, "up"), reply=b"") as up, \
            running_tap(listener(transport, short_dir, "tap"), up.target,
                        idle_timeout=0.3) as (tap, records):
        with connect(address_of(tap)) as sock:
            sock.sendall(b"VERSION\tscript\t4\t0\n")
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 5
        wait_for(lambda: records, "the record")
    assert any("nothing moved for 0.3 s" in note for note in records[0].notes)


def test_max_connections(short_dir: Path) -> None:
    request = request_bytes(b"", dot=False)
    with Upstream(UnixListener(str(short_dir / "up.sock")), reply=b"+\n", hold=0.2) as up, \
            running_tap(UnixListener(str(short_dir / "tap.sock")), up.target,
                        max_connections=1) as (tap, records):
        threads = [threading.Thread(target=exchange, args=(address_of(tap), request))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LIMIT)
        wait_for(lambda: len(records) == 3, "three records")
    assert up.most_active == 1
    assert [r.result for r in records] == ["+"] * 3


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_record_writer_survives_a_broken_stream(short_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Tracing must never stop mail: a failing stdout is reported once, forwarding goes on."""
    writer = RecordWriter(BrokenStream(), as_json=True)
    request = request_bytes(b"", dot=False)
    with Upstream(UnixListener(str(short_dir / "up.sock")), reply=b"+\n") as up, \
            running_tap(UnixListener(str(short_dir / "tap.sock")), up.target) as (tap, _):
        tap.config.emit = writer
        assert exchange(address_of(tap), request) == b"+\n"
        assert exchange(address_of(tap), request) == b"+\n"
    assert [r.getMessage() for r in caplog.records].count(
        "cannot write trace records any more ([Errno 32] Broken pipe); still forwarding") == 1


def test_record_text_of_an_escaped_env_line() -> None:
    """An env line that needed escaping is flagged: Dovecot up to 2.4.2 drops it (Q6)."""
    observer = ExchangeObserver(env_allowlist=[b"A"])
    observer.from_client(encode_request(Request(args=["x"], env={"A": "1\t2"}, noreply=True)))
    observer.from_client(b"")
    observer.from_service(b"")
    record = TraceRecord(0.0, Peer("127.0.0.1:1"), "unix:/s", 0.001, observer.summary(),
                         "noreply")
    text = record_text(record)
    assert text.startswith("1970-01-01T00:00:00.000Z 127.0.0.1:1 -> unix:/s 0.001s v4.0 noreply")
    assert 'env=[A="1\\t2"(kept,escaped)]' in text
    assert record_json(record)["env"] == [
        {"name": "A", "value": "1\\t2", "status": "kept", "escaped": True}]


def test_escape() -> None:
    assert escape(b"plain text") == "plain text"
    assert escape(b"a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert escape(b"\x00\x01\x7f") == "\\x00\\x01\\x7f"
    assert escape("grüße".encode()) == "grüße"
    assert escape(b"\xff\xfe") == "\\xff\\xfe"
    assert escape(b'say "hi"', '"') == 'say \\"hi\\"'
    assert escape("\u2028".encode()) == "\\u2028"


# --- the command ---------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """The peak resident size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_command_big_payload_bounded_memory(short_dir: Path) -> None:
    """200 MB through ``execproto trace``: streamed, hashed, and the tap stays small."""
    size = 200 * 1024 * 1024
    chunk = random.Random(3).randbytes(1 << 20)
    digest = hashlib.sha256()
    header = encode_request(Request(args=["big"]))
    with Upstream(UnixListener(str(short_dir / "up.sock")), reply=b"+\n", store=False) as up, \
            TraceProcess(["--listen", f"unix:{short_dir / 'tap.sock'}", "--to",
                          f"unix:{short_dir / 'up.sock'}", "--json"], short_dir) as tap:
        before = vm_hwm(tap.process.pid)
        with connect(f"unix:{tap.address}") as sock:
            sock.sendall(header)
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
                digest.update(chunk)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b"+\n"
        (record,) = tap.wait_records(1)
        peak = vm_hwm(tap.process.pid)
        assert tap.stop() == 0
    assert up.exchanges[0].count == len(header) + size
    assert record["payload_bytes"] == size
    assert record["payload_sha256"] == digest.hexdigest()
    assert record["result"] == "+"
    assert peak - before < 32 * 1024 * 1024, (before, peak)


def test_command_stops_cleanly(short_dir: Path) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        path = short_dir / "tap.sock"
        with TraceProcess(["--listen", f"unix:{path}", "--mode", "0666", "--to",
                           f"unix:{short_dir / 'up.sock'}"], short_dir) as tap:
            assert (os.stat(path).st_mode & 0o777) == 0o666
            assert tap.stop(signum) == 0
        assert not path.exists()
        assert "forwarding to unix:" in tap.log()


def test_command_text_and_json(short_dir: Path) -> None:
    request = request_bytes(b"hello\n", dot=False)
    with Upstream(UnixListener(str(short_dir / "up.sock")), reply=b"hi\n+\n") as up:
        args = ["--to", f"unix:{up.target.label[5:]}", "-e", "USER", "--show-payload", "3"]
        with TraceProcess(["--listen", f"unix:{short_dir / 'text.sock'}", *args], short_dir,
                          "text") as text_tap, \
                TraceProcess(["--listen", f"unix:{short_dir / 'json.sock'}", "--json", *args],
                             short_dir, "json") as json_tap:
            exchange(f"unix:{text_tap.address}", request)
            exchange(f"unix:{json_tap.address}", request)
            wait_for(text_tap.lines, "a text record")
            (line,) = text_tap.lines()
            (obj,) = json_tap.wait_records(1)
    assert ' -> unix:' in line and ' v4.0 reply args=["hello" "two words"] ' in line
    assert 'env=[USER="frank"(kept) PATH="/evil"(dropped)] payload=6B ' in line
    assert 'head="hel" output=3B result=+' in line
    assert obj["args"] == ["hello", "two words"]
    assert obj["env"] == [
        {"name": "USER", "value": "frank", "status": "kept", "escaped": False},
        {"name": "PATH", "value": "/evil", "status": "dropped", "escaped": False}]
    assert (obj["payload_bytes"], obj["payload_head"], obj["output_bytes"]) == (6, "hel", 3)
    assert obj["payload_sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert (obj["result"], obj["notes"], obj["version"], obj["noreply"]) == ("+", [], "4.0", False)
    assert obj["client_pid"] == os.getpid() and obj["client_uid"] == os.getuid()


def test_command_usage_errors(short_dir: Path) -> None:
    import subprocess
    import sys

    for args in (["--listen", "fifo:/x", "--to", "unix:/y"],
                 ["--listen", "unix:/x", "--to", "exec:/bin/true"],
                 ["--listen", "unix:/x", "--to", "unix:/y", "--mode", "rw"]):
        done = subprocess.run([sys.executable, "-m", "execproto", "trace", *args],
                              capture_output=True, timeout=LIMIT, check=False)
        assert done.returncode == 64, done.stderr
