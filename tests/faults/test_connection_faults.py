"""The connection or the address misbehaves: documented outcomes, in bounded time.

Outcomes:

* The peer vanishes mid-reply (a reset): the script's next write fails and it
  ends at once; the service reaps it and goes on serving.
* The unix socket file is removed: running connections finish; new clients
  get ENOENT (IO) at once; stop() does not fail.
* A tcp name with refusing or black-holed addresses: the client tries each in
  resolver order with an equal share of what is left of the connect timeout,
  so it reaches the live one within that timeout.

The multi-address cases resolve a name with a fake ``socket.getaddrinfo``
(every flavour's client calls it), and once through the real resolver with
a unique name added to ``/etc/hosts`` (root only; restored afterwards).
All addresses are loopback (127.0.0.0/8 is all loopback on Linux).  A
black-holed address is a listener whose backlog is full: its SYNs go
unanswered.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execproto import ErrorKind, Status
from execproto.adapters import RunResult, TcpListener, UnixListener

from ..adapters.flavours import (
    SOCKET_DRIVERS,
    Flavour,
    LogCapture,
    connect_raw,
    read_reply,
    sh_script,
    target_of,
    wait_for_file,
)
from .helpers import black_hole, fake_resolver, is_refused, note, read_pid, reaped_within, timed

V = b"VERSION\tscript\t4\t0\n"
BOUND = 10.0


# --- the peer vanishes ------------------------------------------------------------------------


@SOCKET_DRIVERS
def test_peer_vanishes_mid_reply(flavour: Flavour, driver: str, tmp_path: Path) -> None:
    """A client resets the connection while 32 MB of output are on the way.

    The script's next write fails (EPIPE/ECONNRESET), so it ends at once; the
    service reaps it, cannot send a result code, and keeps serving.
    """
    pidfile = tmp_path / "pid"
    done = "printf 'ok\\r\\n.\\r\\n'" if driver == "tcp" else "echo ok"
    script = sh_script(tmp_path, "big", f"[ \"$1\" = alive ] && {{ {done}; exit 0; }}\n"
                       f"echo $$ > {pidfile}\nexec /usr/bin/head -c 33554432 /dev/zero\n")
    log = LogCapture()
    listener = UnixListener(str(tmp_path / "sock")) if driver == "unix" else \
        TcpListener("127.0.0.1", 0)
    with flavour.serving([listener], script, logger=log.logger) as addresses:
        address = addresses[0]
        sock = connect_raw(address)
        try:
            sock.sendall(V + b"-\nbig\n\n")
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while received < 256 * 1024:
                chunk = sock.recv(65536)
                assert chunk, "the reply ended early"
                received += len(chunk)
            pid = read_pid(pidfile)
            # SO_LINGER 0: close() sends a reset, like a crashed client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
        ended = reaped_within(pid, 5.0)
        logged = log.wait_for(lambda m: True)
        result = flavour.run(target_of(address), ["alive"], timeout=BOUND)
    note(f"peer resets mid-reply / {flavour.name} {driver}: script ended "
         f"{ended if ended is None else round(ended, 2)} s later; log {logged[:1]}; "
         f"next client {result.status.name}")
    assert ended is not None, "the script outlived its client by 5 s"
    assert result.status is Status.SUCCESS, result
    assert result.output == (b"ok" if driver == "tcp" else b"ok\n")


# --- the unix socket file is removed ---------------------------------------------------------


def test_socket_file_removed_under_running_service(flavour: Flavour, tmp_path: Path) -> None:
    """``rm`` of the socket file: the running client is answered, new clients get ENOENT.

    The listening socket itself lives on (only its name is gone), so the
    service notices nothing; stopping it does not fail on the missing file.
    """
    path = str(tmp_path / "sock")
    started = tmp_path / "started"
    script = sh_script(tmp_path, "slow", f"echo > {started}\n/bin/sleep 0.5\necho done\n")
    with flavour.serving([UnixListener(path)], script):
        with connect_raw(path) as running:
            running.sendall(V + b"-\n\n")
            running.shutdown(socket.SHUT_WR)
            assert wait_for_file(started)
            os.unlink(path)
            with timed() as clock:
                result = flavour.run(f"unix:{path}", connect_timeout=2)
            reply, how = read_reply(running, timeout=BOUND)
        stop = time.monotonic()
    stopped_after = time.monotonic() - stop
    note(f"socket file removed / {flavour.name}: running client got {reply!r}; new client "
         f"{result.kind.name} {result.detail!r} in {clock.seconds:.2f} s; "
         f"stopped in {stopped_after:.2f} s")
    assert reply == b"done\n+\n", (reply, how)
    assert result.status is Status.INTERNAL_FAILURE
    assert result.kind is ErrorKind.IO
    assert result.detail == f"connect(unix:{path}) failed: No such file or directory"
    assert clock.seconds < 1.0
    assert not os.path.lexists(path)


def test_stop_leaves_a_replacement_socket_file_alone(flavour: Flavour, tmp_path: Path) -> None:
    """After ``rm`` and a new listener on the same path, stopping the old service keeps it."""
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as newcomer:
        with flavour.serving([UnixListener(path)], "/bin/cat", check_socket_files=False):
            os.unlink(path)
            newcomer.bind(path)
            newcomer.listen()
        assert os.path.lexists(path), "stopping the old service removed the new socket file"
    os.unlink(path)


# --- a tcp name with several addresses --------------------------------------------------------

NAME = "multi.execproto.test"

#: Roles of the addresses in resolver order -> (connect timeout, expected kind,
#: expected seconds from/to).
LAYOUTS = {
    # refused at once; the black hole gets half of the remaining 2 s
    "refused,black-hole,live": (2.0, ErrorKind.NONE, (0.9, 1.8)),
    # 1.5 s: the first black hole 0.5 s, the second 1.0/2 = 0.5 s, then live
    "black-hole,black-hole,live": (1.5, ErrorKind.NONE, (0.9, 1.45)),
    "black-hole,black-hole": (1.0, ErrorKind.CONNECT_TIMEOUT, (0.95, 1.6)),
    "refused,refused": (1.0, ErrorKind.OTHER, (0.0, 0.5)),
}
_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@contextlib.contextmanager
def _layout(flavour: Flavour, roles: list[str]) -> Iterator[int]:
    """Set up *roles* on 127.0.0.2, .3, .4 (in order) on one port; yield the port."""
    with contextlib.ExitStack() as stack:
        live = [ip for ip, role in zip(_IPS, roles, strict=False) if role == "live"]
        if live:
            (address,) = stack.enter_context(
                flavour.serving([TcpListener(live[0], 0)], "/bin/cat"))
            assert isinstance(address, tuple)
            port = address[1]
        else:
            with socket.socket() as probe:  # any free port
                probe.bind((_IPS[0], 0))
                port = probe.getsockname()[1]
        for ip, role in zip(_IPS, roles, strict=False):
            if role == "black-hole":
                stack.enter_context(black_hole(ip, port))
            elif role == "refused":
                assert is_refused(ip, port), f"{ip}:{port} should refuse connections"
        yield port


def _check_layout(flavour: Flavour, layout: str, seconds: float, result: RunResult,
                  target: str) -> None:
    connect_timeout, kind, (low, high) = LAYOUTS[layout]
    note(f"tcp name -> {layout}, connect timeout {connect_timeout} s / {flavour.name}: "
         f"{result.status.name} {result.kind.name} in {seconds:.2f} s")
    if kind is ErrorKind.NONE:
        assert result.status is Status.SUCCESS, result
        assert result.output == b"via name"
        assert seconds < connect_timeout, "the live address was reached after the timeout"
    else:
        assert result.status is Status.INTERNAL_FAILURE
        assert result.kind is kind, result
        if kind is ErrorKind.CONNECT_TIMEOUT:
            assert result.detail == f"connect({target}) timed out after {connect_timeout} s"
        else:
            assert result.detail == f"connect({target}) failed: Connection refused"
    assert low <= seconds < high, seconds


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tcp_name_with_several_addresses(flavour: Flavour, layout: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The client tries every address in resolver order, each with an equal share of the time left.

    Refusing addresses cost nothing; a black hole costs its share; the live
    address is reached within the connect timeout.  All black holes:
    CONNECT_TIMEOUT at the connect timeout; all refused: IO, the last error.
    """
    roles = layout.split(",")
    connect_timeout = LAYOUTS[layout][0]
    with _layout(flavour, roles) as port:
        target = f"tcp:{NAME}:{port}"
        with fake_resolver(monkeypatch, NAME, _IPS[: len(roles)]), timed() as clock:
            result = flavour.run(target, input=b"via name\n", connect_timeout=connect_timeout,
                                 timeout=BOUND)
    _check_layout(flavour, layout, clock.seconds, result, target)


