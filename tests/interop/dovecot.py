"""A private Dovecot master that hosts ``script`` services, for interop tests.

:class:`PrivateDovecot` writes a minimal ``dovecot.conf`` into its own
directory and runs ``dovecot -F -c CONF`` as root. Everything the master
creates (``base_dir``, ``state_dir``, the log file) lives in that directory.
There are no protocols (no imap/pop3/lmtp listeners), no SSL, and inet
listeners bind to 127.0.0.1 only, so it never conflicts with a system Dovecot.

Each hosted service is described by a :class:`ScriptService` and runs
Dovecot's ``script`` binary as ``script [-e NAMES] [-p] SCRIPT ARGS...``
(PROTOCOL.md section 7.1) as ``user = root``.

:data:`RECORDER_SOURCE` is a small script for such services: it records its
argv, environment and stdin into a JSON file (see :func:`write_recorder`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "RECORDER_OUTPUT",
    "RECORDER_SOURCE",
    "PrivateDovecot",
    "ScriptService",
    "StartDovecot",
    "dovecot_binary",
    "libexec_dir",
    "script_binary",
    "write_recorder",
    "write_script",
]

START_TIMEOUT = 10.0
"""Seconds to wait for every listener to be listening."""

STOP_TIMEOUT = 10.0
"""Seconds to wait for the master to exit after SIGTERM."""

STRAY_TIMEOUT = 3.0
"""Seconds to wait for processes left in the master's group after it exited."""

# Dovecot splits `executable` on spaces and treats some characters specially
# in its config syntax, so only plain words are allowed in generated lines.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./,:=+@-]+")


def dovecot_binary() -> str | None:
    """Return the path of the ``dovecot`` master binary, or None if missing."""
    found = shutil.which("dovecot")
    if found is not None:
        return found
    fallback = "/usr/sbin/dovecot"
    return fallback if os.access(fallback, os.X_OK) else None


