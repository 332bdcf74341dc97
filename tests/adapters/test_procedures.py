"""The adapters' policy, tested once: the shared procedures under a fake waiter.

Every procedure of ``execproto.adapters._procedures`` is driven here by
:class:`FakeWaiter` (no event loop, no flavour) on a fake clock.  The tests
assert the requests a procedure makes (types, fds, timeouts) as well as
what it returns or logs: timeouts, retries, kill escalation, result and
log texts, half-close and drain, the stop plan.  Sockets, pipes and
children are real where the procedure makes real system calls; a socket
whose calls fail on cue stands in where an error path must be forced.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from execproto import (
    ClientConnection,
    ErrorKind,
    ForkTarget,
    RemoteProtocolError,
    Request,
    ScriptRequest,
    ServiceConnection,
    Status,
    TcpTarget,
    UnixTarget,
)
from execproto.adapters import _procedures as procs
from execproto.adapters._common import (
    CHUNK,
    KILL_TIMEOUT,
    Listeners,
    RunOptions,
    RunResult,
    ServiceConfig,
    UnixListener,
)
from execproto.adapters._procedures import (
    Deliver,
    Expired,
    Job,
    Jobs,
    NextInput,
    Offload,
    Turn,
    Wait,
    WaitJobs,
)

from .fakewaiter import (
    PASS,
    FakeClock,
    FakeWaiter,
    Flaky,
    Stuck,
    advance_then,
    is_pidfd,
    oserror,
    timed_out,
)

V = b"VERSION\tscript\t4\t0\n"
LABEL = "unix:/run/test.sock"


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The procedures' clock, moved only by the test and its waiter."""
    fake = FakeClock()
    monkeypatch.setattr(procs, "monotonic", fake)
    return fake


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory whose paths fit in a unix socket address."""
    path = tempfile.mkdtemp(prefix="fw", dir="/tmp")
    yield path
    shutil.rmtree(path)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A unix socketpair: (ours, the peer's)."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        peer.settimeout(5.0)  # a test's own reads are bounded too
        yield ours, peer


def on_pidfd(request: Wait) -> bool:
    return len(request.read) == 1 and is_pidfd(request.read[0])


def reply_then(waiter: FakeWaiter, peer: socket.socket, reply: bytes,
               received: list[bytes]) -> Callable[[Wait], bool]:
    """A Wait answer: the peer reads the whole request, replies, closes; then poll."""
    def answer(request: Wait) -> bool:
        received.append(read_all(peer))
        peer.sendall(reply)
        peer.shutdown(socket.SHUT_WR)
        return waiter.poll(request)
    return answer


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def client(*, dot: bool = False, noreply: bool = False, read_output: bool = True,
           lenient_reset: bool = True) -> tuple[ClientConnection, bytes]:
    conn = ClientConnection(dot=dot, read_output=read_output, lenient_reset=lenient_reset)
    return conn, conn.send(Request(args=[b"a"], noreply=noreply))


def exchange(waiter: FakeWaiter, sock: socket.socket, conn: ClientConnection, header: bytes,
             *, timeout: float | None = None, collect: bool = True) -> RunResult:
    return waiter.run(procs.exchange(sock, conn, header, LABEL, timeout,
                                     procs._Output(collect)))


def run(waiter: FakeWaiter, target: UnixTarget | TcpTarget | ForkTarget, args: list[bytes],
        options: RunOptions, *, collect: bool = True, has_input: bool = False) -> RunResult:
    return waiter.run(procs.start_run(target, args, options, stream=not collect,
                                      input=object() if has_input else None))


def failure(kind: ErrorKind, detail: str, *, target: str = LABEL,
            output: bytes | None = None, returncode: int | None = None) -> RunResult:
    return RunResult(Status.INTERNAL_FAILURE, kind, detail, output, target, returncode)


# --- connect --------------------------------------------------------------------


@pytest.fixture
def full_backlog(short_dir: str) -> Iterator[tuple[str, socket.socket]]:
    """A unix listener whose backlog is full: a connect to it says EAGAIN."""
    path = os.path.join(short_dir, "s")
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as filler:
        listener.bind(path)
        listener.listen(0)
        filler.connect(path)  # the one queued connection a backlog of 0 holds
        yield path, listener


def test_unix_eagain_is_retried_every_100_ms_until_the_connect_timeout(
        clock: FakeClock, full_backlog: tuple[str, socket.socket]) -> None:
    path, _ = full_backlog
    w = FakeWaiter(clock)
    result = run(w, UnixTarget(path), [], {"connect_timeout": 0.35})
    assert result == failure(ErrorKind.CONNECT_TIMEOUT,
                             f"connect(unix:{path}) timed out after 0.35 s",
                             target=f"unix:{path}")
    waits = w.of(Wait)
    assert w.requests == waits  # nothing but sleeps
    assert all(not r.read and not r.write for r in waits)
    assert [r.timeout for r in waits[:3]] == [0.1] * 3
    assert waits[3].timeout == pytest.approx(0.05)
    assert len(waits) == 4
    assert clock.now == pytest.approx(1000.35)


def test_unix_eagain_then_room_in_the_backlog_connects(
        clock: FakeClock, full_backlog: tuple[str, socket.socket]) -> None:
    path, listener = full_backlog
    accepted: list[socket.socket] = []

    def make_room(request: Wait) -> bool:
        accepted.append(listener.accept()[0])
        return w.poll(request)

    w = FakeWaiter(clock).on(Wait, make_room, nth=2)
    sock = w.run(procs.connect(UnixTarget(path), None))
    with sock, accepted[0]:
        assert sock.getpeername() == path
        # Without a connect timeout every retry waits the full interval.
        assert [r.timeout for r in w.of(Wait)] == [0.1, 0.1]
        assert clock.now == pytest.approx(1000.2)


def test_unix_connect_errors_are_io_failures_naming_the_path(
        clock: FakeClock, short_dir: str) -> None:
    missing = os.path.join(short_dir, "missing")
    w = FakeWaiter(clock)
    assert run(w, UnixTarget(missing), [], {}) == failure(
        ErrorKind.IO, f"connect(unix:{missing}) failed: No such file or directory",
        target=f"unix:{missing}")
    deaf = os.path.join(short_dir, "deaf")
    with socket.socket(socket.AF_UNIX) as bound:  # bound, never listening
        bound.bind(deaf)
        assert run(w, UnixTarget(deaf), [], {}) == failure(
            ErrorKind.IO, f"connect(unix:{deaf}) failed: Connection refused",
            target=f"unix:{deaf}")
    assert w.requests == []  # a unix connect never waits


@pytest.fixture
def refusing() -> Iterator[tuple[int, int]]:
    """Two ports bound but not listening: a connect to them is refused."""
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        yield one.getsockname()[1], two.getsockname()[1]


def _info(port: int) -> tuple[Any, ...]:
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


def test_tcp_addresses_share_what_is_left_of_the_timeout(
        clock: FakeClock, tcp_listener: socket.socket, refusing: tuple[int, int]) -> None:
    port = tcp_listener.getsockname()[1]
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        black_hole = hole.getsockname()[1]
        infos = [_info(refusing[0]), _info(black_hole), _info(port)]
        # A name is looked up off the loop; the second address never answers.
        w = (FakeWaiter(clock).on(Offload, infos)
             .on(Wait, timed_out(clock), nth=2))
        sock = w.run(procs.connect(TcpTarget("db.example", 2000), 3.0))
    with sock:
        assert sock.getpeername() == ("127.0.0.1", port)
    lookup, = w.of(Offload)
    assert (lookup.fn, lookup.args) == (socket.getaddrinfo,
                                        ("db.example", 2000, 0, socket.SOCK_STREAM))
    assert lookup.timeout == 3.0
    waits = w.of(Wait)
    assert all(len(r.write) == 1 and not r.read for r in waits)
    # 3 s for 3 addresses; the refused one took no time, the silent one its share.
    assert [r.timeout for r in waits] == [1.0, 1.5, 1.5]
    assert w.kinds() == ["Offload", "Wait", "Wait", "Wait"]


def test_tcp_reports_the_last_error_or_a_timeout(clock: FakeClock, tcp_listener: socket.socket,
                                                 refusing: tuple[int, int]) -> None:
    refused = [_info(port) for port in refusing]
    w = FakeWaiter(clock).on(Offload, refused)
    target = TcpTarget("db.example", 2000)
    assert run(w, target, [], {}) == failure(
        ErrorKind.OTHER, "connect(tcp:db.example:2000) failed: Connection refused",
        target="tcp:db.example:2000")
    # A refused address, then one that times out: a timeout.
    port = tcp_listener.getsockname()[1]
    w = (FakeWaiter(clock).on(Offload, [_info(refusing[0]), _info(port)])
         .on(Wait, timed_out(clock), nth=2))
    assert run(w, target, [], {"connect_timeout": 2.0}) == failure(
        ErrorKind.CONNECT_TIMEOUT, "connect(tcp:db.example:2000) timed out after 2.0 s",
        target="tcp:db.example:2000")
    # The first address used up the time (a slow driver): the rest are not tried.
    w = (FakeWaiter(clock).on(Offload, [_info(port), _info(port)])
         .on(Wait, advance_then(clock, 5.0, False)))
    with pytest.raises(procs._ConnectTimeout):
        w.run(procs.connect(target, 2.0))
    assert w.kinds() == ["Offload", "Wait"]


def test_tcp_name_lookup_expires_or_fails(clock: FakeClock) -> None:
    target = TcpTarget("db.example", 2000)
    w = FakeWaiter(clock).on(Offload, Expired())
    assert run(w, target, [], {"connect_timeout": 2.0}) == failure(
        ErrorKind.CONNECT_TIMEOUT, "connect(tcp:db.example:2000) timed out after 2.0 s",
        target="tcp:db.example:2000")
    assert w.of(Offload)[0].timeout == 2.0
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    w = FakeWaiter(clock).on(Offload, unknown)
    assert run(w, target, [], {"connect_timeout": None}) == failure(
        ErrorKind.IO, "Cannot resolve `db.example': Name or service not known",
        target="tcp:db.example:2000")
    assert w.of(Offload)[0].timeout is None


def test_tcp_ip_literal_is_resolved_inline(clock: FakeClock,
                                           tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    w = FakeWaiter(clock)
    with w.run(procs.connect(TcpTarget("127.0.0.1", port), 5.0)) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
    assert not w.of(Offload)
    assert all(r.timeout == 5.0 for r in w.of(Wait))


# --- the exchange ---------------------------------------------------------------


def test_unix_exchange_sends_all_then_reads_the_reply(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    conn, header = client()
    received: list[bytes] = []
    w = FakeWaiter(clock, inputs=[b"hello ", b"world"])
    w.on(Wait, reply_then(w, peer, b"out\n+\n", received))
    result = exchange(w, ours, conn, header, timeout=30.0)
    assert result == RunResult(Status.SUCCESS, output=b"out\n", target=LABEL)
    assert received == [header + b"hello world"]  # then a half-close: EOF
    assert w.kinds() == ["NextInput", "NextInput", "NextInput", "Wait"]
    assert [r.timeout for r in w.of(NextInput)] == [30.0] * 3
    assert w.of(Wait) == [Wait(read=(ours.fileno(),), timeout=30.0)]


def test_tcp_exchange_dot_frames_both_ways(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    conn, header = client(dot=True)
    received: list[bytes] = []
    w = FakeWaiter(clock, inputs=[b".line\n"])
    w.on(Wait, reply_then(w, peer, b"..out\r\n.\r\n-\n", received))
    result = exchange(w, ours, conn, header)
    assert result == RunResult(Status.FAILURE, output=b".out", target=LABEL)
    assert received == [header + b"..line\r\n.\r\n"]
    assert w.of(Wait) == [Wait(read=(ours.fileno(),))]


def _served_by(waiter: FakeWaiter, server: socket.socket, reply: bytes,
               peers: list[socket.socket], received: list[bytes]) -> Callable[[Wait], bool]:
    """A Wait answer: the first wait to read accepts the client and replies."""
    def answer(request: Wait) -> bool:
        if not request.read or peers:  # the connect's own wait, or no more to do
            return waiter.poll(request)
        peers.append(server.accept()[0])
        peers[0].settimeout(5.0)
        return reply_then(waiter, peers[0], reply, received)(request)
    return answer


@contextlib.contextmanager
def _listening(driver: str, short_dir: str, tcp_listener: socket.socket
               ) -> Iterator[tuple[UnixTarget | TcpTarget, socket.socket]]:
    """A target of *driver* ("unix" or "tcp") and the listening socket behind it."""
    with socket.socket(socket.AF_UNIX) as unix_listener:
        if driver == "unix":
            path = os.path.join(short_dir, "s")
            unix_listener.bind(path)
            unix_listener.listen(2)
            yield UnixTarget(path), unix_listener
        else:
            yield TcpTarget("127.0.0.1", tcp_listener.getsockname()[1]), tcp_listener


@pytest.mark.parametrize("driver", ["unix", "tcp"])
def test_start_run_over_a_socket(clock: FakeClock, short_dir: str, driver: str,
                                 tcp_listener: socket.socket) -> None:
    with _listening(driver, short_dir, tcp_listener) as (target, server):
        reply = b"out+\n" if driver == "unix" else b"out\r\n.\r\n+\n"
        peers: list[socket.socket] = []
        received: list[bytes] = []
        w = FakeWaiter(clock, inputs=[b"in"])
        w.on(Wait, _served_by(w, server, reply, peers, received), times=None)
        result = run(w, target, [b"x"], {"env": {"A": "1"}, "timeout": 8.0}, has_input=True)
        with peers[0]:
            assert result == RunResult(Status.SUCCESS, output=b"out", target=target.label)
            assert received[0].startswith(V + b"env_A=1\n-\nx\n\nin")
            assert w.of(Wait)[-1].timeout == 8.0


@pytest.mark.parametrize("driver", ["unix", "tcp"])
def test_a_small_payload_goes_out_with_the_header(clock: FakeClock, short_dir: str, driver: str,
                                                   tcp_listener: socket.socket) -> None:
    # Up to CHUNK bytes in memory: one send, header and payload and its end,
    # and no NextInput; a larger payload is asked for chunk by chunk.
    with _listening(driver, short_dir, tcp_listener) as (target, server):
        reply, end = (b"+\n", b"\n") if driver == "unix" else (b".\r\n+\n", b".\r\n")
        for payload, asked in ((b"in", 0), (b"", 0), (bytes(CHUNK + 1), 1)):
            peers: list[socket.socket] = []
            received: list[bytes] = []
            w = FakeWaiter(clock, inputs=[b"in"])
            w.on(Wait, _served_by(w, server, reply, peers, received), times=None)
            result = w.run(procs.start_run(target, [b"x"], {}, input=payload))
            with peers[0]:
                assert result.status is Status.SUCCESS
                assert len(w.of(NextInput)) == asked + (asked > 0)  # then the end
                if not asked:
                    assert received[0].startswith(V + b"-\nx\n\n" + payload)
                    assert received[0].endswith(end + payload if driver == "unix" else end)


def test_output_not_wanted_is_read_and_dropped(clock: FakeClock, short_dir: str) -> None:
    # read_output=False with a reply: the reply is read for its result code;
    # the output is neither collected nor handed to a caller who has no
    # callback for it (a flavour's Deliver answer needs one).
    target = UnixTarget(os.path.join(short_dir, "s"))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(target.path)
        listener.listen(1)
        peers: list[socket.socket] = []
        w = FakeWaiter(clock)
        w.on(Wait, _served_by(w, listener, b"out\n+\n", peers, []), times=None)
        result = run(w, target, [], {"read_output": False})
        with peers[0]:
            assert result == RunResult(Status.SUCCESS, output=None, target=target.label)
            assert not w.of(Deliver)


def test_noreply_without_output_sends_and_is_done(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.sends = [BlockingIOError()]
        conn, header = client(noreply=True, read_output=False)
        w = FakeWaiter(clock, inputs=[b"payload"])
        result = exchange(w, sock, conn, header, timeout=9.0)
        assert result == RunResult(Status.SUCCESS, output=None, target=LABEL)
        # Nothing is read: the blocked send waits for writability alone.
        assert w.requests[0] == Wait(write=(sock.fileno(),), timeout=9.0)
        assert w.kinds() == ["Wait", "NextInput", "NextInput"]
        peer.shutdown(socket.SHUT_WR)
        sock.close()
        assert read_all(peer) == header + b"payload"


def test_noreply_with_output_reads_to_the_end(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    conn, header = client(noreply=True)
    received: list[bytes] = []
    w = FakeWaiter(clock)
    w.on(Wait, reply_then(w, peer, b"printed", received))
    assert exchange(w, ours, conn, header) == RunResult(Status.SUCCESS, output=b"printed",
                                                        target=LABEL)
    assert received == [V + b"noreply\na\n\n"]


def test_partial_and_blocked_sends(clock: FakeClock,
                                   pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.sends = [3, 2, BlockingIOError()]
        conn, header = client()
        received: list[bytes] = []
        w = FakeWaiter(clock)
        w.on(Wait, reply_then(w, peer, b"+\n", received), when=lambda r: not r.write)
        assert exchange(w, sock, conn, header, timeout=4.0) == RunResult(Status.SUCCESS,
                                                                          target=LABEL,
                                                                          output=b"")
        assert sock.sent[:3] == [3, 2, len(header) - 5]
        assert received == [header]
        fd = sock.fileno()
        # Partial sends go on at once; a blocked one waits for either direction.
        assert w.requests[0] == Wait(read=(fd,), write=(fd,), timeout=4.0)
        assert w.kinds() == ["Wait", "NextInput", "Wait"]


def test_a_failed_write_still_counts_the_result_code(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.sends = [oserror(errno.EPIPE)]
        peer.sendall(b"early\n+\n")  # the script answered without reading
        peer.shutdown(socket.SHUT_WR)
        conn, header = client()
        w = FakeWaiter(clock, inputs=[b"never sent"])
        assert exchange(w, sock, conn, header) == RunResult(Status.SUCCESS, output=b"early\n",
                                                            target=LABEL)
        assert not w.of(NextInput)  # sending is over after a failed write
        assert read_all(peer) == b""  # and the connection was half-closed


def test_a_failed_write_without_a_result_code_is_an_io_failure(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.sends = [oserror(errno.ECONNRESET)]
        peer.shutdown(socket.SHUT_WR)  # and then no result code
        conn, header = client()
        w = FakeWaiter(clock, inputs=[b"payload"])
        assert exchange(w, sock, conn, header) == failure(
            ErrorKind.IO, f"write({LABEL}) failed: Connection reset by peer", output=b"")
        # noreply without output: the failure is the result at once.
        sock.sends = [oserror(errno.EPIPE)]
        conn, header = client(noreply=True, read_output=False)
        w = FakeWaiter(clock)
        assert exchange(w, sock, conn, header) == failure(
            ErrorKind.IO, f"write({LABEL}) failed: Broken pipe")
        assert w.requests == []


@pytest.mark.parametrize("lenient", [True, False])
def test_a_reset_after_the_result_code(clock: FakeClock, lenient: bool,
                                       pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    sock = Flaky(ours)
    with sock:
        sock.recvs = [b"out\n+\n", oserror(errno.ECONNRESET)]
        conn, header = client(lenient_reset=lenient)
        w = FakeWaiter(clock)
        result = exchange(w, sock, conn, header)
    if lenient:
        assert result == RunResult(Status.SUCCESS, output=b"out\n", target=LABEL)
    else:
        assert result == failure(ErrorKind.IO, "connection reset by peer", output=b"out\n")
    assert w.kinds() == ["NextInput"]  # the reset ended the reply: no wait


def test_a_read_error_is_an_io_failure(clock: FakeClock,
                                       pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    sock = Flaky(ours)
    with sock:
        sock.recvs = [b"partial ", oserror(errno.EIO)]
        conn, header = client()
        w = FakeWaiter(clock)
        # What may be a result code is held back: the output ends short of it.
        assert exchange(w, sock, conn, header) == failure(
            ErrorKind.IO, f"read({LABEL}) failed: Input/output error", output=b"partia")


def test_the_result_texts(clock: FakeClock) -> None:
    cases: list[tuple[bytes, RunResult]] = [
        (b"+\n", RunResult(Status.SUCCESS, output=b"", target=LABEL)),
        (b"x\n-\n", RunResult(Status.FAILURE, output=b"x\n", target=LABEL)),
        (b"out", failure(ErrorKind.PROTOCOL, "bad result code from the service: the reply "
                         "ends in b't', not in a result code line", output=b"ou")),
        (b"", failure(ErrorKind.PROTOCOL, "no result code received from the service",
                      output=b"")),
    ]
    for reply, expected in cases:
        ours, peer = socket.socketpair()
        with ours, peer:
            ours.setblocking(False)
            peer.sendall(reply)
            peer.shutdown(socket.SHUT_WR)
            conn, header = client()
            assert exchange(FakeWaiter(clock), ours, conn, header) == expected


def test_run_timeout_on_the_clock(clock: FakeClock,
                                  pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    expected = failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 5.0 s)", output=b"")
    # The reply never comes: the wait times out.
    conn, header = client()
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    assert exchange(w, ours, conn, header, timeout=5.0) == expected
    assert w.of(Wait) == [Wait(read=(ours.fileno(),), timeout=5.0)]
    # The caller's input took all the time: no wait at all.
    fresh, _peer = socket.socketpair()
    with fresh, _peer:
        fresh.setblocking(False)
        conn, header = client()
        w = FakeWaiter(clock).on(NextInput, advance_then(clock, 6.0, b"slow"))
        assert exchange(w, fresh, conn, header, timeout=5.0) == expected
        assert w.kinds() == ["NextInput"]


@pytest.mark.parametrize("at", [NextInput, Deliver])
def test_run_timeout_thrown_in(clock: FakeClock, at: type,
                               pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"output")
    conn, header = client()
    w = FakeWaiter(clock).on(at, Expired())
    result = exchange(w, ours, conn, header, timeout=5.0, collect=False)
    assert result == failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 5.0 s)")
    assert isinstance(w.requests[-1], at)
    if at is Deliver:
        assert w.of(Deliver) == [Deliver(b"outp", 5.0)]  # a result code may follow


def test_a_loop_that_never_waits_takes_turns(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    chunks = iter([b"a", b"b", b"c", None])
    received: list[bytes] = []
    w = FakeWaiter(clock).on(NextInput, advance_then(clock, 0.006, lambda r: next(chunks)),
                             times=None)
    w.on(Wait, reply_then(w, peer, b"+\n", received))
    conn = ClientConnection()
    assert exchange(w, ours, conn, conn.send(Request())) == RunResult(
        Status.SUCCESS, output=b"", target=LABEL)
    # A turn once 10 ms passed without a wait; none right before the wait.
    assert w.kinds() == ["NextInput", "NextInput", "Turn", "NextInput", "NextInput", "Wait"]
    assert received == [V + b"-\n\nabc"]


def test_a_quick_loop_takes_no_turn(clock: FakeClock,
                                    pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    received: list[bytes] = []
    w = FakeWaiter(clock, inputs=[b"x"] * 50)
    w.on(Wait, reply_then(w, peer, b"+\n", received))
    conn, header = client()
    exchange(w, ours, conn, header)
    assert not w.of(Turn)


# --- the fork driver --------------------------------------------------------------


def fork(path: str) -> ForkTarget:
    return ForkTarget(path)


def test_fork_feeds_input_and_collects_output(clock: FakeClock) -> None:
    w = FakeWaiter(clock, inputs=[b"abc", b"def"])
    result = run(w, fork("/bin/cat"), [], {"timeout": 10.0}, has_input=True)
    assert result == RunResult(Status.SUCCESS, output=b"abcdef", target="fork:/bin/cat",
                               returncode=0)
    assert [r.timeout for r in w.of(NextInput)] == [10.0] * 3
    last = w.requests[-1]
    assert isinstance(last, Wait) and w.for_child(last) and last.timeout == 10.0


def test_fork_delivers_output(clock: FakeClock) -> None:
    w = FakeWaiter(clock)
    result = run(w, fork("/bin/sh"), [b"-c", b"echo hi; exit 3"], {}, collect=False)
    assert result == RunResult(Status.FAILURE, ErrorKind.NONE,
                               "terminated with non-zero exit code 3", None, "fork:/bin/sh", 3)
    assert w.delivered == [b"hi\n"]
    assert all(r.timeout is None for r in w.of(Deliver))


def test_fork_without_output_or_input_only_waits_for_the_child(clock: FakeClock) -> None:
    w = FakeWaiter(clock)
    result = run(w, fork("/bin/true"), [], {"read_output": False})
    assert result == RunResult(Status.SUCCESS, target="fork:/bin/true", returncode=0)
    assert len(w.requests) == 1 and w.for_child(w.requests[0])


def test_fork_child_that_does_not_read_its_input(clock: FakeClock) -> None:
    # 1 MB does not fit in the pipe: the write blocks until /bin/true exits,
    # then fails with EPIPE; the rest of the input is not asked for.
    w = FakeWaiter(clock, inputs=[b"x" * (1 << 20), b"more"])
    result = run(w, fork("/bin/true"), [], {}, has_input=True)
    assert result == RunResult(Status.SUCCESS, output=b"", target="fork:/bin/true",
                               returncode=0)
    assert len(w.of(NextInput)) == 1


def test_fork_spawn_failure(clock: FakeClock) -> None:
    w = FakeWaiter(clock)
    result = run(w, fork("/nonexistent/program"), [], {}, has_input=True)
    assert result == RunResult(Status.FAILURE, ErrorKind.NONE,
                               "execvp(/nonexistent/program) failed: No such file or directory",
                               b"", "fork:/nonexistent/program", None)
    assert w.requests == []


# The trap is set before stdout closes: at EOF, SIGTERM is ignored for sure.
STUBBORN = [b"-c", b"trap '' TERM; exec sleep 60 >&-"]


def test_fork_run_timeout_then_sigterm_then_sigkill(clock: FakeClock) -> None:
    w = FakeWaiter(clock).on(Wait, timed_out(clock), when=lambda r: on_pidfd(r)
                             and r.timeout is not None, times=None)
    result = run(w, fork("/bin/sh"), STUBBORN, {"timeout": 2.0})
    assert result == failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 2.0 s)",
                             target="fork:/bin/sh", output=b"", returncode=-9)
    pidfd_waits = w.child_waits
    assert [r.timeout for r in pidfd_waits] == [2.0, KILL_TIMEOUT, None]
    assert clock.now == pytest.approx(1000.0 + 2.0 + KILL_TIMEOUT)


def test_fork_run_timeout_while_output_is_awaited(clock: FakeClock) -> None:
    # sleep keeps its stdout open: the wait for output is what times out.
    w = FakeWaiter(clock).on(Wait, timed_out(clock), when=lambda r: not on_pidfd(r))
    result = run(w, fork("/bin/sleep"), [b"60"], {"timeout": 2.0})
    assert result == failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 2.0 s)",
                             target="fork:/bin/sleep", output=b"", returncode=-signal.SIGTERM)
    first, term = w.of(Wait)
    assert first.timeout == 2.0 and not w.for_child(first)
    assert w.child_waits == [term] and term.timeout == KILL_TIMEOUT


def test_fork_run_timeout_while_the_caller_takes_the_output(clock: FakeClock) -> None:
    w = FakeWaiter(clock).on(Deliver, advance_then(clock, 5.0))
    result = run(w, fork("/bin/sh"), [b"-c", b"echo out; exec sleep 60"], {"timeout": 3.0},
                 collect=False)
    assert result == failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 3.0 s)",
                             target="fork:/bin/sh", returncode=-signal.SIGTERM)
    # No wait for more output once the deadline passed: the child is ended.
    assert w.requests[-2] == Deliver(b"out\n", 3.0)
    assert w.child_waits == [w.requests[-1]]


@pytest.mark.parametrize("at, args", [
    (NextInput, [b"-c", b"exec cat"]),
    (Deliver, [b"-c", b"echo out; exec sleep 60"]),  # still running after its output
])
def test_fork_run_timeout_thrown_in_terminates(clock: FakeClock, at: type,
                                               args: list[bytes]) -> None:
    w = FakeWaiter(clock).on(at, Expired())
    result = run(w, fork("/bin/sh"), args, {"timeout": 3.0}, collect=False,
                 has_input=at is NextInput)
    assert result == failure(ErrorKind.RUN_TIMEOUT, "execution timed out (> 3.0 s)",
                             target="fork:/bin/sh", returncode=-signal.SIGTERM)
    assert isinstance(w.requests[-2], at)
    last = w.requests[-1]
    assert isinstance(last, Wait) and w.for_child(last) and last.timeout == KILL_TIMEOUT


def test_fork_run_timeout_between_input_chunks(clock: FakeClock) -> None:
    # Input that keeps coming, 0.6 s a chunk, to a child that reads it all:
    # once the deadline passed no more is asked for, whatever the driver
    # does with the NextInput timeout.
    chunks = iter([b"x"] * 50)
    w = FakeWaiter(clock).on(NextInput, advance_then(clock, 0.6, lambda r: next(chunks, None)),
                             times=None)
    result = run(w, fork("/bin/cat"), [], {"timeout": 1.0, "read_output": False},
                 has_input=True)
    assert result.kind is ErrorKind.RUN_TIMEOUT and result.returncode == -signal.SIGTERM
    assert [r.timeout for r in w.of(NextInput)] == pytest.approx([1.0, 0.4])


def test_fork_takes_turns_while_feeding(clock: FakeClock) -> None:
    w = FakeWaiter(clock).on(NextInput, advance_then(clock, 0.02, b"x"), times=3)
    result = run(w, fork("/bin/cat"), [], {"read_output": False}, has_input=True)
    assert result.ok
    assert w.kinds()[:7] == ["NextInput", "Turn", "NextInput", "Turn", "NextInput", "Turn",
                             "NextInput"]


def test_fork_turns_while_output_keeps_coming(clock: FakeClock) -> None:
    w = FakeWaiter(clock).on(Deliver, advance_then(clock, 0.02), times=None)
    result = run(w, fork("/bin/sh"), [b"-c", b"head -c 2000000 /dev/zero"], {},
                 collect=False)
    assert result.ok
    assert w.of(Turn)


def test_fork_cancellation_kills_and_reaps_at_once(clock: FakeClock) -> None:
    w = FakeWaiter(clock).on(Wait, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(w, fork("/bin/sleep"), [b"60"], {"read_output": False})
    assert len(w.requests) == 1  # no wait for the child: the fixture sees it reaped


def test_fork_caller_error_kills_the_child(clock: FakeClock) -> None:
    def broken(request: NextInput) -> bytes:
        raise ValueError("input broke")

    w = FakeWaiter(clock).on(NextInput, broken)
    with pytest.raises(ValueError, match="input broke"):
        run(w, fork("/bin/cat"), [], {}, has_input=True)


def test_fork_pidfd_open_failure_reaps_the_child(clock: FakeClock,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise oserror(errno.EMFILE)

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    w = FakeWaiter(clock)
    result = run(w, fork("/bin/sleep"), [b"60"], {}, has_input=True)
    assert result == failure(ErrorKind.OTHER, "pidfd_open() failed: Too many open files",
                             target="fork:/bin/sleep", output=b"")
    assert w.requests == []


# --- service: header ----------------------------------------------------------------


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger="procedures.test")
    return logging.getLogger("procedures.test")


def config(logger: logging.Logger, script: bytes = b"/bin/cat", *args: bytes,
           **options: Any) -> ServiceConfig:
    options.setdefault("header_timeout", 4.0)
    return ServiceConfig(script=script, script_args=args, logger=logger, **options)


def read_header(waiter: FakeWaiter, sock: socket.socket,
                cfg: ServiceConfig) -> tuple[ServiceConnection, ScriptRequest]:
    return waiter.run(procs.read_header(sock, cfg))


def test_read_header_consumes_exactly_the_header(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    header = V + b"-\narg\n\n"
    peer.sendall(header[:10])

    def rest(request: Wait) -> bool:
        peer.sendall(header[10:] + b"payload")
        return w.poll(request)

    w = FakeWaiter(clock).on(Wait, rest)
    _, request = read_header(w, ours, config(logger))
    assert request.args == (b"arg",) and request.header_size == len(header)
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=4.0)]
    assert ours.recv(100) == b"payload"  # left for the script


def test_read_header_consumes_a_piece_at_a_time(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.recvs = [PASS, 4]  # the peek, then a short read while consuming
        peer.sendall(V + b"-\n\npayload")
        read_header(FakeWaiter(clock), sock, config(logger))
        assert sock.recv(100) == b"payload"


def test_read_header_passthrough_reads_nothing(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    w = FakeWaiter(clock)
    _, request = read_header(w, ours, config(logger, passthrough=True))
    assert request.passthrough and request.header_size == 0
    assert w.requests == []
    assert ours.recv(100) == V + b"-\n\n"  # the script reads the raw request


def test_read_header_times_out(clock: FakeClock, logger: logging.Logger,
                               pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    with pytest.raises(procs._HeaderTimeout):
        read_header(w, ours, config(logger))
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=4.0)]
    # Bytes trickle in until the deadline passed: no wait after it.
    peer.sendall(b"V")
    w = FakeWaiter(clock).on(Wait, advance_then(clock, 4.0, True))
    with pytest.raises(procs._HeaderTimeout):
        read_header(w, ours, config(logger))
    assert len(w.requests) == 1


def test_read_header_disconnect_while_consuming(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        sock.recvs = [PASS, b""]
        peer.sendall(V + b"-\n\n")
        with pytest.raises(RemoteProtocolError, match="disconnected while the header"):
            read_header(FakeWaiter(clock), sock, config(logger))


# --- service: the script, the reply, the close ------------------------------------


def serve(waiter: FakeWaiter, sock: socket.socket, cfg: ServiceConfig) -> str:
    """Read the header, then run the script: its how-it-went text."""
    svc, request = read_header(waiter, sock, cfg)
    return waiter.run(procs.run_script(sock, svc, request, cfg, Job(cancel=lambda: None)))


def test_run_script_inline_replies_and_closes(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"-\n\npayload")
    peer.shutdown(socket.SHUT_WR)
    w = FakeWaiter(clock)
    assert serve(w, ours, config(logger)) == "exit 0"
    assert read_all(peer) == b"payload+\n"
    wait, = w.requests  # the drain found EOF at once: no wait
    assert isinstance(wait, Wait) and w.for_child(wait) and wait.timeout is None


def test_run_script_spawns_in_place(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    # A thread hop per spawn cost more than the spawn blocks the loop.
    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    peer.shutdown(socket.SHUT_WR)
    w = FakeWaiter(clock)
    assert serve(w, ours, config(logger, b"/bin/sh", b"-c", b"exit 4")) == "exit 4"
    assert not w.of(Offload)
    assert read_all(peer) == b"-\n"


def test_run_script_spawn_failure(clock: FakeClock, logger: logging.Logger,
                                  caplog: pytest.LogCaptureFixture,
                                  pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    peer.shutdown(socket.SHUT_WR)
    w = FakeWaiter(clock)
    assert serve(w, ours, config(logger, b"/nonexistent/script")) == "not started"
    assert read_all(peer) == b"-\n"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "execvp(/nonexistent/script) failed: No such file or directory")]
    assert w.requests == []


def test_run_script_alarm_terminates(clock: FakeClock, logger: logging.Logger,
                                     pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"alarm=3\n-\n\n")
    peer.shutdown(socket.SHUT_WR)
    w = FakeWaiter(clock).on(Wait, timed_out(clock), when=lambda r: r.timeout == 3)
    how = serve(w, ours, config(logger, b"/bin/sleep", b"60", kill_timeout=7.0))
    assert how == "alarm 3 s expired, killed by signal 15"
    assert [r.timeout for r in w.of(Wait)] == [3, 7.0]
    assert w.child_waits == w.of(Wait)
    assert read_all(peer) == b"-\n"


def test_run_script_cancelled_kills_and_reaps(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    job = Job(cancel=lambda: None)
    w = FakeWaiter(clock).on(Wait, KeyboardInterrupt())
    cfg = config(logger, b"/bin/sleep", b"60")
    svc, request = read_header(w, ours, cfg)
    with pytest.raises(KeyboardInterrupt):
        w.run(procs.run_script(ours, svc, request, cfg, job))
    assert job.pidfd is None


def test_run_script_pidfd_open_failure_reaps_the_script(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, pair: tuple[socket.socket, socket.socket]) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise oserror(errno.EMFILE)

    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    w = FakeWaiter(clock)
    job = serve_connection(w, ours, config(logger, b"/bin/sleep", b"60"))
    # The script was killed and reaped at once (the leak check sees no child)
    # and the client gets a failure, as when the script cannot start.
    assert job.pidfd is None and ours.getblocking()
    lines = log_lines(caplog)
    assert lines[0] == (logging.ERROR, "pidfd_open() failed: Too many open files")
    assert "args=[] killed: cannot be waited for duration=" in lines[1][1]
    assert read_all(peer) == b"-\n"


def test_the_reply_has_a_time_limit(clock: FakeClock, logger: logging.Logger,
                                    pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    sock = Flaky(ours)
    with sock:
        peer.sendall(V + b"-\n\n")
        sock.sends = [BlockingIOError()]
        w = FakeWaiter(clock).on(Wait, timed_out(clock), when=lambda r: bool(r.write))
        how = serve(w, sock, config(logger, b"/bin/true"))
        assert how == "exit 0, client does not read: no reply sent"
        assert w.requests[-1] == Wait(write=(sock.fileno(),), timeout=4.0)
        # Time ran out while waiting: no second wait.
        peer.sendall(V + b"-\n\n")
        sock.sends = [BlockingIOError(), BlockingIOError()]
        w = FakeWaiter(clock).on(Wait, advance_then(clock, 5.0, True),
                                 when=lambda r: bool(r.write))
        assert serve(w, sock, config(logger, b"/bin/true")).endswith(
            ", client does not read: no reply sent")
        assert len([r for r in w.of(Wait) if r.write]) == 1


def test_a_client_gone_before_the_reply(clock: FakeClock, logger: logging.Logger,
                                        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(V + b"-\n\n")
    peer.close()
    w = FakeWaiter(clock)
    assert serve(w, ours, config(logger, b"/bin/true")) == "exit 0, client gone: Broken pipe"
    assert len(w.requests) == 1  # the child; no drain without a result code


def test_close_gently_drains_until_the_client_closes(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"unread payload")

    def client_closes(request: Wait) -> bool:
        peer.shutdown(socket.SHUT_WR)
        return w.poll(request)

    w = FakeWaiter(clock).on(Wait, client_closes)
    w.run(procs.close_gently(ours, 2.5))
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=2.5)]
    assert peer.recv(10) == b""  # half-closed first


def test_close_gently_is_bounded(clock: FakeClock,
                                 pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    w.run(procs.close_gently(ours, 2.5))
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=2.5)]
    # A socket already gone: nothing to do, nothing raised.
    ours.close()
    FakeWaiter(clock).run(procs.close_gently(ours, 2.5))


# --- service: one connection, one log line ------------------------------------------


def serve_connection(waiter: FakeWaiter, sock: socket.socket, cfg: ServiceConfig) -> Job:
    job = Job(cancel=lambda: None)
    waiter.run(procs.serve_connection(sock, "peer", cfg, job))
    return job


def log_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_serve_connection_logs_a_good_request(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    ours.setblocking(True)  # as accept() gives it: serve_connection leaves the mode alone
    peer.sendall(V + b"-\nsome\targ\n\n")
    peer.shutdown(socket.SHUT_WR)
    w = FakeWaiter(clock)
    w.on(Wait, advance_then(clock, 1.25, w.poll), when=on_pidfd)
    job = serve_connection(w, ours, config(logger, b"/bin/true"))
    assert not job.reading_header and ours.getblocking()
    assert log_lines(caplog) == [
        (logging.INFO, "peer: args=[some\\targ] exit 0 duration=1.250s")]
    assert read_all(peer) == b"+\n"


def test_serve_connection_bad_header(clock: FakeClock, logger: logging.Logger,
                                     caplog: pytest.LogCaptureFixture,
                                     pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"HELLO\n\n")
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    job = serve_connection(w, ours, config(logger, header_timeout=4.0))
    assert job.reading_header
    assert log_lines(caplog) == [
        (logging.WARNING, "peer: Client not compatible with this binary (connecting to wrong "
                          "socket?): first line b'HELLO'")]
    # Half-closed, then drained for at most a second (the header timeout is longer).
    assert peer.recv(10) == b""
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=1.0)]


def test_serve_connection_bad_header_drain_bound(
        clock: FakeClock, logger: logging.Logger,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"HELLO\n")
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    serve_connection(w, ours, config(logger, header_timeout=0.5))
    assert w.requests == [Wait(read=(ours.fileno(),), timeout=0.5)]


def test_serve_connection_bare_connect_is_a_debug_line(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.shutdown(socket.SHUT_WR)
    serve_connection(FakeWaiter(clock), ours, config(logger))
    (level, message), = log_lines(caplog)
    assert level == logging.DEBUG and message.startswith(
        "peer: disconnected before the end of the header (0 bytes")


def test_serve_connection_header_timeout(clock: FakeClock, logger: logging.Logger,
                                         caplog: pytest.LogCaptureFixture,
                                         pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    w = FakeWaiter(clock).on(Wait, timed_out(clock))
    serve_connection(w, ours, config(logger))
    assert log_lines(caplog) == [(logging.WARNING, "peer: header not received within 4.0 s")]
    assert len(w.requests) == 1  # no drain


@pytest.mark.parametrize("error, line", [
    (oserror(errno.EIO), (logging.WARNING, "peer: [Errno 5] Input/output error")),
    (ValueError("boom"), (logging.ERROR, "peer: unexpected error")),
])
def test_serve_connection_errors_are_one_line(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        pair: tuple[socket.socket, socket.socket], error: Exception,
        line: tuple[int, str]) -> None:
    ours, _ = pair
    sock = Flaky(ours)
    with sock:
        sock.recvs = [error]
        serve_connection(FakeWaiter(clock), sock, config(logger))
    assert log_lines(caplog) == [line]
    if isinstance(error, ValueError):
        assert caplog.records[0].exc_info is not None


def test_serve_connection_lets_cancellation_through(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    with pytest.raises(KeyboardInterrupt):
        serve_connection(FakeWaiter(clock).on(Wait, KeyboardInterrupt), ours, config(logger))
    assert caplog.records == []


# --- service: accept --------------------------------------------------------------


@pytest.fixture
def unix_listener(short_dir: str) -> Iterator[tuple[socket.socket, str]]:
    path = os.path.join(short_dir, "l")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(4)
        listener.setblocking(False)
        yield listener, path


def test_accept_waits_for_a_client(clock: FakeClock, logger: logging.Logger,
                                   unix_listener: tuple[socket.socket, str]) -> None:
    listener, path = unix_listener
    clients: list[socket.socket] = []

    def a_client_comes(request: Wait) -> bool:
        clients.append(socket.socket(socket.AF_UNIX))
        clients[0].connect(path)
        return w.poll(request)

    w = FakeWaiter(clock).on(Wait, a_client_comes, when=lambda r: r.timeout is None)
    try:
        conn, peer = w.run(procs.accept([(listener, path)], config(logger)))
        conn.close()
        assert peer == f"unix:{path}"
        assert w.requests == [Wait(read=(listener.fileno(),))]
    finally:
        for sock in clients:
            sock.close()


def test_accept_logs_failures_and_retries(
        clock: FakeClock, logger: logging.Logger, caplog: pytest.LogCaptureFixture,
        tcp_listener: socket.socket) -> None:
    tcp_listener.setblocking(False)
    sock = Flaky(tcp_listener)
    with sock, socket.create_connection(sock.getsockname()) as remote:
        sock.accepts = [oserror(errno.EMFILE), ConnectionAbortedError()]
        w = FakeWaiter(clock)
        got = w.run(procs.accept([(sock, ("127.0.0.1", 0))], config(logger)))
        assert got is not None
        conn, peer = got
        with conn:
            assert peer == f"127.0.0.1:{remote.getsockname()[1]}"
        # EMFILE: logged, a 0.1 s pause; an aborted connection: wait for the next.
        assert w.requests == [Wait(timeout=0.1)] + [Wait(read=(sock.fileno(),))] * 2
        assert log_lines(caplog) == [
            (logging.ERROR, "accept() failed: [Errno 24] Too many open files")]


# --- service: the accepting plan of the services that step procedures -----------------


class Starts:
    """A flavour's ``start`` for :class:`procs.Serving`: it records, the test drives."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, Callable[[Any], object]]] = []
        self.cancelled: list[Any] = []

    def __call__(self, procedure: Any, done: Callable[[Any], object]) -> Callable[[], object]:
        self.started.append((procedure, done))

        def cancel() -> None:
            self.cancelled.append(procedure)
            procedure.close()
        return cancel

    def names(self) -> list[str]:
        return [procedure.__name__ for procedure, _ in self.started]


