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
    the same and log its ``message``.
    """


class ConfigError(LocalProtocolError):
    """A setting or a dovecot.conf text is invalid.

    The message starts with where the error is, as Dovecot writes it:
    ``FILE line N: ...`` (or ``line N: ...`` for a text without a name).

    Attributes:
        line: the 1-based line number in the configuration text, or ``None``
            when the error is not tied to a line.
        file: the name of the file the line is in (an included file's own
            name), or ``None`` when not known.
        reason: the message without the location.
    """

    def __init__(self, message: str, line: int | None = None,
                 file: str | None = None) -> None:
        where = f"{file} " if file else ""
        if line is not None:
            where += f"line {line}"
        super().__init__(f"{where.rstrip()}: {message}" if where else message)
        self.line = line
        self.file = file
        self.reason = message
