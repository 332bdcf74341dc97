"""execproto's clients (every flavour, unix and tcp) against Dovecot's own service.

For each installation (2.3.19, 2.4.1, 2.4.5), one private Dovecot serves the
module with three ``script`` services:

* ``raw``: the probe (see :data:`tools.PROBE_SOURCE`) with ``-e FOO,BAR,TABBY``,
  reached over unix;
* ``dot``: the same probe speaking dot framing, reached over TCP;
* ``cat``: ``/bin/cat``, over unix and TCP.

The probe's first client argument selects what it does (``record``,
``echo``, ``fail``, ``early``); its records tell what Dovecot's service gave
the script. ``-e`` takes commas because the ``executable`` line is split on
spaces (PROTOCOL.md 7.1).
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from execproto import ErrorKind, Status

from .dovecot import Installation, PrivateDovecot, ScriptService, StartDovecot
from .tools import (
    RUN_LIMIT,
    cli,
    dot_transform,
    read_records,
    run_client,
    wait_records,
    write_probe,
)

TRANSPORTS = ("unix", "tcp")
ALLOWLIST = ("FOO", "BAR", "TABBY")
BIG = 4 * 1024 * 1024
# Arguments that need tab-escaping, and an empty one, which this client sends
# as b"\x01" (PROTOCOL.md 2.8.2): Dovecot must unescape each to the same text.
ARGS = ["with space", "tab\there", "new\nline", "soh\x01x", "", "cr\rend", "last"]
ENV = {"FOO": "foo", "BAR": "x=y", "TABBY": "a\tb", "NOPE": "not allowed"}
# What the script gets (PROTOCOL.md 2.6): NOPE is not on the allowlist;
# TABBY needed an escape, so the 2.3.19-2.4.2 bug drops it, 2.4.3+ keep it.
ENV_DROPPED = {"FOO": "foo", "BAR": "x=y"}
ENV_KEPT = {"FOO": "foo", "BAR": "x=y", "TABBY": "a\tb"}


def env_seen(installation: Installation) -> dict[str, str]:
    """The script environment ``ENV`` gives on ``installation``."""
    return ENV_KEPT if installation.version >= (2, 4, 3) else ENV_DROPPED


@dataclass
class Setup:
    """The module's Dovecot and where each service's probe records go."""

    dovecot: PrivateDovecot
    probe: Path
    records: dict[str, Path]
    installation: Installation

    def target(self, transport: str, service: str | None = None) -> str:
        """The client target of ``service`` (default: the probe of ``transport``)."""
        if transport == "unix":
            return f"unix:{self.dovecot.socket_path(service or 'raw')}"
        return f"tcp:127.0.0.1:{self.dovecot.port(service or 'dot')}"

    def record_dir(self, transport: str) -> Path:
        """The record directory of ``transport``'s probe, emptied."""
        directory = self.records["raw" if transport == "unix" else "dot"]
        for old in directory.iterdir():
            old.unlink()
        return directory

    def prefix(self, transport: str) -> list[str]:
        """The argv the probe service puts before the client's args."""
        framing = "raw" if transport == "unix" else "dot"
        return [str(self.probe), str(self.records[framing]), framing]


@pytest.fixture(scope="module")
def setup(installation: Installation, start_dovecot: StartDovecot, workspace: Path) -> Setup:
    probe = write_probe(workspace / "probe.py", installation.python,
                        installation.provide_execproto(workspace))
    records = {name: workspace / f"records-{name}" for name in ("raw", "dot")}
    for directory in records.values():
        directory.mkdir()
    dovecot = start_dovecot(
        [
            ScriptService("raw", probe, args=(str(records["raw"]), "raw"),
                          env_allowlist=ALLOWLIST),
            ScriptService("dot", probe, args=(str(records["dot"]), "dot"),
                          env_allowlist=ALLOWLIST, inet_listener=True),
            ScriptService("cat", Path("/bin/cat"), inet_listener=True),
        ]
    )
    result = Setup(dovecot, probe, records, installation)
    # One good exchange per service first: the master throttles a service
    # whose first processes fail (see test_dovecot_vectors.py).
    for transport in TRANSPORTS:
        assert run_client("blocking", result.target(transport), ["record"]).ok
        assert run_client("blocking", result.target(transport, "cat")).ok
    return result


