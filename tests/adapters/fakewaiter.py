"""A fake waiter: drives the shared procedures with no event loop and a fake clock.

The procedures of ``execproto.adapters._procedures`` say what they wait for
by yielding requests.  :class:`FakeWaiter` answers them the way a test
decides, in the loop of ``_procedures.drive``, and records every request
with the fake time it was made at, so a test asserts the requests (types,
fds, timeouts) as well as the result::

    clock = FakeClock()            # monkeypatched over _procedures.monotonic
    w = FakeWaiter(clock, inputs=[b"payload"])
    w.on(Wait, timed_out(clock), when=lambda r: r.timeout == 3)   # alarm passes
    w.on(NextInput, Expired(), nth=2)                             # thrown in
    result = w.run(procedure)
    assert w.kinds() == [...] and w.of(Wait)[0].timeout == 3

Answers come from *rules* (first match wins) and otherwise from defaults:

=============  ===============================================================
request        default answer
=============  ===============================================================
``Wait``       fds: a real ``poll`` of at most ``patience`` real seconds; if
               nothing is ready, the request's timeout passes on the fake
               clock (False), or :class:`Stuck` without a timeout.  No fds:
               a sleep, the clock advances by its timeout (False).
``Offload``    ``fn(*args)`` called at once (its error is thrown in)
``NextInput``  the next of ``inputs``, then None
``Deliver``    appended to ``delivered``
``Turn``       None
``WaitJobs``   :class:`Stuck` (a test that waits for jobs says how)
=============  ===============================================================

A rule's answer is a value (sent back), an exception (thrown in, like a
cancellation or :class:`Expired`), or a callable taking the request (its
result is sent back, what it raises is thrown in; it may fall back on
:meth:`FakeWaiter.poll` or :meth:`FakeWaiter.default`).  Only
:class:`Stuck` is never thrown in (see :meth:`FakeWaiter.run`).

:class:`Flaky` is a real socket whose ``send``, ``recv`` and ``accept``
follow a plan first (fail, go short, return something else), for the
error paths a real peer cannot produce on cue.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from execproto.adapters._procedures import (
    Deliver,
    NextInput,
    Offload,
    Procedure,
    Turn,
    Wait,
    WaitJobs,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "PASS",
    "FakeClock",
    "FakeWaiter",
    "Flaky",
    "Stuck",
    "advance_then",
    "is_pidfd",
    "oserror",
    "timed_out",
]

T = TypeVar("T")

#: Real seconds a default Wait polls before it lets the fake timeout pass.
PATIENCE = 5.0


class Stuck(BaseException):
    """A request the waiter cannot answer: the procedure would wait forever."""


class FakeClock:
    """Stands in for ``_procedures.monotonic``: time moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Rule:
    kind: type
    answer: object
    when: Callable[[Any], bool] | None
    skip: int
    times: int | None