def test_serving_accepts_while_a_slot_is_free(
        clock: FakeClock, logger: logging.Logger, short_dir: str) -> None:
    path = os.path.join(short_dir, "s")
    cfg = config(logger, max_connections=2)
    starts, idle = Starts(), []
    serving = procs.Serving(Listeners([UnixListener(path)], cfg), cfg, starts,
                            lambda: idle.append(True))
    clients: list[socket.socket] = []
    try:
        serving.begin()
        for _ in range(2):
            assert starts.names()[-1] == "accept"
            accept, accepted = starts.started[-1]
            clients.append(socket.socket(socket.AF_UNIX))
            clients[-1].connect(path)
            accepted(FakeWaiter(clock).run(accept))
        # Two connections, no slot left: nothing accepts (clients wait in the backlog).
        assert starts.names() == ["accept", "serve_connection", "accept", "serve_connection"]
        assert len(serving.jobs) == 2 and len(serving.sockets) == 2
        first, second = starts.started[1][1], starts.started[3][1]
        first(None)  # a connection ends: its slot is free, accepting starts again
        assert starts.names()[-1] == "accept" and len(starts.started) == 5
        assert len(serving.jobs) == 1 and idle == []
        second(None)
        assert idle == [True] and not serving.sockets
        starts.started[-1][1](None)  # an accept() that raised: nothing to start
        assert len(starts.started) == 5
        serving.begin()
        serving.stop()  # cancels the waiting accept, closes the listeners
        assert starts.cancelled == [starts.started[-1][0]]
        assert not os.path.exists(path)
        serving.stop()
        assert len(starts.cancelled) == 1
    finally:
        for procedure, _ in starts.started:
            procedure.close()
        for sock in clients:
            sock.close()
        serving.listeners.close()


