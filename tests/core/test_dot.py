"""Dot framing: DotEncoder and DotDecoder (PROTOCOL.md section 5, CV-28 and CV-29)."""

from __future__ import annotations

import itertools
import random

import pytest

from execproto import DotDecoder, DotEncoder, LocalProtocolError, RemoteProtocolError
from execproto._dot import _crlf_only

from .helpers import every_chunking, ref_dot_decode, ref_dot_encode


def encode(chunks: list[bytes], *, stuff_bare_cr_dot: bool = True) -> bytes:
    encoder = DotEncoder(stuff_bare_cr_dot=stuff_bare_cr_dot)
    return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()


def encode_every_chunking(payload: bytes, *, stuff_bare_cr_dot: bool = True) -> bytes:
    outcomes = {
        encode(chunks, stuff_bare_cr_dot=stuff_bare_cr_dot) for chunks in every_chunking(payload)
    }
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


def decode(chunks: list[bytes]) -> tuple[bytes, bool, int]:
    """Decode; return (output, ended, leftover) after EOF."""
    decoder = DotDecoder()
    out = b"".join(decoder.decode(c) for c in chunks)
    try:
        decoder.finish()
    except RemoteProtocolError:
        assert not decoder.ended
        return out, False, decoder.leftover
    assert decoder.ended
    return out, True, decoder.leftover


def decode_every_chunking(wire: bytes) -> tuple[bytes, bool, int]:
    outcomes = {decode(chunks) for chunks in every_chunking(wire)}
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


# --- encoder -----------------------------------------------------------------------

ENCODER_TABLE = [
    # PROTOCOL.md 5.2.2, measured.
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
    # More: CRLF kept, dots only doubled at the start of a line.
    (b"\r\n", b"\r\n.\r\n"),
    (b"\r\n.", b"\r\n..\r\n.\r\n"),
    (b"..", b"...\r\n.\r\n"),
    (b"a.\nb.", b"a.\r\nb.\r\n.\r\n"),
    (b"\r\r\n", b"\r\r\n.\r\n"),
    (b"\n\r\n\n", b"\r\n\r\n\r\n.\r\n"),
    (b".\r\n.\n.", b"..\r\n..\r\n..\r\n.\r\n"),
    (b"\r", b"\r\r\n.\r\n"),
]


@pytest.mark.parametrize(("payload", "wire"), ENCODER_TABLE)
def test_encoder_table(payload: bytes, wire: bytes) -> None:
    assert encode_every_chunking(payload) == wire
    assert ref_dot_encode(payload) == wire


# 5.2.3: a bare CR followed by a dot, with and without the CVE-2026-33604 fix.
CR_DOT_TABLE = [
    (b"a\r.b", b"a\r\n..b\r\n.\r\n", b"a\r.b\r\n.\r\n"),
    (b"\r.", b"\r\n..\r\n.\r\n", b"\r.\r\n.\r\n"),
    (b"\r\r.", b"\r\r\n..\r\n.\r\n", b"\r\r.\r\n.\r\n"),
    (b"\r..\n", b"\r\n...\r\n.\r\n", b"\r..\r\n.\r\n"),
    (b"\r\n.", b"\r\n..\r\n.\r\n", b"\r\n..\r\n.\r\n"),  # CRLF: not bare
    (b"x\r.\r.", b"x\r\n..\r\n..\r\n.\r\n", b"x\r.\r.\r\n.\r\n"),
]


@pytest.mark.parametrize(("payload", "fixed", "old"), CR_DOT_TABLE)
def test_encoder_bare_cr_dot(payload: bytes, fixed: bytes, old: bytes) -> None:
    assert encode_every_chunking(payload) == fixed
    assert encode_every_chunking(payload, stuff_bare_cr_dot=True) == fixed
    assert encode_every_chunking(payload, stuff_bare_cr_dot=False) == old
    assert ref_dot_encode(payload) == fixed
    assert ref_dot_encode(payload, stuff_bare_cr_dot=False) == old


def test_encoder_empty_chunks_change_nothing() -> None:
    encoder = DotEncoder()
    assert encoder.encode(b"") == b""
    assert encoder.finish() == b"\r\n.\r\n"
    encoder = DotEncoder()
    assert encoder.encode(b"a\n") == b"a\r\n"
    assert encoder.encode(b"") == b""
    assert encoder.finish() == b".\r\n"


def test_encoder_streams_without_holding_back() -> None:
    # The encoder never holds bytes back: a CR is sent at once, what it was is
    # decided with the next byte.
    encoder = DotEncoder()
    assert encoder.encode(b"a\r") == b"a\r"
    assert encoder.encode(b"\n") == b"\n"
    assert encoder.encode(b".") == b".."
    assert encoder.encode(b"\r") == b"\r"
    assert encoder.encode(b".") == b"\n.."
    assert encoder.finish() == b"\r\n.\r\n"


