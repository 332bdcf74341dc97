"""ClientConnection: the client side of a run (PROTOCOL.md 4.2, 4.3, 5, 6)."""

from __future__ import annotations

from typing import TypedDict

import pytest
from typing_extensions import Unpack

from execproto import (
    NEED_DATA,
    ClientConnection,
    ClientState,
    Data,
    EndOfInput,
    ErrorKind,
    LocalProtocolError,
    Output,
    Request,
    Result,
    Status,
)

from .helpers import client_output, every_chunking, get_client_events, send_request

V = b"VERSION\tscript\t4\t0\n"
OK = Result(Status.SUCCESS)
FAILED = Result(Status.FAILURE)
RESET = Result(Status.INTERNAL_FAILURE, ErrorKind.IO, "connection reset by peer")


class Options(TypedDict, total=False):
    """The boolean options of ClientConnection."""

    dot: bool
    read_output: bool
    lenient_reset: bool
    result_code: bool
    stuff_bare_cr_dot: bool


def state(conn: ClientConnection) -> ClientState:
    """conn.state, read through a call so that type narrowing does not stick."""
    return conn.state


def reply_every_chunking(
    reply: bytes, *, request: Request | None = None, **options: Unpack[Options]
) -> tuple[bytes, Result]:
    """Run the client over every chunking of *reply*; check they agree."""
    outcomes = set()
    for chunks in every_chunking(reply):
        conn = ClientConnection(**options)
        send_request(conn, request or Request(args=["x"]))
        outcomes.add(client_output(get_client_events(conn, chunks)))
        assert conn.state is ClientState.DONE
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


# --- sending ------------------------------------------------------------------------


def test_unix_request_and_payload() -> None:
    conn = ClientConnection()
    assert conn.state is ClientState.IDLE
    assert conn.send(Request(args=["hello", "wo\nrld"], env={"FOO": "foo"})) == (
        V + b"env_FOO=foo\n-\nhello\nwo\x01nrld\n\n"
    )
    assert state(conn) is ClientState.SENDING
    assert conn.send(Data(data=b"DATA line\n")) == b"DATA line\n"
    assert conn.send(Data(data=b".raw\r.")) == b".raw\r."
    assert conn.send(Data(data=b"")) == b""
    assert conn.send(EndOfInput()) == b""
    assert state(conn) is ClientState.SENT
    assert conn.reads_reply


def test_cv09_tcp_request() -> None:
    conn = ClientConnection(dot=True)
    wire = send_request(conn, Request(args=["a"]), [b"line1\n.dot\nend"])
    assert wire == b"VERSION\tscript\t4\t0\n-\na\n\nline1\r\n..dot\r\nend\r\n.\r\n"


def test_cv09_tcp_request_without_input() -> None:
    # Quirk Q23: the end marker is sent even with no input.
    conn = ClientConnection(dot=True)
    assert send_request(conn, Request(args=["a"])) == b"VERSION\tscript\t4\t0\n-\na\n\n\r\n.\r\n"


def test_tcp_payload_chunked() -> None:
    conn = ClientConnection(dot=True)
    wire = send_request(conn, Request(), [b"a\r", b"\n", b".b\r", b".c"])
    assert wire == V + b"-\n\n" + b"a\r\n..b\r\n..c\r\n.\r\n"


def test_tcp_old_cr_dot_encoding() -> None:
    conn = ClientConnection(dot=True, stuff_bare_cr_dot=False)
    assert send_request(conn, Request(), [b"a\r.b"]) == V + b"-\n\n" + b"a\r.b\r\n.\r\n"


def test_header_is_never_dot_encoded() -> None:
    conn = ClientConnection(dot=True)
    assert conn.send(Request(args=[".x", "\n"])) == V + b"-\n.x\n\x01n\n\n"


def test_empty_args_reject() -> None:
    conn = ClientConnection(empty_args="reject")
    with pytest.raises(LocalProtocolError, match="empty"):
        conn.send(Request(args=[""]))
    assert conn.state is ClientState.ERROR
    assert ClientConnection().send(Request(args=[""])) == V + b"-\n\x01\n\n"


