"""Property tests: round trips, chunking independence, reference equality, error discipline."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from execproto import (
    ClientConnection,
    ConfigError,
    DotDecoder,
    DotEncoder,
    ErrorKind,
    HeaderParser,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Result,
    ScriptRequest,
    ServiceConnection,
    Status,
    encode_request,
    execute_settings,
    expand_args,
    expand_value,
    find_execute,
    find_service,
    parse_config,
    parse_hostport,
    parse_script_command,
    parse_target,
    tab_escape,
    tab_unescape,
)

from .helpers import (
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

# Modest by default (the machine is shared); EXECPROTO_HYPOTHESIS_SCALE=20 for a long hunt.
_SCALE = float(os.environ.get("EXECPROTO_HYPOTHESIS_SCALE", "1"))
FAST = settings(
    max_examples=max(1, int(100 * _SCALE)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(
    max_examples=max(1, int(40 * _SCALE)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies ----------------------------------------------------------------------------

#: Bytes that matter to some layer, so short random strings hit the edge cases.
SPECIAL = [b"\r", b"\n", b".", b"\r\n", b"\n.", b"\r.", b"+", b"-", b"\x01", b"\x00", b"=",
           b"\t", b"a", b"VERSION\tscript\t4\t0\n", b"noreply", b"alarm=", b"env_", b"\xff"]
interesting = st.lists(st.sampled_from(SPECIAL), max_size=30).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=200), interesting)
no_nul = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
no_nul_all_bytes = st.one_of(
    no_nul, st.lists(st.integers(1, 255), max_size=40).map(bytes)
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """*data* cut at drawn offsets (no empty chunks)."""
    points = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return split_at(data, points)


@st.composite
def data_and_chunks(draw: st.DrawFn, strategy: st.SearchStrategy[bytes] = any_bytes) -> tuple[
    bytes, list[bytes]
]:
    data = draw(strategy)
    return data, draw(chunked(data))


env_name = no_nul_all_bytes.map(lambda b: b.replace(b"=", b"")).filter(bool)
requests = st.builds(
    lambda args, env, noreply: Request(args=args, env=env, noreply=noreply),
    st.lists(no_nul_all_bytes, max_size=6),
    st.lists(st.tuples(env_name, no_nul_all_bytes), max_size=5),
    st.booleans(),
)


def expected_env(request: Request) -> tuple[tuple[bytes, bytes], ...]:
    """Allowlisting every name: last duplicate wins, first-seen order."""
    env: dict[bytes, bytes] = {}
    for name, value in request.env:
        env[name] = value
    return tuple(env.items())


# --- header: encode -> decode ------------------------------------------------------------------


@FAST
@given(requests, st.binary(max_size=50), st.sampled_from([False, True]))
def test_request_round_trip(request: Request, payload: bytes, dot: bool) -> None:
    client = ClientConnection(dot=dot)
    wire = client.send(request)
    assert wire == encode_request(request)
    names = [name for name, _ in request.env]
    service = ServiceConnection("/s", ["fixed"], env_allowlist=names)
    got, rest = feed_service(service, [wire + payload])
    assert got is not None
    assert got.args == request.args
    assert got.argv == (b"/s", b"fixed", *request.args)
    assert got.env == expected_env(request)
    assert got.noreply == request.noreply
    assert got.alarm is None and got.version_minor == 0
    assert got.header_size == len(wire)
    assert rest == payload
    # Before the allowlist, the parser sees the env exactly as sent.
    parsed = HeaderParser().feed(wire)
    assert parsed is not None and parsed.env == request.env


@FAST
@given(
    st.lists(st.binary(max_size=10), max_size=4),
    st.lists(st.tuples(st.binary(max_size=6), st.binary(max_size=6)), max_size=3),
    st.sampled_from(["soh", "reject"]),
)
def test_request_encodes_or_raises_local_error(
    args: list[bytes], env: list[tuple[bytes, bytes]], empty_args: str
) -> None:
    request = Request(args=args, env=env)
    invalid = (
        any(b"\0" in a for a in args)
        or any(not n or b"=" in n or b"\0" in n or b"\0" in v for n, v in env)
        or (empty_args == "reject" and any(not a for a in args))
    )
    client = ClientConnection(empty_args=empty_args)
    if invalid:
        with pytest.raises(LocalProtocolError):
            client.send(request)
        return
    wire = client.send(request)
    got, _ = feed_service(ServiceConnection("/s"), [wire])
    assert got is not None and got.args == request.args


@FAST
@given(st.lists(no_nul_all_bytes, max_size=3), st.binary(min_size=1, max_size=5), st.data())
def test_nul_anywhere_raises(args: list[bytes], nul_arg: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(nul_arg)))
    bad = nul_arg[:cut] + b"\0" + nul_arg[cut:]
    where = data.draw(st.sampled_from(["arg", "name", "value"]))
    if where == "arg":
        request = Request(args=[*args, bad])
    elif where == "name":
        request = Request(env=[(bad.replace(b"=", b"") or b"\0", b"v")])
    else:
        request = Request(env=[(b"N", bad)])
    with pytest.raises(LocalProtocolError, match="NUL"):
        encode_request(request)


@FAST
@given(requests, st.binary(max_size=30), st.data())
def test_request_chunking_independence(
    request: Request, payload: bytes, data: st.DataObject
) -> None:
    wire = encode_request(request) + payload
    whole = feed_service(ServiceConnection("/s", env_allowlist=[b"A"]), [wire])
    chunks = data.draw(chunked(wire))
    assert feed_service(ServiceConnection("/s", env_allowlist=[b"A"]), chunks) == whole
    byte_by_byte = [wire[i : i + 1] for i in range(len(wire))]
    assert feed_service(ServiceConnection("/s", env_allowlist=[b"A"]), byte_by_byte) == whole


@SLOW
@given(st.lists(no_nul_all_bytes, max_size=3), st.binary(max_size=8))
def test_request_every_chunking(args: list[bytes], payload: bytes) -> None:
    wire = encode_request(Request(args=args)) + payload
    outcomes = {feed_service(ServiceConnection("/s"), c) for c in every_chunking(wire)}
    assert len(outcomes) == 1


# --- reply: chunking independence and no leaking result code ---------------------------------


@FAST
@given(data_and_chunks())
def test_reply_chunking_independence(case: tuple[bytes, list[bytes]]) -> None:
    reply, chunks = case

    def run(pieces: list[bytes]) -> tuple[bytes, Result]:
        conn = ClientConnection()
        send_request(conn, Request())
        return client_output(get_client_events(conn, pieces))

    whole = run([reply] if reply else [])
    assert run(chunks) == whole
    output, result = whole
    ref_output, ref_status = ref_classify_reply(reply)
    assert output == ref_output
    if ref_status is None:
        assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    else:
        assert result == Result(ref_status)


@FAST
@given(any_bytes, st.sampled_from([b"+", b"-"]), st.data())
def test_result_code_never_leaks_into_output(
    output: bytes, code: bytes, data: st.DataObject
) -> None:
    reply = output + code + b"\n"
    conn = ClientConnection()
    send_request(conn, Request())
    got, result = client_output(get_client_events(conn, data.draw(chunked(reply))))
    assert got == output
    assert result == Result(Status.SUCCESS if code == b"+" else Status.FAILURE)


@FAST
@given(any_bytes, st.sampled_from([b"+", b"-"]), st.binary(max_size=10), st.data())
def test_tcp_reply_result_code_never_leaks(
    output: bytes, code: bytes, junk: bytes, data: st.DataObject
) -> None:
    # Whatever the script writes after its dot line is discarded.
    framed = ref_dot_encode(output)
    reply = framed + junk + code + b"\n"
    conn = ClientConnection(dot=True)
    send_request(conn, Request())
    got, result = client_output(get_client_events(conn, data.draw(chunked(reply))))
    assert got == ref_dot_decode(framed).output
    assert result == Result(Status.SUCCESS if code == b"+" else Status.FAILURE)


@FAST
@given(data_and_chunks(), st.booleans())
def test_tcp_reply_is_filter_then_decoder(case: tuple[bytes, list[bytes]], noreply: bool) -> None:
    # PROTOCOL.md 5.1: the result code filter runs over the raw reply, then
    # the dot decoder over what it released (noreply: the decoder alone).
    reply, chunks = case
    conn = ClientConnection(dot=True)
    send_request(conn, Request(noreply=noreply))
    output, result = client_output(get_client_events(conn, chunks))
    released, status = (reply, Status.SUCCESS) if noreply else ref_classify_reply(reply)
    decoded = ref_dot_decode(released)
    assert output == decoded.output
    if noreply and not reply:  # a script that printed nothing: no dot stream at all
        assert result == Result(Status.SUCCESS)
    elif decoded.ended and status is not None:
        assert result == Result(status)
    else:
        assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
        assert ("dot-input stream ends without '.' line" in result.detail) == (not decoded.ended)


@FAST
@given(data_and_chunks())
def test_noreply_output_is_everything(case: tuple[bytes, list[bytes]]) -> None:
    reply, chunks = case
    conn = ClientConnection()
    send_request(conn, Request(noreply=True))
    assert client_output(get_client_events(conn, chunks)) == (reply, Result(Status.SUCCESS))


# --- dot framing against the reference ---------------------------------------------------------


@FAST
@given(data_and_chunks(), st.booleans())
def test_dot_encoder_matches_reference(case: tuple[bytes, list[bytes]], fix: bool) -> None:
    payload, chunks = case
    encoder = DotEncoder(stuff_bare_cr_dot=fix)
    wire = b"".join(encoder.encode(c) for c in chunks) + encoder.finish()
    assert wire == ref_dot_encode(payload, stuff_bare_cr_dot=fix)


@FAST
@given(data_and_chunks())
def test_dot_decoder_matches_reference(case: tuple[bytes, list[bytes]]) -> None:
    wire, chunks = case
    ref = ref_dot_decode(wire)
    decoder = DotDecoder()
    out = b""
    for chunk in chunks:
        out += decoder.decode(chunk)
    assert out == ref.output
    assert decoder.ended == ref.ended
    assert decoder.leftover == ref.leftover
    if ref.ended:
        decoder.finish()
    else:
        with pytest.raises(RemoteProtocolError):
            decoder.finish()


@FAST
@given(data_and_chunks())
def test_dot_decoder_streams_like_reference(case: tuple[bytes, list[bytes]]) -> None:
    # After each chunk the decoder has released exactly what the reference
    # releases for that prefix: nothing is held back longer than needed.
    _, chunks = case
    decoder = DotDecoder()
    out = b""
    seen = b""
    for chunk in chunks:
        seen += chunk
        out += decoder.decode(chunk)
        assert out == ref_dot_decode(seen).output


def normalise(payload: bytes, fix: bool) -> bytes:
    """What dot framing does to a payload's line breaks (PROTOCOL.md 5.4).

    Every bare LF becomes CRLF; with the CVE-2026-33604 fix every bare CR
    followed by a dot becomes CRLF too.  CRLF and other bare CRs stay.
    """
    lf_space = payload.replace(b"\r\n", b"\n")
    if fix:
        lf_space = lf_space.replace(b"\r.", b"\n.")
    return lf_space.replace(b"\n", b"\r\n")


@FAST
@given(data_and_chunks(), st.booleans())
def test_dot_round_trip(case: tuple[bytes, list[bytes]], fix: bool) -> None:
    # decode(encode(x)) == normalise(x) with one final CRLF removed, if any.
    payload, chunks = case
    encoder = DotEncoder(stuff_bare_cr_dot=fix)
    wire = b"".join(encoder.encode(c) for c in chunks) + encoder.finish()
    decoder = DotDecoder()
    decoded = decoder.decode(wire)
    decoder.finish()
    assert decoder.leftover == 0
    expected = normalise(payload, fix)
    if expected.endswith(b"\r\n"):
        expected = expected[:-2]
    assert decoded == expected


@FAST
@given(any_bytes)
def test_tab_escape_round_trip(value: bytes) -> None:
    escaped = tab_escape(value)
    assert not set(escaped) & set(b"\0\t\n\r")
    assert tab_unescape(escaped) == value


# --- error discipline: arbitrary input, only ProtocolError ---------------------------------------


def only_protocol_errors(func: Callable[[], object], *allowed: type[ProtocolError]) -> None:
    """Run *func*; the listed errors are fine, any other exception fails the test."""
    with contextlib.suppress(*allowed):
        func()


@FAST
@given(data_and_chunks(), st.integers(21, 300))
def test_header_parser_only_remote_errors(case: tuple[bytes, list[bytes]], limit: int) -> None:
    data, chunks = case
    parser = HeaderParser(max_header_bytes=limit)

    def run() -> None:
        for chunk in chunks:
            header = parser.feed(chunk)
            if header is not None:
                assert header.header_size == data.index(b"\n\n") + 2 <= limit
                return
        parser.feed(b"")
        raise AssertionError("EOF accepted")

    only_protocol_errors(run, RemoteProtocolError)


def _header_outcome(chunks: list[bytes], limit: int) -> object:
    """What a HeaderParser makes of *chunks* then EOF: header and payload, or the error."""
    parser = HeaderParser(max_header_bytes=limit)
    try:
        for i, chunk in enumerate(chunks):
            header = parser.feed(chunk)
            if header is not None:
                return header, parser.trailing_data + b"".join(chunks[i + 1 :])
        parser.feed(b"")
    except RemoteProtocolError as exc:
        return exc.message
    raise AssertionError("EOF accepted")


# Valid first lines make most drawn headers reach the options and the args.
_header_prefixes = st.sampled_from(
    [b"", b"VERSION\tscript\t4\t0\n", b"VERSION\tscript\t4\t7\nalarm=3\nenv_A=\x01t\n"])


@FAST
@given(_header_prefixes, any_bytes, st.data(), st.integers(21, 300))
def test_header_parser_one_chunk_same_as_any_chunking(
    prefix: bytes, rest: bytes, data: st.DataObject, limit: int
) -> None:
    # One chunk takes the parser's no-buffer path; any other cut, the buffer.
    wire = prefix + rest
    whole = _header_outcome([wire] if wire else [], limit)
    assert _header_outcome(data.draw(chunked(wire)), limit) == whole
    assert _header_outcome([wire[i : i + 1] for i in range(len(wire))], limit) == whole


@FAST
@given(data_and_chunks(), st.booleans())
def test_service_only_remote_errors(case: tuple[bytes, list[bytes]], passthrough: bool) -> None:
    data, chunks = case
    conn = ServiceConnection("s", ["x"], env_allowlist=["A", "env"], passthrough=passthrough)

    def run() -> None:
        request, payload = feed_service(conn, chunks)
        assert isinstance(request, ScriptRequest)
        assert data[request.header_size :] == payload

    only_protocol_errors(run, RemoteProtocolError)


CLIENT_MODES = [
    partial(ClientConnection),
    partial(ClientConnection, dot=True),
    partial(ClientConnection, result_code=False),
    partial(ClientConnection, dot=True, result_code=False),
    partial(ClientConnection, lenient_reset=False),
    partial(ClientConnection, read_output=False),
    partial(ClientConnection, dot=True, read_output=False),
    partial(ClientConnection, dot=True, stuff_bare_cr_dot=False, empty_args="reject"),
]


@FAST
@given(
    data_and_chunks(),
    st.sampled_from(CLIENT_MODES),
    st.booleans(),
    st.sampled_from(["eof", "reset"]),
)
def test_client_never_raises_on_any_reply(
    case: tuple[bytes, list[bytes]],
    mode: Callable[[], ClientConnection],
    noreply: bool,
    end: str,
) -> None:
    _, chunks = case
    conn = mode()
    send_request(conn, Request(noreply=noreply), [b"payload\n"])
    if not conn.reads_reply:
        assert get_client_events(conn, []) == [Result(Status.SUCCESS)]
        return
    events = get_client_events(conn, chunks, eof=False)
    if end == "eof":
        conn.receive_data(b"")
    else:
        conn.receive_reset()
    _, result = client_output(events + get_client_events(conn, []))
    assert (result.kind is ErrorKind.NONE) == (result.status is not Status.INTERNAL_FAILURE)


@FAST
@given(any_bytes)
def test_tab_unescape_never_fails(value: bytes) -> None:
    assert isinstance(tab_unescape(value), bytes)


config_text = st.one_of(
    st.text(max_size=120),
    st.lists(
        st.sampled_from(
            ["execute", "x", "{", "}", "=", " ", "\n", "\\", "#", '"', "'", "!include ",
             "driver", "tcp", "fork", "tcp_port", "1", ":", "execute_", "service", "script",
             "-e", "-p", "executable", "unix_listener", "inet_listener", "port", "mode", "\t"]
        ),
        max_size=40,
    ).map("".join),
)


@SLOW
@given(config_text, st.text(max_size=40), st.text(max_size=8))
def test_config_only_config_errors(text: str, included: str, name: str) -> None:
    def run() -> None:
        root = parse_config(text, include=lambda path: included)
        for section in root.walk():
            if section.kind == "execute":
                settings_ = execute_settings(section)
                settings_.target()
                settings_.expand_args({"user": "u@d"})
        find_execute(root)

    only_protocol_errors(run, ConfigError)
    only_protocol_errors(lambda: find_execute(parse_config(text), name), ConfigError)
    only_protocol_errors(lambda: find_service(parse_config(text), name), ConfigError)


@FAST
@given(st.lists(st.sampled_from(["-e", "-p", "--", "-", "-eA,B", "-x", "s", "a b", ""]),
                max_size=6))
def test_script_command_only_config_errors(words: list[str]) -> None:
    only_protocol_errors(lambda: parse_script_command(words), ConfigError)


target_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["tcp:", "unix:", "exec:", "fork:", "[", "]", ":", "::1", "0",
                              "65535", "65536", "h", "1", "\u0661"]), max_size=8).map("".join),
)


@FAST
@given(target_text, st.text(max_size=5))
def test_targets_only_config_errors(uri: str, base_dir: str) -> None:
    only_protocol_errors(lambda: parse_target(uri), ConfigError)
    only_protocol_errors(lambda: parse_target(uri, base_dir=base_dir), ConfigError)
    only_protocol_errors(lambda: parse_hostport(uri), ConfigError)


template_text = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(["%", "{", "}", "%{", "%%{", "user", "x", "|", " ", "default", "(", ")",
                         "'", '"', "\\", "x4", "1", "07", "lower", "domain", "username", "@"]),
        max_size=20,
    ).map("".join),
)


@FAST
@given(template_text, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
       st.booleans())
def test_expansion_only_config_errors(
    template: str, variables: dict[str, str], split_first: bool
) -> None:
    variables = {**variables, "user": "a b@c"}
    only_protocol_errors(lambda: expand_value(template, variables), ConfigError)
    only_protocol_errors(
        lambda: expand_args(template, variables, split_first=split_first), ConfigError
    )


@FAST
@given(st.text(max_size=30))
def test_text_without_percent_expands_to_itself(text: str) -> None:
    assume("%" not in text)
    assert expand_value(text, {}) == text
