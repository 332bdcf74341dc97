"""The helpers are code too: check them before trusting them."""

from __future__ import annotations

import pytest

from execproto import (
    ClientConnection,
    ErrorKind,
    Output,
    RemoteProtocolError,
    Request,
    Result,
    ServiceConnection,
    Status,
)

from .helpers import (
    RefDotDecoded,
    client_output,
    every_chunking,
    feed_service,
    get_client_events,
    ref_classify_reply,
    ref_dot_decode,
    ref_dot_encode,
    send_request,
    split_at,
)


def test_split_at() -> None:
    assert split_at(b"abcdef", [2, 4]) == [b"ab", b"cd", b"ef"]
    assert split_at(b"abcdef", [4, 2, 2, 0, 6, 99]) == [b"ab", b"cd", b"ef"]
    assert split_at(b"abc", []) == [b"abc"]
    assert split_at(b"", [1]) == []


def test_every_chunking_short() -> None:
    chunkings = list(every_chunking(b"abc"))
    assert chunkings == [
        [b"abc"],
        [b"a", b"b", b"c"],
        [b"a", b"bc"],
        [b"ab", b"c"],
    ]


def test_every_chunking_degenerate() -> None:
    assert list(every_chunking(b"")) == [[]]
    assert list(every_chunking(b"x")) == [[b"x"]]
    assert list(every_chunking(b"xy")) == [[b"xy"], [b"x", b"y"]]


@pytest.mark.parametrize("size", [0, 1, 2, 5, 49, 50, 51, 300, 10_000])
def test_every_chunking_invariants(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    chunkings = list(every_chunking(data, max_splits=48))
    assert all(b"".join(c) == data for c in chunkings)
    assert all(all(c) for c in chunkings), "empty chunk"
    assert len({tuple(c) for c in chunkings}) == len(chunkings), "duplicate"
    two_way = [c for c in chunkings if len(c) == 2]
    if size >= 3:
        assert [data] in chunkings
        assert [data[i : i + 1] for i in range(size)] in chunkings
    if size <= 49:
        assert len(two_way) == max(size - 1, 0)
    else:
        assert len(two_way) <= 48
        firsts = {len(c[0]) for c in two_way}
        assert {1, 2, size - 1, size - 2} <= firsts


def test_get_client_events_and_output() -> None:
    conn = ClientConnection()
    send_request(conn, Request(args=["x"]))
    events = get_client_events(conn, [b"hel", b"lo\n+", b"\n"])
    assert all(isinstance(e, Output) for e in events[:-1])
    assert client_output(events) == (b"hello\n", Result(Status.SUCCESS))


def test_get_client_events_result_before_data() -> None:
    conn = ClientConnection(read_output=False)
    send_request(conn, Request(noreply=True))
    assert get_client_events(conn, []) == [Result(Status.SUCCESS)]


def test_get_client_events_without_eof() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    assert get_client_events(conn, [b"abc", b"def"], eof=False) == [
        Output(b"a"),
        Output(b"bcd"),
    ]


def test_client_output_rejects_bad_sequences() -> None:
    with pytest.raises(AssertionError):
        client_output([])
    with pytest.raises(AssertionError):
        client_output([Output(b"x")])
    with pytest.raises(AssertionError):
        client_output([Result(Status.SUCCESS), Result(Status.SUCCESS)])
    with pytest.raises(AssertionError):
        client_output([Output(b""), Result(Status.SUCCESS)])


def test_send_request() -> None:
    conn = ClientConnection(dot=True)
    wire = send_request(conn, Request(args=["a"]), [b"x\n", b".y"])
    assert wire == b"VERSION\tscript\t4\t0\n-\na\n\nx\r\n..y\r\n.\r\n"


def test_feed_service() -> None:
    request, payload = feed_service(
        ServiceConnection("/s"), [b"VERSION\tscript\t4\t0\n-\na", b"\n\nPAY", b"LOAD"]
    )
    assert request is not None
    assert request.args == (b"a",)
    assert payload == b"PAYLOAD"


def test_feed_service_passthrough() -> None:
    request, payload = feed_service(ServiceConnection("/s", passthrough=True), [b"ab", b"c"])
    assert request is not None and request.passthrough
    assert payload == b"abc"


def test_feed_service_eof() -> None:
    with pytest.raises(RemoteProtocolError):
        feed_service(ServiceConnection("/s"), [b"VERSION\tscript\t4\t0\n-\n"])
    assert feed_service(ServiceConnection("/s"), [b"VERSION\t"], eof=False) == (None, b"")


# The reference codecs against the spec's own tables (the same rows are
# checked against the core in test_dot.py).


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        (b"", b"\r\n.\r\n"),
        (b"abc", b"abc\r\n.\r\n"),
        (b"abc\n", b"abc\r\n.\r\n"),
        (b"abc\r\n", b"abc\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),
        (b"a\rb", b"a\rb\r\n.\r\n"),
        (b"a\r", b"a\r\r\n.\r\n"),
        (b"a\n\n.\n", b"a\r\n\r\n..\r\n.\r\n"),
        (b"line1\n.dot\nend", b"line1\r\n..dot\r\nend\r\n.\r\n"),
        (b"a\r.b", b"a\r\n..b\r\n.\r\n"),
        (b"\r.", b"\r\n..\r\n.\r\n"),
    ],
)
def test_ref_dot_encode(payload: bytes, wire: bytes) -> None:
    assert ref_dot_encode(payload) == wire


