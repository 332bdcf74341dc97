"""Client side: separate the script's output from the 2-byte result code.

The service appends ``+\\n`` or ``-\\n`` after the script's output with
nothing in between (PROTOCOL.md 4.1), so only EOF tells which two bytes are
the result code.  :class:`ResultCodeFilter` releases everything but the last
two bytes received and classifies those at EOF.  That is less eager than
Dovecot's holdback rule (4.2.1) but gives the same final output for every
chunking, and never releases any byte of the result code.
"""

from __future__ import annotations

from typing_extensions import Buffer

from ._errors import LocalProtocolError
from ._events import Status

__all__ = ["ResultCodeFilter"]

_LF = 0x0A


def _describe_code(code: int) -> str:
    if 0x20 <= code <= 0x7E:
        return f"'{chr(code)}'"
    return f"0x{code:02x}"


class ResultCodeFilter:
    """Incremental result-code extraction for reply mode.

    Call :meth:`feed` with each chunk of the reply and pass on what it
    returns; call :meth:`finish` at EOF for the rest and the verdict.
    """

    __slots__ = ("_finished", "_held", "_total")

    def __init__(self) -> None:
        self._held = b""  # the last (at most) 2 bytes received
        self._total = 0
        self._finished = False

    def feed(self, data: Buffer) -> bytes:
        """Take one chunk of the reply; return the output it releases."""
        if self._finished:
            raise LocalProtocolError("result code filter already finished")
        if not isinstance(data, bytes):
            data = bytes(data)
        n = len(data)
        self._total += n
        if n >= 2:
            held = self._held
            self._held = data[-2:]
            if held:
                return b"".join((held, memoryview(data)[:-2]))
            return data[:-2]
        if n == 0:
            return b""
        both = self._held + data
        self._held = both[-2:]
        return both[:-2]

    def finish(self) -> tuple[bytes, Status | None, str]:
        """Signal EOF; classify the held-back bytes (PROTOCOL.md 4.2).

        Returns:
            ``(output, status, detail)``: the last output bytes to release;
            SUCCESS or FAILURE for a good result code, or None when the
            result code is missing or malformed (then *detail* says why).
        """
        if self._finished:
            raise LocalProtocolError("result code filter already finished")
        self._finished = True
        tail = self._held
        if self._total == 0:
            return b"", None, "no result code received from the service"
        if len(tail) == 2 and tail[1] == _LF:
            code = tail[0]
            if code == ord("+"):
                return b"", Status.SUCCESS, ""
            if code == ord("-"):
                return b"", Status.FAILURE, ""
            return b"", None, f"unexpected result code {_describe_code(code)} from the service"
        return (
            tail[:-1],
            None,
            f"bad result code from the service: the reply ends in {tail[-1:]!r}, "
            "not in a result code line",
        )