def test_encoder_finish_twice_and_encode_after_finish() -> None:
    encoder = DotEncoder()
    encoder.finish()
    with pytest.raises(LocalProtocolError, match="already finished"):
        encoder.finish()
    with pytest.raises(LocalProtocolError, match="already finished"):
        encoder.encode(b"x")
    with pytest.raises(LocalProtocolError, match="already finished"):
        encoder.encode(b"")


# --- decoder -------------------------------------------------------------------------

# PROTOCOL.md 5.3.3, measured: (wire, output, leftover).
DECODER_TABLE = [
    (b"hello world\r\n.\n+\n", b"hello world", 2),
    (b"a\nb\r\nc\n.\n", b"a\nb\r\nc", 0),
    (b".x\n..y\n.\n", b"x\n.y", 0),
    (b"a\n\n.\n", b"a\n", 0),
    (b"a\r\n\r\n.\r\n", b"a\r\n", 0),
    (b"a\rb\r\n.\r\n", b"a\rb", 0),
    (b"a\r.b\r\n.\r\n", b"a\r.b", 0),
    (b".\n", b"", 0),
    (b".\r\n", b"", 0),
    (b"\n.\n", b"", 0),
    (b"\r\n.\r\n", b"", 0),
    (b"x\n.\nTRAILER", b"x", 7),
    # LOOSE_EOT: the four marker forms.
    (b"x\r\n.\r\n", b"x", 0),
    (b"x\n.\n", b"x", 0),
    (b"x\r\n.\n", b"x", 0),
    (b"x\n.\r\n", b"x", 0),
    # More.
    (b".\n.\n", b"", 2),
    (b"..\n.\n", b".", 0),
    (b"...\n.\n", b"..", 0),
    (b"a\n.\r\r\n.\n", b"a\n\r", 0),  # ".\r" + CR: dot dropped, CR is data
    (b"\r\r\n.\n", b"\r", 0),
    (b"\n\n.\n", b"\n", 0),
    (b"a\r\n.\r\nb\r\n.\r\n", b"a", 6),
    (b"\x00\xff\r\n.\r\n", b"\x00\xff", 0),
    (b"hello\r\n.\r\njunk+\n", b"hello", 6),
]


@pytest.mark.parametrize(("wire", "output", "leftover"), DECODER_TABLE)
def test_decoder_table(wire: bytes, output: bytes, leftover: int) -> None:
    assert decode_every_chunking(wire) == (output, True, leftover)
    assert tuple(ref_dot_decode(wire)) == (output, True, leftover)


@pytest.mark.parametrize(
    ("wire", "released"),
    [
        (b"abc", b"abc"),
        (b"abc\r\n", b"abc"),
        (b"abc\r\n.", b"abc"),
        (b"abc\r\n.\r", b"abc"),
        (b"", b""),
        (b".", b""),
        (b"\r", b""),
        (b"\n", b""),
        (b"a\r", b"a"),
        (b"a\n..", b"a\n."),
        (b"hello world\r\n+\n", b"hello world\r\n+"),
        (b"a\n.x", b"a\nx"),
    ],
)
def test_decoder_truncated(wire: bytes, released: bytes) -> None:
    # EOF before the end marker is an error; what was released stays
    # released, and the held-back line break (or CR) is never emitted.
    assert decode_every_chunking(wire) == (released, False, 0)
    assert tuple(ref_dot_decode(wire)) == (released, False, 0)
    decoder = DotDecoder()
    decoder.decode(wire)
    with pytest.raises(RemoteProtocolError, match=r"^dot-input stream ends without '\.' line$"):
        decoder.finish()


# PROTOCOL.md 5.3.2: Dovecot's defect and the recommended handling (quirk Q14).
@pytest.mark.parametrize(
    ("wire", "dovecot", "recommended"),
    [
        (b"\r\n.\rfoo\n.\n", b"\r\n\roo", b"\r\n\rfoo"),
        (b"a\n.\rxy\n.\n", b"a\ny", b"a\n\rxy"),
        (b".\rxy\n.\n", b"y", b"\rxy"),
    ],
)
def test_decoder_defect_table(wire: bytes, dovecot: bytes, recommended: bytes) -> None:
    assert decode_every_chunking(wire) == (recommended, True, 0)
    assert ref_dot_decode(wire, dovecot_defect=True).output == dovecot


def test_decoder_leftovers_after_end() -> None:
    decoder = DotDecoder()
    assert decoder.decode(b"x\n.") == b"x"
    assert not decoder.ended
    assert decoder.leftover == 0
    assert decoder.decode(b"\nabc") == b""
    assert decoder.ended
    assert decoder.leftover == 3
    assert decoder.decode(b"more") == b""
    assert decoder.decode(b"") == b""
    assert decoder.leftover == 7
    decoder.finish()


