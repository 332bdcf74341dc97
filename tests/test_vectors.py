"""Run the language-neutral conformance vectors through execproto's public API.

The vectors live in ``src/execproto/vectors.json``; docs/vectors.md describes the
format.  Every vector is run as given, and the streaming kinds are run a
second time with their input cut into one-byte chunks, which must not change
the result.  The other tests check the file itself: its exact formatting,
unique ids, the fields of each kind, latin-1 byte strings, and that every
conformance vector of PROTOCOL.md section 11 (CV-01 to CV-32) is covered.

A vector that the core fails although the vector follows PROTOCOL.md is not
edited to match the core: it is listed in ``KNOWN_CORE_BUGS`` and runs as a
strict xfail until the core is fixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import execproto
from execproto import (
    DEFAULT_MAX_HEADER_BYTES,
    ClientConnection,
    ConfigError,
    ConfigSection,
    Data,
    DotDecoder,
    DotEncoder,
    EndOfInput,
    ErrorKind,
    ForkTarget,
    LocalProtocolError,
    Output,
    RemoteProtocolError,
    Request,
    Result,
    ScriptExited,
    ScriptRequest,
    ServiceConnection,
    ServiceState,
    Status,
    Target,
    TcpTarget,
    UnixTarget,
    encode_request,
    execute_settings,
    find_execute,
    fork_argv,
    parse_config,
    parse_target,
    service_argv,
    tab_escape,
    tab_unescape,
)

Vector = dict[str, Any]
Outcome = dict[str, Any]

VECTORS_PATH = Path(execproto.__file__).with_name("vectors.json")
TEXT = VECTORS_PATH.read_text(encoding="utf-8")
DOC: dict[str, Any] = json.loads(TEXT)
VECTORS: list[Vector] = DOC["vectors"]

#: Vectors that follow PROTOCOL.md but fail against the core: id -> reason.
KNOWN_CORE_BUGS: dict[str, str] = {}

#: The script path given to ServiceConnection; vectors only see what follows it.
SCRIPT = b"/vector/script"

#: The id prefix of each kind, and the fields a vector of that kind may have
#: besides id, kind, description, spec and dovecot (required, optional).
KINDS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "escape": ("escape-", frozenset({"input", "output"}), frozenset()),
    "unescape": ("unescape-", frozenset({"input", "output"}), frozenset()),
    "encode_request": (
        "encode-",
        frozenset({"args", "env", "noreply", "expect"}),
        frozenset({"empty_args"}),
    ),
    "service_header": ("service-", frozenset({"config", "input", "expect"}), frozenset()),
    "service_result": (
        "result-",
        frozenset({"config", "input", "returncode", "expect"}),
        frozenset(),
    ),
    "reply_decode": ("reply-", frozenset({"mode", "input", "eof", "expect"}), frozenset()),
    "dot_encode": ("dot-encode-", frozenset({"input", "output"}), frozenset({"stuff_bare_cr_dot"})),
    "dot_decode": ("dot-decode-", frozenset({"input", "expect"}), frozenset()),
    "client_request": (
        "client-",
        frozenset({"args", "env", "noreply", "dot", "input", "expect"}),
        frozenset({"empty_args", "stuff_bare_cr_dot", "read_output"}),
    ),
    "argv": ("argv-", frozenset({"function", "expect"}), frozenset()),
    "settings": (
        "settings-",
        frozenset({"name", "block", "base_dir", "variables", "expect"}),
        frozenset(),
    ),
    "target_uri": ("uri-", frozenset({"uri", "base_dir", "expect"}), frozenset()),
    "config_text": (
        "config-",
        frozenset({"text", "consumer", "execute_name", "base_dir", "variables", "expect"}),
        frozenset({"includes"}),
    ),
}
ARGV_FIELDS = {
    "fork_argv": (frozenset({"path", "args", "env"}), frozenset({"run"})),
    "service_argv": (
        frozenset({"script", "service_args", "client_args", "libexec_dir"}),
        frozenset(),
    ),
}
#: Kinds whose ``input`` is a list of chunks that may be re-cut freely.
STREAMING = (
    "service_header",
    "service_result",
    "reply_decode",
    "dot_encode",
    "dot_decode",
    "client_request",
)
#: Words the interop test can put on Dovecot's ``executable`` line.
PLAIN_WORD = re.compile(r"[A-Za-z0-9_./,:=+@-]+")
ID_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
STATUSES = {s.name for s in Status}
ERROR_KINDS = {k.value for k in ErrorKind}


def b(text: str) -> bytes:
    """A vector byte string (code points <= U+00FF, one per byte) as bytes."""
    return text.encode("latin-1")


def s(data: bytes) -> str:
    """Bytes as a vector byte string."""
    return data.decode("latin-1")


def chunks_of(vector: Vector) -> list[bytes]:
    return [b(c) for c in vector["input"]]


def bytewise(chunks: Sequence[bytes]) -> list[bytes]:
    joined = b"".join(chunks)
    return [joined[i : i + 1] for i in range(len(joined))]


def target_dict(target: Target) -> Outcome:
    if isinstance(target, UnixTarget):
        return {"driver": "unix", "path": target.path}
    if isinstance(target, ForkTarget):
        return {"driver": "fork", "path": target.path}
    assert isinstance(target, TcpTarget)
    return {"driver": "tcp", "host": target.host, "port": target.port}


# --- one function per kind: (vector, input chunks) -> outcome in the shape of "expect"


def run_escape(vector: Vector, _: list[bytes]) -> Outcome:
    return {"output": s(tab_escape(b(vector["input"])))}


def run_unescape(vector: Vector, _: list[bytes]) -> Outcome:
    return {"output": s(tab_unescape(b(vector["input"])))}


def make_request(vector: Vector) -> Request:
    return Request(
        args=[b(a) for a in vector["args"]],
        env=[(b(name), b(value)) for name, value in vector["env"]],
        noreply=vector["noreply"],
    )


def run_encode_request(vector: Vector, _: list[bytes]) -> Outcome:
    try:
        header = encode_request(make_request(vector), empty_args=vector.get("empty_args", "soh"))
    except LocalProtocolError as exc:
        return {"error": "local", "message": exc.message}
    return {"output": s(header)}


def service_connection(config: dict[str, Any]) -> ServiceConnection:
    return ServiceConnection(
        SCRIPT,
        [b(a) for a in config["script_args"]],
        env_allowlist=[b(n) for n in config["env_allowlist"]],
        passthrough=config["passthrough"],
        max_header_bytes=config.get("max_header_bytes", DEFAULT_MAX_HEADER_BYTES),
    )


def poll(conn: ServiceConnection) -> ScriptRequest | None:
    event = conn.next_event()
    return event if isinstance(event, ScriptRequest) else None


def run_service_header(vector: Vector, chunks: list[bytes]) -> Outcome:
    config = vector["config"]
    conn = service_connection(config)
    try:
        request = poll(conn)  # passthrough: ready before any byte
        payload = b""
        for chunk in chunks:
            if request is not None:
                payload += chunk
                continue
            conn.receive_data(chunk)
            request = poll(conn)
            if request is not None:
                payload = conn.trailing_data
        if request is None:
            conn.receive_data(b"")  # the client half-closes
            pytest.fail("EOF inside the header was accepted")
    except RemoteProtocolError as exc:
        assert conn.state is ServiceState.ERROR
        return {"error": exc.message}
    # What the adapters rely on besides the vector's fields.
    assert request.argv == (SCRIPT, *(b(a) for a in config["script_args"]), *request.args)
    assert b"".join(chunks)[request.header_size :] == payload
    assert request.passthrough is config["passthrough"]
    assert request.sends_result is not (request.noreply or request.passthrough)
    env = dict(request.env)
    assert len(env) == len(request.env), "duplicate names in the script's environment"
    return {
        "args": [s(a) for a in request.args],
        "env": {s(k): s(v) for k, v in env.items()},
        "noreply": request.noreply,
        "alarm": request.alarm,
        "payload": s(payload),
    }


def run_service_result(vector: Vector, chunks: list[bytes]) -> Outcome:
    conn = service_connection(vector["config"])
    request = poll(conn)
    for chunk in chunks:
        if request is None:
            conn.receive_data(chunk)
            request = poll(conn)
    assert request is not None, "service_result vectors need a complete header"
    code = conn.send(ScriptExited(returncode=vector["returncode"]))
    assert conn.state is ServiceState.DONE
    return {"result_code": s(code)}


def drain(conn: ClientConnection, output: bytearray) -> Result | None:
    while True:
        event = conn.next_event()
        if isinstance(event, Output):
            output += event.data
        elif isinstance(event, Result):
            return event
        else:
            return None


def run_reply_decode(vector: Vector, chunks: list[bytes]) -> Outcome:
    mode = vector["mode"]
    conn = ClientConnection(
        dot=mode["dot"], read_output=True, lenient_reset=mode.get("lenient_reset", True)
    )
    conn.send(Request(noreply=mode["noreply"]))
    conn.send(EndOfInput())
    output = bytearray()
    for chunk in chunks:
        conn.receive_data(chunk)
        assert drain(conn, output) is None, "a result before the end of the reply"
    if vector["eof"] == "eof":
        conn.receive_data(b"")
    else:
        assert vector["eof"] == "reset"
        conn.receive_reset()
    result = drain(conn, output)
    assert result is not None
    return {"output": s(bytes(output)), "status": result.status.name, "kind": result.kind.value}


def run_dot_encode(vector: Vector, chunks: list[bytes]) -> Outcome:
    encoder = DotEncoder(stuff_bare_cr_dot=vector.get("stuff_bare_cr_dot", True))
    wire = b"".join(encoder.encode(c) for c in chunks) + encoder.finish()
    return {"output": s(wire)}


def run_dot_decode(vector: Vector, chunks: list[bytes]) -> Outcome:
    decoder = DotDecoder()
    output = b"".join(decoder.decode(c) for c in chunks)
    try:
        decoder.finish()
    except RemoteProtocolError:
        assert not decoder.ended
        return {"error": "remote"}
    assert decoder.ended
    return {"output": s(output), "leftover": decoder.leftover}


def run_client_request(vector: Vector, chunks: list[bytes]) -> Outcome:
    conn = ClientConnection(
        dot=vector["dot"],
        read_output=vector.get("read_output", True),
        empty_args=vector.get("empty_args", "soh"),
        stuff_bare_cr_dot=vector.get("stuff_bare_cr_dot", True),
    )
    try:
        wire = conn.send(make_request(vector))
        for chunk in chunks:
            wire += conn.send(Data(data=chunk))
        wire += conn.send(EndOfInput())
    except LocalProtocolError as exc:
        return {"error": "local", "message": exc.message}
    if conn.reads_reply:
        return {"output": s(wire), "then": "half-close"}
    # Closed without reading: the run is over, and it succeeded.
    assert conn.next_event() == Result(Status.SUCCESS)
    return {"output": s(wire), "then": "close"}


def run_argv(vector: Vector, _: list[bytes]) -> Outcome:
    function = vector["function"]
    try:
        if function == "fork_argv":
            argv = fork_argv(b(vector["path"]), [b(a) for a in vector["args"]])
        else:
            assert function == "service_argv"
            argv = service_argv(
                b(vector["script"]),
                [b(a) for a in vector["service_args"]],
                [b(a) for a in vector["client_args"]],
                libexec_dir=b(vector["libexec_dir"]),
            )
    except LocalProtocolError as exc:
        return {"error": "local", "message": exc.message}
    outcome: Outcome = {"argv": [s(a) for a in argv]}
    if function == "fork_argv":
        # The child's environment is exactly the caller's entries (last one wins).
        outcome["env"] = {name: value for name, value in vector["env"]}
    return outcome


def run_settings(vector: Vector, _: list[bytes]) -> Outcome:
    section = ConfigSection("execute", vector["name"], 1)
    for line, (key, value) in enumerate(vector["block"].items(), start=2):
        section.settings.append((key, value, line))
    try:
        settings = execute_settings(section)
        outcome = target_dict(settings.target(base_dir=vector["base_dir"]))
        outcome["args"] = list(settings.expand_args(vector["variables"]))
    except ConfigError as exc:
        return {"error": exc.message}
    return outcome


def run_target_uri(vector: Vector, _: list[bytes]) -> Outcome:
    try:
        return target_dict(parse_target(vector["uri"], base_dir=vector["base_dir"]))
    except ConfigError as exc:
        return {"error": exc.message}


def run_config_text(vector: Vector, _: list[bytes]) -> Outcome:
    includes: dict[str, str] | None = vector.get("includes")
    loader: Callable[[str], str] | None = None
    if includes is not None:
        loader = includes.__getitem__
    try:
        section = parse_config(vector["text"], include=loader)
        for kind, name in vector["consumer"]:
            found = [c for c in section.sections if (c.kind, c.name) == (kind, name)]
            assert found, f"the vector's consumer {kind} {name} is not in its text"
            section = found[0]
        settings = find_execute(section, vector["execute_name"])
        outcome = target_dict(settings.target(base_dir=vector["base_dir"]))
        outcome["args"] = list(settings.expand_args(vector["variables"]))
        outcome["name"] = settings.name
    except ConfigError as exc:
        return {"error": exc.message, "line": exc.line}
    return outcome


RUNNERS: dict[str, Callable[[Vector, list[bytes]], Outcome]] = {
    "escape": run_escape,
    "unescape": run_unescape,
    "encode_request": run_encode_request,
    "service_header": run_service_header,
    "service_result": run_service_result,
    "reply_decode": run_reply_decode,
    "dot_encode": run_dot_encode,
    "dot_decode": run_dot_decode,
    "client_request": run_client_request,
    "argv": run_argv,
    "settings": run_settings,
    "target_uri": run_target_uri,
    "config_text": run_config_text,
}


def expected(vector: Vector) -> Outcome:
    if vector["kind"] in ("escape", "unescape", "dot_encode"):
        return {"output": vector["output"]}
    result: Outcome = vector["expect"]
    return result


def check(vector: Vector, got: Outcome) -> None:
    want = expected(vector)
    if "error" not in want:
        assert got == want
        return
    assert "error" in got, f"expected an error ({want}), got {got}"
    if want["error"] in ("local", "remote"):
        assert got["error"] == want["error"]
        if "message" in want:
            assert want["message"] in got["message"], got
    else:
        assert want["error"] in got["error"], got
    if "line" in want:
        assert got["line"] == want["line"], got


def param(vector: Vector) -> Any:
    reason = KNOWN_CORE_BUGS.get(vector["id"])
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(vector, id=vector["id"], marks=marks)


@pytest.mark.parametrize("vector", [param(v) for v in VECTORS])
def test_vector(vector: Vector) -> None:
    chunks = chunks_of(vector) if vector["kind"] in STREAMING else []
    check(vector, RUNNERS[vector["kind"]](vector, chunks))


@pytest.mark.parametrize(
    "vector", [param(v) for v in VECTORS if v["kind"] in STREAMING and v["input"]]
)
def test_vector_one_byte_chunks(vector: Vector) -> None:
    check(vector, RUNNERS[vector["kind"]](vector, bytewise(chunks_of(vector))))


# --- the file itself


def test_file_header() -> None:
    assert DOC["format"] == "execproto-conformance"
    assert DOC["version"] == 1
    assert DOC["bytes_encoding"] == "latin-1 code points"
    assert DOC["description"]
    assert set(DOC) == {"format", "version", "description", "bytes_encoding", "vectors"}
    assert len(VECTORS) >= 80


def test_canonical_formatting() -> None:
    """2-space indent, ASCII only, one trailing newline: diffs stay reviewable."""
    assert json.dumps(DOC, indent=2) + "\n" == TEXT


def test_ids() -> None:
    ids = [v["id"] for v in VECTORS]
    assert len(ids) == len(set(ids))
    for vector in VECTORS:
        assert ID_RE.fullmatch(vector["id"]), vector["id"]
        assert vector["id"].startswith(KINDS[vector["kind"]][0]), vector["id"]


def test_fields() -> None:
    common = {"id", "kind", "description", "spec", "dovecot"}
    for vector in VECTORS:
        _, required, optional = KINDS[vector["kind"]]
        if vector["kind"] == "argv":
            more_required, more_optional = ARGV_FIELDS[vector["function"]]
            required, optional = required | more_required, optional | more_optional
        keys = set(vector)
        assert common | required <= keys, vector["id"]
        assert keys <= common | required | optional, (vector["id"], keys - common - required)
        assert vector["description"].strip(), vector["id"]
        assert vector["spec"].startswith("PROTOCOL.md "), vector["id"]
        if vector["kind"] in STREAMING and "input" in vector:
            assert all(isinstance(c, str) and c for c in vector["input"]), vector["id"]


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_byte_strings_are_latin1() -> None:
    for vector in VECTORS:
        for text in strings(vector):
            assert max(map(ord, text), default=0) <= 0xFF, (vector["id"], text)


def test_section_11_is_covered() -> None:
    cited = {int(n) for v in VECTORS for n in re.findall(r"CV-(\d\d)", v["spec"])}
    assert set(range(1, 33)) <= cited, sorted(set(range(1, 33)) - cited)


def expect_shape_ok(kind: str, expect: Outcome, observed: bool) -> bool:
    keys = set(expect)
    if kind in ("escape", "unescape", "dot_encode", "encode_request"):
        return keys == {"output"} or (
            kind == "encode_request"
            and expect.get("error") == "local"
            and keys <= {"error", "message"}
        )
    if kind == "client_request":
        return (keys == {"output", "then"} and expect["then"] in ("half-close", "close")) or (
            expect.get("error") == "local" and keys <= {"error", "message"}
        )
    if kind == "service_header":
        return keys == {"error"} or keys == {"args", "env", "noreply", "alarm", "payload"}
    if kind == "service_result":
        return keys == {"result_code"} and expect["result_code"] in ("+\n", "-\n", "")
    if kind == "reply_decode":
        return (
            keys == {"output", "status", "kind"}
            and expect["status"] in STATUSES
            and expect["kind"] in ERROR_KINDS
            # Dovecot reports bad result codes as INTERNAL_FAILURE with kind NONE.
            and (observed or (expect["kind"] == "none") == (expect["status"] != "INTERNAL_FAILURE"))
        )
    if kind == "dot_decode":
        return keys == {"output", "leftover"} or expect == {"error": "remote"}
    if kind == "argv":
        return keys in ({"argv"}, {"argv", "env"}) or (
            expect.get("error") == "local" and keys <= {"error", "message"}
        )
    if kind in ("settings", "target_uri", "config_text"):
        extra = {"args"} if kind != "target_uri" else set()
        if kind == "config_text":
            extra.add("name")
        if "error" in expect:
            return keys == ({"error", "line"} if kind == "config_text" else {"error"})
        driver = expect.get("driver")
        fields = {"host", "port"} if driver == "tcp" else {"path"}
        return driver in ("unix", "fork", "tcp") and keys == {"driver"} | fields | extra
    return False


def test_expect_and_dovecot_fields() -> None:
    for vector in VECTORS:
        kind = vector["kind"]
        if kind not in ("escape", "unescape", "dot_encode"):
            assert expect_shape_ok(kind, vector["expect"], False), vector["id"]
        dovecot = vector["dovecot"]
        if dovecot in ("match", "unchecked"):
            continue
        assert isinstance(dovecot, dict), vector["id"]
        assert set(dovecot) == {"differs", "observed"}, vector["id"]
        assert dovecot["differs"].strip(), vector["id"]
        observed = dovecot["observed"]
        assert observed != expected(vector), vector["id"]
        if kind == "service_header" and "error" in observed:
            continue  # "crash" or Dovecot's own log text
        if kind in ("escape", "unescape", "dot_encode"):
            assert set(observed) == {"output"}, vector["id"]
        else:
            assert expect_shape_ok(kind, observed, True), vector["id"]


def test_fork_run_fields() -> None:
    """``run`` is informational (no process is started here), but well-formed."""
    allowed = {"status", "kind", "stdout", "stdout_lines_include", "run_timeout_ms", "min_seconds"}
    runs = [v["run"] for v in VECTORS if v["kind"] == "argv" and "run" in v]
    assert len(runs) >= 6  # the rows of PROTOCOL.md 11.7
    for run in runs:
        assert {"status", "kind"} <= set(run) <= allowed, run
        assert run["status"] in STATUSES and run["kind"] in ERROR_KINDS, run


def test_service_header_configs_fit_the_interop_test() -> None:
    """The interop test writes these configs into a real dovecot.conf."""
    for vector in VECTORS:
        if vector["kind"] not in ("service_header", "service_result"):
            continue
        config = vector["config"]
        assert {"env_allowlist", "passthrough", "script_args"} <= set(config), vector["id"]
        assert set(config) <= {"env_allowlist", "passthrough", "script_args", "max_header_bytes"}, (
            vector["id"]
        )
        assert isinstance(config["passthrough"], bool)
        for word in [*config["env_allowlist"], *config["script_args"]]:
            assert PLAIN_WORD.fullmatch(word), (vector["id"], word)