@contextlib.contextmanager
def _hosts_entry(name: str, ips: list[str]) -> Iterator[None]:
    """Add ``ip name`` lines to /etc/hosts; take exactly them out again afterwards."""
    hosts = "/etc/hosts"
    if os.geteuid() != 0 or not os.access(hosts, os.W_OK):
        pytest.skip("needs root to add a name to /etc/hosts")
    with open(hosts, "rb") as f:
        original = f.read()
    added = "".join(f"{ip} {name}\n" for ip in ips).encode()
    prefix = b"" if original.endswith(b"\n") or not original else b"\n"
    # One small O_APPEND write: readers see the old file or the new one.
    with open(hosts, "ab") as f:
        f.write(prefix + added)
    try:
        yield
    finally:
        with open(hosts, "rb") as f:
            current = f.read()
        if current == original + prefix + added:
            os.truncate(hosts, len(original))
        else:  # someone else changed it meanwhile: remove only our lines
            with open(hosts, "wb") as f:
                f.write(current.replace(prefix + added, b"").replace(added, b""))


def test_tcp_name_from_the_hosts_file(flavour: Flavour) -> None:
    """The same through the real resolver: a unique name on three lines of /etc/hosts.

    glibc returns every address (sorted, RFC 6724); the roles follow the
    order it returns: refused, black hole, live.
    """
    name = f"execproto-faults-{os.getpid()}.test"
    with _hosts_entry(name, list(reversed(_IPS))):
        infos = socket.getaddrinfo(name, 9, type=socket.SOCK_STREAM)
        order = [str(info[4][0]) for info in infos]
        if sorted(order) != sorted(_IPS):
            pytest.skip(f"the resolver returned {order} for three hosts lines")
        by_ip = dict(zip(order, ["refused", "black-hole", "live"], strict=True))
        roles = [by_ip[ip] for ip in _IPS]
        with _layout(flavour, roles) as port:
            target = f"tcp:{name}:{port}"
            with timed() as clock:
                result = flavour.run(target, input=b"via name\n", connect_timeout=2.0,
                                     timeout=BOUND)
    _check_layout(flavour, "refused,black-hole,live", clock.seconds, result, target)
