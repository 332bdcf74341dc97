"""Fuzz targets: one per parser of the core, with the invariants each must keep.

Every target exists in two forms:

* ``check_<name>(...)`` takes structured arguments (what hypothesis draws) and
  raises :class:`InvariantError` when an invariant breaks;
* ``fuzz_<name>(raw)`` turns any byte string into those arguments (what
  atheris mutates, what the corpus and regression files hold) and calls the
  check.  :data:`TARGETS` maps the target names to these.

The invariants, for every target:

* **Error discipline.**  Nothing escapes but :class:`LocalProtocolError` and
  :class:`RemoteProtocolError` (``ConfigError`` is a LocalProtocolError), on
  any input.  Known core bugs (:data:`KNOWN_BUGS`, each pinned by a strict
  xfail in ``tests/regressions``) are tolerated unless the environment
  variable ``EXECPROTO_FUZZ_STRICT`` is set: they raise :class:`KnownBugHit`,
  which the drivers count as a pass.
* **Chunking independence.**  Incremental parsers give the same events for
  the input in one piece, byte by byte and cut at arbitrary points.
* **Bounded memory.**  What a parser holds between two feeds is bounded by its
  configured limit (the header parser) or by a few bytes (the reply filters),
  measured through public behaviour (how much output has been released) or
  with :mod:`tracemalloc`, never by looking at private attributes.

Every loop here is bounded by the size of the input.
"""

from __future__ import annotations

import contextlib
import os
import random
import tracemalloc
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from execproto import (
    NEED_DATA,
    ClientConnection,
    ConfigSection,
    Data,
    DotDecoder,
    EndOfInput,
    ErrorKind,
    ExecuteSettings,
    ForkTarget,
    LocalProtocolError,
    Output,
    RemoteProtocolError,
    Request,
    Result,
    ScriptRequest,
    ServiceConnection,
    ServiceState,
    Status,
    TcpTarget,
    UnixTarget,
    find_execute,
    find_service,
    list_executes,
    parse_config,
    parse_hostport,
    parse_target,
    sieve_programs,
    tab_escape,
    tab_unescape,
)

__all__ = [
    "ALLOWLIST",
    "KNOWN_BUGS",
    "SCRIPT",
    "SCRIPT_ARGS",
    "TARGETS",
    "VARIABLES",
    "InvariantError",
    "KnownBug",
    "KnownBugHit",
    "MemoryProbe",
    "check_config",
    "check_dot",
    "check_header",
    "check_reply",
    "check_target",
    "check_unescape",
    "chunkings_from_seed",
    "encode_config",
    "encode_dot",
    "encode_header",
    "encode_reply",
    "encode_target",
    "fuzz_config",
    "fuzz_dot",
    "fuzz_header",
    "fuzz_reply",
    "fuzz_target",
    "fuzz_unescape",
    "split",
]

T = TypeVar("T")

#: The service configuration every header input is parsed with.
SCRIPT = b"/usr/libexec/execproto-fuzz/script"
SCRIPT_ARGS = (b"--from-service",)
ALLOWLIST = (b"FOO", b"USER", b"HOME")
#: The variables ``%{...}`` expands from in the config target.
VARIABLES = {
    "user": "alice@example.com",
    "home": "/home/a b",
    "empty": "",
    "spacey": " x  y ",
    "UPPER": "MiXeD",
}

#: tracemalloc bounds.  A header parser between two feeds holds at most its
#: buffer (limit + last chunk, with bytearray over-allocation); while it
#: parses a complete header the peak is larger because every line becomes an
#: object: about 22 times the header for 64 KiB of 2-byte escaped arguments.
RETAIN_FACTOR = 1.25
PEAK_FACTOR = 32
MEMORY_SLACK = 16 * 1024
#: The reply pipeline holds back at most the result code (2 bytes) and the
#: dot decoder's undecided line break plus dot (4 bytes: CR LF . CR).
RESULT_CODE_HOLD = 2
DOT_HOLD = 4


