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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._errors import ConfigError
from ._settings import DEFAULT_BASE_DIR, ExecuteSettings, parse_hostport

__all__ = [
    "MAX_INCLUDE_DEPTH",
    "SIEVE_EXTENSIONS",
    "ConfigLoader",
    "ConfigSection",
    "ScriptCommand",
    "ServiceSettings",
    "convert_legacy_args",
    "describe_section",
    "execute_settings",
    "filter_kind",
    "find_execute",
    "find_service",
    "legacy_executes",
    "legacy_target",
    "list_executes",
    "parse_config",
    "parse_script_command",
    "sieve_programs",
]

_PORT = re.compile(r"[0-9]{1,5}")
_EXECUTE_KEYS = ("driver", "args", "fork_path", "unix_socket_path", "tcp_host", "tcp_port")


class ConfigLoader(Protocol):
    """What :func:`parse_config` asks for the files a configuration refers to.

    The core does no I/O: the caller resolves and reads files, with Dovecot's
    rules (see the CLI's implementation): a relative path is relative to the
    directory of the file it appears in (*parent*), ``!include`` takes a glob
    pattern whose matches are read in sorted order.  Errors are raised as
    :class:`ConfigError` with only a reason; the parser adds the file and
    line of the directive.
    """

    def include(self, pattern: str, parent: str, optional: bool) -> Sequence[tuple[str, str]]:
        """The files ``!include PATTERN`` (*optional*: ``!include_try``) names.

        Returns ``(name, text)`` pairs in the order Dovecot reads them; the
        name is what errors in that file are reported with.  An empty list
        means nothing to include (an ``!include`` that matches nothing is an
        error: raise ``ConfigError("No matches")``).
        """
        ...

    def read(self, path: str, parent: str) -> str:
        """The contents of the file a ``key = <PATH`` value names."""
        ...


class _LegacyLoader:
    """Adapts a ``path -> text`` callable: names are the paths as written."""

    def __init__(self, func: Callable[[str], str]) -> None:
        self.func = func

    def include(self, pattern: str, parent: str, optional: bool) -> Sequence[tuple[str, str]]:
        return [(pattern, self.func(pattern))]

    def read(self, path: str, parent: str) -> str:
        raise ConfigError(f"<{path}: values read from files are not followed here")


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A section of a configuration text (the whole text is the root section).

    Fields:
        kind: the section type (``service``, ``execute``...); ``""`` for the root.
        name: the section's name (``execute NAME {``, quotes removed), or ``""``.
        line: the line where the section starts (0 for the root).
        settings: ``(key, value, line)`` in order of appearance.
        sections: the nested sections, in order.
        file: the name of the file the section starts in (``""``: unnamed text).
        origins: for each entry of *settings*, the file it is in and whether
            its value is a ``<PATH`` reference (read by :meth:`get`).
        parent: the enclosing section (``None`` for the root).
    """

    kind: str
    name: str
    line: int
    settings: list[tuple[str, str, int]] = field(default_factory=list)
    sections: list[ConfigSection] = field(default_factory=list)
    file: str = ""
    origins: list[tuple[str, bool]] = field(default_factory=list, compare=False, repr=False)
    parent: ConfigSection | None = field(default=None, compare=False, repr=False)
    loader: ConfigLoader | None = field(default=None, compare=False, repr=False)

    def _origin(self, index: int) -> tuple[str, bool]:
        return self.origins[index] if index < len(self.origins) else (self.file, False)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value set for *key* in this section (not nested ones).

        A ``key = <PATH`` value is read through the loader given to
        :func:`parse_config` (only now: Dovecot too reads only the files of
        settings it uses).

        Raises:
            ConfigError: a ``<PATH`` value that cannot be read.
        """
        for index in range(len(self.settings) - 1, -1, -1):
            k, value, line = self.settings[index]
            if k != key:
                continue
            file, from_file = self._origin(index)
            if not from_file:
                return value
            if self.loader is None:
                raise ConfigError(f"{key}: <{value}: values read from files are not followed "
                                  "here", line, file or None)
            try:
                return self.loader.read(value, file)
            except ConfigError as exc:
                raise ConfigError(exc.reason, line, file or None) from None
        return default

    def where(self, key: str) -> tuple[str, int] | None:
        """``(file, line)`` of the last setting of *key* here, or ``None``."""
        for index in range(len(self.settings) - 1, -1, -1):
            if self.settings[index][0] == key:
                return self._origin(index)[0], self.settings[index][2]
        return None

    def path(self) -> list[ConfigSection]:
        """The sections from the root's first child down to this one."""
        chain: list[ConfigSection] = []
        section: ConfigSection | None = self
        while section is not None and section.parent is not None:
            chain.append(section)
            section = section.parent
        return chain[::-1]

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


