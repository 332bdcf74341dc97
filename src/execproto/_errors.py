"""The two errors the core raises, plus configuration errors.

Every parser in the core raises :class:`RemoteProtocolError` when the peer's
bytes are malformed and :class:`LocalProtocolError` when the caller misuses the
API (an event in the wrong state, a NUL byte in an argument).  Nothing else
escapes from the core on any input; the property tests hold it to that.
"""

from __future__ import annotations

__all__ = ["ConfigError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class of every error the core raises.

    Not raised directly: catch it to handle both subclasses at once.

    Attributes:
        message: the human-readable description, also ``str(error)``.
    """

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        self.message = message


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol cannot express.

    Examples: a NUL byte in an argument, an event sent in the wrong state,
    an invalid setting.  Fix the calling code; retrying cannot help.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol.

    The connection is unusable afterwards: close it.  Dovecot closes the
    connection without a reply in every such case; the service adapters do
    the same and log :attr:`message`.
    """


class ConfigError(LocalProtocolError):
    """A setting or a dovecot.conf text is invalid.

    Attributes:
        line: the 1-based line number in the configuration text, or ``None``
            when the error is not tied to a line.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
