"""Private Dovecot masters that host ``script`` services, for interop tests.

An :class:`Installation` is one Dovecot to test against: a version label, a
root directory (``/`` for the host's packages, or a Debian chroot built by
``.ci/chroots``) and how to run a command in it. :data:`INSTALLATIONS` lists
the three the suite covers: 2.3.19 (the host), 2.4.1 (Debian 13) and 2.4.5
(Debian sid). Files the tests share with a chrooted Dovecot live in a
workspace (:meth:`Installation.workspace`) whose path is the same inside and
outside the chroot, so sockets, scripts and records need no translation.

:class:`PrivateDovecot` writes a minimal ``dovecot.conf`` into its own
directory and runs ``dovecot -F -c CONF`` as root. Everything the master
creates (``base_dir``, ``state_dir``, the log file) lives in that directory.
There are no protocols (no imap/pop3/lmtp listeners), no SSL, and inet
listeners bind to 127.0.0.1 only, so it never conflicts with a system Dovecot.
The version-specific configuration text (2.3 or 2.4 syntax) is written by
:class:`Config23` and :class:`Config24`, and nowhere else.

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
    "INSTALLATIONS",
    "RECORDER_OUTPUT",
    "RECORDER_SOURCE",
    "Config23",
    "Config24",
    "DovecotConfig",
    "Installation",
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

    def words(self, script_binary: Path) -> list[str]:
        """The ``executable`` line of the service, split into words."""
        words = [str(script_binary)]
        if self.env_allowlist:
            words += ["-e", ",".join(self.env_allowlist)]
        if self.passthrough:
            words.append("-p")
        return [*words, str(self.script), *self.args]

    def config(self, script_binary: Path, port: int | None,
               syntax: DovecotConfig | None = None) -> str:
        """Return the ``service { }`` block for dovecot.conf (default: 2.3 syntax)."""
        return (syntax or Config23()).service(self, script_binary, port)


CHROOTS = Path(os.environ.get("EXECPROTO_CHROOTS", "/var/cache/execproto-chroots"))
"""Where ``.ci/chroots`` builds the Debian chroots (same variable as there)."""


class DovecotConfig:
    """The dovecot.conf text that differs between Dovecot 2.3 and 2.4.

    Every method returns complete lines. :meth:`quota` and :meth:`sieve`
    use maildir storage; the quota is 10 KB with one warning at 5 %.
    """

    listen_setting = "address"
    """The setting of an ``inet_listener`` that holds its address."""

    def head(self, directory: Path, base_dir: Path, log_path: Path) -> str:
        """Global settings: private directories, no protocols, root everywhere."""
        return "\n".join([
            f"base_dir = {_plain(str(base_dir))}",
            f"state_dir = {_plain(str(directory / 'state'))}",
            f"log_path = {_plain(str(log_path))}",
            "protocols =",
            "listen = 127.0.0.1",
            "ssl = no",
            "default_internal_user = root",
            "default_internal_group = root",
            "default_login_user = root",
            "",
        ])

    def service(self, service: ScriptService, script_binary: Path, port: int | None) -> str:
        """The ``service { }`` block of a script service."""
        lines = [
            f"service {_plain(service.name)} {{",
            f"  executable = {' '.join(_plain(w) for w in service.words(script_binary))}",
            "  user = root",
            f"  unix_listener {_plain(service.listener)} {{",
            "    mode = 0666",
            "  }",
        ]
        if port is not None:
            lines += [
                f"  inet_listener {_plain(service.name)} {{",
                f"    {self.listen_setting} = 127.0.0.1",
                f"    port = {port}",
                "  }",
            ]
        return "\n".join([*lines, "}", ""])

    def quota(self, users: Path, sockets: Path | None = None, fork: Sequence[str] = (),
              tcp_port: int | None = None) -> str:
        """Mail users from a passwd-file, a 10 KB quota and its warning at 5 %.

        The warning of user U goes to ``unix:SOCKETS/U.sock`` with args
        ``10 U``; with ``fork`` (a program and its first args) it runs
        ``FORK... 10 U`` through the fork driver instead, with ``tcp_port``
        it goes to 127.0.0.1 on that port.
        """
        raise NotImplementedError

    def sieve(self, base_dir: Path, mail_dir: Path, exec_timeout: str = "") -> str:
        """``sieve-test``'s config: extprograms with sockets under ``base_dir``.

        ``exec_timeout``: ``sieve_pipe_exec_timeout`` (default: Pigeonhole's, 10 s).
        """
        raise NotImplementedError

    over_status_field = ""
    """The userdb field that holds a user's over-quota flag."""

    def welcome(self, users: Path, socket: Path, wait: bool) -> str:
        """Mail users from a passwd-file and the welcome plugin.

        Creating a user's INBOX sends ``ARGS USER`` to the unix socket
        ``socket``; ``wait`` is ``welcome_wait``.
        """
        raise NotImplementedError

    def quota_over_status(self, users: Path, socket: Path) -> str:
        """Mail users, a 10 KB quota and its over-quota status script.

        The script is ``unix:SOCKET`` with args ``mismatch USER``, then the
        flag; the mask is ``TRUE``: a user whose flag (the userdb field
        :attr:`over_status_field`) is ``TRUE`` but who is under quota runs it
        as soon as the user is set up (no lazy check).
        """
        raise NotImplementedError

    def lda_redirect(self, base_dir: Path, mail_dir: Path, script: Path, port: int) -> str:
        """``dovecot-lda``'s config: run ``script``, submit over SMTP to ``port``."""
        raise NotImplementedError


class Config23(DovecotConfig):
    """Dovecot 2.3: ``plugin { }`` strings and ``%u`` variables."""

    def quota(self, users: Path, sockets: Path | None = None, fork: Sequence[str] = (),
              tcp_port: int | None = None) -> str:
        # The rule, then the target (a ':' makes a scheme), then args; %u
        # also picks the socket, so each user can have its own.
        if fork:
            target = " ".join(_plain(w) for w in [f"exec:{fork[0]}", *fork[1:]])
        elif tcp_port is not None:
            target = f"tcp:127.0.0.1:{tcp_port}"
        else:
            assert sockets is not None
            target = f"unix:{_plain(str(sockets))}/%u.sock"
        return f"""
mail_location = maildir:~/Maildir
mail_plugins = quota
passdb {{
  driver = passwd-file
  args = {_plain(str(users))}
}}
userdb {{
  driver = passwd-file
  args = {_plain(str(users))}
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=10K
  quota_warning = storage=5%% {target} 10 %u
}}
"""

    def sieve(self, base_dir: Path, mail_dir: Path, exec_timeout: str = "") -> str:
        timeout = f"  sieve_pipe_exec_timeout = {_plain(exec_timeout)}\n" if exec_timeout else ""
        return f"""\
base_dir = {_plain(str(base_dir))}
mail_location = maildir:{_plain(str(mail_dir))}
plugin {{
  sieve_plugins = sieve_extprograms
  sieve_extensions = +vnd.dovecot.filter +vnd.dovecot.execute +vnd.dovecot.pipe
  sieve_filter_socket_dir = sieve-filter
  sieve_execute_socket_dir = sieve-execute
  sieve_pipe_socket_dir = sieve-pipe
{timeout}}}
"""

    over_status_field = "quota_over_flag"

    @staticmethod
    def _users(users: Path, plugins: str) -> str:
        return f"""
mail_location = maildir:~/Maildir
mail_plugins = {plugins}
passdb {{
  driver = passwd-file
  args = {_plain(str(users))}
}}
userdb {{
  driver = passwd-file
  args = {_plain(str(users))}
}}
"""

    def welcome(self, users: Path, socket: Path, wait: bool) -> str:
        return self._users(users, "welcome") + f"""\
plugin {{
  welcome_script = {_plain(str(socket))} hello %u
  welcome_wait = {"yes" if wait else "no"}
}}
"""

    def quota_over_status(self, users: Path, socket: Path) -> str:
        return self._users(users, "quota") + f"""\
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=10K
  quota_over_script = unix:{_plain(str(socket))} mismatch %u
  quota_over_flag_value = TRUE
}}
"""

    def lda_redirect(self, base_dir: Path, mail_dir: Path, script: Path, port: int) -> str:
        return f"""\
base_dir = {_plain(str(base_dir))}
mail_location = maildir:{_plain(str(mail_dir))}
protocol lda {{
  mail_plugins = sieve
}}
plugin {{
  sieve = file:{_plain(str(script))}
}}
submission_host = 127.0.0.1:{port}
"""


class Config24(DovecotConfig):
    """Dovecot 2.4: versioned config, named filters, ``execute`` blocks, ``%{user}``."""

    listen_setting = "listen"
    versions = "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n"

    def head(self, directory: Path, base_dir: Path, log_path: Path) -> str:
        return self.versions + super().head(directory, base_dir, log_path)

    def quota(self, users: Path, sockets: Path | None = None, fork: Sequence[str] = (),
              tcp_port: int | None = None) -> str:
        if fork:
            driver = [
                "driver = fork",
                f"fork_path = {_plain(fork[0])}",
                f"args = {' '.join(_plain(w) for w in fork[1:])} 10 %{{user}}",
            ]
        elif tcp_port is not None:
            driver = [
                "driver = tcp",
                "tcp_host = 127.0.0.1",
                f"tcp_port = {tcp_port}",
                "args = 10 %{user}",
            ]
        else:
            assert sockets is not None
            driver = [
                "driver = unix",
                f"unix_socket_path = {_plain(str(sockets))}/%{{user}}.sock",
                "args = 10 %{user}",
            ]
        execute = "\n".join(f"      {line}" for line in driver)
        return f"""
mail_driver = maildir
mail_path = ~/Maildir
mail_plugins {{
  quota = yes
}}
passdb passwd-file {{
  passwd_file_path = {_plain(str(users))}
}}
userdb passwd-file {{
  passwd_file_path = {_plain(str(users))}
}}
quota "User quota" {{
  storage_size = 10K
  warning warn-5 {{
    quota_storage_percentage = 5
    execute quota-warning {{
{execute}
    }}
  }}
}}
"""

    def sieve(self, base_dir: Path, mail_dir: Path, exec_timeout: str = "") -> str:
        timeout = f"sieve_pipe_exec_timeout = {_plain(exec_timeout)}\n" if exec_timeout else ""
        return self.versions + timeout + f"""\
base_dir = {_plain(str(base_dir))}
mail_driver = maildir
mail_path = {_plain(str(mail_dir))}
sieve_plugins {{
  sieve_extprograms = yes
}}
sieve_extensions {{
  vnd.dovecot.filter = yes
  vnd.dovecot.execute = yes
  vnd.dovecot.pipe = yes
}}
sieve_filter_socket_dir = sieve-filter
sieve_execute_socket_dir = sieve-execute
sieve_pipe_socket_dir = sieve-pipe
"""

    over_status_field = "quota_over_status_current"

    @staticmethod
    def _users(users: Path, plugin: str) -> str:
        return f"""
mail_driver = maildir
mail_path = ~/Maildir
mail_plugins {{
  {plugin} = yes
}}
passdb passwd-file {{
  passwd_file_path = {_plain(str(users))}
}}
userdb passwd-file {{
  passwd_file_path = {_plain(str(users))}
}}
"""

    def welcome(self, users: Path, socket: Path, wait: bool) -> str:
        return self._users(users, "welcome") + f"""\
welcome {{
  wait = {"yes" if wait else "no"}
  execute welcome {{
    unix_socket_path = {_plain(str(socket))}
    args = hello %{{user}}
  }}
}}
"""

    def quota_over_status(self, users: Path, socket: Path) -> str:
        return self._users(users, "quota") + f"""\
quota "User quota" {{
  storage_size = 10K
  quota_over_status_mask = TRUE
  quota_over_status {{
    execute over {{
      unix_socket_path = {_plain(str(socket))}
      args = mismatch %{{user}}
    }}
  }}
}}
"""

    def lda_redirect(self, base_dir: Path, mail_dir: Path, script: Path, port: int) -> str:
        return self.versions + f"""\
base_dir = {_plain(str(base_dir))}
mail_driver = maildir
mail_path = {_plain(str(mail_dir))}
protocol lda {{
  mail_plugins {{
    sieve = yes
  }}
}}
sieve_script personal {{
  type = personal
  driver = file
  path = {_plain(str(script))}
}}
submission_host = 127.0.0.1:{port}
"""


@dataclass(frozen=True)
class Installation:
    """One Dovecot to test against.

    Attributes:
        label: The version the tests are parametrized with (``2.4.1``);
            ``dovecot --version`` must start with it.
        root: ``/`` for the host's packages, else a chroot (``.ci/chroots``)
            that holds Dovecot and a ``python3`` for the scripts.
    """

    label: str
    root: Path

    @property
    def chrooted(self) -> bool:
        return self.root != Path("/")

    @property
    def version(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.label.split("."))

    @property
    def config(self) -> DovecotConfig:
        """The configuration syntax of this version."""
        return Config24() if self.version >= (2, 4) else Config23()

    def command(self, argv: Sequence[str], *, user: int | None = None) -> list[str]:
        """``argv`` (absolute program path) run in this installation.

        ``user``: run it as that uid and gid (no supplementary groups); only
        for the chroots, the host's callers pass ``user=`` to subprocess.
        """
        if not self.chrooted:
            assert user is None, "pass user= to subprocess on the host"
            return list(argv)
        options = [] if user is None else [f"--userspec={user}:{user}", f"--groups={user}"]
        return ["chroot", *options, str(self.root), *argv]

    def host_path(self, path: Path | str) -> Path:
        """Where an absolute path of the installation is on the host."""
        return self.root / Path(path).relative_to("/")

    @property
    def python(self) -> str:
        """The interpreter for scripts that its services run."""
        return "/usr/bin/python3" if self.chrooted else sys.executable

    def dovecot_binary(self) -> str | None:
        if not self.chrooted:
            return dovecot_binary()
        found = "/usr/sbin/dovecot"
        return found if os.access(self.host_path(found), os.X_OK) else None

    def script_binary(self) -> Path | None:
        """Dovecot's ``script`` binary, as a path inside the installation."""
        if not self.chrooted:
            return script_binary()
        for directory in ("/usr/lib/dovecot", "/usr/libexec/dovecot"):
            if os.access(self.host_path(directory) / "script", os.X_OK):
                return Path(directory) / "script"
        return None

    def tool(self, name: str) -> str | None:
        """The path (inside) of a Dovecot tool such as ``doveadm``, or None."""
        if not self.chrooted:
            found = shutil.which(name) or f"/usr/bin/{name}"
            return found if os.access(found, os.X_OK) else None
        found = f"/usr/bin/{name}"
        return found if os.access(self.host_path(found), os.X_OK) else None

    def problem(self) -> str | None:
        """Why this installation cannot be used, or None."""
        if os.geteuid() != 0:
            return "a private Dovecot needs root"
        binary = self.dovecot_binary()
        if binary is None:
            return f"Dovecot {self.label}: dovecot binary not found under {self.root}"
        if self.script_binary() is None:
            return f"Dovecot {self.label}: script binary not found under {self.root}"
        if self.chrooted and not os.access(self.host_path(self.python), os.X_OK):
            return f"Dovecot {self.label}: no {self.python} under {self.root}"
        if self.chrooted and not os.path.ismount(self.host_path("/proc")):
            return f"Dovecot {self.label}: /proc is not mounted in {self.root} (run .ci/chroots)"
        try:
            found = subprocess.run(self.command([binary, "--version"]), capture_output=True,
                                   text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"Dovecot {self.label}: {binary} --version failed: {exc}"
        if not re.match(re.escape(self.label) + r"\b", found):
            return f"Dovecot {self.label}: {self.root} has version {found!r}"
        return None

    def workspace(self, prefix: str = "execproto-interop-") -> Path:
        """A new directory (mode 0755) that has the same path inside and outside.

        In a chroot the directory is ``ROOT/tmp/NAME`` and the host gets a
        symbolic link ``/tmp/NAME`` to it. Remove it with
        :meth:`remove_workspace`.
        """
        prefix = f"{prefix}{self.label}-"
        if not self.chrooted:
            path = Path(tempfile.mkdtemp(prefix=prefix))
            path.chmod(0o755)
            return path
        real = Path(tempfile.mkdtemp(prefix=prefix, dir=self.host_path("/tmp")))
        real.chmod(0o755)
        link = Path("/tmp") / real.name
        link.symlink_to(real)
        return link

    @staticmethod
    def remove_workspace(path: Path) -> None:
        """Remove a directory made by :meth:`workspace` (and its link)."""
        if path.is_symlink():
            real = path.resolve()
            path.unlink()
            shutil.rmtree(real, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def provide_execproto(self, directory: Path) -> Path | None:
        """Make execproto's core importable by scripts run in the installation.

        Returns a directory for ``sys.path`` (a copy of the package under
        ``directory``), or None on the host, where scripts run with the
        test's own interpreter.
        """
        if not self.chrooted:
            return None
        import typing_extensions

        import execproto

        target = directory / "lib"
        if not (target / "execproto").exists():
            shutil.copytree(Path(execproto.__file__).parent, target / "execproto",
                            ignore=shutil.ignore_patterns("__pycache__", "adapters"))
            # The core's one dependency, a single module.
            shutil.copy(typing_extensions.__file__, target)
        return target


INSTALLATIONS = (
    Installation("2.3.19", Path("/")),
    Installation("2.4.1", CHROOTS / "trixie"),
    Installation("2.4.5", CHROOTS / "sid"),
)
"""The Dovecot versions the interop tests run against, oldest first."""


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
    It must run as root. ``installation`` is the Dovecot it runs (default:
    the host's); a directory given for a chrooted one must be in a
    :meth:`Installation.workspace`. If no directory is given, a temporary one is
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
        installation: Installation = INSTALLATIONS[0],
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
        self.installation = installation
        self.binary = installation.dovecot_binary() or "/usr/sbin/dovecot"
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
        script = self.installation.script_binary()
        if script is None:
            raise FileNotFoundError(f"Dovecot {self.installation.label}: no script binary")
        config = self.installation.config
        head = config.head(self.directory, self.base_dir, self.log_path)
        blocks = [s.config(script, self.ports.get(s.name), config) for s in self.services]
        return head + "\n".join(blocks) + self.extra_config

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
                self.installation.command([self.binary, "-F", "-c", str(self.config_path)]),
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
                raise RuntimeError(f"Dovecot {self.installation.label} exited early:\n{log}")
            if time.monotonic() > deadline:
                log = self._startup_output()
                self.stop()
                raise RuntimeError(f"Dovecot {self.installation.label}: listeners not ready "
                                   f"in {START_TIMEOUT}s:\n{log}")
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


def write_recorder(path: Path, python: str = sys.executable) -> Path:
    """Write the recorder script (see :data:`RECORDER_SOURCE`) to ``path``.

    The shebang is ``python``, an absolute path (default: the running
    interpreter), since scripts run with an empty environment (no ``PATH``).
    """
    source = RECORDER_SOURCE.format(python=python, output=RECORDER_OUTPUT)
    return write_script(path, source)