def _is_space(c: str) -> bool:
    # Dovecot 2.4's i_isspace(); 2.3 only skips blanks, which is the same
    # once lines are split on LF and lose a trailing CR.
    return c in " \t\r\n\v\f"


def _str_unescape(text: str, strict: bool = False) -> str:
    """Dovecot's str_unescape(): a backslash keeps the next character as is.

    *strict*: Dovecot 2.4.4's config_str_unescape(), which knows only
    ``\\\\`` and ``\\"`` (raises ConfigError for any other escape).
    """
    if "\\" not in text:
        return text
    if strict:
        for m in re.finditer(r"\\(.?)", text, re.DOTALL):
            if m.group(1) not in ("\\", '"'):
                raise ConfigError(f"Unknown escape sequence \\{m.group(1)}")
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 1
            if i >= len(text):
                break
            c = text[i]
        out.append(c)
        i += 1
    return "".join(out)


def _strip_comment(line: str) -> str:
    """Cut a ``#`` comment outside quotes (config-parser.c's scan, quirks included).

    A quote opens anywhere (``don't``); one left open ends the scan, so the
    rest of the line, ``#`` included, stays.
    """
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c in "\"'":
            i += 1
            while i < n and line[i] != c:
                i += 2 if line[i] == "\\" and i + 1 < n else 1
            if i >= n:
                return line
        elif c == "#":
            return line[:i]
        i += 1
    return line


_WHITE = " \t\r\n\v\f"


@dataclass(slots=True)
class _Input:
    name: str
    lines: list[str]
    index: int = 0


#: A bound on nested !include files (Dovecot has none but recursion detection).
MAX_INCLUDE_DEPTH = 100


def _parse_line(line: str, strict: bool = False) -> tuple[str, str, str, bool]:
    """One logical line: ``(type, key, value, quoted)``.

    Types: ``set`` (key = value), ``file`` (key = <path), ``begin``
    (section kind, name), ``end``, ``include``, ``include_try`` and
    ``error`` (value: Dovecot's message).
    """
    n = len(line)
    # a) key = value   b) section_type [section_name] {   c) }
    if line.startswith('"'):  # Dovecot 2.4: a quoted key
        i = 1
        while i < n:
            if line[i] == "\\" and i + 1 < n:
                i += 2
            elif line[i] == '"':
                break
            else:
                i += 1
        key = _str_unescape(line[1:i], True) if strict else line[1:i]
        i += 1
    else:
        i = 0
        while i < n and not _is_space(line[i]) and line[i] != "=":
            i += 1
        key = line[:i]
    while i < n and _is_space(line[i]):
        i += 1
    rest = line[i:]
    if key in ("!include", "!include_try"):
        return ("include" if key == "!include" else "include_try"), key, rest, False
    if rest.startswith("="):
        value = rest[1:].lstrip(_WHITE)
        if value.startswith("<"):
            return "file", key, value[1:].lstrip(_WHITE), False
        if value[:1] in ('"', "'") and len(value) >= 1 and value[-1] == value[0]:
            return "set", key, _str_unescape(value[1:-1], strict), True
        return "set", key, value, False
    if key == "}" and not rest:
        return "end", key, "", False
    if rest.startswith("{"):
        name, quoted, after = "", False, rest
    elif key == "group":  # Dovecot 2.4: group @group name {
        words = rest.split(maxsplit=2)
        if len(words) < 2:
            return "error", key, "Expecting group name", False
        if len(words) < 3 or not words[2].startswith("{"):
            return "error", key, "Expecting '{'", False
        key, name, quoted, after = words[0], words[1], False, words[2]
    elif rest.startswith('"'):
        close = rest.find('"', 1)
        if close < 0:
            return "error", key, "Expecting '{'", False
        name, quoted = _str_unescape(rest[1:close], strict), True
        after = rest[close + 1 :].lstrip(_WHITE)
    else:
        j = 0
        while j < len(rest) and not _is_space(rest[j]):
            j += 1
        name, quoted, after = rest[:j], False, rest[j:].lstrip(_WHITE)
    if not after.startswith("{"):
        return "error", key, "Expecting '{'", False
    if after != "{":
        return "error", key, "Garbage after '{'", False
    return "begin", key, name, quoted


