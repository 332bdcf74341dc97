"""Where a script runs: targets, URIs, ``execute`` settings and ``%{var}`` expansion.

Mirrors Dovecot's ``program_client_settings_check()`` (target inference,
PROTOCOL.md 9.2), ``program_client_create()`` (the ``unix:``/``tcp:``/``exec:``
URIs, 9.5.1) and the part of the 2.4 variable expansion that ``args`` use
(9.3).  Values are ``str``: they come from configuration text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ._errors import ConfigError

__all__ = [
    "DEFAULT_BASE_DIR",
    "DRIVERS",
    "FILTERS",
    "MAX_FILL",
    "ExecuteSettings",
    "ForkTarget",
    "Target",
    "TcpTarget",
    "UnixTarget",
    "expand_args",
    "expand_value",
    "parse_hostport",
    "parse_target",
]

#: Dovecot's usual run directory, the default ``base_dir``.
DEFAULT_BASE_DIR = "/run/dovecot"
#: The execute drivers, the first being the default.
DRIVERS = ("unix", "fork", "tcp")


@dataclass(frozen=True, slots=True)
class UnixTarget:
    """A ``script`` service on a UNIX socket.

    Fields:
        path: the socket path.
    """

    path: str

    @property
    def label(self) -> str:
        """Dovecot's label for logs, ``unix:PATH``."""
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """A ``script`` service on TCP (dot framing both ways).

    Fields:
        host: a host name or an IP literal (IPv6 without brackets).
        port: 1..65535.
    """

    host: str
    port: int

    @property
    def label(self) -> str:
        """Dovecot's label for logs, ``tcp:HOST:PORT`` (``[v6]`` in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ForkTarget:
    """A program run directly by the client (fork + exec).

    Fields:
        path: the program; a name without ``/`` is searched in the default
            search path (the environment has no PATH).
    """

    path: str

    @property
    def label(self) -> str:
        """Dovecot 2.4's label for logs, ``fork:PATH`` (2.3 said ``exec:``)."""
        return f"fork:{self.path}"


#: Any of the three targets.
Target = UnixTarget | TcpTarget | ForkTarget

_PORT_RE = re.compile(r"[0-9]+")


