"""The pure observer of a tap (:class:`execproto.ExchangeObserver`) on vectors.

Every chunking of the same two streams must give the same summary, and the
summary must say what the client sent and what the service answered, as
Dovecot's service and client would read them.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from execproto import (
    DotEncoder,
    EnvEntry,
    ExchangeObserver,
    ExchangeSummary,
    Request,
    Status,
    encode_request,
)

from ..core.helpers import every_chunking

SHA_EMPTY = hashlib.sha256(b"").hexdigest()


def observe(request: bytes, reply: bytes, *, request_chunks: list[bytes] | None = None,
            reply_chunks: list[bytes] | None = None, ended: Any = True,
            **kwargs: Any) -> ExchangeSummary:
    observer = ExchangeObserver(**kwargs)
    for chunk in request if request_chunks is None else request_chunks:
        observer.from_client(bytes([chunk]) if isinstance(chunk, int) else chunk)
    if ended:
        observer.from_client(b"")
    for chunk in reply if reply_chunks is None else reply_chunks:
        observer.from_service(bytes([chunk]) if isinstance(chunk, int) else chunk)
    if ended:
        observer.from_service(b"")
    return observer.summary()


def whole(request: bytes, reply: bytes, **kwargs: Any) -> ExchangeSummary:
    return observe(request, reply, request_chunks=[request] if request else [],
                   reply_chunks=[reply] if reply else [], **kwargs)


def every_way(request: bytes, reply: bytes, **kwargs: Any) -> ExchangeSummary:
    """The summary, after checking that every chunking of both streams gives it."""
    expected = whole(request, reply, **kwargs)
    for chunks in every_chunking(request, max_splits=24):
        assert observe(request, reply, request_chunks=chunks,
                       reply_chunks=[reply] if reply else [], **kwargs) == expected
    for chunks in every_chunking(reply, max_splits=24):
        assert observe(request, reply, request_chunks=[request] if request else [],
                       reply_chunks=chunks, **kwargs) == expected
    return expected


def test_quota_warning() -> None:
    """CV-04: Dovecot's quota warning, noreply, no payload, then close."""
    summary = every_way(b"VERSION\tscript\t4\t0\nnoreply\n10\nfrank\n\n", b"")
    assert summary.header is not None
    assert summary.header.args == (b"10", b"frank")
    assert summary.header.noreply
    assert summary.header.version_minor == 0
    assert summary.header_error is None
    assert summary.env == ()
    assert (summary.request_bytes, summary.payload_bytes) == (37, 0)
    assert summary.payload_sha256 == SHA_EMPTY
    assert (summary.result, summary.output_bytes, summary.status) == ("noreply", 0, None)
    assert summary.payload_dot_end is None and summary.output_dot_end is None
    assert summary.client_ended and summary.service_ended


def test_full_unix_exchange_with_allowlist() -> None:
    """PROTOCOL.md 1.3: env lines kept and dropped, escaped args, payload, '+'."""
    request = (b"VERSION\tscript\t4\t0\nenv_FOO=foo\nenv_BAR=bar\n-\nhello\nwo\x01nrld\n\n"
               b"DATA line\n")
    summary = every_way(request, b"OUT\n+\n", env_allowlist=["FOO"], keep=4)
    assert summary.header is not None
    assert summary.header.args == (b"hello", b"wo\nrld")
    assert summary.env == (EnvEntry(b"FOO", b"foo", "kept"), EnvEntry(b"BAR", b"bar", "dropped"))
    assert summary.payload_bytes == 10
    assert summary.payload_sha256 == hashlib.sha256(b"DATA line\n").hexdigest()
    assert summary.payload_head == b"DATA"
    assert summary.request_head == b"VERS"
    assert (summary.result, summary.status, summary.output_bytes) == ("+", Status.SUCCESS, 4)
    assert summary.reply_bytes == 6


