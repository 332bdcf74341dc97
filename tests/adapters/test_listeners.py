"""bind_listener() for unix sockets: the real path, the exact mode, never wider.

The socket is bound at its own path (so ``/proc/net/unix`` and ``ss -xlp``
show it, as for Dovecot's master), under a umask stricter than the process's
by every bit the mode lacks, then given exactly its mode.  These tests call
bind_listener() directly; ``tests/hostile/test_security.py`` watches whole
services start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto.adapters import UnixListener
from execproto.adapters._common import SocketFile, _bind_umask, _set_socket_mode, bind_listener

#: (process umask, requested mode): a umask that takes nothing from the
#: mode, one that takes bits the mode wants (so a chmod must follow), and
#: one that is wider open than the mode (umask 0).
CASES = [(0o022, 0o600), (0o022, 0o666), (0o027, 0o660), (0o077, 0o666), (0, 0o640),
         (0o002, 0o777), (0o022, 0o000)]


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Run with the process umask set to *value*; check bind_listener restored it."""
    old = os.umask(value)
    try:
        yield
        assert current_umask() == value, "the umask was not restored"
    finally:
        os.umask(old)


def current_umask() -> int:
    value = os.umask(0o777)
    os.umask(value)
    return value


@contextlib.contextmanager
def bound(path: Path, mode: int = 0o600) -> Iterator[tuple[socket.socket, SocketFile]]:
    sock, created = bind_listener(UnixListener(str(path), mode))
    try:
        assert created is not None
        yield sock, created
    finally:
        sock.close()
        if created is not None:
            created.remove()


def proc_net_unix_paths() -> list[str]:
    """The paths of the listening unix sockets in /proc/net/unix."""
    paths = []
    with open("/proc/net/unix") as f:
        next(f)  # Num RefCount Protocol Flags Type St Inode Path
        for line in f:
            fields = line.split(None, 7)
            # Flags 00010000 (__SO_ACCEPTCON): listening.
            if len(fields) == 8 and int(fields[3], 16) & 0x10000:
                paths.append(fields[7].rstrip("\n"))
    return paths


# --- the name the kernel records ----------------------------------------------------------


def test_proc_net_unix_lists_the_real_path(tmp_path: Path) -> None:
    path = tmp_path / "quota-warning"
    with bound(path, 0o666):
        listed = proc_net_unix_paths()
        assert str(path) in listed
        assert not [p for p in listed if str(tmp_path) in p and p != str(path)], listed
    assert not list(tmp_path.iterdir()), "something was left behind"


# --- the mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(("process_umask", "mode"), CASES)
def test_mode_is_exact(tmp_path: Path, process_umask: int, mode: int) -> None:
    path = tmp_path / "sock"
    with umask(process_umask), bound(path, mode) as (_, created):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert oct(stat.S_IMODE(st.st_mode)) == oct(mode)
        assert created.ident == (st.st_dev, st.st_ino)


@pytest.mark.parametrize(("process_umask", "mode"), CASES)
def test_never_wider_right_after_bind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      process_umask: int, mode: int) -> None:
    """The file bind() creates already has no bit outside the mode.

    bind() is the moment the path becomes reachable; the chmod that follows
    may only add bits of the mode.
    """
    path = tmp_path / "sock"
    seen: list[tuple[int, int]] = []
    original = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        original(self, address)
        if address == str(path):
            seen.append((stat.S_IMODE(os.lstat(path).st_mode), current_umask()))

    monkeypatch.setattr(socket.socket, "bind", bind)
    with umask(process_umask), bound(path, mode):
        pass
    ((after_bind, umask_during_bind),) = seen
    assert after_bind & ~mode == 0, f"{after_bind:o} is wider than {mode:o}"
    assert after_bind == mode & ~process_umask
    # Only ever stricter than the process's own umask.
    assert umask_during_bind & process_umask == process_umask