def output_of(transport: str, line: bytes) -> bytes:
    """The output of a probe answering ``line`` (tcp: dot-decoded, so trimmed)."""
    return line if transport == "unix" else dot_transform(line)


def only_record(directory: Path) -> dict[str, Any]:
    found = read_records(directory)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_args_env_and_payload(setup: Setup, flavour: str, transport: str) -> None:
    records = setup.record_dir(transport)
    payload = b"payload\nline two\n.dot line\n"

    result = run_client(flavour, setup.target(transport), ["record", *ARGS], input=payload,
                        env=ENV)

    assert (result.status, result.kind, result.detail) == (Status.SUCCESS, ErrorKind.NONE, "")
    assert result.output == output_of(transport, b"recorded\n")
    record = only_record(records)
    assert record["argv"] == [*setup.prefix(transport), "record", *ARGS]
    assert record["env"] == env_seen(setup.installation)
    # tcp: the payload went through the client's encoder and the probe's
    # decoder, so the script sees its documented dot transformation.
    want = payload if transport == "unix" else dot_transform(payload)
    assert record["stdin"] == want.decode("latin-1")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_big_binary_payload_through_cat(setup: Setup, flavour: str, transport: str) -> None:
    payload = random.Random(2319).randbytes(BIG)

    result = run_client(flavour, setup.target(transport, "cat"), input=payload)

    assert (result.status, result.kind) == (Status.SUCCESS, ErrorKind.NONE)
    assert result.target == setup.target(transport, "cat")
    assert result.output is not None
    if transport == "unix":
        assert result.output == payload  # byte for byte
    else:
        # cat echoes the dot-encoded wire bytes; the client decodes them.
        assert len(result.output) == len(dot_transform(payload))
        assert result.output == dot_transform(payload)


def test_big_binary_payload_through_dot_script(setup: Setup, flavour: str) -> None:
    records = setup.record_dir("tcp")
    payload = random.Random(2320).randbytes(BIG)

    result = run_client(flavour, setup.target("tcp"), ["echo"], input=payload)

    assert (result.status, result.kind) == (Status.SUCCESS, ErrorKind.NONE)
    once = dot_transform(payload)
    record = only_record(records)
    assert record["stdin_sha256"] == hashlib.sha256(once).hexdigest()
    # The probe encodes what it decoded; the client decodes that again.
    assert result.output == dot_transform(once)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_script_failure(setup: Setup, flavour: str, transport: str) -> None:
    setup.record_dir(transport)

    result = run_client(flavour, setup.target(transport), ["fail"], input=b"in\n")

    # exit 3 -> the service sends b"-\n" -> FAILURE, output kept.
    assert (result.status, result.kind) == (Status.FAILURE, ErrorKind.NONE)
    assert result.output == output_of(transport, b"failing\n")


