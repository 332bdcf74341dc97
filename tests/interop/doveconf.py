"""Dovecot's ``doveconf`` as the reference parser for execproto's config reader.

* :class:`Doveconf` runs ``doveconf -n`` of one Dovecot version (the host's
  2.3, or a Debian chroot's 2.4) over many configuration trees in one batch.
* :func:`example_blocks` and :func:`enable_block` turn a stock
  ``/etc/dovecot`` file's commented example blocks back on, one at a time.
* :func:`execproto_verdict` is execproto's side: the reader as the CLI uses
  it, plus the checks Dovecot's settings layer makes on ``execute`` blocks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from execproto import (
    ConfigError,
    ConfigSection,
    ExecuteSettings,
    ServiceSettings,
    execute_settings,
    find_service,
    list_executes,
    parse_config,
)
from execproto.adapters.cli import _FileLoader

__all__ = [
    "CHROOTS",
    "HEADER_24",
    "VERSIONS",
    "Case",
    "Doveconf",
    "Observed",
    "Outcome",
    "Verdict",
    "doveconf_for",
    "drop_default_listeners",
    "enable_block",
    "example_blocks",
    "execproto_verdict",
    "loader_for",
    "observed",
    "parse_printed",
]

#: The Dovecot versions the reader is compared with.
VERSIONS = ("2.3.19", "2.4.1", "2.4.5")
#: Where each 2.4 version lives: a Debian chroot under :data:`CHROOT_BASE`.
CHROOTS = {"2.4.1": "trixie", "2.4.5": "sid"}
CHROOT_BASE = Path(os.environ.get("EXECPROTO_CHROOTS", "/var/cache/execproto-chroots"))
#: The lines every 2.4 configuration must start with.
HEADER_24 = "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n"

_ERROR = re.compile(r"Error in configuration file (?P<file>.+?)(?: line (?P<line>\d+))?: "
                    r"(?P<reason>.*)")


@dataclass(frozen=True)
class Case:
    """One configuration tree: files by relative path, and the main file.

    Fields:
        name: shown when the case fails.
        files: relative path -> text.
        main: the file given to ``-c``.
        base: a directory (inside the root) copied under the case first, e.g.
            a stock ``/etc/dovecot``; *files* then replace some of its files.
    """

    name: str
    files: dict[str, str]
    main: str = "dovecot.conf"
    base: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What ``doveconf -n`` did with one case."""

    accepted: bool
    output: str  # the configuration it printed
    error: str  # the Fatal line, or ""
    file: str | None = None
    line: int | None = None
    reason: str = ""