def test_decoder_finish_twice() -> None:
    decoder = DotDecoder()
    decoder.decode(b".\n")
    decoder.finish()
    decoder.finish()
    truncated = DotDecoder()
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            truncated.finish()


def test_decoder_streams_as_it_can() -> None:
    # Only the line break before a possible end marker is held back.
    decoder = DotDecoder()
    assert decoder.decode(b"abc\r") == b"abc"
    assert decoder.decode(b"\n") == b""
    assert decoder.decode(b"d") == b"\r\nd"
    assert decoder.decode(b"\n.") == b""
    assert decoder.decode(b"e") == b"\ne"
    assert decoder.decode(b"\n.\r") == b""
    assert decoder.decode(b"\n") == b""
    assert decoder.ended


def test_decoder_empty_chunk_keeps_state() -> None:
    decoder = DotDecoder()
    for chunk in [b"a\n", b"", b".", b"", b"\r", b"", b"\n"]:
        decoder.decode(chunk)
    assert decoder.ended


def test_decoder_accepts_bytearray() -> None:
    # The codecs take bytes (ClientConnection converts whatever it receives);
    # a bytearray works too.
    decoder = DotDecoder()
    assert decoder.decode(bytearray(b"a\n.b\nc")) == b"a\nb\nc"
    assert decoder.decode(bytearray(b"\n.\n")) == b""
    assert decoder.ended


# --- round trip ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "decoded"),
    [
        (b"", b""),
        (b"x", b"x"),
        (b"x\n", b"x"),
        (b"x\r\n", b"x"),
        (b"a\nb", b"a\r\nb"),
        (b".\n..\n", b".\r\n.."),
        (b"a\r.b", b"a\r\n.b"),
        (b"a\r", b"a\r"),
        (b"\n\n", b"\r\n"),
    ],
)
def test_round_trip_examples(payload: bytes, decoded: bytes) -> None:
    # 5.4: bare LF arrives as CRLF, the final line break is lost, and with
    # the CVE fix a bare CR before a dot gains an LF.
    assert decode_every_chunking(encode([payload] if payload else [])) == (decoded, True, 0)


# --- whole-chunk paths ----------------------------------------------------------------


def test_crlf_only_is_the_three_counts() -> None:
    # The encoder's test for "CRLF text" (one scan) against its definition
    # (a CRLF, every CR but a final one starts a CRLF, every LF ends one),
    # for every short string that holds a CR, as the encoder calls it.
    symbols = [b"a", b"\r", b"\n", b".", b"\x00", b"\x85"]
    checked = 0
    for length in range(1, 7):
        for combo in itertools.product(symbols, repeat=length):
            data = b"".join(combo)
            if b"\r" not in data:
                continue
            body = data[:-1] if data.endswith(b"\r") else data
            counts = 0 < body.count(b"\n") == body.count(b"\r") == body.count(b"\r\n")
            assert _crlf_only(data) == counts, data
            checked += 1
    assert checked > 10_000


def _mail(lines: int, seed: int, breaks: tuple[bytes, ...]) -> bytes:
    rng = random.Random(seed)
    starts = [b"", b"", b"", b".", b"..", b".\r", b"\r", b"\t", b"x.y"]
    words = [b"word", b"a.b", b"\r", b"\n", b"..", b"-", b"\t"]
    out = []
    for _ in range(lines):
        out.append(rng.choice(starts) + b" ".join(rng.choices(words, k=rng.randrange(8))))
        out.append(rng.choice(breaks))
    return b"".join(out)


@pytest.mark.parametrize("breaks", [(b"\n",), (b"\r\n",), (b"\n", b"\r\n", b"\r")])
@pytest.mark.parametrize("size", [1, 7, 64, 1000, 1 << 16])
def test_large_chunks_match_the_reference(breaks: tuple[bytes, ...], size: int) -> None:
    # The whole-chunk paths (one regex pass over a chunk) see many lines at
    # once only with large chunks; the property tests use short data.
    payload = _mail(1500, size, breaks)
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    for fix in (True, False):
        assert encode(chunks, stuff_bare_cr_dot=fix) == ref_dot_encode(
            payload, stuff_bare_cr_dot=fix)
    wire = ref_dot_encode(payload)
    ref = ref_dot_decode(wire)
    decoder = DotDecoder()
    released = b""
    for i in range(0, len(wire), size):
        released += decoder.decode(wire[i : i + size])
        if size >= 1000:  # nothing is held back longer than the reference does
            assert released == ref_dot_decode(wire[: i + size]).output
    assert (released, decoder.ended, decoder.leftover) == (ref.output, True, 0)
