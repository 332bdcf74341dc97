"""A reader for the parts of dovecot.conf this project needs.

It understands the general syntax (``key = value``, ``name [arg] {`` ...
``}``, ``#`` comments outside quotes, quoted values, ``\\`` line
continuation) and builds a tree; :func:`find_execute` then applies
Dovecot 2.4's "exactly one ``execute`` block" rule.  It does not read
files: ``!include`` lines are handed to a caller-supplied loader (the core
does no I/O), or rejected when there is none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ._errors import ConfigError
from ._settings import DEFAULT_BASE_DIR, ExecuteSettings

__all__ = [
    "ConfigSection",
    "ScriptCommand",
    "ServiceSettings",
    "execute_settings",
    "find_execute",
    "find_service",
    "parse_config",
    "parse_script_command",
]

_PORT = re.compile(r"[0-9]{1,5}")
_EXECUTE_KEYS = ("driver", "args", "fork_path", "unix_socket_path", "tcp_host", "tcp_port")


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A section of a configuration text (the whole text is the root section).

    Fields:
        kind: the section type (``service``, ``execute``...); ``""`` for the root.
        name: the section's name (``execute NAME {``), or ``""``.
        line: the line where the section starts (0 for the root).
        settings: ``(key, value, line)`` in order of appearance.
        sections: the nested sections, in order.
    """

    kind: str
    name: str
    line: int
    settings: list[tuple[str, str, int]] = field(default_factory=list)
    sections: list[ConfigSection] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value set for *key* in this section (not nested ones)."""
        for k, value, _ in reversed(self.settings):
            if k == key:
                return value
        return default

    def walk(self) -> list[ConfigSection]:
        """Return this section and every nested one, depth first, in text order."""
        # Iterative: a hostile text can nest sections thousands deep.
        found: list[ConfigSection] = []
        stack = [self]
        while stack:
            section = stack.pop()
            found.append(section)
            stack.extend(reversed(section.sections))
        return found


def _unquote(value: str, line: int) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        body = value[1:-1]
        out: list[str] = []
        i = 0
        while i < len(body):
            c = body[i]
            if c == "\\" and i + 1 < len(body):
                out.append(body[i + 1])
                i += 2
                continue
            out.append(c)
            i += 1
        return "".join(out)
    if value[:1] in ("'", '"'):
        raise ConfigError("unterminated quoted value", line)
    return value


def _strip_comment(text: str) -> str:
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            return text[:i]
        i += 1
    return text


def parse_config(
    text: str,
    *,
    include: Callable[[str], str] | None = None,
    _depth: int = 0,
) -> ConfigSection:
    """Parse dovecot.conf *text* into a tree of sections.

    Args:
        text: the configuration.
        include: called with the path of each ``!include``/``!include_try``
            line and returns that file's text (glob expansion is the
            caller's; return ``""`` for nothing).  Without it, includes are
            an error.

    Raises:
        ConfigError: with the line number, for any syntax error.
    """
    if _depth > 20:
        raise ConfigError("!include nested too deeply")
    root = ConfigSection("", "", 0)
    stack = [root]
    pending = ""
    start_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        # As config-parser.c: each physical line loses its comment and its
        # surrounding blanks; one ending in a backslash continues, joined to
        # the next with a single space.
        line = _strip_comment(raw.strip()).strip()
        if not line:
            continue
        if not pending:
            start_line = number
        if line.endswith("\\"):
            before = line[:-1].rstrip()
            pending += before + " " if before else ""
            pending = pending or " "  # remember that a continuation is open
            continue
        line = (pending.lstrip() + line) if pending else line
        pending = ""
        if line.startswith("!include"):
            keyword, _, path = line.partition(" ")
            if keyword not in ("!include", "!include_try"):
                raise ConfigError(f"unknown directive {keyword!r}", start_line)
            if include is None:
                raise ConfigError(f"{keyword} {path.strip()}: includes are not followed here",
                                  start_line)
            sub = parse_config(include(_unquote(path.strip(), start_line)), include=include,
                               _depth=_depth + 1)
            stack[-1].settings.extend(sub.settings)
            stack[-1].sections.extend(sub.sections)
            continue
        if line == "}":
            if len(stack) == 1:
                raise ConfigError("'}' without an open section", start_line)
            stack.pop()
            continue
        if line.endswith("{"):
            head = line[:-1].split()
            if not head or len(head) > 2 or "=" in line:
                raise ConfigError(f"invalid section start {line!r}", start_line)
            name = _unquote(head[1], start_line) if len(head) == 2 else ""
            section = ConfigSection(head[0], name, start_line)
            stack[-1].sections.append(section)
            stack.append(section)
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key or " " in key or "\t" in key:
            raise ConfigError(f"expected 'key = value', '{{' or '}}', got {line!r}", start_line)
        stack[-1].settings.append((key, _unquote(value.strip(), start_line), start_line))
    if pending:
        raise ConfigError("the last line ends with a continuation '\\'", start_line)
    if len(stack) > 1:
        raise ConfigError(f"section {stack[-1].kind} {stack[-1].name} is not closed",
                          stack[-1].line)
    return root


def execute_settings(section: ConfigSection) -> ExecuteSettings:
    """Turn an ``execute NAME { ... }`` section into :class:`ExecuteSettings`.

    Keys may carry the ``execute_`` prefix or not.

    Raises:
        ConfigError: an unknown key, nested sections, or a bad value.
    """
    if section.sections:
        raise ConfigError(f"execute {section.name}: unexpected nested section",
                          section.sections[0].line)
    values: dict[str, str] = {}
    for key, value, line in section.settings:
        short = key.removeprefix("execute_")
        if short not in _EXECUTE_KEYS:
            raise ConfigError(f"execute {section.name}: unknown setting {key!r}", line)
        values[short] = value
    port_text = values.pop("tcp_port", "0") or "0"
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"execute {section.name}: invalid tcp_port {port_text!r}",
                          section.line)
    return ExecuteSettings(name=section.name, tcp_port=int(port_text), line=section.line,
                           **values)


def find_execute(section: ConfigSection, name: str | None = None) -> ExecuteSettings:
    """Find the one ``execute`` block directly inside *section* (Dovecot's rule).

    Args:
        section: the consumer's section (``welcome``, ``quota_warning X``...)
            or the root.  Blocks nested deeper are not considered, unless
            *name* is given: then the block of that name is searched anywhere
            below *section*.
        name: pick the block with this name.

    Raises:
        ConfigError: no block (``execute { .. } named list filter is
            missing``), two or more (Dovecot's "only one execution is allowed"
            message), or no block called *name*.
    """
    if name is not None:
        for found in section.walk():
            if found.kind == "execute" and found.name == name:
                return execute_settings(found)
        raise ConfigError(f"no execute {name} {{ .. }} block found")
    blocks = [s for s in section.sections if s.kind == "execute"]
    if not blocks:
        raise ConfigError("execute { .. } named list filter is missing", section.line or None)
    if len(blocks) > 1:
        raise ConfigError(
            f"Extra execute {blocks[1].name} {{ .. }} named list filter - only one execution "
            f"is allowed for now (previous: execute {blocks[0].name} {{ .. }})",
            blocks[1].line)
    return execute_settings(blocks[0])


@dataclass(frozen=True, slots=True)
class ScriptCommand:
    """The ``script`` binary's command line, as a service's ``executable`` gives it.

    Fields:
        env_allowlist: names from every ``-e`` option (split on ``,``, space, TAB).
        passthrough: ``-p`` was given.
        script: the script path (relative: against the libexec directory).
        script_args: the arguments after the script path.
    """

    env_allowlist: tuple[str, ...]
    passthrough: bool
    script: str
    script_args: tuple[str, ...]


def parse_script_command(words: list[str]) -> ScriptCommand:
    """Parse ``script [-e NAMES]... [-p] SCRIPT [ARGS...]`` (PROTOCOL.md 7.1).

    *words* start after the program name.  Options stop at the first
    non-option, so options after the script path belong to the script.

    Raises:
        ConfigError: an unknown option, ``-e`` without a value, or no script
            ("Missing script path").
    """
    allow: list[str] = []
    passthrough = False
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-":
        word = words[i]
        if word == "--":
            i += 1
            break
        if word == "-p":
            passthrough = True
        elif word.startswith("-e"):
            value = word[2:]
            if not value:
                i += 1
                if i >= len(words):
                    raise ConfigError("option -e needs a value")
                value = words[i]
            allow.extend(p for p in value.replace(",", " ").replace("\t", " ").split(" ") if p)
        else:
            raise ConfigError(f"unknown script option {word!r}")
        i += 1
    if i >= len(words):
        raise ConfigError("Missing script path")
    return ScriptCommand(tuple(allow), passthrough, words[i], tuple(words[i + 1 :]))


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """A ``service NAME { ... }`` block that runs the ``script`` binary.

    Fields:
        name: the service name.
        command: the parsed ``script`` command line.
        unix_listeners: ``(path, mode)``; relative paths are joined to base_dir.
        inet_listeners: ``(address, port)``; address ``*`` / ``::`` mean any.
        line: where the block starts.
    """

    name: str
    command: ScriptCommand
    unix_listeners: tuple[tuple[str, int], ...]
    inet_listeners: tuple[tuple[str, int], ...]
    line: int


def find_service(root: ConfigSection, name: str, *, base_dir: str | None = None) -> ServiceSettings:
    """Read the script service *name* from a parsed dovecot.conf.

    The command comes from ``executable`` (2.3 and 2.4) or ``execute``
    (the 2.4 documentation's spelling), which must run ``script``.  Unix
    listener paths are relative to *base_dir* (default: the config's
    ``base_dir`` setting, else :data:`DEFAULT_BASE_DIR`).  An
    ``inet_listener`` without ``address`` listens on the top-level ``listen``
    addresses (default ``*, ::``).

    Raises:
        ConfigError: no such service, no script command, or a bad listener.
    """
    base = base_dir or root.get("base_dir") or DEFAULT_BASE_DIR
    listen = [a.strip() for a in (root.get("listen") or "*, ::").split(",") if a.strip()]
    for section in root.walk():
        if section.kind != "service" or section.name != name:
            continue
        command_text = section.get("executable") or section.get("execute")
        if not command_text:
            raise ConfigError(f"service {name}: no 'executable = script ...' setting",
                              section.line)
        words = command_text.split()
        if not words or words[0].rsplit("/", 1)[-1] != "script":
            shown = words[0] if words else command_text
            raise ConfigError(f"service {name}: executable is {shown!r}, not the script binary",
                              section.line)
        try:
            command = parse_script_command(words[1:])
        except ConfigError as exc:
            raise ConfigError(f"service {name}: {exc.message}", section.line) from None
        unix: list[tuple[str, int]] = []
        inet: list[tuple[str, int]] = []
        for sub in section.sections:
            if sub.kind == "unix_listener":
                path = sub.get("path") or sub.name
                if not path:
                    raise ConfigError("unix_listener without a path", sub.line)
                mode_text = sub.get("mode") or "0600"
                if not all(c in "01234567" for c in mode_text) or len(mode_text) > 4:
                    raise ConfigError(f"invalid unix_listener mode {mode_text!r}", sub.line)
                unix.append((path if path.startswith("/") else f"{base}/{path}",
                             int(mode_text, 8)))
            elif sub.kind == "inet_listener":
                port_text = sub.get("port") or ""
                if not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
                    raise ConfigError(f"invalid inet_listener port {port_text!r}", sub.line)
                addresses = sub.get("address")
                hosts = [a.strip() for a in addresses.split(",")] if addresses else listen
                inet.extend((h, int(port_text)) for h in hosts if h)
        return ServiceSettings(name, command, tuple(unix), tuple(inet), section.line)
    raise ConfigError(f"no service {name} {{ .. }} block found")