# --- service: jobs and the stop plan -------------------------------------------------


def test_jobs_signal_scripts_through_their_pidfds() -> None:
    pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], {})
    jobs = Jobs()
    running, reading = Job(cancel=lambda: None), Job(cancel=lambda: None)
    running.pidfd = os.pidfd_open(pid)
    try:
        jobs.add(running)
        jobs.add(reading)
        jobs.signal_scripts(signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
        jobs.signal_scripts(signal.SIGKILL)  # reaped: nothing to signal, no error
    finally:
        os.close(running.pidfd)
    assert len(jobs) == 2


def test_jobs_cancel_header_readers_or_all() -> None:
    cancelled: list[str] = []

    def canceller(name: str) -> Callable[[], None]:
        def cancel() -> None:
            cancelled.append(name)
            if name == "broken":
                raise oserror(errno.ENOTCONN)
        return cancel

    jobs = Jobs()
    header, script, broken, done = (Job(canceller(n)) for n in ("header", "script", "broken",
                                                                 "done"))
    script.reading_header = False
    for job in (header, script, broken, done):
        jobs.add(job)
    jobs.discard(done)
    jobs.cancel(header_only=True)
    assert sorted(cancelled) == ["broken", "header"]
    cancelled.clear()
    jobs.cancel(header_only=False)
    assert sorted(cancelled) == ["broken", "header", "script"]


class _Recorded(Jobs):
    def __init__(self, events: list[object]) -> None:
        super().__init__()
        self.events = events

    def signal_scripts(self, signum: int) -> None:
        self.events.append(("signal", signum))
        super().signal_scripts(signum)


@pytest.fixture
def stop_plan(logger: logging.Logger) -> tuple[_Recorded, list[object], ServiceConfig]:
    events: list[object] = []
    jobs = _Recorded(events)
    def canceller(name: str) -> Callable[[], None]:
        return lambda: events.append(("cancel", name))

    for name, reading in (("header", True), ("script", False)):
        job = Job(cancel=canceller(name))
        job.reading_header = reading
        jobs.add(job)
    return jobs, events, config(logger, grace=2.0, kill_timeout=3.0, header_timeout=4.0)


def _recording(events: list[object], answer: Callable[[WaitJobs], Any]
               ) -> Callable[[WaitJobs], Any]:
    def record(request: WaitJobs) -> Any:
        events.append(("wait", request.timeout))
        return answer(request)
    return record


def _everyone_leaves(jobs: Jobs) -> Callable[[WaitJobs], bool]:
    def leave(request: WaitJobs) -> bool:
        for job in list(jobs._jobs):
            jobs.discard(job)
        return True
    return leave


def _sweeps(events: list[object]) -> list[object]:
    """The events, each run of cancels as one set (jobs are cancelled in no set order)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, tuple) and event[0] == "cancel":
            if out and isinstance(out[-1], frozenset):
                out[-1] = out[-1] | {event[1]}
            else:
                out.append(frozenset({event[1]}))
        else:
            out.append(event)
    return out


def test_wind_down_every_step_in_order(
        clock: FakeClock, stop_plan: tuple[_Recorded, list[object], ServiceConfig]) -> None:
    jobs, events, cfg = stop_plan
    w = FakeWaiter(clock)
    w.on(WaitJobs, _recording(events, _everyone_leaves(jobs)), when=lambda r: r.timeout is None)
    w.on(WaitJobs, _recording(events, timed_out(clock)), times=None)
    w.run(procs.wind_down(jobs, cfg))
    assert _sweeps(events) == [
        ("wait", 2.0),  # grace
        {"header"}, ("signal", signal.SIGTERM),
        ("wait", 3.0),  # kill_timeout
        ("signal", signal.SIGKILL),
        ("wait", 5.0),  # the bounded drain: header_timeout + 1
        {"header", "script"},
        ("wait", None),
    ]
    assert clock.now == pytest.approx(1010.0)


def test_wind_down_stops_waiting_once_jobs_are_done(
        clock: FakeClock, stop_plan: tuple[_Recorded, list[object], ServiceConfig]) -> None:
    jobs, events, cfg = stop_plan
    w = FakeWaiter(clock).on(WaitJobs, _recording(events, _everyone_leaves(jobs)))
    w.run(procs.wind_down(jobs, cfg))
    assert events == [("wait", 2.0), ("signal", signal.SIGTERM), ("signal", signal.SIGKILL)]
    # No connection at all: not a single wait.
    w = FakeWaiter(clock)
    w.run(procs.wind_down(Jobs(), cfg))
    assert w.requests == []


def test_wind_down_cancelled_skips_the_waits_and_reraises_at_the_end(
        clock: FakeClock, stop_plan: tuple[_Recorded, list[object], ServiceConfig]) -> None:
    jobs, events, cfg = stop_plan
    first, second = KeyboardInterrupt("first"), KeyboardInterrupt("second")

    def cancelled(by: BaseException) -> Callable[[WaitJobs], bool]:
        def answer(request: WaitJobs) -> bool:
            raise by
        return answer

    w = FakeWaiter(clock)
    w.on(WaitJobs, _recording(events, cancelled(first)))  # during the grace
    w.on(WaitJobs, _recording(events, cancelled(second)))  # while the last jobs end
    w.on(WaitJobs, _recording(events, _everyone_leaves(jobs)))
    with pytest.raises(KeyboardInterrupt) as raised:
        w.run(procs.wind_down(jobs, cfg))
    assert raised.value is first  # a second cancellation does not replace it
    assert _sweeps(events) == [
        ("wait", 2.0),
        {"header"}, ("signal", signal.SIGTERM), ("signal", signal.SIGKILL),
        {"header", "script"},
        ("wait", None), ("wait", None),
    ]
    assert clock.now == 1000.0


def test_wind_down_can_be_closed(
        clock: FakeClock, stop_plan: tuple[_Recorded, list[object], ServiceConfig]) -> None:
    # A driver that drops the plan (its task destroyed) closes the generator:
    # it ends there, it does not take GeneratorExit for a cancellation.
    jobs, _, cfg = stop_plan
    for waits in (0, 3):
        plan = procs.wind_down(jobs, cfg)
        request = next(plan)
        for _ in range(waits):
            request = plan.send(False)
        assert request == WaitJobs(None if waits else 2.0)
        plan.close()


def test_wind_down_cancelled_at_the_last_wait(
        clock: FakeClock, stop_plan: tuple[_Recorded, list[object], ServiceConfig]) -> None:
    jobs, _, cfg = stop_plan
    w = FakeWaiter(clock)
    w.on(WaitJobs, KeyboardInterrupt, when=lambda r: r.timeout is None)
    w.on(WaitJobs, _everyone_leaves(jobs), when=lambda r: r.timeout is None)
    w.on(WaitJobs, timed_out(clock), times=None)
    with pytest.raises(KeyboardInterrupt):
        w.run(procs.wind_down(jobs, cfg))
    assert [r.timeout for r in w.of(WaitJobs)] == [2.0, 3.0, 5.0, None, None]


# --- the processes' helpers ---------------------------------------------------------


def test_wait_child_and_terminate(clock: FakeClock) -> None:
    pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], {})
    pidfd = os.pidfd_open(pid)
    try:
        w = FakeWaiter(clock).on(Wait, timed_out(clock))
        assert w.run(procs.wait_child(pid, pidfd, 1.5)) is None
        assert w.requests == [Wait(read=(pidfd,), timeout=1.5)]
        w = FakeWaiter(clock)
        assert w.run(procs.terminate(pid, pidfd, 9.0)) == -signal.SIGTERM
        assert w.requests == [Wait(read=(pidfd,), timeout=9.0)]
        procs.kill_and_reap(pid, pidfd)  # already reaped: no error
    finally:
        os.close(pidfd)


def test_drive_answers_and_throws_in() -> None:
    # The one driver loop of every flavour: answers by request type, an
    # answer's error thrown in, the procedure's value returned.
    def procedure() -> procs.Procedure[str]:
        first = yield Wait(timeout=1.0)
        try:
            yield NextInput()
        except Expired:
            return f"{first} then expired"
        raise AssertionError("not thrown in")  # pragma: no cover

    async def wait(request: Wait) -> str:
        return "waited"

    async def expire(request: NextInput) -> None:
        raise Expired

    coroutine = procs.drive(procedure(), {Wait: wait, NextInput: expire})
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    assert done.value.value == "waited then expired"


def test_the_fake_waiter_reports_a_wait_without_end(clock: FakeClock) -> None:
    def sleep_forever() -> procs.Procedure[None]:
        yield Wait()

    def keep_waiting() -> procs.Procedure[None]:
        while True:
            with contextlib.suppress(Stuck):
                yield WaitJobs(None)

    with pytest.raises(Stuck):
        FakeWaiter(clock).run(sleep_forever())
    with pytest.raises(Stuck):  # not thrown in: a loop that swallows it still ends
        FakeWaiter(clock).run(keep_waiting())
    with pytest.raises(Stuck, match="more than 5 requests"):
        FakeWaiter(clock, limit=5).on(WaitJobs, True, times=None).run(keep_waiting())


# --- the driver, the pull-based stream and a run's answers ---------------------


def complete(coroutine: Any) -> Any:
    """Run a coroutine whose awaits never suspend (as the blocking flavour does)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine suspended")  # pragma: no cover


async def _no_wait(request: Wait) -> bool:
    return True


def test_drive_without_an_answer_for_a_request_fails_loudly() -> None:
    def procedure() -> procs.Procedure[None]:
        yield Deliver(b"x")

    with pytest.raises(AssertionError, match="no answer for Deliver"):
        complete(procs.drive(procedure(), {Wait: _no_wait}))


def _chatty(cleaned: list[str], fail: bool = False) -> procs.Procedure[RunResult]:
    try:
        yield Wait(timeout=1.0)
        yield Deliver(b"one")
        yield Deliver(b"two")
        if fail:
            raise ValueError("the input broke")
        return RunResult(Status.SUCCESS, target=LABEL)
    finally:
        cleaned.append("cleaned")


def test_run_stream_pulls_chunk_by_chunk_then_the_result() -> None:
    cleaned: list[str] = []
    stream = procs.RunStream(_chatty(cleaned), {Wait: _no_wait})

    async def consume() -> list[bytes]:
        chunks = []
        async with stream:
            assert cleaned == []  # entering started the run: it waits on its first chunk
            async for chunk in stream:
                chunks.append(chunk)
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
        return chunks

    assert complete(consume()) == [b"one", b"two"]
    assert stream.result == RunResult(Status.SUCCESS, target=LABEL)
    assert cleaned == ["cleaned"]


def test_run_stream_left_early_abandons_the_run() -> None:
    cleaned: list[str] = []
    stream = procs.RunStream(_chatty(cleaned), {Wait: _no_wait})

    async def consume() -> None:
        async with stream:
            async for chunk in stream:
                assert chunk == b"one"
                break

    complete(consume())
    assert cleaned == ["cleaned"]
    assert stream.result is None


def test_run_stream_raises_the_runs_error_from_the_iteration() -> None:
    cleaned: list[str] = []
    stream = procs.RunStream(_chatty(cleaned, fail=True), {Wait: _no_wait})

    async def consume() -> None:
        async with stream:
            async for _ in stream:
                pass

    with pytest.raises(ValueError, match="the input broke"):
        complete(consume())
    assert cleaned == ["cleaned"] and stream.result is None


def test_run_stream_raises_an_error_of_its_first_step_from_the_iteration() -> None:
    def broken() -> procs.Procedure[RunResult]:
        raise ValueError("at once")
        yield Wait()  # pragma: no cover

    stream = procs.RunStream(broken(), {})

    async def enter_then_iterate() -> None:
        async with stream:  # entering does not raise it
            with pytest.raises(ValueError, match="at once"):
                await stream.__anext__()

    complete(enter_then_iterate())


def test_run_stream_misuse() -> None:
    stream = procs.RunStream(_chatty([]), {Wait: _no_wait})
    with pytest.raises(RuntimeError, match="inside its async with block"):
        complete(stream.__anext__())
    complete(stream.__aenter__())
    with pytest.raises(RuntimeError, match="entered once"):
        complete(stream.__aenter__())
    complete(stream.__aexit__(None, None, None))
    assert stream.__aiter__() is stream


def test_run_stream_marks_itself_over_when_a_step_is_cancelled() -> None:
    class Cancelled(BaseException):
        pass

    async def cancelled(request: Wait) -> bool:
        raise Cancelled

    cleaned: list[str] = []
    stream = procs.RunStream(_chatty(cleaned), {Wait: cancelled})
    with pytest.raises(Cancelled):
        complete(stream.__aenter__())
    assert cleaned == ["cleaned"]
    with pytest.raises(StopAsyncIteration):
        complete(stream.__anext__())
    complete(stream.__aexit__(None, None, None))  # nothing left to abandon


async def _within(awaitable: Any, timeout: float | None) -> Any:
    if timeout is not None and timeout <= 0:
        awaitable.close()  # as a flavour's timeout cancels it
        raise Expired
    return await awaitable


def test_run_answers_for_each_kind_of_input_and_output() -> None:
    delivered: list[bytes] = []

    async def stored(data: bytes) -> None:
        delivered.append(data)

    async def chunks() -> Any:
        for chunk in (b"a", b"", bytearray(b"b")):
            yield chunk

    answers = procs.run_answers({Wait: _no_wait}, chunks(), stored, _within)
    assert set(answers) == {Wait, NextInput, Deliver}
    next_input = answers[NextInput]
    assert [complete(next_input(NextInput())) for _ in range(3)] == [b"a", b"b", None]
    complete(answers[Deliver](Deliver(b"out")))
    assert delivered == [b"out"]
    with pytest.raises(Expired):
        complete(answers[Deliver](Deliver(b"late", timeout=0.0)))

    # A file read by the flavour's own reader (a worker thread in trio);
    # without an output callback there is no Deliver answer (open_run).
    reads: list[int] = []

    async def read(function: Callable[[int], bytes], size: int) -> bytes:
        reads.append(size)
        return function(size)

    file = io.BytesIO(b"file")
    answers = procs.run_answers({}, file, None, _within, read=read)
    assert Deliver not in answers
    assert [complete(answers[NextInput](NextInput())) for _ in range(2)] == [b"file", None]
    assert reads == [CHUNK, CHUNK]

    # Plain bytes, iterated where the driver runs; output that is not awaitable.
    answers = procs.run_answers({}, b"xy", delivered.append, _within)
    assert complete(answers[NextInput](NextInput())) == b"xy"
    assert complete(answers[NextInput](NextInput())) is None
    complete(answers[Deliver](Deliver(b"sync")))
    assert delivered[-1] == b"sync"


def test_start_run_with_an_output_callback_reads_the_output(
        clock: FakeClock, short_dir: str) -> None:
    # read_output=False is overridden: whoever passes a callback wants it.
    path = os.path.join(short_dir, "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        procedure = procs.start_run(UnixTarget(path), [], {"read_output": False},
                                    input=None, output=lambda data: None)
        waiter = FakeWaiter(clock)
        with contextlib.suppress(Stuck):
            waiter.run(procedure)
        # The request header asks for a reply: the callback's output is read.
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(100) == b"VERSION\tscript\t4\t0\n-\n\n"