def parse_hostport(text: str, default_port: int = 0) -> tuple[str, int]:
    """Split ``host[:port]`` like Dovecot's ``net_str2hostport()``.

    ``[addr]`` and ``[addr]:port`` are IPv6 literals; text with exactly one
    ``:`` is split there; text without ``:`` or with two or more is all host
    (a bare IPv6 address) and gets *default_port*.

    Raises:
        ConfigError: a bad bracket form, or a port that is not 1..65535.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
    else:
        colon = text.find(":")
        if colon < 0 or ":" in text[colon + 1 :]:
            return text, default_port
        host, rest = text[:colon], text[colon:]
    if not rest:
        return host, default_port
    if not rest.startswith(":"):
        raise ConfigError(f"unexpected {rest!r} after ']' in {text!r}")
    digits = rest[1:]
    # Any run of digits, as net_str2port(): leading zeros are fine.  Strip
    # them before int() so a huge digit string cannot hit int()'s limit.
    significant = digits.lstrip("0")
    if _PORT_RE.fullmatch(digits) is None or len(significant) > 5 or not 0 < int(
            significant or "0") <= 65535:
        raise ConfigError(f"invalid port {digits[:20]!r} in {text[:80]!r}")
    return host, int(significant)


def _join_base(base_dir: str, path: str) -> str:
    return path if path.startswith("/") else f"{base_dir}/{path}"


def parse_target(uri: str, *, base_dir: str | None = None) -> Target:
    """Parse a program-client URI: ``unix:PATH``, ``tcp:HOST:PORT``, ``exec:PATH``.

    ``fork:PATH`` is accepted as an alias of ``exec:`` (Dovecot 2.4's label).
    Dovecot uses a ``unix:`` path as given; pass *base_dir* to resolve a
    relative one against it (as 2.3 quota warnings do for bare names).

    Raises:
        ConfigError: with Dovecot's message for an unknown scheme or a tcp
            target without a valid non-zero port.
    """
    scheme, colon, rest = uri.partition(":")
    if colon and scheme in ("exec", "fork"):
        if not rest:
            raise ConfigError(f"empty program path in {uri!r}")
        return ForkTarget(rest)
    if colon and scheme == "unix":
        if not rest:
            raise ConfigError(f"empty socket path in {uri!r}")
        return UnixTarget(_join_base(base_dir, rest) if base_dir is not None else rest)
    if colon and scheme == "tcp":
        try:
            host, port = parse_hostport(rest)
        except ConfigError:
            port = 0
        if port == 0 or not host:
            raise ConfigError(f"Invalid tcp syntax, must be host:port in '{rest}'")
        return TcpTarget(host, port)
    raise ConfigError(f"Unsupported program client scheme '{scheme}'")


# --- %{...} expansion -------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z\x80-\U0010ffff][A-Za-z0-9_/;:.\-\x80-\U0010ffff]*")
_SPACE_RE = re.compile(r"[ \t]*")
_STRING_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "t": "\t", "r": "\r", "n": "\n"}


class _Expr:
    """A cursor over one ``%{...}`` expression."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def skip_space(self) -> None:
        m = _SPACE_RE.match(self.text, self.pos)
        assert m is not None
        self.pos = m.end()

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def name(self) -> str:
        self.skip_space()
        m = _NAME_RE.match(self.text, self.pos)
        if m is None:
            raise ConfigError(f"expected a variable or filter name at {self.text[self.pos:]!r}")
        self.pos = m.end()
        return m.group()

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            e = self.text[self.pos : self.pos + 1]
            if e in _STRING_ESCAPES:
                out.append(_STRING_ESCAPES[e])
                self.pos += 1
            elif e == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", hex_digits := self.text[
                    self.pos + 1 : self.pos + 3]):
                out.append(chr(int(hex_digits, 16)))
                self.pos += 3
            elif octal := re.match(r"[0-7]{1,3}", self.text[self.pos : self.pos + 3]):
                # \N, \NN or \NNN, as Dovecot's lexer
                out.append(chr(int(octal.group(), 8) & 0xFF))
                self.pos += octal.end()
            else:
                raise ConfigError(f"invalid escape '\\{e}' in a quoted string")
        raise ConfigError("unterminated quoted string in %{...}")


_HASHES = ("md5", "sha1", "sha256", "sha384", "sha512")
#: Bounds the output of lfill/rfill/hexlify (Dovecot has none; a template
#: must not make a value of gigabytes).
MAX_FILL = 4096

_NUMBER_RE = re.compile(r"-?[0-9]+")
_Param = tuple[str, "str | int"]  # ("str" | "int" | "var", value)


def _params(expr: _Expr, fname: str) -> list[_Param]:
    """``(a, 'b', 3)`` after a filter name: strings, numbers and variable names."""
    expr.pos += 1  # the "("
    params: list[_Param] = []
    while True:
        expr.skip_space()
        c = expr.peek()
        if c in ("'", '"'):
            params.append(("str", expr.string()))
        elif c == "-" or (c.isdigit() and c.isascii()):
            m = _NUMBER_RE.match(expr.text, expr.pos)
            if m is None or len(m.group()) > 19:
                raise ConfigError(f"{fname}(): expected a number at {expr.text[expr.pos:][:20]!r}")
            expr.pos = m.end()
            params.append(("int", int(m.group())))
        else:
            name = expr.name()
            expr.skip_space()
            if expr.peek() == "=":
                raise ConfigError(f"{fname}(): named parameters are not supported")
            params.append(("var", name))
        expr.skip_space()
        c = expr.peek()
        if c == ",":
            expr.pos += 1
            continue
        if c != ")":
            raise ConfigError(f"expected ')' after the {fname}() argument")
        expr.pos += 1
        return params