class InvariantError(AssertionError):
    """A fuzz invariant broke: a crash or wrong behaviour of the core."""


@dataclass(frozen=True)
class KnownBug:
    """A core bug already reported, matched by exception type and function.

    Fields:
        id: the regression file name (``tests/regressions/<target>/<id>``).
        target: the fuzz target that finds it.
        exc_type: the exception that escapes.
        function: the innermost function of ``execproto`` in its traceback.
        summary: one line for the report.
    """

    id: str
    target: str
    exc_type: type[BaseException]
    function: str
    summary: str


class KnownBugHit(Exception):
    """An input hit a :class:`KnownBug` (tolerated unless EXECPROTO_FUZZ_STRICT is set)."""

    def __init__(self, bug: KnownBug) -> None:
        super().__init__(f"known bug {bug.id}: {bug.summary}")
        self.bug = bug


KNOWN_BUGS: tuple[KnownBug, ...] = ()


def strict() -> bool:
    """True when known bugs must fail like any other (EXECPROTO_FUZZ_STRICT=1)."""
    return os.environ.get("EXECPROTO_FUZZ_STRICT", "") not in ("", "0")


def _innermost_core_function(tb: types.TracebackType | None) -> str:
    name = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        if f"{os.sep}execproto{os.sep}" in code.co_filename and \
                f"{os.sep}adapters{os.sep}" not in code.co_filename:
            name = code.co_name
        tb = tb.tb_next
    return name


def _known(target: str, exc: BaseException) -> KnownBug | None:
    function = _innermost_core_function(exc.__traceback__)
    for bug in KNOWN_BUGS:
        if bug.target == target and type(exc) is bug.exc_type and bug.function == function:
            return bug
    return None


def core(target: str, fn: Callable[[], T]) -> T:
    """Call the core; let only its two protocol errors escape.

    Raises:
        LocalProtocolError, RemoteProtocolError: as the core raised them.
        KnownBugHit: a known bug (not in strict mode).
        InvariantError: any other exception.
    """
    try:
        return fn()
    except (LocalProtocolError, RemoteProtocolError):
        raise
    except Exception as exc:
        bug = _known(target, exc)
        if bug is not None and not strict():
            raise KnownBugHit(bug) from exc
        raise InvariantError(f"{target}: the core raised {type(exc).__name__}: {exc}") from exc


def require(condition: bool, message: str) -> None:
    """Raise :class:`InvariantError` unless *condition*."""
    if not condition:
        raise InvariantError(message)


# --- chunkings ---------------------------------------------------------------


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut *data* at the given offsets; never yields an empty chunk (b"" is EOF)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks = []
    previous = 0
    for point in [*points, len(data)]:
        if point > previous:
            chunks.append(data[previous:point])
        previous = point
    return chunks


def chunkings_from_seed(data: bytes, seed: int) -> list[list[int]]:
    """Cut lists for *data* derived from *seed*: byte by byte, random cuts, small pieces.

    (Whole-input feeding is always added by the checks themselves.)
    """
    rng = random.Random(seed)
    n = len(data)
    if n <= 1:
        return []
    bytewise = list(range(1, n)) if n <= 4096 else list(range(1, n, 3))
    some = [rng.randrange(1, n) for _ in range(rng.randrange(1, 8))]
    small = []
    position = 0
    while position < n:
        position += rng.randrange(1, 33)
        small.append(position)
    return [bytewise, some, small]


def _all_chunkings(data: bytes, cut_lists: Sequence[Sequence[int]]) -> list[list[bytes]]:
    whole = [data] if data else []
    return [whole, *(split(data, cuts) for cuts in cut_lists)]


class _Fields:
    """Reads parameters from the front of a raw fuzz input."""

    def __init__(self, raw: bytes, size: int) -> None:
        self.head = raw[:size].ljust(size, b"\0")
        self.body = raw[size:]

    def uint(self, start: int, length: int) -> int:
        return int.from_bytes(self.head[start : start + length], "big")