@pytest.mark.parametrize("read_output", [True, False], ids=["read", "no-read"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_noreply(setup: Setup, flavour: str, transport: str, read_output: bool) -> None:
    records = setup.record_dir(transport)
    payload = b"noreply payload\n"

    result = run_client(flavour, setup.target(transport), ["record", "x y"], input=payload,
                        noreply=True, read_output=read_output)

    assert (result.status, result.kind, result.detail) == (Status.SUCCESS, ErrorKind.NONE, "")
    if read_output:
        # No trailer in noreply mode: everything is output (tcp: dot-decoded).
        assert result.output == output_of(transport, b"recorded\n")
    else:
        assert result.output is None
    # Without reading, the run ends before the script does: wait for it.
    (record,) = wait_records(records)
    assert record["argv"] == [*setup.prefix(transport), "record", "x y"]
    want = payload if transport == "unix" else dot_transform(payload)
    assert record["stdin"] == want.decode("latin-1")



# --- noreply and a script that prints nothing ----------------------------------------
#
# With noreply Dovecot's service execs the script with the connection as its
# stdin and stdout and adds nothing: no result code, no dot framing. A script
# that prints nothing therefore sends zero bytes, over tcp too. Dovecot's own
# tcp client, when it reads output, runs them through its dot decoder and
# fails ("dot-input stream ends without '.' line"); its noreply users (quota
# warnings, welcome) never read, so they never meet this. execproto takes an
# empty noreply reply as no output, so unix and tcp agree.


def raw_noreply_exchange(setup: Setup, transport: str, action: str) -> tuple[bytes, str]:
    """What Dovecot's service sends back to a noreply request without payload.

    Over tcp the (empty) payload is still dot-encoded, as every client does.
    """
    if transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = str(setup.dovecot.socket_path("raw"))
        payload = b""
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("127.0.0.1", setup.dovecot.port("dot"))
        payload = b"\r\n.\r\n"
    with sock:
        sock.settimeout(RUN_LIMIT)
        sock.connect(address)
        sock.sendall(b"VERSION\tscript\t4\t0\nnoreply\n" + action.encode() + b"\n\n" + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            return reply, "reset"
        return reply, "eof"


@pytest.mark.parametrize(
    ("transport", "action", "end"),
    [
        ("unix", "silent", "eof"),
        ("tcp", "silent", "eof"),
        ("unix", "gone", "eof"),  # no payload: nothing left unread
        ("tcp", "gone", "reset"),  # the dot end line is left unread
    ],
)
def test_noreply_service_sends_nothing_for_a_silent_script(
    setup: Setup, transport: str, action: str, end: str
) -> None:
    records = setup.record_dir(transport)

    assert raw_noreply_exchange(setup, transport, action) == (b"", end)
    wait_records(records)


@pytest.mark.parametrize("noreply", [True, False], ids=["noreply", "reply"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_silent_script(setup: Setup, flavour: str, transport: str, noreply: bool) -> None:
    records = setup.record_dir(transport)

    result = run_client(flavour, setup.target(transport), ["silent"], noreply=noreply)

    if transport == "tcp" and not noreply:
        # The reply is a bare b"+\n": no dot line, as Dovecot's client also finds.
        assert (result.status, result.kind, result.detail) == (
            Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL, "dot-input stream ends without '.' line")
    else:
        assert (result.status, result.kind, result.detail) == (Status.SUCCESS, ErrorKind.NONE, "")
    assert result.output == b""
    wait_records(records)


@pytest.mark.parametrize("lenient", [True, False], ids=["lenient", "strict"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_noreply_silent_script_leaving_payload_unread(
    setup: Setup, flavour: str, transport: str, lenient: bool
) -> None:
    # The common quota-warning script: reads nothing, prints nothing.
    records = setup.record_dir(transport)

    result = run_client(flavour, setup.target(transport), ["gone"], noreply=True,
                        lenient_reset=lenient)

    if transport == "tcp" and not lenient:  # a reset, reported like Dovecot
        assert (result.status, result.kind, result.detail) == (
            Status.INTERNAL_FAILURE, ErrorKind.IO, "connection reset by peer")
    else:
        assert (result.status, result.kind, result.detail) == (Status.SUCCESS, ErrorKind.NONE, "")
    assert result.output == b""
    wait_records(records)


@pytest.mark.parametrize("action", ["silent", "gone", "record"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cli_run_noreply_no_input(setup: Setup, flavour: str, transport: str,
                                  action: str) -> None:
    records = setup.record_dir(transport)

    done = cli("run", "--adapter", flavour, "--noreply", "--no-input", "--connect-timeout",
               "10", "--timeout", "20", setup.target(transport), action)

    output = output_of(transport, b"recorded\n") if action == "record" else b""
    assert (done.returncode, done.stdout, done.stderr) == (0, output, b"")
    wait_records(records)


# --- a script that exits without reading its payload ---------------------------------
#
# Dovecot's service then closes the connection with unread data, so Linux
# resets it (PROTOCOL.md 4.2.2, quirk Q8). The probe's "early" answer and
# the service's b"+\n" are sent before the reset, and on loopback they always
# arrive first. What the client sees depends on which call meets the reset:
#
# * a read (recv returns the queued reply, then ECONNRESET): lenient_reset
#   counts the complete result code -> SUCCESS; lenient_reset=False -> IO.
# * a write: unix reports EPIPE and the next reads still end in ECONNRESET;
#   tcp reports the reset on that write (EPIPE/ECONNRESET), which clears it,
#   and the reads then end in a plain EOF.
#
# A 13-byte payload is sent before the script starts (a Python script takes
# tens of ms), so only reads meet the reset: exact results. A 4 MB payload
# fills the socket buffers, so whether a read or a write meets the reset
# first is timing: exact for unix and for lenient; strict tcp is covered by
# the stalled-input test below, which makes the write meet it every time.


def early_expectation(transport: str, lenient: bool) -> tuple[Status, ErrorKind, bytes]:
    if lenient:
        return Status.SUCCESS, ErrorKind.NONE, output_of(transport, b"early\n")
    return Status.INTERNAL_FAILURE, ErrorKind.IO, output_of(transport, b"early\n")


@pytest.mark.parametrize("lenient", [True, False], ids=["lenient", "strict"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reset_small_payload(setup: Setup, flavour: str, transport: str, lenient: bool) -> None:
    setup.record_dir(transport)

    result = run_client(flavour, setup.target(transport), ["early"], input=b"13 bytes here",
                        lenient_reset=lenient)

    assert (result.status, result.kind, result.output) == early_expectation(transport, lenient)
    assert result.detail == ("" if lenient else "connection reset by peer")


@pytest.mark.parametrize(
    ("transport", "lenient"), [("unix", False), ("tcp", True)], ids=["unix-strict", "tcp-lenient"]
)
def test_reset_big_payload(setup: Setup, flavour: str, transport: str, lenient: bool) -> None:
    setup.record_dir(transport)
    payload = random.Random(2321).randbytes(BIG)

    result = run_client(flavour, setup.target(transport), ["early"], input=payload,
                        lenient_reset=lenient)

    assert (result.status, result.kind, result.output) == early_expectation(transport, lenient)
    if not lenient:
        # Which call meets the reset first is timing (see above).
        label = setup.target(transport)
        assert result.detail in ("connection reset by peer",
                                 f"write({label}) failed: Broken pipe"), result.detail


def stalled_input(records: Path) -> Iterator[bytes]:
    """A payload whose second chunk is sent only after the service has closed.

    The first chunk stays unread (the probe's "early" action does not read),
    so the service's close resets the connection; the second chunk's write
    then meets the reset before any read does.
    """
    yield b"x" * 1000
    wait_records(records)  # the probe has answered and is exiting
    time.sleep(0.3)  # the service reaps it, writes b"+\n" and closes
    yield b"y" * 1000


@pytest.mark.parametrize(
    ("transport", "lenient"),
    [
        ("unix", False),
        ("tcp", True),
        ("tcp", False),
    ],
    ids=["unix-strict", "tcp-lenient", "tcp-strict"],
)
def test_reset_met_by_a_write(setup: Setup, flavour: str, transport: str,
                              lenient: bool) -> None:
    records = setup.record_dir(transport)

    result = run_client(flavour, setup.target(transport), ["early"],
                        input=stalled_input(records), lenient_reset=lenient)

    assert (result.status, result.kind, result.output) == early_expectation(transport, lenient)

