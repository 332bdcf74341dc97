"""Benchmarks of the sans-IO core's hot paths, each against a CPython ceiling.

Run from the repository root::

    python benchmarks/bench_core.py            # about 1-2 minutes
    python benchmarks/bench_core.py --quick    # under 20 s, for a smoke check

Every row times one core workload (A) and one plain-CPython "ceiling" doing
the least work the same job could cost (C) in the same run, interleaved:
round r runs A then C when r is even, C then A when it is odd, with the
garbage collector off inside a timed round (as ``timeit`` does).  The table
shows the median rate of each over all rounds and their ratio, A / C.  A
goal is a lower bound on that ratio; rows without a goal are informational.

Only public names of ``execproto`` are used, and only the standard library.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

from execproto import (
    NEED_DATA,
    ClientConnection,
    DotDecoder,
    DotEncoder,
    EndOfInput,
    HeaderParser,
    Output,
    Request,
    Result,
    ScriptRequest,
    ServiceConnection,
    Status,
    encode_request,
)

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

#: run(n) performs the workload n times.
Work = Callable[[int], None]


@dataclass(frozen=True)
class Side:
    label: str
    run: Work
    units: float  # units of work per repetition (headers, or bytes)


@dataclass(frozen=True)
class Case:
    key: str  # short id used by --filter
    name: str
    unit: str  # "hdr" (count) or "B" (bytes)
    core: Side
    ceiling: Side
    goal: float | None = None  # minimum core/ceiling ratio
    goal_text: str = "—"


@dataclass(frozen=True)
class Row:
    case: Case
    core_rate: float
    ceiling_rate: float
    rounds: int

    @property
    def ratio(self) -> float:
        return self.core_rate / self.ceiling_rate

    @property
    def verdict(self) -> str:
        if self.case.goal is None:
            return "—"
        return "pass" if self.ratio >= self.case.goal else "**MISS**"


def _timed(run: Work, n: int) -> int:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        run(n)
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def _calibrate(side: Side, target_ns: int) -> int:
    """Pick a repetition count so that one round takes about *target_ns* (warms up too)."""
    n = 1
    while True:
        elapsed = max(_timed(side.run, n), 1)
        if elapsed >= target_ns // 4 or n >= 1 << 22:
            return max(1, round(n * target_ns / elapsed))
        n *= 8 if elapsed < target_ns // 64 else 2


def measure(case: Case, rounds: int, target_ns: int) -> Row:
    n_core = _calibrate(case.core, target_ns)
    n_ceiling = _calibrate(case.ceiling, target_ns)
    core: list[float] = []
    ceiling: list[float] = []
    for r in range(rounds):
        order = ((case.core, n_core, core), (case.ceiling, n_ceiling, ceiling))
        for side, n, rates in order if r % 2 == 0 else order[::-1]:
            rates.append(side.units * n * 1e9 / _timed(side.run, n))
    return Row(case, statistics.median(core), statistics.median(ceiling), rounds)


def _rate(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / MiB:,.1f} MiB/s" if value >= 10 * MiB else f"{value / MiB:.2f} MiB/s"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M/s"
    return f"{value / 1e3:,.1f} k/s"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| benchmark | core median | ceiling | ceiling median | ratio | goal | result |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        c = row.case
        lines.append(
            f"| {c.name} | {_rate(row.core_rate, c.unit)} | {c.ceiling.label} "
            f"| {_rate(row.ceiling_rate, c.unit)} | {row.ratio:.1%} | {c.goal_text} "
            f"| {row.verdict} |"
        )
    return "\n".join(lines)


def machine_line(rounds: int, quick: bool) -> str:
    impl = platform.python_implementation()
    return (
        f"{datetime.date.today().isoformat()}, {impl} {platform.python_version()}, "
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
        f"{rounds} interleaved rounds{' (--quick)' if quick else ''}"
    )


# --------------------------------------------------------------------------
# Test data (deterministic)
# --------------------------------------------------------------------------

_WORD_TEXT = (
    "the of and to a in is it you that he was for on are with as his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find mailbox quota server message delivery account configuration"
)
_WORDS = _WORD_TEXT.split()


def mail_lines(size: int, rng: random.Random, dot_share: float) -> list[bytes]:
    """Lines (without breaks) of mail-like text totalling about *size* bytes.

    Headers, then paragraphs of 40-76 character lines with blank lines and
    quoted blocks between them.  A share *dot_share* of the lines starts with
    a dot (an ellipsis, a signature separator, a leading dot-file name).
    """
    lines: list[bytes] = []
    total = 0
    msg = 0
    dot_starts = (b"...", b".", b".profile", b"..", b".sig")
    while total < size:
        msg += 1
        block = [
            b"Return-Path: <sender%d@example.org>" % msg,
            b"Received: from mx%d.example.org (mx.example.org [192.0.2.%d])" % (msg, msg % 250),
            b"\tby imap.example.com with LMTP id Yy%08d; Tue, 25 Nov 2025 14:00:00 +0000" % msg,
            b"From: Sender <sender%d@example.org>" % msg,
            b"To: frank@example.com",
            b"Subject: " + " ".join(rng.choices(_WORDS, k=6)).encode(),
            b"Message-ID: <%d.%d@example.org>" % (msg, rng.randrange(10**9)),
            b"Content-Type: text/plain; charset=utf-8",
            b"",
        ]
        for _ in range(rng.randrange(3, 12)):
            quoted = rng.random() < 0.2
            for _ in range(rng.randrange(2, 9)):
                words: list[str] = []
                width = rng.randrange(40, 77)
                while sum(len(w) + 1 for w in words) < width:
                    words.append(rng.choice(_WORDS))
                line = " ".join(words).encode()
                if rng.random() < dot_share:
                    line = rng.choice(dot_starts) + line
                block.append(b"> " + line if quoted else line)
            block.append(b"")
        block += [b"-- ", b"Sender %d, Example Org" % msg, b""]
        lines += block
        total += sum(len(line) + 1 for line in block)
    return lines


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def dot_wire(lines: Sequence[bytes], brk: bytes) -> bytes:
    """The dot-framed form of *lines*, as a conforming script writes it."""
    body = brk.join(b"." + line if line.startswith(b".") else line for line in lines)
    return body + brk + b"." + brk


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

_ARGS = ["quota-warning", "95", "frank@example.com", "INBOX", "--storage=STORAGE"]
_ENV = {
    "USER": "frank@example.com",
    "HOME": "/var/vmail/example.com/frank",
    "SESSION": "YyVfHJfQb2ZtAwAAlCfaXQ",
}
_HEADER_LINES = (
    b"VERSION\tscript\t4\t0\n",
    *(f"env_{k}={v}\n".encode() for k, v in _ENV.items()),
    b"-\n",
    *(f"{a}\n".encode() for a in _ARGS),
    b"\n",
)
_HEADER = b"".join(_HEADER_LINES)
_ALLOW = tuple(_ENV)


def _drain_client(conn: ClientConnection, chunks: Sequence[bytes]) -> tuple[int, Result]:
    """Feed a whole reply and return (output bytes, result); used to check workloads."""
    out = 0
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if isinstance(event, Output):
                out += len(event.data)
            elif isinstance(event, Result):
                return out, event
            else:
                break
    raise AssertionError("no Result")


def header_encode_cases() -> list[Case]:
    args, env = _ARGS, _ENV
    request = Request(args=args, env=env)
    assert ClientConnection().send(Request(args=args, env=env)) == _HEADER
    assert encode_request(request) == _HEADER

    def send(n: int) -> None:
        for _ in repeat(None, n):
            ClientConnection().send(Request(args=args, env=env))

    def encode(n: int) -> None:
        for _ in repeat(None, n):
            encode_request(request)

    def ceiling(n: int) -> None:
        join, lines = b"".join, _HEADER_LINES
        for _ in repeat(None, n):
            join(lines)

    c = Side('`b"".join(lines)`', ceiling, 1)
    return [
        Case(
            "enc-send",
            "1. header encode: `ClientConnection().send(Request(...))`",
            "hdr",
            Side("send", send, 1),
            c,
        ),
        Case(
            "enc-request",
            "1. header encode: `encode_request(request)`",
            "hdr",
            Side("encode_request", encode, 1),
            c,
        ),
    ]


def header_decode_cases() -> list[Case]:
    header = _HEADER
    ones = chunked(header, 1)
    conn = ServiceConnection("quota-warning.sh", env_allowlist=_ALLOW)
    for piece in ones:
        conn.receive_data(piece)
    event = conn.next_event()
    assert isinstance(event, ScriptRequest) and len(event.env) == 3 and len(event.args) == 5
    parsed = HeaderParser().feed(header)
    assert parsed is not None and parsed.header_size == len(header)

    def service(pieces: list[bytes]) -> Work:
        def run(n: int) -> None:
            for _ in repeat(None, n):
                c = ServiceConnection("quota-warning.sh", env_allowlist=_ALLOW)
                for piece in pieces:
                    c.receive_data(piece)
                c.next_event()

        return run

    def parser(pieces: list[bytes]) -> Work:
        def run(n: int) -> None:
            for _ in repeat(None, n):
                p = HeaderParser()
                for piece in pieces:
                    p.feed(piece)

        return run

    def ceiling(n: int) -> None:
        h = header
        for _ in repeat(None, n):
            end = h.find(b"\n\n")
            h[:end].split(b"\n")

    c = Side('`find(b"\\n\\n")` + `split`', ceiling, 1)
    name = "2. header decode ({}): `{}`"
    return [
        Case(
            "dec-service-1",
            name.format("one chunk", "ServiceConnection"),
            "hdr",
            Side("service", service([header]), 1),
            c,
        ),
        Case(
            "dec-parser-1",
            name.format("one chunk", "HeaderParser"),
            "hdr",
            Side("parser", parser([header]), 1),
            c,
        ),
        Case(
            "dec-service-b",
            name.format("1-byte chunks", "ServiceConnection"),
            "hdr",
            Side("service", service(ones), 1),
            c,
        ),
        Case(
            "dec-parser-b",
            name.format("1-byte chunks", "HeaderParser"),
            "hdr",
            Side("parser", parser(ones), 1),
            c,
        ),
    ]


def reply_cases(text: bytes) -> list[Case]:
    # 64 MiB of script output in 64 KiB chunks: 64 distinct chunks, cycled.
    pool = chunked((text * (4 * MiB // len(text) + 1))[: 4 * MiB], 64 * KiB)
    chunks = pool * 16
    chunks[-1] = chunks[-1][:-2] + b"+\n"
    total = sum(map(len, chunks))
    assert total == 64 * MiB
    out, result = _drain_client(_reply_client(), chunks)
    assert out == total - 2 and result.status is Status.SUCCESS

    def core(n: int) -> None:
        for _ in repeat(None, n):
            _run_client(_reply_client(), chunks)

    def ceiling(n: int) -> None:
        for _ in repeat(None, n):
            for c in chunks:
                bytes(memoryview(c))

    return [
        Case(
            "reply",
            "3. reply decode, 64 KiB chunks, 64 MiB: `ClientConnection` (unix)",
            "B",
            Side("client", core, total),
            Side("`bytes(memoryview(c))`", ceiling, total),
            goal=0.5,
            goal_text="≥ 50 %",
        ),
    ]


def _reply_client(dot: bool = False) -> ClientConnection:
    conn = ClientConnection(dot=dot)
    conn.send(Request(args=("x",)))
    conn.send(EndOfInput())
    return conn


def _run_client(conn: ClientConnection, chunks: Sequence[bytes]) -> None:
    """What an adapter's read loop does: feed each chunk, drain the events."""
    receive, next_event = conn.receive_data, conn.next_event
    for chunk in chunks:
        receive(chunk)
        while next_event() is not NEED_DATA:
            pass
    receive(b"")
    while not isinstance(next_event(), Result):
        pass