# --- memory ------------------------------------------------------------------


class MemoryProbe:
    """Traced memory allocated since :meth:`start` (current and peak), via tracemalloc."""

    def __init__(self) -> None:
        self._owner = False
        self.base = 0

    def start(self) -> None:
        """Start tracing (if needed) and take the current size as the baseline."""
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._owner = True
        self.base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()

    def stop(self) -> None:
        """Stop tracing if :meth:`start` started it."""
        if self._owner:
            tracemalloc.stop()
            self._owner = False

    def reset_peak(self) -> None:
        """Let :meth:`peak` measure from now on."""
        tracemalloc.reset_peak()

    def retained(self) -> int:
        """Bytes allocated since the baseline and still alive."""
        return tracemalloc.get_traced_memory()[0] - self.base

    def peak(self) -> int:
        """Highest :meth:`retained` since the last :meth:`reset_peak`."""
        return tracemalloc.get_traced_memory()[1] - self.base


# --- service header (ServiceConnection / HeaderParser) -------------------------


@dataclass(frozen=True)
class HeaderOutcome:
    """What a service connection made of one chunking of a header input.

    Fields:
        request: the ScriptRequest, or None when the header was rejected.
        fed: bytes fed when the request (or the error) came out.
        last_chunk: the size of the chunk that completed the request.
        trailing: the connection's ``trailing_data`` at that point.
    """

    request: ScriptRequest | None
    fed: int
    last_chunk: int = 0
    trailing: bytes = b""


def _new_service(max_header_bytes: int) -> ServiceConnection:
    return ServiceConnection(SCRIPT, SCRIPT_ARGS, env_allowlist=ALLOWLIST,
                             max_header_bytes=max_header_bytes)


def _feed_service(chunks: list[bytes], max_header_bytes: int,
                  probe: MemoryProbe | None) -> HeaderOutcome:
    svc = core("header", lambda: _new_service(max_header_bytes))
    fed = 0
    for chunk in chunks:
        if probe is not None:
            probe.reset_peak()
        try:
            core("header", partial(svc.receive_data, chunk))
        except RemoteProtocolError:
            require(svc.state is ServiceState.ERROR, f"state {svc.state} after a header error")
            return HeaderOutcome(None, fed + len(chunk))
        fed += len(chunk)
        event = core("header", svc.next_event)
        if probe is not None:
            # Bounded by the limit and the last chunk: measured in the worst
            # spot (right after a feed), with everything the feed produced.
            bound = max_header_bytes + len(chunk)
            peak, retained = probe.peak(), probe.retained()
            require(peak <= PEAK_FACTOR * bound + MEMORY_SLACK,
                    f"header: feeding {len(chunk)} bytes (limit {max_header_bytes}) peaked "
                    f"at {peak} bytes")
            if event is NEED_DATA:
                require(retained <= RETAIN_FACTOR * bound + MEMORY_SLACK,
                        f"header: {retained} bytes held after {fed} bytes without the end "
                        f"(limit {max_header_bytes}, last chunk {len(chunk)})")
        if event is NEED_DATA:
            continue
        require(isinstance(event, ScriptRequest), f"header: unexpected event {event!r}")
        assert isinstance(event, ScriptRequest)
        return HeaderOutcome(event, fed, len(chunk), core("header", lambda: svc.trailing_data))
    try:
        core("header", lambda: svc.receive_data(b""))
    except RemoteProtocolError:
        return HeaderOutcome(None, fed)
    raise InvariantError("header: EOF before the end of the header did not raise")


