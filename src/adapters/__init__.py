"""execproto's transports: the I/O around the pure core.

Three flavours with the same names and shapes: :mod:`execproto.adapters.blocking`,
:mod:`execproto.adapters.asyncio` and :mod:`execproto.adapters.trio`; each has
``run()`` (client: unix, tcp and fork drivers) and ``serve()`` (a drop-in for
Dovecot's ``script`` service).  This package only re-exports what they share;
import the flavour you use.
"""

from ._common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    KILL_TIMEOUT,
    FdListener,
    Listener,
    RunOptions,
    RunResult,
    ServiceConfig,
    ServiceOptions,
    TcpListener,
    UnixListener,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "KILL_TIMEOUT",
    "FdListener",
    "Listener",
    "RunOptions",
    "RunResult",
    "ServiceConfig",
    "ServiceOptions",
    "TcpListener",
    "UnixListener",
]