def libexec_dir() -> Path | None:
    """Return Dovecot's libexec directory (Debian: ``/usr/lib/dovecot``).

    Asks ``doveconf`` for its built-in ``libexec_dir`` default (reading no
    config file), then falls back to the usual locations. Returns None if no
    candidate holds an executable ``script`` binary.
    """
    candidates: list[Path] = []
    doveconf = shutil.which("doveconf") or "/usr/bin/doveconf"
    try:
        result = subprocess.run(
            [doveconf, "-c", "/dev/null", "-h", "libexec_dir"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    candidates += [Path(p) for p in ("/usr/lib/dovecot", "/usr/libexec/dovecot")]
    for candidate in candidates:
        if os.access(candidate / "script", os.X_OK):
            return candidate
    return None


def script_binary() -> Path | None:
    """Return the path of Dovecot's ``script`` service binary, or None."""
    directory = libexec_dir()
    return None if directory is None else directory / "script"


def _plain(word: str) -> str:
    if not _PLAIN_WORD.fullmatch(word):
        raise ValueError(f"not usable in dovecot.conf: {word!r}")
    return word


@dataclass(frozen=True)
class ScriptService:
    """One ``script`` service of a :class:`PrivateDovecot`.

    Attributes:
        name: Service name; also the default unix listener path.
        script: Absolute path of the script the service runs.
        args: Service args, passed to the script before the client args.
        env_allowlist: Names for ``-e`` (joined with commas); empty: no ``-e``.
        passthrough: Pass ``-p`` (the script gets the raw request, section 4.4).
        unix_listener: Listener path relative to ``base_dir`` (mode 0666);
            None means the service name.
        inet_listener: Also listen on 127.0.0.1 on a free TCP port.
    """

    name: str
    script: Path
    args: Sequence[str] = ()
    env_allowlist: Sequence[str] = ()
    passthrough: bool = False
    unix_listener: str | None = None
    inet_listener: bool = False

    @property
    def listener(self) -> str:
        """The unix listener path, relative to ``base_dir``."""
        return self.unix_listener or self.name

    def config(self, script_binary: Path, port: int | None) -> str:
        """Return the ``service { }`` block for dovecot.conf."""
        words = [str(script_binary)]
        if self.env_allowlist:
            words += ["-e", ",".join(self.env_allowlist)]
        if self.passthrough:
            words.append("-p")
        words += [str(self.script), *self.args]
        lines = [
            f"service {_plain(self.name)} {{",
            f"  executable = {' '.join(_plain(w) for w in words)}",
            "  user = root",
            f"  unix_listener {_plain(self.listener)} {{",
            "    mode = 0666",
            "  }",
        ]
        if port is not None:
            lines += [
                f"  inet_listener {_plain(self.name)} {{",
                "    address = 127.0.0.1",
                f"    port = {port}",
                "  }",
            ]
        return "\n".join([*lines, "}", ""])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening() -> tuple[set[str], set[int]]:
    """Return the unix socket paths and TCP ports that are listening.

    A listening socket accepts connections (the kernel queues them), so this
    tells when Dovecot is ready. Connecting instead would start a service
    process per probe, which logs a Fatal line, runs ``-p`` scripts, and can
    make the master throttle the service for seconds
    ("command startup failed"). Reads Linux's /proc/net tables.
    """
    paths: set[str] = set()
    # Columns: Num RefCount Protocol Flags Type St Inode [Path];
    # Flags has __SO_ACCEPTCON (0x10000) set on listening sockets.
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and int(fields[3], 16) & 0x10000:
            paths.add(fields[7])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            # Columns: sl local_address rem_address st ...; st 0A is LISTEN.
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return paths, ports


def _group_alive(pgid: int) -> bool:
    """Tell whether process group ``pgid`` has a member that is not a zombie.

    Zombies do not count: processes orphaned by the master's exit are
    reaped by init, not by us.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command: state ppid pgrp ...
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process is gone
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group(pgid: int, timeout: float) -> bool:
    """Wait until :func:`_group_alive` is false; return whether it became so."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class PrivateDovecot:
    """A private Dovecot master hosting :class:`ScriptService` entries.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    It must run as root. If no directory is given, a temporary one is
    created and removed again by :meth:`stop`.

    ``extra_config`` is appended to the generated dovecot.conf (for mail
    settings, passdb/userdb...); ``wait_for`` names more unix listeners,
    relative to ``base_dir`` (e.g. ``auth-userdb``), to wait for in
    :meth:`start`.

    :meth:`start` returns once every listener is listening (checked through
    /proc, without connecting, so no service process is started).
    """

    def __init__(
        self,
        services: Sequence[ScriptService],
        directory: Path | None = None,
        binary: str | None = None,
        extra_config: str = "",
        wait_for: Sequence[str] = (),
    ) -> None:
        if len({s.name for s in services}) != len(services):
            raise ValueError("service names must be unique")
        self.services = list(services)
        self.extra_config = extra_config
        self.wait_for = list(wait_for)
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="dovecot-")) if directory is None else directory
        )
        self.binary = binary or dovecot_binary() or "/usr/sbin/dovecot"
        self.base_dir = self.directory / "run"
        self.config_path = self.directory / "dovecot.conf"
        self.log_path = self.directory / "dovecot.log"
        self.stderr_path = self.directory / "dovecot.stderr"
        self.ports = {s.name: _free_port() for s in self.services if s.inet_listener}
        self._process: subprocess.Popen[bytes] | None = None

    def socket_path(self, name: str) -> Path:
        """Return the unix listener path of service ``name``."""
        for service in self.services:
            if service.name == name:
                return self.base_dir / service.listener
        raise KeyError(name)

    def port(self, name: str) -> int:
        """Return the TCP port of service ``name`` (needs ``inet_listener``)."""
        return self.ports[name]

    def config_text(self) -> str:
        """Return the complete dovecot.conf this instance runs with."""
        script = script_binary()
        if script is None:
            raise FileNotFoundError("Dovecot's script binary was not found")
        head = [
            f"base_dir = {_plain(str(self.base_dir))}",
            f"state_dir = {_plain(str(self.directory / 'state'))}",
            f"log_path = {_plain(str(self.log_path))}",
            "protocols =",
            "listen = 127.0.0.1",
            "ssl = no",
            "default_internal_user = root",
            "default_internal_group = root",
            "default_login_user = root",
            "",
        ]
        blocks = [s.config(script, self.ports.get(s.name)) for s in self.services]
        return "\n".join(head) + "\n".join(blocks) + self.extra_config

    def log_text(self) -> str:
        """Return the Dovecot log so far, latin-1 decoded."""
        return self.log_path.read_bytes().decode("latin-1") if self.log_path.exists() else ""

    def _startup_output(self) -> str:
        stderr = self.stderr_path.read_bytes() if self.stderr_path.exists() else b""
        return stderr.decode("latin-1") + self.log_text()

    def log_size(self) -> int:
        """Return the current length of :meth:`log_text`, to slice new lines."""
        return len(self.log_text())

    def wait_log(self, needle: str, start: int = 0, timeout: float = 5.0) -> str:
        """Wait until ``needle`` appears in the log after offset ``start``.

        The log process writes asynchronously, so lines may appear shortly
        after a connection has ended.

        Returns:
            The log text after ``start``.

        Raises:
            TimeoutError: ``needle`` did not appear within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[start:]
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in Dovecot log:\n{text}")
            time.sleep(0.02)

    def start(self) -> None:
        """Write the config, start the master and wait for every listener.

        Raises:
            RuntimeError: Dovecot exited or was not ready within the timeout.
        """
        if self._process is not None:
            raise RuntimeError("already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in (self.base_dir / s.listener for s in self.services):
            # A unix socket path is limited to 107 bytes.
            if len(os.fsencode(path)) > 107:
                raise ValueError(f"socket path too long: {path}")
        self.config_path.write_text(self.config_text())
        for service in self.services:
            # The master does not create a listener's parent directory.
            (self.base_dir / service.listener).parent.mkdir(parents=True, exist_ok=True)
        with self.stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                # Own process group: stop() can clean up any stray service.
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self._process.poll() is not None:
                log = self._startup_output()
                self.stop()
                raise RuntimeError(f"dovecot exited early:\n{log}")
            if time.monotonic() > deadline:
                log = self._startup_output()
                self.stop()
                raise RuntimeError(f"dovecot listeners not ready in {START_TIMEOUT}s:\n{log}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        paths, ports = _listening()
        wanted = [self.socket_path(s.name) for s in self.services]
        wanted += [self.base_dir / name for name in self.wait_for]
        return all(str(p) in paths for p in wanted) and all(
            port in ports for port in self.ports.values()
        )

    def stop(self) -> None:
        """Stop the master: SIGTERM, bounded wait, then SIGKILL.

        Stray processes left in the master's process group are killed too,
        and the master is reaped. Removes the directory if it was created by
        this instance. Safe to call more than once.
        """
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=STOP_TIMEOUT)
            # Service processes may outlive the master for a moment (the log
            # process drains its input first). Give them a chance to exit on
            # their own, then kill what is left of the group.
            if not _wait_group(process.pid, STRAY_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                _wait_group(process.pid, STRAY_TIMEOUT)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivateDovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


StartDovecot = Callable[[Sequence[ScriptService]], PrivateDovecot]
"""Type of a function that starts a :class:`PrivateDovecot` for some services."""

RECORDER_OUTPUT = b"recorded\n"
"""What the recorder writes to stdout before it exits with status 0."""

RECORDER_SOURCE = '''\
#!{python}
"""Record argv, environment, stdin and pending alarm into a JSON file.