def test_env_without_allowlist_and_duplicates() -> None:
    request = encode_request(Request(env=[("A", "1"), ("B", "x=y\tz"), ("A", "2")]))
    assert [e.status for e in whole(request, b"+\n").env] == [None, None, None]
    entries = whole(request, b"+\n", env_allowlist=["A"]).env
    assert entries == (EnvEntry(b"A", b"1", "overridden"),
                       EnvEntry(b"B", b"x=y\tz", "dropped", escaped=True),
                       EnvEntry(b"A", b"2", "kept"))
    # Dovecot up to 2.4.2 drops a line that needed escaping (Q6): flagged.
    assert [e.escaped for e in whole(request, b"+\n").env] == [False, True, False]


def test_alarm_and_minor_version() -> None:
    summary = whole(b"VERSION\tscript\t4\t7\nalarm=10\nnoreply\ntext/html\n\n", b"")
    assert summary.header is not None
    assert (summary.header.alarm, summary.header.version_minor) == (10, 7)


def test_result_codes() -> None:
    """PROTOCOL.md 4.2: the client's classification of the reply's end."""
    request = b"VERSION\tscript\t4\t0\n-\n\n"
    table = {
        b"hello\n+\n": ("+", 6), b"hello\n+\n-\n": ("-", 8), b"+\n": ("+", 0),
        b"": ("none", 0), b"x": ("bad", 0), b"hello": ("bad", 4),
        b"hello\nX\n": ("bad", 6), b"ab+\r\n": ("bad", 3),
    }
    for reply, (result, output) in table.items():
        summary = every_way(request, reply)
        assert (summary.result, summary.output_bytes) == (result, output), reply
        assert bool(summary.result_detail) == (result in ("bad", "none")), reply


def test_noreply_with_output() -> None:
    summary = every_way(b"VERSION\tscript\t4\t0\nnoreply\n\n", b"hello\n+\n")
    assert (summary.result, summary.output_bytes, summary.reply_bytes) == ("noreply", 8, 8)


def test_tcp_dot_framing() -> None:
    """CV-09 and CV-30: the payload and the output are dot-framed."""
    request = b"VERSION\tscript\t4\t0\n-\na\n\nline1\r\n..dot\r\nend\r\n.\r\n"
    summary = every_way(request, b"hello world\r\n.\r\n+\n", dot=True)
    assert (summary.payload_bytes, summary.payload_dot_end) == (22, True)
    assert (summary.result, summary.output_dot_end, summary.output_bytes) == ("+", True, 16)
    summary = every_way(request[:-3], b"hello world\r\n+\n", dot=True)
    assert (summary.payload_dot_end, summary.output_dot_end) == (False, False)
    assert summary.result == "+"


def test_tcp_noreply() -> None:
    request = b"VERSION\tscript\t4\t0\nnoreply\n\n\r\n.\r\n"
    silent = every_way(request, b"", dot=True)
    assert (silent.result, silent.output_dot_end, silent.payload_dot_end) == (
        "noreply", None, True)
    assert every_way(request, b"hi\r\n.\r\n", dot=True).output_dot_end is True
    assert every_way(request, b"hi\r\n.", dot=True).output_dot_end is False


def test_bad_headers() -> None:
    """A header the service would drop is reported, and still counted."""
    for request, error in [
        (b"GET / HTTP/1.0\r\n\r\n", "Client not compatible"),
        (b"VERSION\tscript\t4\t0\nalarm=5\n\n", "missing options line"),
        (b"VERSION\tscript\t4\t0\nenv_FOO\n-\n\nDATA", "invalid environment variable"),
        (b"VERSION\tscript\t4\t0\n-\na\n", "disconnected before the end of the header"),
        (b"", "disconnected before the end of the header (0 bytes"),
    ]:
        summary = every_way(request, b"", keep=8)
        assert summary.header is None
        assert summary.header_error is not None and error in summary.header_error, request
        assert summary.request_bytes == len(request)
        assert summary.request_head == request[:8]
        assert (summary.payload_bytes, summary.result) == (0, "none")


def test_header_cap() -> None:
    request = b"VERSION\tscript\t4\t0\n-\n" + b"x" * 200 + b"\n\npayload"
    summary = whole(request, b"+\n", max_header_bytes=100)
    assert summary.header_error == "header exceeds 100 bytes"
    assert summary.request_bytes == len(request)


