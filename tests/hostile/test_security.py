"""The testable claims of SECURITY.md, against every flavour.

Each claim is checked from the script's side: an introspection script
reports what it actually received (argv, environment, descriptors, signal
state, uid), so nothing here trusts the service's own account.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execproto import tab_escape
from execproto.adapters import FdListener, TcpListener, UnixListener
from tests.adapters.flavours import (
    LogCapture,
    get_flavour,
    open_fds,
    read_reply,
    sh_script,
)

from .clients import Served, exchange_raw, header, introspect_script, parse_introspection


@contextlib.contextmanager
def introspection(flavour_name: str, transport: str, directory: Path,
                  **options: Any) -> Iterator[Served]:
    """The introspection script behind *flavour_name*'s service."""
    log = LogCapture()
    listener = (UnixListener(str(directory / "sock")) if transport == "unix"
                else TcpListener("127.0.0.1", 0))
    options.setdefault("header_timeout", 5.0)
    with get_flavour(flavour_name).serving([listener], introspect_script(directory),
                                           logger=log.logger, **options) as addresses:
        yield Served(flavour_name, transport, addresses[0], log, options)


def _introspect(served: Served, *lines: bytes, payload: bytes = b"") -> dict[str, Any]:
    reply, how = exchange_raw(served, header(*lines) + payload)
    assert how == "eof", f"{served}: {how} after {reply!r}"
    return parse_introspection(reply)


# --- no shell ------------------------------------------------------------------