def _number(param: _Param, variables: Mapping[str, str], fname: str) -> int:
    kind, value = param
    if kind == "int":
        assert isinstance(value, int)
        return value
    text = str(value) if kind == "str" else variables.get(str(value))
    if text is None:
        raise ConfigError(f"unknown variable {value!r} in {fname}()")
    if not re.fullmatch(r"-?[0-9]{1,18}", text):
        raise ConfigError(f"{fname}(): '{text[:40]}' is not a number")
    return int(text)


def _string(param: _Param, variables: Mapping[str, str], fname: str) -> str:
    kind, value = param
    if kind == "var":
        found = variables.get(str(value))
        if found is None:
            raise ConfigError(f"unknown variable {value!r} in {fname}()")
        return found
    return str(value)


def _arity(fname: str, params: list[_Param], least: int, most: int) -> None:
    if not least <= len(params) <= most:
        wanted = str(least) if least == most else f"{least} to {most}"
        raise ConfigError(f"{fname}() takes {wanted} parameter(s), got {len(params)}")


def _substr(value: bytes, params: list[int]) -> bytes:
    """Dovecot's fn_substr(): offset (negative: from the end), optional length."""
    size = len(value)
    off = params[0]
    if not -size <= off <= size:
        raise ConfigError("substr(): Offset out of bounds")
    length = params[1] if len(params) > 1 else size
    if not -size <= length <= size:
        raise ConfigError("substr(): Length out of bounds")
    if len(params) > 1 and length == 0:
        return b""
    if off < 0:
        off += size
    if len(params) < 2:
        length = size - off
    elif length < 0:
        length += size
        if length < off:
            raise ConfigError("substr(): Length out of bounds")
        length -= off
    if length < 0 or length + off > size:
        raise ConfigError("substr(): Length out of bounds")
    return value[off : off + length]


def _apply(fname: str, params: list[_Param] | None, value: bytes, binary: bool,
           variables: Mapping[str, str]) -> tuple[bytes, bool]:
    """One filter, on the value's bytes; returns the new bytes and whether they are binary."""
    args = params or []
    if fname in ("lower", "upper", "username", "domain", "reverse", *_HASHES):
        _arity(fname, args, 0, 0)
    if fname == "lower":
        return value.lower(), False
    if fname == "upper":
        return value.upper(), False
    if fname == "username":
        return value.partition(b"@")[0], False
    if fname == "domain":
        return value.partition(b"@")[2], False
    if fname == "reverse":
        return value[::-1], binary
    if fname in _HASHES:
        return hashlib.new(fname, value).digest(), True
    if fname == "truncate":
        _arity(fname, args, 1, 1)
        length = _number(args[0], variables, fname)
        if length < 0:
            raise ConfigError("truncate(): Value of out of bounds")
        return value[:length], binary
    if fname == "substr":
        _arity(fname, args, 1, 2)
        return _substr(value, [_number(p, variables, fname) for p in args]), binary
    if fname == "index":
        _arity(fname, args, 2, 2)
        separator = _string(args[0], variables, fname).encode("utf-8", "surrogateescape")
        if not separator:
            raise ConfigError("index(): empty separator")
        tokens = value.split(separator)
        position = _number(args[1], variables, fname)
        if position < 0:
            position += len(tokens)
        if not 0 <= position < len(tokens):
            raise ConfigError("index(): Position out of bounds")
        return tokens[position], False
    if fname in ("lfill", "rfill"):
        _arity(fname, args, 1, 2)
        amount = _number(args[0], variables, fname)
        if not 1 <= amount <= MAX_FILL:
            raise ConfigError(f"{fname}(): Fill length out of bounds (1..{MAX_FILL})")
        filler = (_string(args[1], variables, fname) if len(args) > 1 else "0").encode(
            "utf-8", "surrogateescape")
        if not filler:
            raise ConfigError(f"{fname}(): empty filler")
        pad = b""
        while len(value) + len(pad) < amount:
            pad += filler
        return (pad + value if fname == "lfill" else value + pad), binary
    if fname == "hexlify":
        _arity(fname, args, 0, 1)
        width = _number(args[0], variables, fname) if args else 0
        if not 0 <= width <= MAX_FILL:
            raise ConfigError(f"hexlify(): Width out of bounds (0..{MAX_FILL})")
        text = value.hex().encode()
        if width:
            text = text.rjust(width, b"0")[:width]
        return text, False
    raise ConfigError(f"unknown filter {fname!r} (supported: {', '.join(sorted(FILTERS))})")