def test_bind_umask_only_adds_bits_and_never_exceeds_the_mode() -> None:
    for old in range(0o1000):
        for mode in range(0o1000):
            new = _bind_umask(mode, old)
            assert new & old == old, (oct(old), oct(mode))  # stricter, never looser
            created = 0o777 & ~new  # what bind() gives
            assert created & ~mode == 0, (oct(old), oct(mode))  # never wider
            assert created == mode & ~old  # and no stricter than needed


def test_bind_umask_ignores_bits_beyond_permissions() -> None:
    assert _bind_umask(0o4755, 0o022) == 0o022
    assert _bind_umask(0o600, 0o7022) == 0o177


def test_replaced_by_a_symlink_before_chmod(tmp_path: Path) -> None:
    """Whoever can write to the directory cannot redirect the chmod."""
    path = tmp_path / "sock"
    target = tmp_path / "precious"
    target.write_bytes(b"")
    target.chmod(0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        path.unlink()
        path.symlink_to(target)
        st = os.lstat(path)
        with pytest.raises(OSError, match="replaced") as raised:
            # Even with the symlink's own identity: it is not a socket.
            _set_socket_mode(SocketFile(str(path), (st.st_dev, st.st_ino)), 0o666)
    assert raised.value.errno == errno.EEXIST
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_replaced_by_another_socket_before_chmod(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as ours, socket.socket(socket.AF_UNIX) as theirs:
        ours.bind(str(path))
        st = os.lstat(path)
        path.unlink()
        old = os.umask(0o077)
        try:
            theirs.bind(str(path))
        finally:
            os.umask(old)
        with pytest.raises(OSError, match="replaced"):
            _set_socket_mode(SocketFile(str(path), (st.st_dev, st.st_ino)), 0o666)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


# --- what is at the path already ----------------------------------------------------------


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: nothing accepts on it
    with bound(path, 0o660) as (sock, _):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            accepted, _ = sock.accept()
            accepted.close()
        assert str(path) in proc_net_unix_paths()


def test_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with bound(path, 0o600) as (_, created):
        with pytest.raises(OSError) as raised:
            bind_listener(UnixListener(str(path), 0o666))
        assert raised.value.errno == errno.EADDRINUSE
        st = os.lstat(path)
        assert created.ident == (st.st_dev, st.st_ino)
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_other_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    path.write_bytes(b"keep me")
    with pytest.raises(OSError) as raised:
        bind_listener(UnixListener(str(path)))
    assert raised.value.errno == errno.EEXIST
    assert path.read_bytes() == b"keep me"


# --- removal on stop ----------------------------------------------------------------------


def test_removed_on_stop_only_while_ours(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    sock, created = bind_listener(UnixListener(str(path)))
    assert created is not None
    # Someone put another socket there meanwhile (while ours is open, its
    # inode number cannot be reused: the identity is sound).
    path.unlink()
    with socket.socket(socket.AF_UNIX) as newer:
        newer.bind(str(path))
        sock.close()
        created.remove()
        assert path.exists(), "the other socket was removed"
    sock, created = bind_listener(UnixListener(str(path)))  # stale now: replaced
    sock.close()
    assert created is not None
    created.remove()
    assert not path.exists()
    created.remove()  # gone already: nothing to do


def test_backlog_follows_max_connections(tmp_path: Path) -> None:
    # A burst as large as max_connections waits in the backlog: no EAGAIN
    # for unix clients (the old fixed backlog of 128 refused the 130th).
    from execproto.adapters._common import Listeners, ServiceConfig, listen_backlog

    assert listen_backlog(1) == 128
    assert 128 <= listen_backlog(10**9) <= 65535
    config = ServiceConfig(script="/bin/true", max_connections=400)
    listeners = Listeners([UnixListener(str(tmp_path / "s"))], config)
    clients: list[socket.socket] = []
    try:
        for _ in range(400):  # nobody accepts: all of them are queued
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            client.connect(str(tmp_path / "s"))
    finally:
        for client in clients:
            client.close()
        listeners.close()
    assert len(clients) == 400