# --- reply mode (unix) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "output", "result"),
    [
        (b"hello\n+\n", b"hello\n", OK),
        (b"hello\n+\n+\n", b"hello\n+\n", OK),
        (b"hello\n+\n-\n", b"hello\n+\n", FAILED),
        (b"+\n", b"", OK),
        (b"-\n", b"", FAILED),
        (b"OUT\n+\n+\n", b"OUT\n+\n", OK),  # CV-22
        (b"\x00\xff\r\n-\n", b"\x00\xff\r\n", FAILED),
    ],
)
def test_reply(reply: bytes, output: bytes, result: Result) -> None:
    assert reply_every_chunking(reply) == (output, result)


@pytest.mark.parametrize(
    ("reply", "output", "detail"),
    [
        (b"", b"", "no result code received"),
        (b"x", b"", "bad result code"),
        (b"\n", b"", "bad result code"),
        (b"+", b"", "bad result code"),
        (b"hello", b"hell", "bad result code"),
        (b"hello\nX\n", b"hello\n", "unexpected result code 'X'"),
        (b"hello\n\x01\n", b"hello\n", "unexpected result code 0x01"),
        (b"hello\n\n", b"hello", "unexpected result code 0x0a"),
        (b"ab+\r\n", b"ab+", "unexpected result code 0x0d"),
    ],
)
def test_cv24_bad_result_codes(reply: bytes, output: bytes, detail: str) -> None:
    got_output, result = reply_every_chunking(reply)
    assert got_output == output
    # Dovecot reports these as INTERNAL_FAILURE with no error kind; the core
    # needs a kind for INTERNAL_FAILURE and says PROTOCOL.
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert detail in result.detail


@pytest.mark.parametrize("chunks", [[b"hel", b"lo\n+", b"\n"], [b"hello\n", b"+", b"\n"]])
def test_cv25_trailer_split(chunks: list[bytes]) -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    assert client_output(get_client_events(conn, chunks)) == (b"hello\n", OK)