#: The ``%{...}`` filters :func:`expand_value` knows.
FILTERS = ("default", "domain", "hexlify", "index", "lfill", "lower", "md5", "reverse",
           "rfill", "sha1", "sha256", "sha384", "sha512", "substr", "truncate", "upper",
           "username")


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _eval_expression(expr: _Expr, variables: Mapping[str, str]) -> str:
    var = expr.name()
    value = _encode(variables.get(var))
    binary = False
    while True:
        expr.skip_space()
        c = expr.peek()
        if c == "}":
            expr.pos += 1
            break
        if c != "|":
            raise ConfigError(f"expected '|' or '}}' in %{{...}} at {expr.text[expr.pos:]!r}")
        expr.pos += 1
        fname = expr.name()
        expr.skip_space()
        params = _params(expr, fname) if expr.peek() == "(" else None
        if fname == "default":
            fallback = b""
            if params:
                _arity(fname, params, 1, 1)
                kind, ref = params[0]
                if kind == "var" and ref not in variables:
                    raise ConfigError(f"unknown variable {ref!r} in default()")
                fallback = _encode(_string(params[0], variables, fname)) or b""
            if not value:
                value, binary = fallback, False
            continue
        if fname not in FILTERS:
            raise ConfigError(f"unknown filter {fname!r} (supported: {', '.join(FILTERS)})")
        if value is None:
            raise ConfigError(f"unknown variable {var!r}")
        value, binary = _apply(fname, params, value, binary, variables)
    if value is None:
        raise ConfigError(f"unknown variable {var!r}")
    return value.hex() if binary else value.decode("utf-8", "surrogateescape")


def expand_value(template: str, variables: Mapping[str, str]) -> str:
    """Expand ``%{...}`` in *template* with Dovecot 2.4's syntax (the subset args use).

    ``%%{`` gives a literal ``%{``; any other ``%`` is literal.  Filters:
    ``lower``, ``upper``, ``username``, ``domain``, ``default`` and
    ``default('x')`` / ``default(var)``.

    Raises:
        ConfigError: an unknown variable (without a later ``default``), an
            unknown filter, or a malformed expression.
    """
    out: list[str] = []
    pos = 0
    while True:
        pct = template.find("%", pos)
        if pct < 0:
            out.append(template[pos:])
            return "".join(out)
        out.append(template[pos:pct])
        if template.startswith("%%{", pct):
            out.append("%{")
            pos = pct + 3
        elif template.startswith("%{", pct):
            expr = _Expr(template, pct + 2)
            try:
                out.append(_eval_expression(expr, variables))
            except IndexError:
                raise ConfigError(f"unterminated %{{...}} in {template!r}") from None
            pos = expr.pos
        else:
            out.append("%")
            pos = pct + 1


def _split_outside_braces(template: str) -> list[str]:
    """Split on spaces that are not inside a ``%{...}`` expression."""
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    i = 0
    while i < len(template):
        if template.startswith("%%{", i):
            current.append("%%{")
            i += 3
            continue
        if template.startswith("%{", i):
            depth += 1
            current.append("%{")
            i += 2
            continue
        c = template[i]
        if c == "}" and depth:
            depth -= 1
        if c == " " and not depth:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(c)
        i += 1
    if current:
        tokens.append("".join(current))
    return tokens


def expand_args(
    template: str, variables: Mapping[str, str], *, split_first: bool = False
) -> tuple[str, ...]:
    """Turn an ``execute { args = ... }`` value into the argument list.

    Dovecot expands the whole value, then splits it on spaces (runs of spaces
    collapse, TAB is not a separator, no quoting): a variable whose value
    contains spaces becomes several arguments, and one that expands to the
    empty string disappears.  ``split_first=True`` splits the template first
    and expands each token, so each variable stays exactly one argument
    (not what Dovecot does; useful when values may contain spaces).

    Raises:
        ConfigError: see :func:`expand_value`.
    """
    if split_first:
        return tuple(expand_value(token, variables) for token in _split_outside_braces(template))
    return tuple(p for p in expand_value(template, variables).split(" ") if p)