def _check_request(data: bytes, max_header_bytes: int, outcome: HeaderOutcome) -> None:
    request = outcome.request
    assert request is not None
    size = request.header_size
    require(0 < size <= max_header_bytes, f"header_size {size} (limit {max_header_bytes})")
    require(data.find(b"\n\n") == size - 2, f"header_size {size} is not after the first LF LF")
    require(outcome.fed - outcome.last_chunk < size <= outcome.fed,
            f"the request came out late: header_size {size}, {outcome.fed} bytes fed")
    require(outcome.trailing == data[size : outcome.fed],
            "trailing_data is not exactly the bytes after the header")
    require(request.argv[: 1 + len(SCRIPT_ARGS)] == (SCRIPT, *SCRIPT_ARGS),
            f"argv does not start with the service's script and args: {request.argv[:3]!r}")
    require(request.argv[1 + len(SCRIPT_ARGS) :] == request.args, "argv != script + args")
    require(all(b"\0" not in a for a in request.argv), "NUL byte in argv")
    names = [name for name, _ in request.env]
    require(all(name in ALLOWLIST for name in names), f"env name off the allowlist: {names}")
    require(len(set(names)) == len(names), f"duplicate env names: {names}")
    require(all(b"\0" not in v and b"=" not in n for n, v in request.env), "bad env entry")
    require(request.alarm is None or 0 <= request.alarm <= 0xFFFFFFFF, "alarm out of range")
    require(request.version_minor is not None and 0 <= request.version_minor <= 0xFFFFFFFF,
            "minor version out of range")
    require(not request.passthrough and request.sends_result == (not request.noreply),
            "noreply / passthrough flags inconsistent")


def check_header(data: bytes, max_header_bytes: int,
                 cut_lists: Sequence[Sequence[int]] = (), *, memory: bool = False) -> None:
    """Service header: every chunking gives the same request or a protocol error.

    Args:
        data: what the client sends (header, payload, garbage...).
        max_header_bytes: the service's limit (at least 20).
        cut_lists: extra chunkings to compare with feeding *data* whole.
        memory: also check the tracemalloc bounds after every feed.
    """
    outcomes = []
    probe = MemoryProbe() if memory else None
    for chunks in _all_chunkings(data, cut_lists):
        if probe is not None:
            probe.start()
        try:
            outcomes.append(_feed_service(chunks, max_header_bytes, probe))
        finally:
            if probe is not None:
                probe.stop()
    first = outcomes[0]
    for other in outcomes[1:]:
        require(other.request == first.request,
                f"header: chunkings disagree: {first.request!r} vs {other.request!r}")
    for outcome in outcomes:
        if outcome.request is not None:
            _check_request(data, max_header_bytes, outcome)


def encode_header(data: bytes, max_header_bytes: int = 65536, seed: int = 0) -> bytes:
    """The raw fuzz input :func:`fuzz_header` decodes to these arguments."""
    if max_header_bytes <= 275:
        head = bytes([0, max_header_bytes - 20, 0])
    else:
        head = bytes([0x80]) + (max_header_bytes - 20).to_bytes(2, "big")
    return head + seed.to_bytes(4, "big") + data


def fuzz_header(raw: bytes) -> None:
    """Raw input: [limit: 3 bytes][chunking seed: 4 bytes][data...]."""
    fields = _Fields(raw, 7)
    # 20..65555, or 20..275: small limits reach the size checks more often.
    limit = 20 + (fields.uint(1, 2) if fields.head[0] & 0x80 else fields.head[1])
    data = fields.body
    check_header(data, limit, chunkings_from_seed(data, fields.uint(3, 4)))


# --- client reply (ClientConnection) ---------------------------------------------


@dataclass
class ReplyOutcome:
    """What a client connection made of one chunking of a reply.

    Fields:
        output: all Output data, in order.
        result: the final Result.
        released: output length released after each chunk (before EOF).
        fed: bytes fed before each entry of *released*.
    """

    output: bytes
    result: Result
    released: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)