class FakeWaiter:
    """Answers a procedure's requests from rules and defaults; records them all.

    Attributes:
        requests: every request, in order.
        times: the fake time of each request.
        delivered: the Deliver chunks a default answer took.
    """

    def __init__(self, clock: FakeClock, *, inputs: Iterable[bytes] = (),
                 patience: float = PATIENCE, limit: int = 100_000) -> None:
        self.clock = clock
        self.patience = patience
        self.limit = limit
        self.requests: list[object] = []
        self.times: list[float] = []
        self.delivered: list[bytes] = []
        #: The Waits for a child (on a pidfd), told apart while the pidfd is open.
        self.child_waits: list[Wait] = []
        self._inputs = iter(inputs)
        self._rules: list[_Rule] = []

    def on(self, kind: type, answer: object, *, when: Callable[[Any], bool] | None = None,
           nth: int = 1, times: int | None = 1) -> FakeWaiter:
        """Answer the *nth* matching request of *kind* (and *times* - 1 more; None: all)."""
        self._rules.append(_Rule(kind, answer, when, nth - 1, times))
        return self

    def of(self, kind: type[T]) -> list[T]:
        """The requests of one type, in order."""
        return [r for r in self.requests if isinstance(r, kind)]

    def for_child(self, request: object) -> bool:
        """Whether *request* was a Wait for a child (told when it was made)."""
        return any(request is wait for wait in self.child_waits)

    def kinds(self) -> list[str]:
        """The requests' type names, in order (for a readable assert)."""
        return [type(r).__name__ for r in self.requests]

    def run(self, procedure: Procedure[T]) -> T:
        """Drive *procedure* to its end, as ``_procedures.drive`` does.

        What an answer raises is thrown in, except :class:`Stuck`: the
        procedure is closed and Stuck raised here, so a procedure that
        keeps waiting through errors (the stop plan) cannot loop forever.
        """
        reply: Any = None
        error: BaseException | None = None
        for _ in range(self.limit):
            try:
                request = procedure.throw(error) if error is not None else procedure.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                reply, error = self.answer(request), None
            except Stuck:
                procedure.close()
                raise
            except BaseException as exc:
                reply, error = None, exc
        procedure.close()
        raise Stuck(f"more than {self.limit} requests")

    def answer(self, request: Any) -> Any:
        """Record *request* and answer it: a rule's answer, else the default."""
        self.requests.append(request)
        self.times.append(self.clock.now)
        if isinstance(request, Wait) and any(is_pidfd(fd) for fd in request.read):
            self.child_waits.append(request)
        for rule in self._rules:
            if rule.times == 0 or not isinstance(request, rule.kind):
                continue
            if rule.when is not None and not rule.when(request):
                continue
            if rule.skip:
                rule.skip -= 1
                continue
            if rule.times is not None:
                rule.times -= 1
            return self._apply(rule.answer, request)
        return self.default(request)

    @staticmethod
    def _apply(answer: object, request: object) -> Any:
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, type) and issubclass(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def default(self, request: object) -> Any:
        """The default answer (rules may fall back on it)."""
        if isinstance(request, Wait):
            return self.poll(request)
        if isinstance(request, Offload):
            return request.fn(*request.args)
        if isinstance(request, NextInput):
            return next(self._inputs, None)
        if isinstance(request, Deliver):
            self.delivered.append(request.data)
            return None
        if isinstance(request, Turn):
            return None
        raise Stuck(f"no answer for {request!r}")

    def poll(self, request: Wait, patience: float | None = None) -> bool:
        """Wait for real (bounded) for what *request* asks; else its timeout passes."""
        if not request.read and not request.write:
            if request.timeout is None:
                raise Stuck("a sleep without end")
            self.clock.advance(request.timeout)
            return False
        poller = select.poll()
        for fd in request.read:
            poller.register(fd, select.POLLIN)
        for fd in request.write:
            poller.register(fd, select.POLLOUT | (select.POLLIN if fd in request.read else 0))
        limit = self.patience if patience is None else patience
        if request.timeout is not None:
            limit = min(limit, max(request.timeout, 0.0))
        if poller.poll(limit * 1000):
            return True
        if request.timeout is None:
            raise Stuck(f"nothing came for {request!r}")
        self.clock.advance(request.timeout)
        return False


def is_pidfd(fd: int) -> bool:
    """Whether *fd* is a pidfd (the procedures wait on them for children)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    except OSError:
        return False


def timed_out(clock: FakeClock) -> Callable[[Any], bool]:
    """An answer for a Wait or WaitJobs: its whole timeout passes, nothing happens."""
    def answer(request: Wait | WaitJobs) -> bool:
        assert request.timeout is not None, f"{request!r} has no timeout"
        clock.advance(request.timeout)
        return False
    return answer


def advance_then(clock: FakeClock, seconds: float, value: object = None) -> Callable[[Any], Any]:
    """An answer that lets *seconds* pass on the clock, then sends *value*.

    A callable *value* is called with the request for the answer.
    """
    def answer(request: object) -> object:
        clock.advance(seconds)
        return value(request) if callable(value) else value
    return answer


# --- sockets that fail on cue -------------------------------------------------


PASS = object()  # a step of a Flaky plan: make the real call


class Flaky(socket.socket):
    """A real socket whose calls follow a plan, then behave.

    ``sends``: per send() call, an exception to raise, an int (send at most
    that many bytes) or PASS.  ``recvs``: per recv() call, an exception,
    bytes to return instead, an int (receive at most that many) or PASS.
    ``accepts``: per accept() call, an exception or PASS.
    """

    def __init__(self, sock: socket.socket) -> None:
        blocking = sock.getblocking()
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.setblocking(blocking)
        self.sends: list[object] = []
        self.recvs: list[object] = []
        self.accepts: list[object] = []
        self.sent: list[int] = []

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        step = self.sends.pop(0) if self.sends else PASS
        if isinstance(step, BaseException):
            raise step
        view = memoryview(data)
        if isinstance(step, int):
            view = view[:step]
        sent = super().send(view, flags)
        self.sent.append(sent)
        return sent

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        step = self.recvs.pop(0) if self.recvs else PASS
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, bytes):
            return step
        if isinstance(step, int):
            bufsize = min(bufsize, step)
        return super().recv(bufsize, flags)

    def accept(self) -> tuple[socket.socket, Any]:
        step = self.accepts.pop(0) if self.accepts else PASS
        if isinstance(step, BaseException):
            raise step
        return super().accept()


def oserror(code: int) -> OSError:
    """The OSError the kernel's *code* becomes in Python (BrokenPipeError for EPIPE...)."""
    return OSError(code, os.strerror(code))