@dataclass(frozen=True, slots=True)
class ExecuteSettings:
    """One ``execute NAME { ... }`` block (Dovecot 2.4).

    Fields:
        name: the block's name (``execute_name``).
        driver: ``unix`` (default), ``fork`` or ``tcp``.
        args: the unexpanded ``args`` value.
        fork_path, unix_socket_path, tcp_host: default to values inferred
            from *name* (see :meth:`target`).
        tcp_port: 0 when unset.
        line: where the block starts in its configuration text, if known.
        file: the file that line is in, if known.
    """

    name: str
    driver: str = "unix"
    args: str = ""
    fork_path: str = ""
    unix_socket_path: str = ""
    tcp_host: str = ""
    tcp_port: int = 0
    line: int | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ConfigError(
                f"execute {self.name}: invalid driver {self.driver!r} "
                f"(expected one of {', '.join(DRIVERS)})", self.line, self.file)
        if not 0 <= self.tcp_port <= 65535:
            raise ConfigError(f"execute {self.name}: invalid tcp_port {self.tcp_port}",
                              self.line, self.file)

    def target(self, *, base_dir: str = DEFAULT_BASE_DIR) -> Target:
        """Infer the target as Dovecot's ``program_client_settings_check()`` does.

        unix: ``unix_socket_path`` or else the name, prefixed with
        ``base_dir + "/"`` unless absolute.  fork: ``fork_path`` or else the
        name.  tcp: when ``tcp_host`` is empty the name is parsed as
        ``host[:port]`` and its port *replaces* ``tcp_port`` (quirk Q17).

        Raises:
            ConfigError: with Dovecot's messages for an unparsable name or a
                zero port.
        """
        if self.driver == "unix":
            return UnixTarget(_join_base(base_dir, self.unix_socket_path or self.name))
        if self.driver == "fork":
            path = self.fork_path or self.name
            if not path:
                raise ConfigError("execute: empty fork_path and name", self.line, self.file)
            return ForkTarget(path)
        host, port = self.tcp_host, self.tcp_port
        if not host and self.name:
            try:
                host, port = parse_hostport(self.name, 0)
            except ConfigError:
                raise ConfigError(
                    f"Failed to parse execute_tcp_host:port from execute_name={self.name}",
                    self.line, self.file) from None
        if port == 0:
            raise ConfigError(
                "execute_tcp_port must not be 0 with execute_driver=tcp", self.line, self.file)
        return TcpTarget(host, port)

    def expand(self, variables: Mapping[str, str]) -> ExecuteSettings:
        """These settings with ``%{...}`` expanded in the paths and the tcp host.

        Dovecot expands every string setting for the user it runs for, so
        ``unix_socket_path = /run/qw/%{user}.sock`` reaches one socket per
        user (2.3 expands its whole ``quota_warning`` string the same way).
        The name is not expanded (nor is it in Dovecot); ``args`` stays a
        template for :meth:`expand_args`, which splits it after expanding.

        Raises:
            ConfigError: see :func:`expand_value`, with the block's place.
        """
        def one(key: str, template: str) -> str:
            if "%" not in template:
                return template
            try:
                return expand_value(template, variables)
            except ConfigError as exc:
                raise ConfigError(f"execute {self.name}: {key}: {exc.reason}", self.line,
                                  self.file) from None

        return replace(self, unix_socket_path=one("unix_socket_path", self.unix_socket_path),
                       fork_path=one("fork_path", self.fork_path),
                       tcp_host=one("tcp_host", self.tcp_host))

    def expand_args(
        self, variables: Mapping[str, str], *, split_first: bool = False
    ) -> tuple[str, ...]:
        """The argument list for these settings; see :func:`expand_args`."""
        try:
            return expand_args(self.args, variables, split_first=split_first)
        except ConfigError as exc:
            raise ConfigError(f"execute {self.name}: args: {exc.reason}", self.line,
                              self.file) from None