class Doveconf:
    """``doveconf`` of one version, run on the host or in a chroot."""

    def __init__(self, version: str, root: Path) -> None:
        self.version = version
        self.root = root

    @property
    def strict_escapes(self) -> bool:
        """Dovecot 2.4.4 and later refuse escapes other than ``\\\\`` and ``\\"``."""
        numbers = tuple(int(n) for n in re.findall(r"[0-9]+", self.version)[:3])
        return numbers >= (2, 4, 4)

    @property
    def is_24(self) -> bool:
        """Dovecot 2.4's syntax (execute blocks, the version header)."""
        return self.version.startswith("2.4")

    def stock(self) -> str:
        """The stock configuration directory, as a path inside the root."""
        return "/etc/dovecot"

    def run(self, cases: Sequence[Case], workdir: str) -> list[Outcome]:
        """Write *cases* under *workdir* (inside the root) and run doveconf on each.

        One process (one chroot) runs them all; each case's output, errors and
        exit status go to files next to it.
        """
        real = self.real(workdir)
        real.mkdir(parents=True, exist_ok=True)
        for index, case in enumerate(cases):
            directory = real / str(index)
            if case.base is not None:
                shutil.copytree(self.real(case.base), directory, symlinks=True)
            for name, text in case.files.items():
                path = directory / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(text.encode("utf-8", "surrogateescape"))
        script = (
            f'cd {workdir} && for i in $(seq 0 {len(cases) - 1}); do '
            f'doveconf -n -c "{workdir}/$i/$(cat $i/.main)" >$i/.out 2>$i/.err; '
            'echo $? >$i/.rc; done'
        )
        for index, case in enumerate(cases):
            (real / str(index) / ".main").write_text(case.main)
        command = ["/bin/sh", "-c", script]
        if self.root != Path("/"):
            command = ["chroot", str(self.root), *command]
        subprocess.run(command, check=True, timeout=600, env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
        outcomes = []
        for index in range(len(cases)):
            directory = real / str(index)
            rc = int((directory / ".rc").read_text())
            output = (directory / ".out").read_text(errors="surrogateescape")
            errors = (directory / ".err").read_text(errors="surrogateescape")
            fatal = [line for line in errors.splitlines() if "Fatal:" in line]
            if rc == 0:
                outcomes.append(Outcome(True, output, ""))
                continue
            error = fatal[-1] if fatal else errors.strip() or f"exit status {rc}"
            match = _ERROR.search(error)
            if match:
                line = match.group("line")
                outcomes.append(Outcome(False, output, error, match.group("file"),
                                        int(line) if line else None, match.group("reason")))
            else:
                outcomes.append(Outcome(False, output, error, reason=error))
        return outcomes

    def real(self, path: str) -> Path:
        """Where a path inside the root is on this machine."""
        return Path(str(self.root).rstrip("/") + path)

    def workdir(self) -> str:
        """A fresh directory inside the root, as a path inside it."""
        real = self.real("/tmp")
        real.mkdir(exist_ok=True)
        made = tempfile.mkdtemp(prefix="execproto-doveconf-", dir=real)
        return made[len(str(self.root).rstrip("/")):]


def _version_of(root: Path) -> str | None:
    command = ["dovecot", "--version"]
    if root != Path("/"):
        command = ["chroot", str(root), *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except OSError:
        return None
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else None


def doveconf_for(version: str) -> Doveconf | str:
    """The doveconf of *version*, or why it is not available."""
    if version in CHROOTS:
        root = CHROOT_BASE / CHROOTS[version]
        if not (root / ".ready").exists():
            return f"no Dovecot {version} chroot at {root} (.ready missing)"
        if os.geteuid() != 0:
            return "chroot needs root"
    else:
        root = Path("/")
        if shutil.which("doveconf") is None:
            return "doveconf not found"
    found = _version_of(root)
    if found is None:
        return f"dovecot --version failed in {root}"
    if not found.startswith(version):
        return f"Dovecot {found} instead of {version} in {root}"
    return Doveconf(version, root)


# --- the stock trees' commented examples -------------------------------------------------

_CODE = re.compile(
    r"""\s*(?:[A-Za-z0-9_!."@-]+\s*=.*|[A-Za-z0-9_@!.-]+(?:\s+(?:"[^"]*"|\S+))?\s*\{|\})\s*""")
_OPEN = re.compile(r"""\s*[A-Za-z0-9_@!.-]+(?:\s+(?:"[^"]*"|\S+))?\s*\{\s*""")


def _uncommented(line: str) -> str | None:
    """The code a ``#code`` line holds, or ``None`` for prose and other lines."""
    stripped = line.lstrip()
    if not stripped.startswith("#") or stripped.startswith("##"):
        return None
    code = stripped[1:]
    return code if _CODE.fullmatch(code) else None


def example_blocks(text: str) -> list[tuple[int, int]]:
    """Commented-out sections (``#service x {`` ... ``#}``): (first, last) line indexes.

    Inside a block, ``#code`` lines are part of it and ``# prose`` lines stay
    comments.  Blocks inside a larger commented block are not listed again.
    """
    lines = text.split("\n")
    blocks: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        code = _uncommented(lines[i])
        if code is None or not _OPEN.fullmatch(code):
            i += 1
            continue
        depth, j = 0, i
        while j < len(lines):
            code = _uncommented(lines[j])
            if code is not None:
                depth += code.rstrip().endswith("{") - (code.strip() == "}")
                if depth == 0:
                    break
            elif lines[j].strip() and not lines[j].lstrip().startswith("#"):
                break  # live code inside: not a self-contained example
            j += 1
        if depth == 0 and j < len(lines):
            blocks.append((i, j))
            i = j + 1
        else:
            i += 1
    return blocks


def enable_block(text: str, block: tuple[int, int]) -> str:
    """*text* with the ``#code`` lines of *block* uncommented."""
    lines = text.split("\n")
    for k in range(block[0], block[1] + 1):
        if _uncommented(lines[k]) is not None:
            lines[k] = lines[k].replace("#", "", 1)
    return "\n".join(lines)


# --- execproto's side ---------------------------------------------------------------------


@dataclass
class Verdict:
    """What execproto made of a case."""

    root: ConfigSection | None
    error: ConfigError | None = None
    checks: list[str] = field(default_factory=list)


def loader_for(doveconf: Doveconf) -> _FileLoader:
    """The CLI's file loader, reading inside *doveconf*'s root."""
    return _FileLoader(root=str(doveconf.root) if doveconf.root != Path("/") else "")


def execproto_verdict(doveconf: Doveconf, path: str) -> Verdict:
    """Read *path* (inside the root) as ``execproto --config`` does.

    On 2.4 the ``execute`` blocks are also checked as Dovecot's settings
    check does (driver, tcp host:port), since doveconf rejects bad ones.
    """
    loader = loader_for(doveconf)
    try:
        text = doveconf.real(path).read_bytes().decode("utf-8", "surrogateescape")
        root = parse_config(text, loader=loader, name=path,
                            strict_escapes=doveconf.strict_escapes)
    except ConfigError as exc:
        return Verdict(None, exc)
    if doveconf.is_24:
        for section in root.walk():
            if section.kind == "execute":
                try:
                    execute_settings(section).target()
                except ConfigError as exc:
                    return Verdict(None, exc)
    return Verdict(root)


def _execute_values(root: ConfigSection) -> list[tuple[str, object]]:
    """Each execute block (and 2.3 program setting) without its position."""
    values: list[tuple[str, object]] = []
    for where, settings in list_executes(root):
        place = where.rsplit(" (", 1)[0]
        if isinstance(settings, ExecuteSettings):
            values.append((place, (settings.name, settings.driver, settings.args,
                                   settings.fork_path, settings.unix_socket_path,
                                   settings.tcp_host, settings.tcp_port)))
        else:
            values.append((place, settings.reason))
    return sorted(values, key=repr)


def _service_values(root: ConfigSection, names: set[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name in sorted(names):
        try:
            service: ServiceSettings = find_service(root, name)
        except ConfigError as exc:
            values[name] = exc.reason
        else:
            # doveconf -n prints listeners sorted by name: compare them as sets.
            values[name] = (service.command, sorted(service.unix_listeners),
                            sorted(service.inet_listeners))
    return values


def drop_default_listeners(root: ConfigSection) -> None:
    """Remove unix listeners that set nothing (in place).

    doveconf 2.3's ``-n`` leaves them out of its output (and, when one is
    the last thing of the last service, the service's closing brace too).
    """
    for section in root.walk():
        keep = [s for s in section.sections
                if not (s.kind == "unix_listener" and not s.sections and not s.settings)]
        section.sections[:] = keep


def parse_printed(output: str, doveconf: Doveconf, name: str) -> ConfigSection:
    """Parse what ``doveconf -n`` printed (adding the closing braces 2.3 may omit)."""
    for _ in range(10):
        try:
            return parse_config(output, loader=loader_for(doveconf), name=name)
        except ConfigError as exc:
            if doveconf.is_24 or not exc.reason.startswith("Missing '}'"):
                raise
            output += "}\n"
    return parse_config(output, loader=loader_for(doveconf), name=name)


@dataclass(frozen=True)
class Observed:
    """The values execproto reads from a tree: script services and execute blocks."""

    services: dict[str, object]
    executes: list[tuple[str, object]]


def observed(root: ConfigSection, services: set[str] | None = None) -> Observed:
    """What execproto reads from *root* (for the script services named, default: all)."""
    if services is None:
        services = set()
        for section in root.sections:
            if section.kind == "service":
                command = section.get("executable") or section.get("execute") or ""
                words = command.split()
                if words and words[0].rsplit("/", 1)[-1] == "script":
                    services.add(section.name)
    return Observed(_service_values(root, services), _execute_values(root))
