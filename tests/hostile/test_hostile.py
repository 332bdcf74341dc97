"""Clients that break the protocol, stall, vanish or flood, against every flavour.

After every case the service must answer a normal request correctly
(:func:`clients.assert_alive`).  Rejected headers must be dropped without a
reply, with one log line, and promptly (well before the header timeout).
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.adapters.flavours import read_reply

from .clients import (
    PROMPT,
    Served,
    assert_alive,
    assert_dropped,
    exchange_raw,
    header,
    idle_flood,
    reset_close,
    send_slowly,
    socket_count,
)

#: Headers the service must drop (sent without half-closing: it decides alone).
BAD_HEADERS = {
    "major-5": header(b"-", version=b"VERSION\tscript\t5\t0"),
    "old-major-3": header(b"-", version=b"VERSION\tscript\t3\t0"),
    "other-service": header(b"-", version=b"VERSION\tsieve\t4\t0"),
    "no-minor": header(b"-", version=b"VERSION\tscript\t4"),
    "huge-major": header(b"-", version=b"VERSION\tscript\t18446744073709551620\t0"),
    "no-version-line": b"-\nping\n\n",
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "nul-in-version": b"VERSION\0\tscript\t4\t0\n-\n\n",
    "nul-first": b"\0VERSION\tscript\t4\t0\n-\n\n",
    "env-without-equals": header(b"env_FOO", b"-"),
    "env-escaped-no-equals": header(b"env_FOO\x01nBAR", b"-"),
    "missing-options-line": header(b"env_FOO=1"),
    "alarm-empty": header(b"alarm=", b"-"),
    "alarm-word": header(b"alarm=soon", b"-"),
    "alarm-negative": header(b"alarm=-1", b"-"),
    "alarm-too-big": header(b"alarm=4294967296", b"-"),
    "alarm-space": header(b"alarm= 1", b"-"),
    "alarm-hex": header(b"alarm=0x10", b"-"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_header_is_dropped(served: Served, name: str) -> None:
    assert_dropped(served, BAD_HEADERS[name])
    assert_alive(served)


def test_garbage(served: Served) -> None:
    rng = random.Random(20260525)
    for payload in (rng.randbytes(300), rng.randbytes(3000).replace(b"\n", b"\r"),
                    bytes.fromhex("160301020001000000") + rng.randbytes(64)):  # a TLS hello
        assert_dropped(served, payload, half_close=True)
    assert_alive(served)


@pytest.mark.parametrize(("request_bytes", "reply"), [
    # A NUL ends an argument (C strings), as in Dovecot (quirk Q4).
    (header(b"-", b"ping\0; rm -rf /") + b"in", b"args:ping\nin+\n"),
    # A NUL ends the whole header text: the lines after it are gone, and
    # the line break before it leaves one empty argument.
    (header(b"-", b"x", b"\0hidden", b"more") + b"in", b"args:x \nin+\n"),
    # Escaped NUL (\x01 0) is the same as a raw one.
    (header(b"-", b"ping\x010tail") + b"in", b"args:ping\nin+\n"),
], ids=["in-argument", "in-header", "escaped"])
def test_nul_bytes(served: Served, request_bytes: bytes, reply: bytes) -> None:
    assert exchange_raw(served, request_bytes) == (reply, "eof")
    assert_alive(served)


def test_header_one_byte_at_a_time(served: Served) -> None:
    with served.connect() as sock:
        send_slowly(sock, header(b"env_FOO=x", b"-", b"ping") + b"hello", 0.002)
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock, 5.0)
    assert reply == (b"args:ping\nhello+\n", "eof")
    assert_alive(served)


def test_header_at_and_over_the_limit(served: Served) -> None:
    limit = served.options["max_header_bytes"]
    fill = limit - len(header(b"-", b""))
    exact = header(b"-", b"a" * fill)
    assert len(exact) == limit
    assert exchange_raw(served, exact) == (b"args:" + b"a" * fill + b"\n+\n", "eof")
    assert_dropped(served, header(b"-", b"a" * (fill + 1)))
    # Many lines, sent in small pieces: dropped once the buffer passes the limit.
    many = header(b"-", *[b"arg"] * (limit // 4 + 10))
    mark = served.log_mark()
    with served.connect() as sock:
        with contextlib.suppress(OSError):
            for i in range(0, len(many), 64):
                sock.sendall(many[i : i + 64])
        data, _ = read_reply(sock, PROMPT)
    assert data == b""
    assert any("exceeds" in m for m in served.warnings_since(mark))
    # One endless first line: there is no LF to check, the limit still applies.
    assert_dropped(served, b"VERSION\tscript\t4\t" + b"0" * (limit + 10))
    assert_alive(served)


def test_silence_and_drip_hit_the_total_header_timeout(served: Served) -> None:
    """A silent client and one sending a byte every 0.1 s are both dropped on time."""
    timeout = served.options["header_timeout"]
    drip_data = b"VERSION\tscript\t4\t0\n-\n" + b"x" * 1000
    started = time.monotonic()
    closed: dict[str, float] = {}
    with served.connect() as silent, served.connect() as drip:
        socks = {"silent": silent, "drip": drip}
        for sock in socks.values():
            sock.setblocking(False)
        sent = 0
        while len(closed) < 2 and time.monotonic() - started < timeout + 2.0:
            if "drip" not in closed:
                try:
                    drip.send(drip_data[sent : sent + 1])
                    sent += 1
                except OSError:
                    closed["drip"] = time.monotonic() - started
            open_socks = [s for n, s in socks.items() if n not in closed]
            readable, _, _ = select.select(open_socks, [], [], 0.1)
            for name, sock in socks.items():
                if sock in readable and name not in closed:
                    try:
                        data = sock.recv(100)
                    except ConnectionResetError:
                        data = b""
                    assert data == b"", f"{served}: {name} client got {data!r}"
                    closed[name] = time.monotonic() - started
    assert set(closed) == {"silent", "drip"}, f"{served}: still open after {timeout + 2} s"
    for name, at in closed.items():
        assert timeout - 0.2 <= at <= timeout + 1.0, f"{served}: {name} dropped after {at:.2f} s"
    assert sent < len(drip_data)
    assert_alive(served)


STAGES = ["after-connect", "mid-version", "mid-header", "after-header", "mid-payload",
          "script-running", "before-reading-reply"]


@pytest.mark.parametrize("stage", STAGES)
def test_disconnect(served: Served, stage: str) -> None:
    """The client goes away (FIN, then RST) at each stage of a request."""
    for way in ("close", "reset"):
        sock = served.connect()
        try:
            if stage == "mid-version":
                sock.sendall(b"VERSION\tscr")
            elif stage == "mid-header":
                sock.sendall(b"VERSION\tscript\t4\t0\nenv_FOO=1\n-\nping\n")
            elif stage == "after-header":
                sock.sendall(header(b"-", b"ping"))  # the script waits for stdin
            elif stage == "mid-payload":
                sock.sendall(header(b"-", b"ping") + b"x" * 100_000)
            elif stage == "script-running":
                sock.sendall(header(b"-", b"sleep", b"0.3"))
                sock.shutdown(socket.SHUT_WR)
            elif stage == "before-reading-reply":
                sock.sendall(header(b"-", b"big", b"4000000"))  # more than the buffers
                sock.shutdown(socket.SHUT_WR)
            # Let the service reach the stage (the scripts start within ms).
            time.sleep(0.15 if stage == "script-running" else 0.05)
        finally:
            if way == "reset":
                reset_close(sock)
            else:
                sock.close()
        assert_alive(served)


def test_connection_churn(served: Served) -> None:
    """Connections opened and dropped at once (FIN or RST), some with half a header."""
    deadline = time.monotonic() + 20.0
    for i in range(150):
        while True:  # a full unix backlog refuses at once (EAGAIN): come back later
            try:
                sock = served.connect()
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{served}: backlog never drains"
                time.sleep(0.01)
        if i % 3 == 0:
            with contextlib.suppress(OSError):
                sock.send(b"VERSION\tscript\t4\t0\n")
        reset_close(sock) if i % 2 else sock.close()
    assert_alive(served)


#: How soon after a flood ends the service must answer again.
RECOVERY = 5.0


def test_idle_flood(served: Served, record: Callable[[str, str], None]) -> None:
    """2000 idle connections: at most max_connections are accepted, each only for the
    header timeout; once the clients go away the service answers promptly."""
    slots = served.options["max_connections"]
    timeout = served.options["header_timeout"]
    baseline = socket_count()
    mark = served.log_mark()
    with idle_flood(served, 2000) as (socks, refused):
        held = len(socks)
        assert held >= slots, f"{served}: only {held} connections ({refused} refused)"
        most = 0
        until = time.monotonic() + timeout + 0.4
        while time.monotonic() < until:
            most = max(most, socket_count() - baseline - held)
            time.sleep(0.05)
        assert most <= slots, f"{served}: {most} connections accepted at once"
        timed_out = [m for m in served.log.messages()[mark:] if "not received" in m]
        assert len(timed_out) >= slots, f"{served}: idle slots not reclaimed: {timed_out}"
    took = assert_alive(served, within=RECOVERY + 5)
    record(f"idle flood {served}", f"{held} connections held ({refused} refused at once), "
           f"at most {most} accepted at once, answered {took:.2f} s after they closed")
    assert took <= RECOVERY, f"{served}: answered {took:.2f} s after the flood ended"


def test_unread_payload_keeps_the_verdict(served: Served) -> None:
    """The script exits without reading 8 MB of payload: the reply still arrives intact
    (the service drains before closing, so the close is not a reset)."""
    payload = b"x" * (8 * 1024 * 1024)
    with served.connect(timeout=10.0) as sock:
        sender = threading.Thread(target=_send_all_quietly, args=(sock, header(
            b"-", b"exit", b"0") + payload), daemon=True)
        sender.start()
        reply = read_reply(sock, 10.0)
        sender.join(10.0)
    assert reply == (b"+\n", "eof"), f"{served}: {reply!r}"
    assert_alive(served)


def _send_all_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