def parse_config(
    text: str,
    *,
    include: Callable[[str], str] | None = None,
    loader: ConfigLoader | None = None,
    name: str = "",
    strict_escapes: bool = False,
) -> ConfigSection:
    """Parse dovecot.conf *text* into a tree of sections, as Dovecot's config-parser.c.

    The syntax is Dovecot's, quirks included: a ``#`` outside quotes starts
    a comment; a line ending in ``\\`` continues on the next (joined with a
    space; a blank or comment line in between drops what was gathered);
    ``"..."`` values and section names lose their quotes and backslashes;
    a value with an unbalanced quote is kept as written; ``key = <PATH``
    reads the value from a file when it is used (:meth:`ConfigSection.get`).
    Dovecot's setting names are not checked: any key is kept.

    Args:
        text: the configuration.
        include: legacy loader: called with the path of each
            ``!include``/``!include_try`` line as written, returns that file's
            text (``""`` for nothing); errors in it name the path as written.
        loader: a :class:`ConfigLoader` for includes and ``<PATH`` values
            (takes precedence over *include*).  Without either, includes are
            an error.
        name: the file name of *text*, for error messages and for the loader
            to resolve relative paths against.
        strict_escapes: read quoted text as Dovecot 2.4.4 and later do:
            only ``\\\\`` and ``\\"`` may follow a backslash ("Unknown escape
            sequence" otherwise; 2.3 and 2.4.1 take any escaped character as
            itself, the default here).

    Raises:
        ConfigError: for any syntax error, with Dovecot's message where it has
            one, the name of the file the error is in and the line there.
    """
    if loader is None and include is not None:
        loader = _LegacyLoader(include)
    root = ConfigSection("", "", 0, file=name, loader=loader)
    stack = [root]
    inputs = [_Input(name, text.split("\n"))]
    # A trailing newline does not start another line.
    if inputs[0].lines and inputs[0].lines[-1] == "":
        inputs[0].lines.pop()
    pending: list[str] = []
    while inputs:
        current = inputs[-1]
        if current.index >= len(current.lines):
            inputs.pop()
            continue
        raw = current.lines[current.index]
        current.index += 1
        number = current.index
        file = current.name
        # C strings: a NUL ends the line; i_stream_next_line() drops a CR before LF.
        raw = raw.partition("\0")[0]
        if raw.endswith("\r"):
            raw = raw[:-1]
        line = raw.lstrip(_WHITE)
        if not line or line[0] == "#":
            pending.clear()
            continue
        line = _strip_comment(line).rstrip(_WHITE)
        if line.endswith("\\"):
            before = line[:-1].rstrip(_WHITE)
            if before:
                pending.append(before + " ")
            continue
        if pending:
            line = "".join(pending) + line
            pending.clear()
        try:
            kind, key, value, _ = _parse_line(line, strict_escapes)
        except ConfigError as exc:
            raise ConfigError(exc.reason, number, file or None) from None
        if kind == "error":
            raise ConfigError(value, number, file or None)
        if kind in ("include", "include_try"):
            if loader is None:
                raise ConfigError(f"!{kind} {value}: includes are not followed here",
                                  number, file or None)
            if len(inputs) > MAX_INCLUDE_DEPTH:
                raise ConfigError("!include nested too deeply", number, file or None)
            try:
                found = list(loader.include(value, file, kind == "include_try"))
            except ConfigError as exc:
                raise ConfigError(exc.reason, number, file or None) from None
            open_names = {i.name for i in inputs}
            for sub_name, _ in found:
                if sub_name in open_names:
                    raise ConfigError(f"Recursive include file: {sub_name}", number,
                                      file or None)
            for sub_name, sub_text in reversed(found):
                lines = sub_text.split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                inputs.append(_Input(sub_name, lines))
            continue
        section = stack[-1]
        if kind == "end":
            if len(stack) == 1:
                raise ConfigError("Unexpected '}'", number, file or None)
            stack.pop()
        elif kind == "begin":
            if not key:
                raise ConfigError("Expecting '{'", number, file or None)
            child = ConfigSection(key, value, number, file=file, parent=section, loader=loader)
            section.sections.append(child)
            stack.append(child)
        else:
            if not key:
                raise ConfigError("Missing setting name before '='", number, file or None)
            section.settings.append((key, value, number))
            section.origins.append((file, kind == "file"))
    if len(stack) > 1:
        open_section = stack[-1]
        raise ConfigError(
            f"Missing '}}' (section started at {open_section.file or '<text>'}:"
            f"{open_section.line})", open_section.line, open_section.file or None)
    return root