def test_summary_before_the_end() -> None:
    """A tap that gives up early still summarises what it saw."""
    observer = ExchangeObserver()
    observer.from_client(b"VERSION\tscript\t4\t0\n-\n")
    early = observer.summary()
    assert (early.header, early.header_error, early.client_ended) == (None, None, False)
    observer.from_client(b"\npay")
    observer.from_service(b"out+")
    middle = observer.summary()
    assert middle.payload_bytes == 3 and middle.result == "bad"
    observer.from_service(b"\n")
    assert observer.summary().result == "+"
    assert not observer.summary().service_ended


def test_nothing_after_an_end() -> None:
    observer = ExchangeObserver()
    observer.from_client(b"VERSION\tscript\t4\t0\n-\n\nab")
    observer.from_client(b"")
    observer.from_client(b"")
    observer.from_client(b"more")
    observer.from_service(b"+\n")
    observer.from_service(b"")
    observer.from_service(b"more")
    summary = observer.summary()
    assert (summary.payload_bytes, summary.reply_bytes, summary.result) == (2, 2, "+")


def test_big_payload_memory_stays_small() -> None:
    """Megabytes pass; only the hash state and the kept head remain."""
    observer = ExchangeObserver(keep=16)
    observer.from_client(b"VERSION\tscript\t4\t0\n-\n\n")
    chunk = bytes(range(256)) * 1024
    digest = hashlib.sha256()
    for _ in range(64):
        observer.from_client(chunk)
        digest.update(chunk)
    summary = observer.summary()
    assert summary.payload_bytes == 64 * len(chunk)
    assert summary.payload_sha256 == digest.hexdigest()
    assert summary.payload_head == chunk[:16]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


texts = st.binary(max_size=40)
names = st.text(alphabet="ABCXYZ_", min_size=1, max_size=3)
values = st.binary(max_size=12).filter(lambda v: b"\0" not in v)


@settings(max_examples=150, deadline=None)
@given(
    args=st.lists(values, max_size=4),
    env=st.lists(st.tuples(names, values), max_size=4),
    noreply=st.booleans(),
    payload=texts,
    output=texts,
    code=st.sampled_from([b"+\n", b"-\n", b"", b"?\n", b"x"]),
    dot=st.booleans(),
    allow=st.none() | st.lists(names, max_size=3),
    request_points=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    reply_points=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_any_request_any_chunking(
    args: list[bytes], env: list[tuple[str, bytes]], noreply: bool, payload: bytes,
    output: bytes, code: bytes, dot: bool, allow: list[str] | None,
    request_points: list[int], reply_points: list[int],
) -> None:
    header = encode_request(Request(args=args, env=env, noreply=noreply))
    wire_payload = payload
    if dot:
        encoder = DotEncoder()
        wire_payload = encoder.encode(payload) + encoder.finish()
    request = header + wire_payload
    reply = output + code
    kwargs: dict[str, Any] = {"dot": dot, "env_allowlist": allow, "keep": 5}
    expected = whole(request, reply, **kwargs)
    chunked = observe(request, reply, request_chunks=cut(request, request_points),
                      reply_chunks=cut(reply, reply_points), **kwargs)
    assert chunked == expected
    assert expected.header is not None
    assert expected.header.args == tuple(a or b"" for a in args)
    assert [(e.name, e.value) for e in expected.env] == [(n.encode(), v) for n, v in env]
    assert expected.payload_bytes == len(wire_payload)
    assert expected.payload_sha256 == hashlib.sha256(wire_payload).hexdigest()
    assert expected.payload_head == wire_payload[:5]
    assert expected.payload_dot_end is (True if dot else None)
    assert expected.reply_bytes == len(reply)
    if noreply:
        assert (expected.result, expected.output_bytes) == ("noreply", len(reply))
    elif code in (b"+\n", b"-\n"):
        assert (expected.result, expected.output_bytes) == (code[:1].decode(), len(output))
    if allow is not None:
        kept = {e.name: e.value for e in expected.env if e.status == "kept"}
        assert kept == {n.encode(): v for n, v in dict(env).items() if n in allow}