def _replace_ceiling(chunks: Sequence[bytes]) -> Side:
    def run(n: int) -> None:
        for _ in repeat(None, n):
            for c in chunks:
                c.replace(b"\n", b"\r\n")

    return Side('`replace(b"\\n", b"\\r\\n")`', run, sum(map(len, chunks)))


def dot_cases(size: int) -> list[Case]:
    rng = random.Random(20251125)
    plain = mail_lines(size, rng, dot_share=0.005)
    dotty = mail_lines(size, rng, dot_share=0.25)
    inputs = (
        ("lf", "mail, LF", plain, b"\n"),
        ("crlf", "mail, CRLF", plain, b"\r\n"),
        ("dots", "mail, 25 % dot-lines, LF", dotty, b"\n"),
    )
    cases: list[Case] = []
    for key, label, lines, brk in inputs:
        raw = brk.join(lines) + brk
        raw_chunks = chunked(raw, 64 * KiB)
        expected_wire = dot_wire(lines, b"\r\n")
        enc = DotEncoder()
        assert b"".join([*map(enc.encode, raw_chunks), enc.finish()]) == expected_wire

        wire_chunks = chunked(dot_wire(lines, brk), 64 * KiB)
        dec = DotDecoder()
        decoded = b"".join(map(dec.decode, wire_chunks))
        assert dec.ended and decoded == brk.join(lines)
        reply_chunks = chunked(dot_wire(lines, brk) + b"+\n", 64 * KiB)
        out, result = _drain_client(_reply_client(dot=True), reply_chunks)
        assert out == len(decoded) and result.status is Status.SUCCESS

        def encode(n: int, chunks: list[bytes] = raw_chunks) -> None:
            for _ in repeat(None, n):
                e = DotEncoder()
                for c in chunks:
                    e.encode(c)
                e.finish()

        def decode(n: int, chunks: list[bytes] = wire_chunks) -> None:
            for _ in repeat(None, n):
                d = DotDecoder()
                for c in chunks:
                    d.decode(c)
                d.finish()

        def tcp_reply(n: int, chunks: list[bytes] = reply_chunks) -> None:
            for _ in repeat(None, n):
                _run_client(_reply_client(dot=True), chunks)

        n_raw, n_wire = len(raw), sum(map(len, wire_chunks))
        n_reply = sum(map(len, reply_chunks))
        cases += [
            Case(
                f"dot-enc-{key}",
                f"4. dot encode ({label}): `DotEncoder`",
                "B",
                Side("encoder", encode, n_raw),
                _replace_ceiling(raw_chunks),
                goal=0.4,
                goal_text="≥ 40 %",
            ),
            Case(
                f"dot-dec-{key}",
                f"4. dot decode ({label}): `DotDecoder`",
                "B",
                Side("decoder", decode, n_wire),
                _replace_ceiling(wire_chunks),
                goal=0.4,
                goal_text="≥ 40 %",
            ),
            Case(
                f"tcp-reply-{key}",
                f"4. tcp reply path ({label}): `ClientConnection(dot=True)`",
                "B",
                Side("client", tcp_reply, n_reply),
                _replace_ceiling(reply_chunks),
                goal=0.4,
                goal_text="≥ 40 %",
            ),
        ]
    return cases