def test_args_never_go_through_a_shell(flavour_name: str, transport: str,
                                       tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = [f"; touch {marker}1", f"$(touch {marker}2)", f"`touch {marker}3`",
            f"| touch {marker}4", f"&& touch {marker}5 &&", f"> {marker}6", f"\n touch {marker}7",
            "*", "~", "$HOME", "${IFS}", "a b", "'quoted'", '"dq"', "\\", "-e", "--", "%s%n",
            "\t", "\x01", "é"]
    with introspection(flavour_name, transport, tmp_path) as served:
        report = _introspect(served, b"-",
                             *(tab_escape(a.encode("utf-8")) for a in args))
    got = [a.encode("latin-1").decode("utf-8") for a in report["argv"]]
    assert got == args
    assert not list(tmp_path.glob("pwned*")), "a shell ran an argument"


# --- no environment leaks ------------------------------------------------------------


def test_environment_is_exactly_the_allowlist(flavour_name: str, transport: str,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The service's own environment holds things that must not reach the script.
    monkeypatch.setenv("EXECPROTO_TEST_SECRET", "service-only")
    monkeypatch.setenv("LD_PRELOAD", "")
    sent = [("FOO", "1"), ("LD_PRELOAD", "/nonexistent/evil.so"), ("PATH", "/evil"),
            ("foo", "lower"), ("FOOBAR", "x"), ("FOO ", "space"), ("BAR", "two"),
            ("HOME", "/root"), ("", "empty-name"), ("EXECPROTO_TEST_SECRET", "client"),
            ("BAR", "three")]
    lines = [b"env_" + tab_escape(f"{n}={v}".encode()) for n, v in sent]
    with introspection(flavour_name, transport, tmp_path,
                       env_allowlist=("FOO", "BAR")) as served:
        report = _introspect(served, *lines, b"-")
    assert sorted(report["environ"]) == ["BAR=three", "FOO=1"]


# --- no descriptor leaks --------------------------------------------------------------


def _inheritable_fds() -> set[str]:
    """Descriptors above 2 of this process that a child would inherit."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if int(name) > 2 and os.get_inheritable(int(name)):
                found.add(name)
    return found


def test_only_fds_0_1_2_reach_the_script(flavour_name: str, transport: str,
                                         tmp_path: Path) -> None:
    """While another client is connected and another script runs, a script sees
    only its connection (0, 1) and the service's stderr (2): nothing the
    service opened (listeners, connections, pidfds, pipes) leaks to it."""
    # What the test process itself inherited from whatever started it is
    # the subject of the next test, not of this one.
    inherited = _inheritable_fds()
    with introspection(flavour_name, transport, tmp_path) as served:
        idle = served.connect()
        busy = served.connect()
        try:
            busy.sendall(header(b"-"))  # its script blocks reading stdin
            time.sleep(0.2)
            report = _introspect(served, b"-")
        finally:
            idle.close()
            busy.shutdown(socket.SHUT_WR)
            read_reply(busy, 10.0)
            busy.close()
    fds = report["fds"]
    assert {"0", "1", "2"} <= set(fds), fds
    assert set(fds) - {"0", "1", "2"} <= inherited, fds
    assert fds["0"] == fds["1"] and fds["0"].startswith("socket:"), fds


def test_activated_listener_does_not_reach_the_script(flavour_name: str,
                                                      tmp_path: Path) -> None:
    """A listening socket handed over by systemd (inheritable) stays the service's."""
    activated = socket.create_server(("127.0.0.1", 0))
    activated.set_inheritable(True)  # systemd passes LISTEN_FDS inheritable
    port = activated.getsockname()[1]
    log = LogCapture()
    inherited = _inheritable_fds()
    with get_flavour(flavour_name).serving(
            [FdListener(activated.detach())], introspect_script(tmp_path),
            logger=log.logger, header_timeout=5.0):
        served = Served(flavour_name, "tcp", ("127.0.0.1", port), log, {})
        report = _introspect(served, b"-")
    leaked = set(report["fds"]) - {"0", "1", "2"} - inherited
    assert not leaked, {fd: report["fds"][fd] for fd in leaked}


@pytest.mark.xfail(strict=True, reason="by design: the library passes descriptors its host "
                   "process made inheritable (the stray pipe here), as any exec does; "
                   "FdListener sockets and everything under `execproto serve` are "
                   "made close-on-exec")
def test_host_process_fds_do_not_reach_the_script(flavour_name: str, tmp_path: Path) -> None:
    """An application embedding serve() holds an inheritable descriptor."""
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_r, True)
    try:
        with introspection(flavour_name, "unix", tmp_path) as served:
            report = _introspect(served, b"-")
    finally:
        os.close(stray_r)
        os.close(stray_w)
    assert str(stray_r) not in report["fds"], report["fds"]


#: Lists the descriptors the script process holds: ls replaces the shell,
#: so it sees what the shell got (plus its own listing of the directory).
_LIST_FDS = "exec /bin/ls -l /proc/$$/fd\n"


def test_cli_launcher_fds_do_not_reach_the_script(flavour_name: str, tmp_path: Path) -> None:
    """``execproto serve`` started with an inheritable descriptor (a careless launcher):
    its scripts get only 0, 1 and 2."""
    script = sh_script(tmp_path, "fds", _LIST_FDS)
    sock = tmp_path / "sock"
    stray_r, stray_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "execproto", "serve", "--adapter", flavour_name,
             "--unix", str(sock), "--grace", "0.5", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(stray_r,))
    finally:
        os.close(stray_r)
        os.close(stray_w)
    try:
        deadline = time.monotonic() + 15.0
        while not _accepting(sock):
            assert proc.poll() is None, proc.communicate(timeout=5)[0].decode()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        served = Served(flavour_name, "unix", str(sock), LogCapture(), {})
        reply, _ = exchange_raw(served, header(b"-"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output = proc.communicate(timeout=10)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate(timeout=5)[0].decode(errors="replace")
    assert reply.endswith(b"+\n"), (reply, output)
    # "lrwx------ 1 root root 64 <date> 0 -> socket:[123]": keep "0" -> "socket:[123]"
    listed = dict(line.split()[-3::2] for line in reply[:-2].decode().splitlines()
                  if " -> " in line)
    fds = {fd: target for fd, target in listed.items()
           if target != script  # the shell's script, if it kept it open
           and not (target.startswith("/proc/") and target.endswith("/fd"))}  # ls's listing
    assert sorted(fds) == ["0", "1", "2"], listed
    assert fds["0"] == fds["1"] and fds["0"].startswith("socket:"), listed


# --- clean signal state ------------------------------------------------------------------

#: Reports the shell's own credentials and signal state (builtins only: no
#: child process, and unlike a Python script it does not change its own
#: signal dispositions at start-up).
_STATUS = """\
while read -r key value rest; do
  case "$key" in Uid:|Gid:|Groups:|SigBlk:|SigIgn:) echo "$key $value $rest" ;; esac
done < /proc/self/status
"""


def _status(reply: bytes) -> dict[str, list[str]]:
    assert reply.endswith(b"+\n"), reply
    return {line.split()[0].rstrip(":"): line.split()[1:]
            for line in reply[:-2].decode().splitlines()}



def test_signal_mask_empty_and_dispositions_default(flavour_name: str, transport: str,
                                                    tmp_path: Path) -> None:
    """Even when the service's threads block signals and the process ignores some."""
    blocked = {signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    previous_usr2 = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    listener = (UnixListener(str(tmp_path / "sock")) if transport == "unix"
                else TcpListener("127.0.0.1", 0))
    try:
        with get_flavour(flavour_name).serving(
                [listener], sh_script(tmp_path, "status", _STATUS)) as addresses:
            served = Served(flavour_name, transport, addresses[0], LogCapture(), {})
            reply, _ = exchange_raw(served, header(b"-"))
    finally:
        signal.signal(signal.SIGUSR2, previous_usr2)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    status = _status(reply)
    assert status["SigBlk"] == ["0" * 16], status
    # Python itself ignores SIGPIPE and SIGXFSZ: neither may reach the script.
    ignored = int(status["SigIgn"][0], 16)
    assert ignored & ~_GLIBC_INTERNAL == 0, status


#: Signals 32 and 33 (bits 31 and 32 of the SigIgn mask) are glibc's own
#: (SIGCANCEL, SIGSETXID): not in signal.valid_signals(), so posix_spawn's
#: "default dispositions" set cannot name them, and glibc 2.36's posix_spawn
#: leaves them SIG_IGN in the child.
_GLIBC_INTERNAL = (1 << 31) | (1 << 32)


@pytest.mark.xfail(strict=False, reason="glibc's posix_spawn sets its internal signals 32 "
                   "and 33 to SIG_IGN in the child (seen with glibc 2.36)")
def test_glibc_internal_signals_not_ignored(tmp_path: Path) -> None:
    """SECURITY.md promises default dispositions: that includes signals 32 and 33."""
    with get_flavour("blocking").serving([UnixListener(str(tmp_path / "sock"))],
                                         sh_script(tmp_path, "status", _STATUS)) as addresses:
        served = Served("blocking", "unix", addresses[0], LogCapture(), {})
        reply, _ = exchange_raw(served, header(b"-"))
    assert int(_status(reply)["SigIgn"][0], 16) == 0, reply


# --- socket creation without a window ------------------------------------------------------


class _ModeWatcher(threading.Thread):
    """Stats every socket file in a directory tree, as fast as it can, until stopped."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.stop = threading.Event()
        #: (path, socket mode, mode of its directory)
        self.seen: list[tuple[str, int, int]] = []
        self.scans = 0

    def _scan(self, directory: str) -> None:
        try:
            directory_mode = stat.S_IMODE(os.stat(directory).st_mode)
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                self.seen.append((entry.path, stat.S_IMODE(st.st_mode), directory_mode))
            elif stat.S_ISDIR(st.st_mode):
                self._scan(entry.path)

    def run(self) -> None:
        while not self.stop.is_set():
            self._scan(str(self.directory))
            self.scans += 1


@pytest.mark.parametrize(("process_umask", "mode"), [(0, 0o640), (0o027, 0o666)],
                         ids=["umask-0", "umask-027"])
def test_unix_socket_never_wider_than_its_mode(flavour_name: str, tmp_path: Path,
                                               process_umask: int, mode: int) -> None:
    """Never wider than its mode, at its real path only.

    With umask 0 a plain bind would make a 0777 socket.  With umask 027 the
    bind gives 0640 and a chmod must add bits: the watcher may see 0640
    first, never anything outside 0666.
    """
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    path = directory / "sock"
    watcher = _ModeWatcher(directory)
    old_umask = os.umask(process_umask)
    watcher.start()
    try:
        with get_flavour(flavour_name).serving([UnixListener(str(path), mode)], "/bin/true"):
            final = stat.S_IMODE(os.stat(path).st_mode)
            time.sleep(0.05)
    finally:
        os.umask(old_umask)
        watcher.stop.set()
        watcher.join(5.0)
    assert final == mode, oct(final)
    assert watcher.scans > 0
    for seen_path, seen_mode, _ in watcher.seen:
        assert seen_path == str(path), f"a socket under another name: {seen_path}"
        assert seen_mode & ~mode == 0, f"{seen_path} seen with mode {seen_mode:o}"


def _accepting(path: Path) -> bool:
    """Whether a service accepts connections on *path* (the file appears at bind())."""
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def _start_fails(flavour_name: str, path: Path) -> BaseException:
    """Start a service on *path*; return why it could not start."""
    with pytest.raises(AssertionError, match="failed to start") as failed:  # noqa: SIM117
        with get_flavour(flavour_name).serving([UnixListener(str(path))], "/bin/true"):
            pass
    cause = failed.value.__cause__
    assert cause is not None
    return cause


def _settled_fd_growth(before: dict[int, str], timeout: float = 3.0) -> dict[int, str]:
    """Descriptors open now that were not before, once they stop going away (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        new = {fd: target for fd, target in open_fds().items() if before.get(fd) != target}
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


def _only_oserrors(exc: BaseException) -> bool:
    inner = getattr(exc, "exceptions", None)  # the harness's trio nursery groups it
    return all(_only_oserrors(e) for e in inner) if inner else isinstance(exc, OSError)


def test_live_socket_is_not_replaced(flavour_name: str, tmp_path: Path) -> None:
    """A second service on the path of a live one fails; a stale file is replaced."""
    path = tmp_path / "sock"
    flavour = get_flavour(flavour_name)
    with flavour.serving([UnixListener(str(path))], "/bin/true") as addresses:
        served = Served(flavour_name, "unix", addresses[0], LogCapture(), {})
        assert exchange_raw(served, header(b"-")) == (b"+\n", "eof")  # fully up
        before = open_fds()
        cause = _start_fails(flavour_name, path)
        assert _only_oserrors(cause), repr(cause)
        assert exchange_raw(served, header(b"-")) == (b"+\n", "eof")
        leaked = _settled_fd_growth(before)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: nothing accepts on it
    stale.close()
    with flavour.serving([UnixListener(str(path))], "/bin/true") as addresses:
        served = Served(flavour_name, "unix", addresses[0], LogCapture(), {})
        assert exchange_raw(served, header(b"-")) == (b"+\n", "eof")
    assert not leaked, f"the failed start left descriptors open: {leaked}"


# --- privilege separation ----------------------------------------------------------------



def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="needs root and 'nobody'")
def test_cli_user_nobody_runs_scripts_as_nobody(flavour_name: str) -> None:
    """``execproto serve --user nobody`` started as root: scripts run as uid 65534."""
    nobody = _nobody()
    assert nobody is not None
    # A directory the unprivileged service (and its /bin/sh script) can use.
    directory = Path(tempfile.mkdtemp(prefix="execproto-user-"))
    try:
        directory.chmod(0o755)
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        script = sh_script(directory, "status", _STATUS)
        sock = directory / "sock"
        command = [sys.executable, "-m", "execproto", "serve", "--adapter", flavour_name,
                   "--user", "nobody", "--unix", str(sock), "--mode", "0666",
                   "--grace", "1", script]
        # Under umask 022 bind() gives 0644: 0666 means the final chmod, after listen().
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, umask=0o022)
        try:
            deadline = time.monotonic() + 15.0
            while not (sock.exists() and stat.S_IMODE(sock.stat().st_mode) == 0o666):
                assert proc.poll() is None, proc.communicate(timeout=5)[0].decode()
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.05)
            assert os.stat(sock).st_uid == 0, "bound before dropping privileges"
            served = Served(flavour_name, "unix", str(sock), LogCapture(), {})
            reply, how = exchange_raw(served, header(b"-"))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                output = proc.communicate(timeout=15)[0].decode(errors="replace")
            except subprocess.TimeoutExpired:
                proc.kill()
                output = proc.communicate(timeout=5)[0].decode(errors="replace")
        assert how == "eof", (reply, output)
        ids = _status(reply)
        assert ids["Uid"] == ["65534"] * 4, (reply, output)
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4, (reply, output)
        assert "0" not in ids["Groups"], f"root's group kept: {ids['Groups']}"
        assert proc.returncode == 0, output
        assert "Traceback" not in output, output
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="needs root and 'nobody'")
def test_cli_user_stops_cleanly_with_socket_in_root_owned_dir(flavour_name: str) -> None:
    """The usual layout (/run/dovecot is root's): SIGTERM must still stop the service."""
    directory = Path(tempfile.mkdtemp(prefix="execproto-user-"))
    try:
        directory.chmod(0o755)  # root's, like /run/dovecot
        script = sh_script(directory, "true", "exit 0\n")
        sock = directory / "sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "execproto", "serve", "--adapter", flavour_name,
             "--user", "nobody", "--unix", str(sock), "--grace", "0.5", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15.0
            while not sock.exists():
                assert proc.poll() is None, proc.communicate(timeout=5)[0].decode()
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.05)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=3)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate(timeout=5)[0].decode(errors="replace")
            raise AssertionError(f"still running 3 s after SIGTERM: {output}") from None
        assert proc.returncode == 0 and "Traceback" not in output, output
    finally:
        shutil.rmtree(directory, ignore_errors=True)
