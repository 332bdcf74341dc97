"""Events, sentinels, the result vocabulary and the error classes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

import execproto
from execproto import (
    NEED_DATA,
    ConfigError,
    Data,
    EndOfInput,
    ErrorKind,
    LocalProtocolError,
    Output,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Result,
    ScriptExited,
    ScriptRequest,
    Status,
)

# --- Request --------------------------------------------------------------------------


def test_request_defaults() -> None:
    request = Request()
    assert (request.args, request.env, request.noreply) == ((), (), False)


def test_request_normalises_str_to_bytes() -> None:
    request = Request(args=["héllo", b"raw", bytearray(b"ba"), memoryview(b"mv")],
                      env=[("K", "vé"), (b"B", bytearray(b"b"))])
    assert request.args == (b"h\xc3\xa9llo", b"raw", b"ba", b"mv")
    assert all(type(a) is bytes for a in request.args)
    assert request.env == ((b"K", b"v\xc3\xa9"), (b"B", b"b"))


def test_request_surrogateescape_round_trips() -> None:
    name = b"\xff\xfe".decode("utf-8", "surrogateescape")
    assert Request(args=[name]).args == (b"\xff\xfe",)


def test_request_env_forms() -> None:
    pairs = [("A", "1"), ("B", "2"), ("A", "3")]
    assert Request(env=pairs).env == ((b"A", b"1"), (b"B", b"2"), (b"A", b"3"))
    assert Request(env=iter(pairs)).env == Request(env=pairs).env
    assert Request(env={"A": "1"}).env == ((b"A", b"1"),)


def test_request_args_from_any_iterable() -> None:
    assert Request(args=(a for a in ["x", "y"])).args == (b"x", b"y")


@pytest.mark.parametrize("args", ["abc", b"abc", bytearray(b"abc"), memoryview(b"abc")])
def test_request_rejects_a_single_string_as_args(args: object) -> None:
    with pytest.raises(LocalProtocolError, match="sequence of values, not a single string"):
        Request(args=args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"args": [1]}, "argument must be bytes or str, not int"),
        ({"args": [None]}, "argument must be bytes or str, not NoneType"),
        ({"env": [("A",)]}, "env must be a mapping or"),
        ({"env": [("A", "1", "2")]}, "env must be a mapping or"),
        ({"env": [1]}, "env must be a mapping or"),
        ({"env": {1: "x"}}, "env name must be bytes or str, not int"),
        ({"env": {"A": 1}}, "env value must be bytes or str, not int"),
    ],
)
def test_request_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        Request(**kwargs)  # type: ignore[arg-type]


def test_request_noreply_is_bool() -> None:
    assert Request(noreply=1).noreply is True  # type: ignore[arg-type]
    assert Request(noreply=0).noreply is False  # type: ignore[arg-type]


def test_request_is_keyword_only_frozen_and_hashable() -> None:
    with pytest.raises(TypeError):
        Request(["x"])  # type: ignore[call-arg]
    request = Request(args=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.noreply = True  # type: ignore[misc]
    assert request == Request(args=[b"x"])
    assert hash(request) == hash(Request(args=[b"x"]))
    assert not hasattr(request, "__dict__")


# --- Data, EndOfInput, Output -----------------------------------------------------------


def test_data() -> None:
    assert Data(data="é").data == b"\xc3\xa9"
    assert Data(data=bytearray(b"x")).data == b"x"
    assert type(Data(data=memoryview(b"x")).data) is bytes
    with pytest.raises(LocalProtocolError, match="data must be bytes or str, not int"):
        Data(data=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Data(b"x")  # type: ignore[call-arg]


def test_end_of_input_and_output() -> None:
    assert EndOfInput() == EndOfInput()
    assert Output(b"x") == Output(data=b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Output(b"x").data = b"y"  # type: ignore[misc]


# --- Result ---------------------------------------------------------------------------------


def test_status_values_are_dovecots() -> None:
    assert (Status.SUCCESS, Status.FAILURE, Status.INTERNAL_FAILURE) == (1, 0, -1)


def test_error_kinds() -> None:
    assert {k.name for k in ErrorKind} == {
        "NONE", "CONNECT_TIMEOUT", "RUN_TIMEOUT", "IO", "PROTOCOL", "OTHER"
    }


@pytest.mark.parametrize("status", [Status.SUCCESS, Status.FAILURE])
def test_result_without_kind(status: Status) -> None:
    result = Result(status)
    assert (result.status, result.kind, result.detail) == (status, ErrorKind.NONE, "")
    assert Result(status, detail="note").detail == "note"


@pytest.mark.parametrize("kind", [k for k in ErrorKind if k is not ErrorKind.NONE])
def test_result_invariants(kind: ErrorKind) -> None:
    assert Result(Status.INTERNAL_FAILURE, kind).kind is kind
    for status in (Status.SUCCESS, Status.FAILURE):
        with pytest.raises(LocalProtocolError, match="INTERNAL_FAILURE result needs an error kind"):
            Result(status, kind)


def test_internal_failure_needs_a_kind() -> None:
    with pytest.raises(LocalProtocolError, match="status=INTERNAL_FAILURE, kind=NONE"):
        Result(Status.INTERNAL_FAILURE)


# --- service side events ---------------------------------------------------------------


def test_script_exited() -> None:
    assert ScriptExited(returncode=0).returncode == 0
    assert ScriptExited(returncode=None).returncode is None
    assert ScriptExited(returncode=-9) == ScriptExited(returncode=-9)
    with pytest.raises(TypeError):
        ScriptExited(0)  # type: ignore[call-arg]


def test_script_request_properties() -> None:
    def make(noreply: bool, passthrough: bool) -> ScriptRequest:
        return ScriptRequest(
            argv=(b"/s",), env=((b"A", b"1"), (b"B", b"2")), args=(), noreply=noreply,
            passthrough=passthrough, alarm=None, version_minor=0, header_size=21,
        )

    assert make(False, False).sends_result
    assert not make(True, False).sends_result
    assert not make(False, True).sends_result
    assert make(False, False).environ == {b"A": b"1", b"B": b"2"}


# --- sentinels and errors ----------------------------------------------------------------


def test_need_data_sentinel() -> None:
    assert type(NEED_DATA) is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert isinstance(NEED_DATA, type)


def test_protocol_error_cannot_be_raised_directly() -> None:
    with pytest.raises(TypeError, match="raise LocalProtocolError or RemoteProtocolError"):
        ProtocolError("x")


@pytest.mark.parametrize(
    "make",
    [
        lambda: LocalProtocolError("m"),
        lambda: RemoteProtocolError("m"),
        lambda: ConfigError("m"),
    ],
)
def test_error_classes(make: Callable[[], ProtocolError]) -> None:
    error = make()
    assert isinstance(error, ProtocolError)
    assert error.message == "m" == str(error)


def test_config_error_is_local() -> None:
    assert issubclass(ConfigError, LocalProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    error = ConfigError("bad", 12)
    assert (error.line, error.message, str(error)) == (12, "line 12: bad", "line 12: bad")


# --- the public surface -------------------------------------------------------------------


def test_all_names_exist_and_are_documented() -> None:
    for name in execproto.__all__:
        obj = getattr(execproto, name)
        if callable(obj) and not isinstance(obj, (str, int, tuple)):
            assert obj.__doc__, f"{name} has no docstring"
    assert execproto.__version__ == "0.1.0"
    assert sorted(execproto.__all__) == sorted(set(execproto.__all__))