def _drain(conn: ClientConnection, out: bytearray, limit: int) -> Result | None:
    for _ in range(limit):
        event = core("reply", conn.next_event)
        if event is NEED_DATA:
            return None
        if isinstance(event, Output):
            require(bool(event.data), "reply: an empty Output event")
            out += event.data
            continue
        require(isinstance(event, Result), f"reply: unexpected event {event!r}")
        assert isinstance(event, Result)
        return event
    raise InvariantError(f"reply: more than {limit} events in a row")


def _feed_client(chunks: list[bytes], dot: bool, noreply: bool, reset: bool) -> ReplyOutcome:
    conn = core("reply", lambda: ClientConnection(dot=dot))
    core("reply", lambda: conn.send(Request(args=[b"fuzz"], noreply=noreply)))
    core("reply", lambda: conn.send(Data(data=b"payload")))
    core("reply", lambda: conn.send(EndOfInput()))
    require(conn.reads_reply, "reply: the connection does not read its reply")
    out = bytearray()
    released: list[int] = []
    fed: list[int] = []
    total = sum(len(c) for c in chunks)
    limit = total + 16
    count = 0
    for chunk in chunks:
        core("reply", partial(conn.receive_data, chunk))
        count += len(chunk)
        early = _drain(conn, out, limit)
        require(early is None, f"reply: a Result before EOF: {early!r}")
        released.append(len(out))
        fed.append(count)
    if reset:
        core("reply", conn.receive_reset)
    else:
        core("reply", lambda: conn.receive_data(b""))
    result = _drain(conn, out, limit)
    require(result is not None, "reply: no Result after EOF")
    assert result is not None
    for late in (conn.next_event, lambda: conn.receive_data(b"x")):
        try:
            core("reply", late)
        except LocalProtocolError:
            pass
        else:
            raise InvariantError("reply: the connection accepted a call after its Result")
    return ReplyOutcome(bytes(out), result, released, fed)


def _dot_hold_bound(prefix: bytes) -> int:
    """Bytes a dot decoder may not have released after *prefix* (before its end line)."""
    return DOT_HOLD + prefix.count(b"\n.") + (1 if prefix.startswith(b".") else 0)


def check_reply(data: bytes, *, dot: bool, noreply: bool, reset: bool,
                cut_lists: Sequence[Sequence[int]] = ()) -> None:
    """Client reply: same output and Result for every chunking; bounded hold-back.

    Args:
        data: the bytes the service sends.
        dot: tcp mode (dot-decoded); else unix mode.
        noreply: no result code is expected.
        reset: the reply ends with a connection reset instead of EOF.
        cut_lists: extra chunkings to compare with feeding *data* whole.
    """
    outcomes = [_feed_client(chunks, dot, noreply, reset)
                for chunks in _all_chunkings(data, cut_lists)]
    first = outcomes[0]
    result = first.result
    require((result.status is Status.INTERNAL_FAILURE)
            == (result.kind is not ErrorKind.NONE), f"reply: inconsistent {result!r}")
    require(result.kind in (ErrorKind.NONE, ErrorKind.PROTOCOL, ErrorKind.IO),
            f"reply: the core produced {result.kind}")
    for other in outcomes[1:]:
        require(other.output == first.output and other.result == result,
                f"reply: chunkings disagree: {first.output!r} {result!r} vs "
                f"{other.output!r} {other.result!r}")
    require(len(first.output) <= len(data), "reply: more output than input")
    if not dot:
        if noreply:
            require(first.output == data, "reply: noreply output is not the reply itself")
        elif result.status is not Status.INTERNAL_FAILURE:
            code = b"+\n" if result.status is Status.SUCCESS else b"-\n"
            require(first.output + code == data, "reply: output + result code != reply")
    for outcome in outcomes:
        for released, fed in zip(outcome.released, outcome.fed, strict=True):
            # Output is never retracted or reordered...
            require(first.output[:released] == outcome.output[:released],
                    "reply: output released early differs from the final output")
            # ...and at most a few bytes are held back (unix mode; the dot
            # decoder's own bound is checked by the dot target).
            if not dot:
                hold = 0 if noreply else RESULT_CODE_HOLD
                require(released == max(fed - hold, 0),
                        f"reply: {fed} bytes fed but {released} released")