def test_output_is_streamed_before_eof() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"first line\n")
    assert conn.next_event() == Output(b"first lin")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x")
    conn.receive_data(b"y")
    assert conn.next_event() == Output(b"e")
    assert conn.next_event() == Output(b"\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"+\n")
    assert conn.next_event() == Output(b"xy")
    conn.receive_data(b"")
    assert conn.next_event() == OK
    assert conn.state is ClientState.DONE


def test_reading_while_sending() -> None:
    # A script may answer before the payload is complete.
    conn = ClientConnection()
    conn.send(Request())
    conn.send(Data(data=b"part"))
    conn.receive_data(b"early output\n")
    assert conn.next_event() == Output(b"early outpu")
    conn.send(Data(data=b"rest"))
    conn.send(EndOfInput())
    conn.receive_data(b"-\n")
    conn.receive_data(b"")
    assert conn.next_event() == Output(b"t\n")
    assert conn.next_event() == FAILED


def test_eof_while_sending() -> None:
    # The service may close before the client has sent everything.
    conn = ClientConnection()
    conn.send(Request())
    conn.receive_data(b"-\n")
    conn.receive_data(b"")
    assert conn.next_event() == FAILED


def test_read_output_false_in_reply_mode_still_parses_the_result_code() -> None:
    conn = ClientConnection(read_output=False)
    send_request(conn, Request())
    assert conn.reads_reply
    output, result = client_output(get_client_events(conn, [b"ignored\n-\n"]))
    assert result == FAILED
    assert output == b"ignored\n"  # the adapter discards it


def test_receive_data_accepts_bytearray() -> None:
    buf = bytearray(b"ab+")
    conn = ClientConnection()
    send_request(conn, Request())
    conn.receive_data(buf)
    buf[:] = b"XYZ"  # the adapter reuses its buffer
    conn.receive_data(bytearray(b"\n"))
    assert client_output(get_client_events(conn, [])) == (b"ab", OK)


@pytest.mark.parametrize("dot", [False, True])
def test_receive_data_copies_memoryview(dot: bool) -> None:
    # ServiceConnection.receive_data copies its input with bytes(); the client
    # did too until the filter moved into receive_data.
    buf = bytearray(b"x\r\n.\r\n+" if dot else b"out+")
    conn = ClientConnection(dot=dot)
    send_request(conn, Request())
    conn.receive_data(memoryview(buf))
    buf[:] = b"?" * len(buf)  # the adapter reuses its buffer
    conn.receive_data(memoryview(b"\n"))
    events = get_client_events(conn, [])
    assert client_output(events) == (b"x" if dot else b"out", OK)
    assert all(type(e.data) is bytes for e in events if isinstance(e, Output))


# --- noreply (4.3, CV-26) -----------------------------------------------------------------


def test_cv04_noreply_without_output_closes_at_once() -> None:
    conn = ClientConnection(read_output=False)
    assert conn.reads_reply  # not known before the request
    assert conn.send(Request(args=["10", "frank"], noreply=True)) == (
        b"VERSION\tscript\t4\t0\nnoreply\n10\nfrank\n\n"
    )
    assert not conn.reads_reply
    assert conn.next_event() is NEED_DATA
    assert conn.send(EndOfInput()) == b""
    assert conn.next_event() == OK
    assert conn.state is ClientState.DONE
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_noreply_without_output_tcp() -> None:
    conn = ClientConnection(dot=True, read_output=False)
    wire = send_request(conn, Request(noreply=True), [b"x"])
    assert wire == V + b"noreply\n\nx\r\n.\r\n"
    assert get_client_events(conn, []) == [OK]


@pytest.mark.parametrize(
    "reply", [b"hello\n", b"", b"+\n", b"-\n", b"x", b"hello\n+\n"]
)
def test_cv26_noreply_with_output(reply: bytes) -> None:
    # No result code: everything is output and the run succeeds.
    assert reply_every_chunking(reply, request=Request(noreply=True)) == (reply, OK)


def test_noreply_with_output_tcp_decodes() -> None:
    request = Request(noreply=True)
    assert reply_every_chunking(b"a\n..b\r\n.\r\n+\n", request=request, dot=True) == (
        b"a\n.b",
        OK,
    )
    output, result = reply_every_chunking(b"a\n..b\r\n", request=request, dot=True)
    assert output == b"a\n.b"
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert result.detail == "dot-input stream ends without '.' line"



# --- noreply and a script that prints nothing (unix and tcp agree) ---------------------------


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
def test_noreply_empty_reply_is_no_output(dot: bool) -> None:
    # The service never dot-encodes: a silent script sends zero bytes, not b".\r\n".
    assert reply_every_chunking(b"", request=Request(noreply=True), dot=dot) == (b"", OK)


def test_noreply_tcp_output_still_needs_the_dot_line() -> None:
    # Only an empty reply is exempt: output that has begun may be truncated.
    output, result = reply_every_chunking(b"x", request=Request(noreply=True), dot=True)
    assert output == b"x"
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert result.detail == "dot-input stream ends without '.' line"
    assert reply_every_chunking(b".\r\n", request=Request(noreply=True), dot=True) == (b"", OK)


def test_reply_mode_tcp_empty_output_still_needs_the_dot_line() -> None:
    # The exemption is noreply's: with a result code Dovecot's framing rules stay.
    output, result = reply_every_chunking(b"+\n", dot=True)
    assert output == b""
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)


def noreply_reset_run(*, dot: bool, lenient_reset: bool, ended: bool = True) -> Result:
    """A noreply run reading output, reset before any byte arrived."""
    conn = ClientConnection(dot=dot, lenient_reset=lenient_reset)
    conn.send(Request(noreply=True))
    if ended:
        conn.send(EndOfInput())
    conn.receive_reset()
    (result,) = get_client_events(conn, [])
    assert isinstance(result, Result)
    return result


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
def test_noreply_reset_before_any_output(dot: bool) -> None:
    # A script that left its payload (over tcp at least the dot end line)
    # unread: its close is a reset.  Dovecot reports an I/O error.
    assert noreply_reset_run(dot=dot, lenient_reset=True) == OK
    assert noreply_reset_run(dot=dot, lenient_reset=False) == RESET


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("lenient_reset", [False, True])
def test_noreply_reset_while_sending_is_an_error(dot: bool, lenient_reset: bool) -> None:
    # Success needs the whole request sent.
    assert noreply_reset_run(dot=dot, lenient_reset=lenient_reset, ended=False) == RESET


