"""Small helpers shared by the core's modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ._errors import LocalProtocolError

__all__ = ["BytesLike", "EnvLike", "Sentinel", "to_bytes"]

#: What public APIs accept where the protocol carries bytes.  ``str`` is
#: encoded as UTF-8 with ``surrogateescape`` (what ``os.fsencode`` does on
#: Linux), so a name decoded from the file system round-trips.
BytesLike = bytes | bytearray | memoryview | str

#: An environment: a mapping (``dict[str, str]``, ``dict[bytes, bytes]``...)
#: or ``(name, value)`` pairs, which keep order and may repeat a name.
EnvLike = (
    Mapping[str, BytesLike] | Mapping[bytes, BytesLike] | Iterable[tuple[BytesLike, BytesLike]]
)


def to_bytes(value: BytesLike, what: str) -> bytes:
    """Return *value* as ``bytes``; ``str`` is encoded UTF-8/surrogateescape.

    Raises:
        LocalProtocolError: *value* is neither bytes-like nor ``str``.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise LocalProtocolError(f"{what} must be bytes or str, not {type(value).__name__}")


class Sentinel(type):
    """Metaclass for sentinels: ``type(NEED_DATA) is NEED_DATA`` (as in h11).

    This lets callers dispatch on ``type(event)`` for events and sentinels alike.
    """

    def __new__(
        cls: type[Sentinel], name: str, bases: tuple[type, ...], namespace: dict[str, object]
    ) -> Sentinel:
        assert bases == (Sentinel,)
        v = super().__new__(cls, name, bases, namespace)
        v.__class__ = v  # type: ignore[assignment]
        return v

    def __repr__(self) -> str:
        return self.__name__