def encode_reply(data: bytes, *, dot: bool, noreply: bool, reset: bool, seed: int = 0) -> bytes:
    """The raw fuzz input :func:`fuzz_reply` decodes to these arguments."""
    flags = (1 if dot else 0) | (2 if noreply else 0) | (4 if reset else 0)
    return bytes([flags]) + seed.to_bytes(4, "big") + data


def fuzz_reply(raw: bytes) -> None:
    """Raw input: [flags: dot, noreply, reset][chunking seed: 4 bytes][reply...]."""
    fields = _Fields(raw, 5)
    flags = fields.head[0]
    data = fields.body
    check_reply(data, dot=bool(flags & 1), noreply=bool(flags & 2), reset=bool(flags & 4),
                cut_lists=chunkings_from_seed(data, fields.uint(1, 4)))


# --- dot decoder -------------------------------------------------------------------


@dataclass(frozen=True)
class DotOutcome:
    """What a DotDecoder made of one chunking.

    Fields:
        output: everything decoded.
        ended: the end line was seen.
        leftover: bytes after the end line.
    """

    output: bytes
    ended: bool
    leftover: int


def _feed_dot(chunks: list[bytes]) -> DotOutcome:
    decoder = DotDecoder()
    out = bytearray()
    fed = 0
    prefix = bytearray()
    for chunk in chunks:
        out += core("dot", partial(decoder.decode, chunk))
        fed += len(chunk)
        prefix += chunk
        if not decoder.ended:
            require(fed - len(out) <= _dot_hold_bound(bytes(prefix)),
                    f"dot: {fed} bytes fed but only {len(out)} released")
    ended = decoder.ended
    try:
        core("dot", decoder.finish)
    except RemoteProtocolError:
        require(not ended, "dot: finish() failed after the end line")
    else:
        require(ended, "dot: finish() accepted a stream without its end line")
    if not ended:
        require(decoder.leftover == 0, "dot: leftover bytes before the end line")
    return DotOutcome(bytes(out), ended, decoder.leftover)


def check_dot(data: bytes, cut_lists: Sequence[Sequence[int]] = ()) -> None:
    """Dot decoder: same output, end and leftover for every chunking; bounded hold-back."""
    outcomes = [_feed_dot(chunks) for chunks in _all_chunkings(data, cut_lists)]
    first = outcomes[0]
    for other in outcomes[1:]:
        require(other == first, f"dot: chunkings disagree: {first!r} vs {other!r}")
    require(len(first.output) + first.leftover <= len(data), "dot: more output than input")
    if first.ended:
        # Everything up to the end line is the stream, everything after it leftover.
        require(first.leftover <= len(data) - 2, "dot: the end line is shorter than '.\\n'")


def encode_dot(data: bytes, seed: int = 0) -> bytes:
    """The raw fuzz input :func:`fuzz_dot` decodes to these arguments."""
    return seed.to_bytes(4, "big") + data


def fuzz_dot(raw: bytes) -> None:
    """Raw input: [chunking seed: 4 bytes][stream...]."""
    fields = _Fields(raw, 4)
    check_dot(fields.body, chunkings_from_seed(fields.body, fields.uint(0, 4)))


# --- tab_unescape ----------------------------------------------------------------

_REF_UNESCAPE = {ord("0"): 0, ord("1"): 1, ord("t"): 9, ord("n"): 10, ord("r"): 13}


def _ref_unescape(data: bytes) -> bytes:
    """PROTOCOL.md 3.2, one byte at a time."""
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte != 1:
            out.append(byte)
            i += 1
        elif i + 1 < len(data):
            out.append(_REF_UNESCAPE.get(data[i + 1], data[i + 1]))
            i += 2
        else:
            i += 1
    return bytes(out)