@pytest.mark.parametrize("dot", [False, True], ids=["unix", "tcp"])
def test_noreply_send_failed_before_any_output(dot: bool) -> None:
    conn = ClientConnection(dot=dot)
    conn.send(Request(noreply=True))
    conn.send_failed("write(x) failed: Broken pipe")
    conn.receive_data(b"")
    assert get_client_events(conn, []) == [
        Result(Status.INTERNAL_FAILURE, ErrorKind.IO, "write(x) failed: Broken pipe")
    ]


# --- tcp replies (CV-30) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "output", "result"),
    [
        (b"hello world\r\n.\n+\n", b"hello world", OK),
        (b"hello world\r\n.\r\n+\n", b"hello world", OK),
        (b"a\n..b\nc\n.\n-\n", b"a\n.b\nc", FAILED),
        (b".\n-\n", b"", FAILED),
        (b"hello\r\n.\r\njunk+\n", b"hello", OK),
        (b"OUT:...\nhello\r\n..world\r\n.\r\n+\n", b"OUT:...\nhello\r\n.world", OK),
        (b"\r\n.\rfoo\n.\n+\n", b"\r\n\rfoo", OK),  # recommended handling of Q14
    ],
)
def test_cv30_tcp_replies(reply: bytes, output: bytes, result: Result) -> None:
    assert reply_every_chunking(reply, dot=True) == (output, result)


def test_cv30_missing_dot_line() -> None:
    output, result = reply_every_chunking(b"hello world\r\n+\n", dot=True)
    assert output == b"hello world"
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert result.detail == "dot-input stream ends without '.' line"


def test_cv30_result_code_eaten_from_dot_line() -> None:
    output, result = reply_every_chunking(b"hello world\r\n.\r\n", dot=True)
    assert output == b"hello world"
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert "unexpected result code 0x0d" in result.detail
    assert "dot-input stream ends without '.' line" in result.detail


def test_tcp_result_code_without_lf() -> None:
    # The filter hands the decoder the rest of the reply at EOF: here the LF
    # that completes the dot line, followed by a result code without its LF.
    output, result = reply_every_chunking(b"x\r\n.\r\n+", dot=True)
    assert output == b"x"
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL)
    assert result.detail.startswith("bad result code")
    assert "dot-input" not in result.detail


def test_tcp_empty_reply() -> None:
    output, result = reply_every_chunking(b"", dot=True)
    assert output == b""
    assert result.status is Status.INTERNAL_FAILURE
    assert "no result code" in result.detail
    assert "dot-input stream ends" in result.detail


# --- fork mode: no result code ------------------------------------------------------------


@pytest.mark.parametrize("reply", [b"", b"x", b"out\n+\n", b"-\n"])
def test_result_code_false(reply: bytes) -> None:
    assert reply_every_chunking(reply, result_code=False) == (reply, OK)


# --- connection reset (4.2.2, quirk Q8) --------------------------------------------------


def reset_run(chunks: list[bytes], **options: Unpack[Options]) -> tuple[bytes, Result]:
    conn = ClientConnection(**options)
    send_request(conn, Request())
    events = get_client_events(conn, chunks, eof=False)
    conn.receive_reset()
    return client_output(events + get_client_events(conn, []))


@pytest.mark.parametrize("dot", [False, True])
def test_reset_after_complete_result_code(dot: bool) -> None:
    reply = b"x\r\n.\r\n+\n" if dot else b"OUT\n+\n"
    output = b"x" if dot else b"OUT\n"
    assert reset_run([reply], dot=dot) == (output, OK)
    assert reset_run([reply], dot=dot, lenient_reset=True) == (output, OK)
    assert reset_run([reply], dot=dot, lenient_reset=False) == (output, RESET)


