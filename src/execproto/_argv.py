"""argv for the fork driver and for the service (PROTOCOL.md 7.1, 8.1)."""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import LocalProtocolError
from ._util import BytesLike, to_bytes

__all__ = ["fork_argv", "service_argv"]


def _no_nul(values: tuple[bytes, ...], what: str) -> tuple[bytes, ...]:
    for value in values:
        if b"\0" in value:
            raise LocalProtocolError(f"NUL byte in {what} {value!r}")
    return values


def fork_argv(path: BytesLike, args: Iterable[BytesLike] = ()) -> tuple[bytes, ...]:
    """Argv of the fork driver: ``[path, *args]``.

    ``argv[0]`` is the path as configured, not its basename.  A path without
    ``/`` is looked up in the default search path by the adapter, since the
    script's environment has no PATH (quirk Q18).

    Raises:
        LocalProtocolError: an empty path or a NUL byte anywhere.
    """
    p = to_bytes(path, "fork path")
    if not p:
        raise LocalProtocolError("empty fork path")
    return _no_nul((p, *(to_bytes(a, "argument") for a in args)), "argument")


def service_argv(
    script: BytesLike,
    service_args: Iterable[BytesLike],
    client_args: Iterable[BytesLike],
    *,
    libexec_dir: BytesLike,
) -> tuple[bytes, ...]:
    """Argv of a script run by the service: ``[script, *service_args, *client_args]``.

    A relative *script* is prefixed with ``libexec_dir + "/"``, as the
    ``script`` binary does with Dovecot's libexec directory.

    Raises:
        LocalProtocolError: an empty script path ("Missing script path") or a
            NUL byte in the script or service args.
    """
    s = to_bytes(script, "script path")
    if not s:
        raise LocalProtocolError("Missing script path")
    if not s.startswith(b"/"):
        s = to_bytes(libexec_dir, "libexec dir") + b"/" + s
    fixed = _no_nul((s, *(to_bytes(a, "service argument") for a in service_args)), "argument")
    return fixed + tuple(to_bytes(a, "argument") for a in client_args)
