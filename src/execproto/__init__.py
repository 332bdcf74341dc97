"""execproto: Dovecot's execute-scripts protocol, sans I/O.

This package is the pure protocol core: bytes in, events and bytes out, no
sockets, processes, clocks or environment.  The transports live in
``execproto.adapters`` (blocking, asyncio, trio), which ``import execproto``
never loads.

Client side::

    conn = ClientConnection()
    sock.sendall(conn.send(Request(args=["hello"], env={"USER": "frank"})))
    sock.sendall(conn.send(Data(data=b"payload")))
    sock.sendall(conn.send(EndOfInput()))
    sock.shutdown(SHUT_WR)
    ...feed conn.receive_data(chunk), drain conn.next_event()...

Service side: :class:`ServiceConnection`.  Codecs: :func:`encode_request`,
:class:`HeaderParser`, :class:`ResultCodeFilter`, :class:`DotEncoder`,
:class:`DotDecoder`, :func:`tab_escape`, :func:`tab_unescape`.  A tap's view of
both streams: :class:`ExchangeObserver`.  Settings:
:func:`parse_target`, :class:`ExecuteSettings`, :func:`parse_config`.
"""

from ._argv import fork_argv, service_argv
from ._client import ClientConnection, ClientState
from ._config import (
    ConfigSection,
    ScriptCommand,
    ServiceSettings,
    execute_settings,
    find_execute,
    find_service,
    parse_config,
    parse_script_command,
)
from ._dot import DotDecoder, DotEncoder
from ._errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._escape import tab_escape, tab_unescape
from ._events import (
    NEED_DATA,
    Data,
    EndOfInput,
    ErrorKind,
    Output,
    Request,
    Result,
    ScriptExited,
    ScriptRequest,
    Status,
)
from ._header import (
    DEFAULT_MAX_HEADER_BYTES,
    SCRIPT_MAJOR_VERSION,
    HeaderParser,
    ParsedHeader,
    encode_request,
)
from ._observe import EnvEntry, ExchangeObserver, ExchangeSummary
from ._reply import ResultCodeFilter
from ._service import DEFAULT_LIBEXEC_DIR, ServiceConnection, ServiceState, parse_env_allowlist
from ._settings import (
    DEFAULT_BASE_DIR,
    DRIVERS,
    ExecuteSettings,
    ForkTarget,
    Target,
    TcpTarget,
    UnixTarget,
    expand_args,
    expand_value,
    parse_hostport,
    parse_target,
)
from ._util import BytesLike, EnvLike

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_DIR",
    "DEFAULT_LIBEXEC_DIR",
    "DEFAULT_MAX_HEADER_BYTES",
    "DRIVERS",
    "NEED_DATA",
    "SCRIPT_MAJOR_VERSION",
    "BytesLike",
    "ClientConnection",
    "ClientState",
    "ConfigError",
    "ConfigSection",
    "Data",
    "DotDecoder",
    "DotEncoder",
    "EndOfInput",
    "EnvEntry",
    "EnvLike",
    "ErrorKind",
    "ExchangeObserver",
    "ExchangeSummary",
    "ExecuteSettings",
    "ForkTarget",
    "HeaderParser",
    "LocalProtocolError",
    "Output",
    "ParsedHeader",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "Result",
    "ResultCodeFilter",
    "ScriptCommand",
    "ScriptExited",
    "ScriptRequest",
    "ServiceConnection",
    "ServiceSettings",
    "ServiceState",
    "Status",
    "Target",
    "TcpTarget",
    "UnixTarget",
    "__version__",
    "encode_request",
    "execute_settings",
    "expand_args",
    "expand_value",
    "find_execute",
    "find_service",
    "fork_argv",
    "parse_config",
    "parse_env_allowlist",
    "parse_hostport",
    "parse_script_command",
    "parse_target",
    "service_argv",
    "tab_escape",
    "tab_unescape",
]