def _err(message: str, section: ConfigSection, line: int | None = None,
         file: str | None = None) -> ConfigError:
    return ConfigError(message, section.line if line is None else line,
                       (section.file if file is None else file) or None)


def execute_settings(section: ConfigSection) -> ExecuteSettings:
    """Turn an ``execute NAME { ... }`` section into :class:`ExecuteSettings`.

    Keys may carry the ``execute_`` prefix or not.

    Raises:
        ConfigError: an unknown key, nested sections, or a bad value.
    """
    if section.sections:
        sub = section.sections[0]
        raise _err(f"execute {section.name}: unexpected nested section", sub, file=sub.file)
    values: dict[str, str] = {}
    for key, _, line in section.settings:
        short = key.removeprefix("execute_")
        if short not in _EXECUTE_KEYS:
            file = section.where(key)
            raise _err(f"execute {section.name}: unknown setting {key!r}", section, line,
                       file[0] if file else None)
        values[short] = section.get(key) or ""
    port_text = values.pop("tcp_port", "0") or "0"
    if not _PORT.fullmatch(port_text):
        raise _err(f"execute {section.name}: invalid tcp_port {port_text!r}", section)
    return ExecuteSettings(name=section.name, tcp_port=int(port_text), line=section.line,
                           file=section.file or None, **values)


#: Dovecot 2.4 settings that a named filter's key stands for inside another
#: filter (``quota "x" { warning w { } }`` is ``quota_warning w``).
_PREFIXED_FILTERS = frozenset({"quota_warning"})
#: How many blocks an ambiguity error lists, and how many filters of each.
_LISTED = 20
_DEPTH_SHOWN = 8


def filter_kind(section: ConfigSection) -> str:
    """The section's type as ``doveconf -n`` prints it (Dovecot 2.4's prefixing).

    Inside a filter ``quota``, ``warning`` is ``quota_warning`` (doveconf
    2.4 accepts no other short form there); other types are unchanged.
    """
    parent = section.parent
    if parent is not None and f"{parent.kind}_{section.kind}" in _PREFIXED_FILTERS:
        return f"{parent.kind}_{section.kind}"
    return section.kind


