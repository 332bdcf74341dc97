"""The client side of a run, as an h11-style connection object.

Theory of operation
-------------------
A :class:`ClientConnection` is what Dovecot's ``program-client`` does with
the bytes of one run, without doing any I/O itself.  The adapter:

1. sends ``conn.send(Request(...))`` (the header) as soon as it is connected;
2. sends ``conn.send(Data(data=...))`` for each chunk of payload and finally
   ``conn.send(EndOfInput())``; then half-closes the socket when
   :attr:`ClientConnection.reads_reply` is true, else closes it;
3. meanwhile (reading and writing run concurrently, or a script that writes
   before it reads would deadlock) feeds every received chunk to
   ``conn.receive_data(chunk)`` (``b""`` at EOF, :meth:`receive_reset` on
   ECONNRESET) and drains ``conn.next_event()``: :class:`Output` events,
   then exactly one :class:`Result`.

Reply pipeline (PROTOCOL.md 5.1)::

    bytes -> ResultCodeFilter (reply mode) -> DotDecoder (tcp) -> Output

States::

    IDLE --Request--> SENDING --EndOfInput--> SENT
    (reading is allowed in SENDING and SENT)
    a Result is produced at EOF, or at EndOfInput when the reply is not read

noreply (PROTOCOL.md 4.3): the service sends no result code and never
dot-encodes; the script's stdout is the socket.  When the reply is read, a
reply that ends before its first byte, once the whole request was sent, is
a script that printed nothing: SUCCESS with no output, over unix and tcp
alike.  (Dovecot's tcp client fails it with "dot-input stream ends without
'.' line".)  A reset instead of EOF, e.g. from a script that left the
always-sent dot end line unread, counts so only under ``lenient_reset``.
Output that has begun must still end with a dot line over tcp: a
truncated stream is never taken as complete.

Timeouts, connecting, retries and error mapping belong to the adapter; it
reports transport failures with its own :class:`Result`.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import NoReturn

from typing_extensions import Buffer

from ._dot import DotDecoder, DotEncoder
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Data,
    EndOfInput,
    ErrorKind,
    Output,
    Request,
    Result,
    Status,
)
from ._header import EMPTY_ARG_MODES, encode_request
from ._reply import ResultCodeFilter

__all__ = ["ClientConnection", "ClientState"]


class ClientState(enum.Enum):
    """Where the sending half of a :class:`ClientConnection` is."""

    IDLE = "idle"  #: nothing sent yet
    SENDING = "sending"  #: header sent; payload may follow
    SENT = "sent"  #: EndOfInput sent
    DONE = "done"  #: the Result has been returned
    ERROR = "error"  #: the caller misused the connection; every call fails


_NO_RECEIVE = frozenset({ClientState.IDLE, ClientState.DONE, ClientState.ERROR})
_SENDING, _SENT, _DONE, _ERROR = (
    ClientState.SENDING, ClientState.SENT, ClientState.DONE, ClientState.ERROR)


class ClientConnection:
    """One run of a script through a service (unix/tcp) or a child (fork).

    Args:
        dot: use dot framing, as Dovecot does for the tcp driver.
        read_output: the caller wants the script's output.  With ``noreply``
            and no output wanted the reply is not read at all: the socket is
            closed after the payload and the run succeeds at once (as Dovecot).
            With ``noreply`` and output wanted, the reply is read to EOF: an
            empty one is no output and SUCCESS (unix and tcp alike), a
            non-empty one is output (tcp: dot-decoded, so it must end with
            a dot line).
        empty_args: how to send an empty argument: ``"soh"`` or ``"reject"``.
        stuff_bare_cr_dot: see :class:`DotEncoder`.
        lenient_reset: a connection reset after a complete result code is
            the script's verdict (default); with ``noreply``, a reset before
            any output is a script that printed nothing.  False reports both
            as an I/O error like Dovecot (quirk Q8).
        result_code: parse a result code (True, the default).  False is the
            fork driver's mode: the whole stream is output and the adapter
            decides the status from the exit code.
    """

    def __init__(
        self,
        *,
        dot: bool = False,
        read_output: bool = True,
        empty_args: str = "soh",
        stuff_bare_cr_dot: bool = True,
        lenient_reset: bool = True,
        result_code: bool = True,
    ) -> None:
        if empty_args not in EMPTY_ARG_MODES:
            raise LocalProtocolError(f"empty_args must be one of {EMPTY_ARG_MODES}")
        self.dot = dot
        self.read_output = read_output
        self._empty_args = empty_args
        self._lenient_reset = lenient_reset
        self._result_code = result_code
        self._encoder = DotEncoder(stuff_bare_cr_dot=stuff_bare_cr_dot) if dot else None
        self._decoder = DotDecoder() if dot else None
        self._filter: ResultCodeFilter | None = None
        self._noreply = False
        self.state = ClientState.IDLE
        self._ready: deque[bytes] = deque()  # output not yet returned by next_event
        self._eof = False
        self._received = False  # any reply byte arrived
        self._reset = False
        self._send_error: str | None = None
        self._result: Result | None = None

    @property
    def reads_reply(self) -> bool:
        """Whether the adapter must read the reply (then half-close, not close)."""
        return not (self._noreply and not self.read_output)

    def send(self, event: Request | Data | EndOfInput) -> bytes:
        """Return the bytes to write for *event*.

        Raises:
            LocalProtocolError: the event is not allowed in this state, or the
                request cannot be encoded (see :func:`encode_request`).  The
                connection then goes to ``ERROR``.
        """
        try:
            return self._send(event)
        except LocalProtocolError:
            self.state = ClientState.ERROR
            raise

    def _send(self, event: Request | Data | EndOfInput) -> bytes:
        state = self.state
        if type(event) is Request and state is ClientState.IDLE:
            header = encode_request(event, empty_args=self._empty_args)
            self._noreply = event.noreply
            if self._result_code and not event.noreply:
                self._filter = ResultCodeFilter()
            self.state = ClientState.SENDING
            return header
        if type(event) is Data and state is ClientState.SENDING:
            return self._encoder.encode(event.data) if self._encoder else event.data
        if type(event) is EndOfInput and state is ClientState.SENDING:
            self.state = ClientState.SENT
            if not self.reads_reply:
                self._result = Result(Status.SUCCESS)
            return self._encoder.finish() if self._encoder else b""
        raise LocalProtocolError(f"cannot send {type(event).__name__} in state {state.name}")

    def receive_data(self, data: Buffer) -> None:
        """Add bytes read from the connection; ``b""`` means EOF.

        Raises:
            LocalProtocolError: data after EOF, or before the request was sent.
        """
        # The per-chunk path of every reply: identity tests only (a frozenset
        # lookup hashes the enum in Python); the second line is reads_reply.
        state = self.state
        if self._eof or not (state is _SENDING or (
                state is _SENT and not (self._noreply and not self.read_output))):
            self._refuse_data()
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer
        if not data:
            self._eof = True
            return
        self._received = True
        # Filter at once: next_event() then only hands out what is ready.
        if self._filter is not None:
            data = self._filter.feed(data)
        if self._decoder is not None and data:
            data = self._decoder.decode(data)
        if data:
            self._ready.append(data)

    def _refuse_data(self) -> NoReturn:
        why = "after EOF" if self._eof else (
            f"in state {self.state.name}" if self.state in _NO_RECEIVE
            else "in a run that does not read the reply")
        self.state = ClientState.ERROR
        raise LocalProtocolError(f"cannot receive data {why}")

    def send_failed(self, detail: str = "write failed") -> None:
        """Report that writing failed (EPIPE, ECONNRESET...): the bytes did not all go.

        Sending is over (``send`` raises from now on); keep reading, because
        the service may already have sent its result code.  With
        ``lenient_reset`` a complete result code still counts as the script's
        verdict; otherwise, or without one, the run ends in an I/O error
        with *detail*, as Dovecot reports any write error.

        After the Result has been returned it changes nothing (a sender
        may fail while the reader has already finished).

        Raises:
            LocalProtocolError: nothing was sent yet, or the connection is in ERROR.
        """
        if self.state is ClientState.DONE:
            return
        if self.state is not ClientState.SENDING and self.state is not ClientState.SENT:
            raise LocalProtocolError(f"send_failed() in state {self.state.name}")
        self._send_error = detail
        self.state = ClientState.SENT
        if not self.reads_reply:
            self._result = Result(Status.INTERNAL_FAILURE, ErrorKind.IO, detail)

    def receive_reset(self) -> None:
        """Report that the peer reset the connection (ECONNRESET) while reading.

        It ends the reply like EOF.  A complete result code already received
        still counts (unless ``lenient_reset=False``); anything else becomes
        an I/O error.
        """
        self.receive_data(b"")
        self._reset = True

    def next_event(self) -> Output | Result | type[NEED_DATA]:
        """Return the next event: :class:`Output`, the final :class:`Result`, or NEED_DATA.

        Treat it like ``next()`` on an iterator that may need feeding: call it
        until it returns NEED_DATA (then read and :meth:`receive_data`) or a
        Result (then the run is over; further calls raise).

        Raises:
            LocalProtocolError: called after the Result was returned.
        """
        state = self.state
        if state is _DONE or state is _ERROR:
            raise LocalProtocolError(f"no more events in state {state.name}")
        ready = self._ready
        if ready:
            return Output(ready.popleft())
        if self._result is not None:
            return self._finish(self._result)
        if not self._eof:
            return NEED_DATA
        return self._at_eof()

    def _at_eof(self) -> Output | Result:
        if self._noreply and not self._received and self.state is ClientState.SENT:
            # The request went and the script printed nothing: there is no
            # dot stream to check (tcp) and no output a reset could cut.
            self._result = self._empty_noreply_result()
            return self._finish(self._result)
        status = Status.SUCCESS
        problems: list[str] = []
        tail = b""
        # Without a result code or a dot end line nothing vouches for completeness.
        verdict_missing = self._filter is None and self._decoder is None
        if self._filter is not None:
            tail, verdict, detail = self._filter.finish()
            self._filter = None
            if verdict is None:
                problems.append(detail)
            else:
                status = verdict
        if self._decoder is not None:
            if tail:
                tail = self._decoder.decode(tail)
            try:
                self._decoder.finish()
            except RemoteProtocolError as exc:
                problems.append(exc.message)
        broken = self._send_error or ("connection reset by peer" if self._reset else None)
        if broken is not None and (problems or not self._lenient_reset or verdict_missing):
            # Without a complete result code a reset may have lost data.
            result = Result(Status.INTERNAL_FAILURE, ErrorKind.IO, broken)
        elif problems:
            result = Result(Status.INTERNAL_FAILURE, ErrorKind.PROTOCOL, "; ".join(problems))
        else:
            result = Result(status)
        self._result = result
        if tail:
            return Output(tail)
        return self._finish(result)

    def _empty_noreply_result(self) -> Result:
        if self._send_error is not None:  # the request did not all go
            return Result(Status.INTERNAL_FAILURE, ErrorKind.IO, self._send_error)
        if self._reset and not self._lenient_reset:
            return Result(Status.INTERNAL_FAILURE, ErrorKind.IO, "connection reset by peer")
        return Result(Status.SUCCESS)

    def _finish(self, result: Result) -> Result:
        self.state = ClientState.DONE
        return result
