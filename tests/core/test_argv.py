"""argv of the fork driver and of the service (PROTOCOL.md 7.1, 8.1)."""

from __future__ import annotations

import pytest

from execproto import LocalProtocolError, fork_argv, service_argv


def test_fork_argv() -> None:
    assert fork_argv("/bin/sh", ["-c", "echo $0", "a"]) == (b"/bin/sh", b"-c", b"echo $0", b"a")
    assert fork_argv(b"sh") == (b"sh",)  # argv[0] is the path as configured
    assert fork_argv("/x", [b"\xff", "é"]) == (b"/x", b"\xff", b"\xc3\xa9")
    assert fork_argv("/x", [""]) == (b"/x", b"")


@pytest.mark.parametrize(
    ("path", "args", "match"),
    [
        ("", [], "empty fork path"),
        ("/a\x00", [], "NUL byte"),
        ("/a", ["b\x00"], "NUL byte"),
        (1, [], "fork path must be bytes or str"),
        ("/a", [1], "argument must be bytes or str"),
    ],
)
def test_fork_argv_errors(path: object, args: list[object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        fork_argv(path, args)  # type: ignore[arg-type]


def test_service_argv() -> None:
    assert service_argv("/s", ["one"], [b"c"], libexec_dir="/lib") == (b"/s", b"one", b"c")
    assert service_argv("t.sh", [], [], libexec_dir="/usr/lib/dovecot") == (
        b"/usr/lib/dovecot/t.sh",
    )
    assert service_argv(b"t", [b"a"], ["b"], libexec_dir=b"/x") == (b"/x/t", b"a", b"b")


def test_service_argv_errors() -> None:
    with pytest.raises(LocalProtocolError, match="Missing script path"):
        service_argv("", [], [], libexec_dir="/x")
    with pytest.raises(LocalProtocolError, match="NUL byte"):
        service_argv("/s\x00", [], [], libexec_dir="/x")
    with pytest.raises(LocalProtocolError, match="NUL byte"):
        service_argv("/s", ["\x00"], [], libexec_dir="/x")
    with pytest.raises(LocalProtocolError, match="libexec dir must be bytes or str"):
        service_argv("s", [], [], libexec_dir=None)  # type: ignore[arg-type]