def _label(section: ConfigSection) -> str:
    name = section.name
    if name and any(c in name for c in ' \t"{}#'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{filter_kind(section)} {name}".rstrip()


def describe_section(section: ConfigSection) -> str:
    """Where a section is: its enclosing filters, its file and line.

    For example ``quota "User quota" / quota_warning warn-95 / execute
    quota-warning (conf.d/90-quota.conf line 12)``.
    """
    path = section.path()
    # The innermost filters tell blocks apart; a hostile depth stays short.
    chain = " / ".join(_label(s) for s in path[-_DEPTH_SHOWN:])
    if len(path) > _DEPTH_SHOWN:
        chain = ".../ " + chain
    where = f"{section.file} line {section.line}" if section.file else f"line {section.line}"
    return f"{chain} ({where})"


def _matches(section: ConfigSection, selector: str) -> bool:
    selector = " ".join(selector.split())
    kind = filter_kind(section)
    return selector in (section.name, section.kind, kind, _label(section),
                        f"{section.kind} {section.name}", f"{kind} {section.name}")


def _selected(section: ConfigSection, filters: Sequence[str]) -> bool:
    """Every filter matches an enclosing section, in order (outermost first)."""
    if not filters:
        return True
    ancestors = section.path()[:-1]
    i = 0
    for selector in filters:
        while i < len(ancestors) and not _matches(ancestors[i], selector):
            i += 1
        if i >= len(ancestors):
            return False
        i += 1
    return True


def find_execute(
    section: ConfigSection,
    name: str | None = None,
    *,
    filters: Sequence[str] = (),
) -> ExecuteSettings:
    """Find an ``execute`` block: Dovecot's rule, or by name.

    Args:
        section: the consumer's section (``welcome``, ``quota_warning X``...)
            or the root.  Without *name* only blocks directly inside it count
            (Dovecot's rule: exactly one).
        name: the block's name: searched anywhere below *section*, also in
            named filters (``quota "User quota" { warning warn-95 {
            execute quota-warning { ... } } }``) and in Dovecot 2.3's
            ``plugin { quota_warning* = ... }`` and ``welcome_script``
            settings (see :func:`legacy_executes`).
        filters: choose among several blocks of that name: each selector must
            match an enclosing section, outermost first, by name
            (``warn-95``), type (``quota_warning``; 2.4's short forms such
            as ``warning`` too) or both (``quota_warning warn-95``).

    Raises:
        ConfigError: no block (``execute { .. } named list filter is
            missing``), two or more without *name* (Dovecot's "only one
            execution is allowed" message), none called *name*, or several
            called *name* that *filters* do not tell apart (the message lists
            each one with its filters, file and line).
    """
    if name is not None:
        candidates = [s for s in section.walk()
                      if s.kind == "execute" and s.name == name and _selected(s, filters)]
        legacy = [(where, settings) for labels, where, settings in _legacy(section)
                  if settings.name == name and _legacy_selected(labels, filters)]
        if len(candidates) + len(legacy) == 1:
            return execute_settings(candidates[0]) if candidates else legacy[0][1]
        if not candidates and not legacy:
            scope = f" within {' / '.join(filters)}" if filters else ""
            raise ConfigError(f"no execute {name} {{ .. }} block found{scope}")
        count = len(candidates) + len(legacy)
        places = [describe_section(c) for c in candidates[:_LISTED]]
        places += [w for w, _ in legacy[: _LISTED - len(places)]]
        more = f"; and {count - len(places)} more" if count > len(places) else ""
        raise ConfigError(
            f"{count} execute {name} {{ .. }} blocks, choose one by its filters: "
            + "; ".join(places) + more)
    blocks = [s for s in section.sections if s.kind == "execute"]
    if not blocks:
        raise ConfigError("execute { .. } named list filter is missing", section.line or None,
                          section.file or None)
    if len(blocks) > 1:
        raise _err(
            f"Extra execute {blocks[1].name} {{ .. }} named list filter - only one execution "
            f"is allowed for now (previous: execute {blocks[0].name} {{ .. }})", blocks[1])
    return execute_settings(blocks[0])


def list_executes(root: ConfigSection) -> list[tuple[str, ExecuteSettings | ConfigError]]:
    """Every ``execute`` block and 2.3 program setting, with where it is.

    Returns ``(description, settings or the error reading it)`` pairs in text
    order: 2.4 blocks first, then the 2.3 forms.
    """
    found: list[tuple[str, ExecuteSettings | ConfigError]] = []
    for section in root.walk():
        if section.kind == "execute":
            try:
                found.append((describe_section(section), execute_settings(section)))
            except ConfigError as exc:
                found.append((describe_section(section), exc))
    found.extend(legacy_executes(root))
    return found


# --- Dovecot 2.3 forms (PROTOCOL.md 9.5) -------------------------------------------------

_LEGACY_VARS = {"u": "user", "n": "user | username", "d": "user | domain", "h": "home",
                "s": "service", "l": "local_ip", "r": "remote_ip", "p": "pid",
                "i": "uid", "a": "local_port", "b": "remote_port"}
_LEGACY_MODIFIERS = {"L": "lower", "U": "upper"}
_QUOTA_WARNING = re.compile(r"quota_warning[0-9]*")


def convert_legacy_args(template: str) -> str:
    """Rewrite Dovecot 2.3 ``%u``-style variables in the 2.4 ``%{...}`` syntax.

    ``%%`` is a ``%``; ``%u`` user, ``%n`` its user part, ``%d`` its domain,
    ``%h`` home, ``%s`` service, ``%l``/``%r`` local/remote IP, ``%{name}``
    a long name; ``L``/``U`` modifiers (``%Lu``) lower/upper the value.

    Raises:
        ConfigError: a variable or modifier this conversion does not know.
    """
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        i += 1
        modifiers: list[str] = []
        while i < n and template[i] in _LEGACY_MODIFIERS:
            modifiers.append(_LEGACY_MODIFIERS[template[i]])
            i += 1
        if i >= n:
            raise ConfigError(f"'%' at the end of {template!r}")
        c = template[i]
        if c == "%" and not modifiers:
            # A literal '%': keep a following '{' literal in the 2.4 syntax.
            out.append("%%" if template.startswith("{", i + 1) else "%")
            i += 1
            continue
        if c == "{":
            close = template.find("}", i)
            if close < 0:
                raise ConfigError(f"unterminated %{{ in {template!r}")
            var = template[i + 1 : close].strip()
            i = close + 1
        elif c in _LEGACY_VARS:
            var = _LEGACY_VARS[c]
            i += 1
        else:
            raise ConfigError(f"unsupported 2.3 variable '%{c}' in {template!r}")
        out.append("%{" + " | ".join([var, *modifiers]) + "}")
    return "".join(out)


def legacy_target(text: str, name: str, line: int, file: str | None,
                  args: str) -> ExecuteSettings:
    """A 2.3 quota-warning/welcome target word as :class:`ExecuteSettings`.

    The text before the first ``:`` is the scheme (``unix``, ``tcp``,
    ``exec``), none means ``unix`` (quirk Q20: a unix path with a ``:`` is
    misread the same way).  *args* and a unix or exec path are in 2.3
    syntax (``%u``), converted to 2.4's; expand them with
    :meth:`ExecuteSettings.expand` and :meth:`ExecuteSettings.expand_args`.

    Raises:
        ConfigError: an unknown scheme or bad variable.
    """
    scheme, colon, rest = text.partition(":")
    if not colon:
        scheme, rest = "unix", text
    converted = convert_legacy_args(args)
    # 2.3 expands the whole string, the target too (unix:/run/qw/%u.sock).
    rest = convert_legacy_args(rest) if scheme in ("unix", "exec") else rest
    if scheme == "unix":
        return ExecuteSettings(name=name, unix_socket_path=rest, args=converted, line=line,
                               file=file)
    if scheme == "exec":
        return ExecuteSettings(name=name, driver="fork", fork_path=rest, args=converted,
                               line=line, file=file)
    if scheme == "tcp":
        host, port = parse_hostport(rest)
        return ExecuteSettings(name=name, driver="tcp", tcp_host=host, tcp_port=port,
                               args=converted, line=line, file=file)
    raise ConfigError(f"Unsupported program client scheme '{scheme}'", line, file)


def _legacy(root: ConfigSection) -> list[tuple[list[str], str, ExecuteSettings]]:
    # plugin { } blocks at one place merge: the last value of a key wins.
    last: dict[tuple[tuple[str, ...], str], tuple[ConfigSection, int]] = {}
    for plugin in root.walk():
        if plugin.kind != "plugin":
            continue
        chain = tuple(_label(s) for s in plugin.path())
        for index, (key, _, _) in enumerate(plugin.settings):
            last.pop((chain, key), None)  # keep the order of the winning value
            last[(chain, key)] = (plugin, index)
    found: list[tuple[list[str], str, ExecuteSettings]] = []
    for (chain, key), (plugin, index) in last.items():
        _, value, line = plugin.settings[index]
        words = [w for w in value.split(" ") if w]
        if _QUOTA_WARNING.fullmatch(key):
            words = words[1:]  # the rule: storage=95%%, -messages=10...
        elif key != "welcome_script":
            continue
        if not words:
            continue
        file = plugin._origin(index)[0] or None
        labels = [*chain, key]
        where = f"{file} line {line}" if file else f"line {line}"
        try:
            settings = legacy_target(words[0], words[0], line, file, " ".join(words[1:]))
        except ConfigError:
            continue
        found.append((labels, f"{' / '.join(labels)} ({where})", settings))
    return found


def legacy_executes(root: ConfigSection) -> list[tuple[str, ExecuteSettings]]:
    """The programs a Dovecot 2.3 ``plugin { }`` section runs (PROTOCOL.md 9.5).

    ``quota_warning``, ``quota_warning2``...: ``RULE TARGET ARGS`` (rule as
    ``storage=95%%``); ``welcome_script``: ``TARGET ARGS``.  The execute
    name is the target word as written (``quota-warning``), so the same
    ``--execute quota-warning`` finds the 2.4 block and the 2.3 setting.
    Each comes with a description: ``plugin / quota_warning2 (FILE line N)``.
    Settings that cannot be read are left out.
    """
    return [(where, settings) for _, where, settings in _legacy(root)]


def _legacy_selected(labels: list[str], filters: Sequence[str]) -> bool:
    i = 0
    for selector in filters:
        selector = " ".join(selector.split())
        while i < len(labels) and selector not in (labels[i], *labels[i].split(" ", 1)):
            i += 1
        if i >= len(labels):
            return False
        i += 1
    return True


#: The Pigeonhole extprograms extensions: vnd.dovecot.pipe, .filter, .execute.
SIEVE_EXTENSIONS = ("pipe", "filter", "execute")


def _top_setting(root: ConfigSection, key: str) -> tuple[str, int, str | None] | None:
    """A top-level setting (2.4), else the last in a top-level ``plugin { }`` (2.3)."""
    for section in [root, *reversed([s for s in root.sections if s.kind == "plugin"])]:
        where = section.where(key)
        if where is not None:
            return section.get(key) or "", where[1], where[0] or None
    return None


def sieve_programs(root: ConfigSection, extension: str, program: str) -> list[ExecuteSettings]:
    """Where Pigeonhole runs *program* for ``vnd.dovecot.EXTENSION`` (pipe, filter, execute).

    Reads ``sieve_EXTENSION_socket_dir`` and ``sieve_EXTENSION_bin_dir``
    (top level in 2.4, ``plugin { }`` in 2.3).  Returns the candidates in
    Pigeonhole's order: the unix socket ``BASE_DIR/SOCKET_DIR/PROGRAM``
    (relative to base_dir: Pigeonhole joins even an absolute socket_dir to
    it), used when that socket exists, then the program ``BIN_DIR/PROGRAM``
    run by fork.

    Raises:
        ConfigError: an unknown extension, a program name with ``/``, or
            neither directory set (Pigeonhole: "extension is unconfigured").
    """
    if extension not in SIEVE_EXTENSIONS:
        raise ConfigError(f"unknown sieve extension {extension!r} "
                          f"(expected one of {', '.join(SIEVE_EXTENSIONS)})")
    if not program or "/" in program:
        raise ConfigError(f"invalid sieve program name {program!r}")
    found: list[ExecuteSettings] = []
    socket_dir = _top_setting(root, f"sieve_{extension}_socket_dir")
    if socket_dir is not None and socket_dir[0]:
        value, line, file = socket_dir
        found.append(ExecuteSettings(name=program,
                                     unix_socket_path=f"{value.lstrip('/')}/{program}",
                                     line=line, file=file))
    bin_dir = _top_setting(root, f"sieve_{extension}_bin_dir")
    if bin_dir is not None and bin_dir[0]:
        value, line, file = bin_dir
        found.append(ExecuteSettings(name=program, driver="fork",
                                     fork_path=f"{value}/{program}", line=line, file=file))
    if not found:
        raise ConfigError(f"vnd.dovecot.{extension} extension is unconfigured (both "
                          f"sieve_{extension}_bin_dir and sieve_{extension}_socket_dir "
                          "are not set)")
    return found


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
        line: where the (first) block starts.
        file: the file it starts in, if known.
    """

    name: str
    command: ScriptCommand
    unix_listeners: tuple[tuple[str, int], ...]
    inet_listeners: tuple[tuple[str, int], ...]
    line: int
    file: str | None = None


def _merged(sections: list[ConfigSection]) -> ConfigSection:
    """Sections of one type and name, merged as Dovecot does (later values win)."""
    if len(sections) == 1:
        return sections[0]
    first = sections[0]
    merged = ConfigSection(first.kind, first.name, first.line, file=first.file,
                           parent=first.parent, loader=first.loader)
    for section in sections:
        merged.settings.extend(section.settings)
        merged.origins.extend(section._origin(i) for i in range(len(section.settings)))
        merged.sections.extend(section.sections)
    return merged


def _grouped(sections: list[ConfigSection], kinds: Sequence[str]) -> list[ConfigSection]:
    groups: dict[tuple[str, str], list[ConfigSection]] = {}
    for section in sections:
        if section.kind in kinds:
            groups.setdefault((section.kind, section.name), []).append(section)
    return [_merged(group) for group in groups.values()]


def _addresses(text: str) -> list[str]:
    """Split an address list on commas and blanks, as Dovecot does."""
    return [a for a in re.split(r"[,\s]+", text) if a]


def _listener_get(listener: ConfigSection, key: str) -> str | None:
    """A listener's setting, also in 2.4's long form (``unix_listener_mode``)."""
    long_key = f"{listener.kind}_{key}"
    for k, _, _ in reversed(listener.settings):
        if k in (key, long_key):
            return listener.get(k)
    return None


def _runs_script(service: ConfigSection) -> bool:
    """Whether a service block's (plain) executable is Dovecot's ``script``."""
    for key, value, _ in reversed(service.settings):
        if key in ("executable", "execute"):
            words = value.split()
            return bool(words) and words[0].rsplit("/", 1)[-1] == "script"
    return False


def find_service(root: ConfigSection, name: str, *, base_dir: str | None = None) -> ServiceSettings:
    """Read the script service *name* from a parsed dovecot.conf.

    Blocks ``service NAME`` at top level are merged as Dovecot merges them
    (a later value wins; listeners of one type and name are one listener).
    The command comes from ``executable`` (2.3 and 2.4) or ``execute``
    (the 2.4 documentation's spelling), which must run ``script``.  Unix
    listener paths are relative to *base_dir* (default: the config's
    ``base_dir`` setting, else :data:`DEFAULT_BASE_DIR`).  An
    ``inet_listener`` listens on its ``address`` (2.3) or ``listen`` (2.4),
    else the service's or the top-level ``listen`` (default ``*, ::``).

    Raises:
        ConfigError: no such service, no script command, or a bad listener;
            with the file and line of the block or setting at fault.
    """
    base = base_dir or root.get("base_dir") or DEFAULT_BASE_DIR
    listen = _addresses(root.get("listen") or "*, ::")
    blocks = [s for s in root.sections if s.kind == "service" and s.name == name]
    if not blocks:
        names = sorted({s.name for s in root.sections if s.kind == "service"
                        and _runs_script(s)})
        known = f" (script services here: {', '.join(names)})" if names else ""
        raise ConfigError(f"no service {name} {{ .. }} block found{known}")
    section = _merged(blocks)
    key = "executable" if section.where("executable") else "execute"
    where = section.where(key)
    command_text = section.get(key)
    if not command_text or not where:
        raise _err(f"service {name}: no 'executable = script ...' setting", section)
    words = command_text.split()
    if not words or words[0].rsplit("/", 1)[-1] != "script":
        shown = words[0] if words else command_text
        raise _err(f"service {name}: executable is {shown!r}, not the script binary",
                   section, where[1], where[0])
    try:
        command = parse_script_command(words[1:])
    except ConfigError as exc:
        raise _err(f"service {name}: {exc.reason}", section, where[1], where[0]) from None
    unix: list[tuple[str, int]] = []
    inet: list[tuple[str, int]] = []
    for sub in _grouped(section.sections, ("unix_listener", "inet_listener")):
        if sub.kind == "unix_listener":
            path = _listener_get(sub, "path") or sub.name
            if not path:
                raise _err("unix_listener without a path", sub)
            mode_text = _listener_get(sub, "mode") or "0600"
            if not all(c in "01234567" for c in mode_text) or len(mode_text) > 4:
                raise _err(f"invalid unix_listener mode {mode_text!r}", sub)
            unix.append((path if path.startswith("/") else f"{base}/{path}",
                         int(mode_text, 8)))
        else:
            port_text = _listener_get(sub, "port") or ""
            if not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
                raise _err(f"invalid inet_listener port {port_text!r}", sub)
            # 2.3: address; 2.4: listen, inherited from the service and the top.
            addresses = (_listener_get(sub, "address") or _listener_get(sub, "listen")
                         or section.get("listen"))
            hosts = _addresses(addresses) if addresses else listen
            inet.extend((h, int(port_text)) for h in hosts if h)
    return ServiceSettings(name, command, tuple(unix), tuple(inet), section.line,
                           section.file or None)