@pytest.mark.parametrize("lenient_reset", [False, True])
def test_cv27_reset_without_result_code(lenient_reset: bool) -> None:
    # Output released before the reset stays released.
    assert reset_run([b"OUT:...\n"], lenient_reset=lenient_reset) == (b"OUT:..", RESET)
    assert reset_run([], lenient_reset=lenient_reset) == (b"", RESET)
    assert reset_run([b"OUT\nX\n"], lenient_reset=lenient_reset) == (b"OUT\n", RESET)


@pytest.mark.parametrize("lenient_reset", [False, True])
def test_reset_with_bad_dot_stream(lenient_reset: bool) -> None:
    assert reset_run([b"hello\r\n+\n"], dot=True, lenient_reset=lenient_reset) == (
        b"hello",
        RESET,
    )


@pytest.mark.parametrize("lenient_reset", [False, True])
def test_reset_noreply_with_output(lenient_reset: bool) -> None:
    # Nothing vouches for completeness without a result code.
    conn = ClientConnection(lenient_reset=lenient_reset)
    send_request(conn, Request(noreply=True))
    conn.receive_data(b"partial")
    conn.receive_reset()
    assert client_output(get_client_events(conn, [])) == (b"partial", RESET)


def test_reset_noreply_tcp_complete_dot_stream_lenient() -> None:
    conn = ClientConnection(dot=True)
    send_request(conn, Request(noreply=True))
    conn.receive_data(b"a\r\n.\r\n")
    conn.receive_reset()
    assert client_output(get_client_events(conn, [])) == (b"a", OK)


def test_reset_after_eof() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.receive_reset()


# --- state errors and sticky ERROR -------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "event"),
    [
        ([], Data(data=b"x")),
        ([], EndOfInput()),
        ([Request()], Request()),
        ([Request(), EndOfInput()], Data(data=b"x")),
        ([Request(), EndOfInput()], EndOfInput()),
        ([Request(), EndOfInput()], Request()),
    ],
)
def test_send_in_wrong_state(before: list[Request | Data | EndOfInput], event: Request | Data |
                             EndOfInput) -> None:
    conn = ClientConnection()
    for earlier in before:
        conn.send(earlier)
    state = conn.state.name
    with pytest.raises(
        LocalProtocolError, match=f"^cannot send {type(event).__name__} in state {state}$"
    ):
        conn.send(event)
    assert conn.state is ClientState.ERROR


def test_send_wrong_type() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot send Output"):
        conn.send(Output(b"x"))  # type: ignore[arg-type]
    assert conn.state is ClientState.ERROR


def test_sticky_error() -> None:
    conn = ClientConnection()
    conn.send(Request())
    with pytest.raises(LocalProtocolError):
        conn.send(Request())
    assert conn.state is ClientState.ERROR
    with pytest.raises(LocalProtocolError, match="in state ERROR"):
        conn.send(Data(data=b"x"))
    with pytest.raises(LocalProtocolError, match="in state ERROR"):
        conn.send(EndOfInput())
    with pytest.raises(LocalProtocolError, match="in state ERROR"):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match="in state ERROR"):
        conn.next_event()
    assert conn.state is ClientState.ERROR


def test_unencodable_request_is_an_error() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="NUL"):
        conn.send(Request(args=["a\x00"]))
    assert conn.state is ClientState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(Request(args=["a"]))


def test_receive_before_request() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot receive data in state IDLE"):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match="cannot receive data in state ERROR"):
        conn.receive_reset()  # errors are sticky


def test_receive_after_eof() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="cannot receive data after EOF"):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match="cannot receive data after EOF"):
        conn.receive_data(b"")


def test_next_event_after_result() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    assert client_output(get_client_events(conn, [b"+\n"])) == (b"", OK)
    for _ in range(2):
        with pytest.raises(LocalProtocolError, match="no more events in state DONE"):
            conn.next_event()


def test_result_is_the_last_event_even_with_tail_output() -> None:
    conn = ClientConnection()
    send_request(conn, Request())
    conn.receive_data(b"ab")
    conn.receive_data(b"")
    # "ab" has no result code: "a" is released as output, then the Result.
    assert conn.next_event() == Output(b"a")
    result = conn.next_event()
    assert isinstance(result, Result) and result.status is Status.INTERNAL_FAILURE
    assert conn.state is ClientState.DONE