def big_header(size: int, rng: random.Random) -> bytes:
    """A valid request header of exactly *size* bytes (many 100-byte arguments)."""
    head = b"".join(_HEADER_LINES[:-1])  # VERSION, env, options, the 5 usual args
    room = size - len(head) - 1  # the final blank line
    args: list[bytes] = []
    while room > 200:
        words = " ".join(rng.choices(_WORDS, k=30)).encode()
        args.append(words[:99] + b"\n")
        room -= 100
    args.append(b"z" * (room - 1) + b"\n")
    header = head + b"".join(args) + b"\n"
    assert len(header) == size and header.find(b"\n\n") == size - 2
    return header


def big_header_cases() -> list[Case]:
    rng = random.Random(5)
    huge = big_header(MiB, rng)
    at_cap = big_header(64 * KiB, rng)  # exactly the default cap
    small = big_header(16 * KiB, rng)

    def service(pieces: list[bytes], cap: int) -> Work:
        def run(n: int) -> None:
            for _ in repeat(None, n):
                c = ServiceConnection(
                    "quota-warning.sh", env_allowlist=_ALLOW, max_header_bytes=cap
                )
                for piece in pieces:
                    c.receive_data(piece)
                c.next_event()

        return run

    for header, cap, small_piece in ((huge, 2 * MiB, 4 * KiB), (at_cap, 64 * KiB, 1)):
        for size in (small_piece, len(header)):
            conn = ServiceConnection("s", max_header_bytes=cap)
            for piece in chunked(header, size):
                conn.receive_data(piece)
            event = conn.next_event()
            assert isinstance(event, ScriptRequest) and event.header_size == len(header)

    def side(label: str, header: bytes, piece: int, cap: int) -> Side:
        return Side(label, service(chunked(header, piece), cap), len(header))

    return [
        Case(
            "big-4k",
            "5. 1 MiB header, 4 KiB chunks vs one chunk: `ServiceConnection`",
            "B",
            side("4 KiB chunks", huge, 4 * KiB, 2 * MiB),
            side("one chunk", huge, MiB, 2 * MiB),
            goal=1 / 3,
            goal_text="within 3× (≥ 33 %)",
        ),
        Case(
            "big-1b",
            "5. 64 KiB header (the default cap), 1-byte chunks vs one chunk",
            "B",
            side("1-byte chunks", at_cap, 1, 64 * KiB),
            side("one chunk", at_cap, 64 * KiB, 64 * KiB),
        ),
        Case(
            "big-linear",
            "5. 1-byte chunks, 64 KiB header vs 16 KiB header (per byte)",
            "B",
            side("64 KiB", at_cap, 1, 64 * KiB),
            side("16 KiB, 1-byte chunks", small, 1, 64 * KiB),
            goal=0.5,
            goal_text="linear (≥ 50 %)",
        ),
    ]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def build_cases(quick: bool) -> list[Case]:
    rng = random.Random(7)
    text = b"\n".join(mail_lines(256 * KiB, rng, dot_share=0.005)) + b"\n"
    return [
        *header_encode_cases(),
        *header_decode_cases(),
        *reply_cases(text),
        *dot_cases(2 * MiB if quick else 8 * MiB),
        *big_header_cases(),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="7 short rounds (under 20 s)")
    ap.add_argument("--rounds", type=int, help="rounds, at least 7 (default 11, quick 7)")
    ap.add_argument("--filter", default="", help="run only cases whose id contains this")
    ns = ap.parse_args(argv)
    rounds = (7 if ns.quick else 11) if ns.rounds is None else ns.rounds
    if rounds < 7:
        ap.error("--rounds: at least 7, the median needs them on a noisy machine")
    target_ns = (12 if ns.quick else 80) * 1_000_000
    started = time.perf_counter()
    cases = [c for c in build_cases(ns.quick) if ns.filter in c.key]
    rows = []
    for case in cases:
        print(f"  {case.key} ...", file=sys.stderr, flush=True)
        rows.append(measure(case, rounds, target_ns))
    print(machine_line(rounds, ns.quick))
    print()
    print(table(rows))
    print()
    missed = [r.case.key for r in rows if r.verdict != "pass" and r.case.goal is not None]
    print(
        f"{len(rows)} row{'' if len(rows) == 1 else 's'} in {time.perf_counter() - started:.0f} s; "
        f"goals missed: {', '.join(missed) if missed else 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