def test_ref_dot_encode_old_cr_dot() -> None:
    assert ref_dot_encode(b"a\r.b", stuff_bare_cr_dot=False) == b"a\r.b\r\n.\r\n"


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"hello world\r\n.\n+\n", RefDotDecoded(b"hello world", True, 2)),
        (b"a\nb\r\nc\n.\n", RefDotDecoded(b"a\nb\r\nc", True, 0)),
        (b".x\n..y\n.\n", RefDotDecoded(b"x\n.y", True, 0)),
        (b"a\n\n.\n", RefDotDecoded(b"a\n", True, 0)),
        (b"a\r\n\r\n.\r\n", RefDotDecoded(b"a\r\n", True, 0)),
        (b"a\rb\r\n.\r\n", RefDotDecoded(b"a\rb", True, 0)),
        (b"a\r.b\r\n.\r\n", RefDotDecoded(b"a\r.b", True, 0)),
        (b".\n", RefDotDecoded(b"", True, 0)),
        (b"\r\n.\r\n", RefDotDecoded(b"", True, 0)),
        (b"x\n.\nTRAILER", RefDotDecoded(b"x", True, 7)),
        (b"abc\r\n.", RefDotDecoded(b"abc", False, 0)),
        (b"", RefDotDecoded(b"", False, 0)),
    ],
)
def test_ref_dot_decode(wire: bytes, expected: RefDotDecoded) -> None:
    assert ref_dot_decode(wire) == expected


@pytest.mark.parametrize(
    ("wire", "dovecot", "recommended"),
    [
        (b"\r\n.\rfoo\n.\n", b"\r\n\roo", b"\r\n\rfoo"),
        (b"a\n.\rxy\n.\n", b"a\ny", b"a\n\rxy"),
        (b".\rxy\n.\n", b"y", b"\rxy"),
    ],
)
def test_ref_dot_decode_defect(wire: bytes, dovecot: bytes, recommended: bytes) -> None:
    assert ref_dot_decode(wire, dovecot_defect=True).output == dovecot
    assert ref_dot_decode(wire).output == recommended


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"", (b"", None)),
        (b"hello\n+\n", (b"hello\n", Status.SUCCESS)),
        (b"-\n", (b"", Status.FAILURE)),
        (b"hello", (b"hell", None)),
        (b"\n", (b"", None)),
        (b"hello\nX\n", (b"hello\n", None)),
    ],
)
def test_ref_classify_reply(reply: bytes, expected: tuple[bytes, Status | None]) -> None:
    assert ref_classify_reply(reply) == expected


def test_result_kind_vocabulary() -> None:
    # The helpers compare Result objects by value; make sure that is sound.
    assert Result(Status.INTERNAL_FAILURE, ErrorKind.IO, "x") == Result(
        Status.INTERNAL_FAILURE, ErrorKind.IO, "x"
    )
    assert Result(Status.SUCCESS) != Result(Status.FAILURE)