def check_unescape(data: bytes) -> None:
    """tab_unescape never fails, matches the spec, and undoes tab_escape."""
    out = core("unescape", lambda: tab_unescape(data))
    require(type(out) is bytes, f"unescape: returned {type(out).__name__}")
    require(out == _ref_unescape(data), f"unescape: {data!r} gave {out!r}")
    require(len(out) <= len(data), "unescape: output longer than input")
    escaped = core("unescape", lambda: tab_escape(data))
    require(not any(b in escaped for b in (b"\0", b"\t", b"\n", b"\r")),
            f"escape: {escaped!r} still has a special byte")
    require(core("unescape", lambda: tab_unescape(escaped)) == data,
            "unescape(escape(x)) != x")


def fuzz_unescape(raw: bytes) -> None:
    """Raw input: the escaped value."""
    check_unescape(raw)


# --- dovecot.conf reader -------------------------------------------------------------

#: Bounds the work an input with many (nested) includes can cause.
INCLUDE_BUDGET = 64


def _check_execute(settings: ExecuteSettings, base_dir: str) -> None:
    try:
        target = core("config", lambda: settings.target(base_dir=base_dir))
    except LocalProtocolError:
        pass
    else:
        require(isinstance(target, (UnixTarget, TcpTarget, ForkTarget)), f"target {target!r}")
        if isinstance(target, TcpTarget):
            require(0 < target.port <= 65535, f"config: tcp port {target.port}")
    for split_first in (False, True):
        try:
            args = core("config", partial(settings.expand_args, VARIABLES,
                                          split_first=split_first))
        except LocalProtocolError:
            continue
        require(all(isinstance(a, str) for a in args), f"config: args {args!r}")
        if not split_first:  # split_first keeps one argument per token, even empty
            require(all(a and " " not in a for a in args), f"config: unsplit args {args!r}")


def check_config(text: str, includes: Sequence[str] = (), base_dir: str = "/run/dovecot",
                 extra_names: Sequence[str] = ("x",)) -> None:
    """dovecot.conf reader: only ConfigError on any text.

    Runs parse_config (with ``!include`` served from *includes*), then
    find_execute on the root and every section (with and without a name),
    find_service for every service name, and for every ExecuteSettings found
    its target() and expand_args().
    """
    calls = 0

    def include(path: str) -> str:
        nonlocal calls
        calls += 1
        if not includes or calls > INCLUDE_BUDGET:
            return ""
        return includes[sum(path.encode("utf-8", "surrogatepass")) % len(includes)]

    try:
        root = core("config", lambda: parse_config(text, include=include))
    except LocalProtocolError:
        return
    require(isinstance(root, ConfigSection) and root.kind == "", "config: bad root")
    sections = core("config", root.walk)
    names = {s.name for s in sections if s.kind == "execute"} | set(extra_names)
    services = {s.name for s in sections if s.kind == "service"} | set(extra_names)
    found: list[ExecuteSettings] = []
    for section in sections[:12]:
        for name in [None, *sorted(names)[:4]]:
            with contextlib.suppress(LocalProtocolError):
                found.append(core("config", partial(find_execute, section, name)))
    for name in sorted(services)[:10]:
        for base in (None, base_dir):
            try:
                service = core("config", partial(find_service, root, name, base_dir=base))
            except LocalProtocolError:
                continue
            try:
                effective = base or root.get("base_dir") or "/run/dovecot"
            except LocalProtocolError:
                effective = "/"
            for path, mode in service.unix_listeners:
                # Relative paths join base_dir, which may itself be relative.
                require((path.startswith("/") or not effective.startswith("/"))
                        and 0 <= mode <= 0o7777, f"config: listener {path!r} {mode:o}")
            for _, port in service.inet_listeners:
                require(0 < port <= 65535, f"config: inet port {port}")
    for filters in ([], ["q"], ["quota_warning", "x"]):
        for name in sorted(names)[:3]:
            with contextlib.suppress(LocalProtocolError):
                found.append(core("config", partial(find_execute, root, name,
                                                    filters=filters)))
    for _, listed in core("config", partial(list_executes, root))[:20]:
        if isinstance(listed, ExecuteSettings):
            found.append(listed)
    for extension in ("pipe", "execute"):
        with contextlib.suppress(LocalProtocolError):
            found.extend(core("config", partial(sieve_programs, root, extension, "p")))
    with contextlib.suppress(LocalProtocolError):
        core("config", lambda: parse_config(text, include=include, strict_escapes=True))
    for settings in found[:20]:
        _check_execute(settings, base_dir)