Usage: recorder RECORD_DIR [ARGS...]. Writes RECORD_DIR/record-PID.json
with "argv", "env", "stdin" (byte strings as latin-1 text) and "alarm"
(seconds left of an alarm inherited across exec, then cancelled), prints
one line and exits 0. The environment is read from /proc/self/environ
because Python adds LC_CTYPE to os.environ when the locale is C (PEP 538).
"""
import json
import os
import signal
import sys

alarm = signal.alarm(0)
stdin = b""
while chunk := os.read(0, 65536):
    stdin += chunk
with open("/proc/self/environ", "rb") as f:
    entries = [e.partition(b"=") for e in f.read().split(b"\\0") if e]
record = {{
    "argv": [os.fsencode(a).decode("latin-1") for a in sys.argv],
    "env": {{k.decode("latin-1"): v.decode("latin-1") for k, _, v in entries}},
    "stdin": stdin.decode("latin-1"),
    "alarm": alarm,
}}
path = os.path.join(sys.argv[1], "record-%d.json" % os.getpid())
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
os.write(1, {output!r})
'''
"""Source of the recorder script; format with ``python`` and ``output``."""


def write_script(path: Path, text: str, executable: bool = True) -> Path:
    """Write a script file, mode 0755 (or 0644 if not ``executable``)."""
    path.write_text(text)
    path.chmod(0o755 if executable else 0o644)
    return path


def write_recorder(path: Path) -> Path:
    """Write the recorder script (see :data:`RECORDER_SOURCE`) to ``path``.

    The shebang is the running interpreter's absolute path, since scripts
    run with an empty environment (no ``PATH``).
    """
    source = RECORDER_SOURCE.format(python=sys.executable, output=RECORDER_OUTPUT)
    return write_script(path, source)
