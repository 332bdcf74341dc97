"""Every flavour's client against every flavour's service (3 x 3), unix and tcp."""

from __future__ import annotations

from pathlib import Path

import pytest

from execproto import DotEncoder, ErrorKind, Status

from .flavours import (
    FLAVOUR_NAMES,
    SOCKET_DRIVERS,
    dot_roundtrip,
    endpoint,
    get_flavour,
    read_record,
    recorder_script,
    sh_script,
)


@SOCKET_DRIVERS
@pytest.mark.parametrize("service_name", FLAVOUR_NAMES)
@pytest.mark.parametrize("client_name", FLAVOUR_NAMES)
def test_cross_success(client_name: str, service_name: str, driver: str,
                       tmp_path: Path) -> None:
    """Args, allowlisted env and 1 MB of payload arrive; the output comes back."""
    client, service = get_flavour(client_name), get_flavour(service_name)
    reply = b"OUT\r\n.\r\n" if driver == "tcp" else b"OUT\n"
    script, record = recorder_script(tmp_path, reply=reply)
    payload = bytes(range(256)) * 4096
    args = ["a", "", "tab\there", "nl\nx", "\x01"]
    with endpoint(service, driver, tmp_path, script, script_args=("first",),
                  env_allowlist=("FOO",)) as target:
        result = client.run(target, args, input=payload, env={"FOO": "x\ty", "BAR": "no"})
        seen = read_record(record)
    assert result.status is Status.SUCCESS, result
    assert result.kind is ErrorKind.NONE
    assert result.output == (b"OUT" if driver == "tcp" else b"OUT\n")
    assert seen["cmdline"][2:] == [b"first"] + [a.encode() for a in args]
    assert seen["environ"] == {b"FOO": b"x\ty"}
    if driver == "tcp":
        encoder = DotEncoder()
        assert seen["stdin"] == encoder.encode(payload) + encoder.finish()
    else:
        assert seen["stdin"] == payload


@SOCKET_DRIVERS
@pytest.mark.parametrize("service_name", FLAVOUR_NAMES)
@pytest.mark.parametrize("client_name", FLAVOUR_NAMES)
def test_cross_failure_and_echo(client_name: str, service_name: str, driver: str,
                                tmp_path: Path) -> None:
    """A failing script is FAILURE with its output; ``cat`` echoes (dot-framed on tcp)."""
    client, service = get_flavour(client_name), get_flavour(service_name)
    out = "no\\r\\n.\\r\\n" if driver == "tcp" else "no\\n"
    failing = sh_script(tmp_path, "fail", f"/bin/cat >/dev/null\nprintf '{out}'\nexit 7\n")
    with endpoint(service, driver, tmp_path, failing) as target:
        result = client.run(target, input=b"ignored")
    assert result.status is Status.FAILURE, result
    assert result.output == (b"no" if driver == "tcp" else b"no\n")
    data = b"".join(b"%d .\n.%d\n" % (i, i) for i in range(5000))
    (tmp_path / "echo").mkdir()
    with endpoint(service, driver, tmp_path / "echo", "/bin/cat") as target:
        result = client.run(target, input=data)
    assert result.status is Status.SUCCESS, result
    assert result.output == (dot_roundtrip(data) if driver == "tcp" else data)