def encode_config(text: str, includes: Sequence[str] = (), *, latin1: bool = False) -> bytes:
    """The raw fuzz input :func:`fuzz_config` decodes to these arguments."""
    encoding = ("latin-1", "strict") if latin1 else ("utf-8", "surrogateescape")
    parts = [p.encode(*encoding) for p in (text, *includes)]
    return bytes([1 if latin1 else 0]) + b"\0".join(parts)


def fuzz_config(raw: bytes) -> None:
    """Raw input: [flags][main text][NUL][include text][NUL]...

    Flag bit 0: decode as latin-1 (else UTF-8 with surrogateescape); bit 1:
    base_dir is relative-looking (``run``) instead of ``/run/dovecot``.
    """
    fields = _Fields(raw, 1)
    flags = fields.head[0]
    encoding = ("latin-1", "strict") if flags & 1 else ("utf-8", "surrogateescape")
    text, *includes = (p.decode(*encoding) for p in fields.body.split(b"\0"))
    check_config(text, includes, base_dir="run" if flags & 2 else "/run/dovecot")


# --- parse_target ------------------------------------------------------------------------


def check_target(text: str, base_dir: str | None = None) -> None:
    """parse_target / parse_hostport: only ConfigError; results are valid and round-trip."""
    for base in (None, base_dir):
        try:
            target = core("target", partial(parse_target, text, base_dir=base))
        except LocalProtocolError:
            continue
        label = target.label
        if isinstance(target, TcpTarget):
            require(target.host != "" and 0 < target.port <= 65535, f"target: {target!r}")
            if "[" not in target.host and "]" not in target.host:
                again = core("target", partial(parse_target, label))
                require(again == target, f"target: {label!r} parses as {again!r}")
        else:
            require(isinstance(target, (UnixTarget, ForkTarget)) and target.path != "",
                    f"target: {target!r}")
            if base is None or isinstance(target, ForkTarget):
                again = core("target", partial(parse_target, label))
                require(again == target, f"target: {label!r} parses as {again!r}")
    for default in (0, 143):
        try:
            host, port = core("target", partial(parse_hostport, text, default))
        except LocalProtocolError:
            continue
        require(isinstance(host, str) and (port == default or 0 < port <= 65535),
                f"parse_hostport({text!r}) = {host!r}, {port!r}")


def encode_target(text: str, base_dir: str | None = None) -> bytes:
    """The raw fuzz input :func:`fuzz_target` decodes to these arguments."""
    flag = 0 if base_dir is None else 1
    return bytes([flag]) + text.encode("utf-8", "surrogateescape")


def fuzz_target(raw: bytes) -> None:
    """Raw input: [flags: bit 0 base_dir, bit 1 latin-1][URI...]."""
    fields = _Fields(raw, 1)
    flags = fields.head[0]
    text = fields.body.decode("latin-1") if flags & 2 else fields.body.decode(
        "utf-8", "surrogateescape")
    check_target(text, "/run/dovecot" if flags & 1 else None)


#: Target name -> raw-input entry point.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "header": fuzz_header,
    "reply": fuzz_reply,
    "dot": fuzz_dot,
    "unescape": fuzz_unescape,
    "config": fuzz_config,
    "target": fuzz_target,
}
