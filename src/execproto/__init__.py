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
:func:`parse_target`, :class:`ExecuteSettings`, :func:`parse_config`.  What
Dovecot's own clients send (quota warnings, welcome, Pigeonhole's Sieve
programs): :class:`ClientCall` and the ``*_call`` functions.  What
``execproto doctor`` checks, from a configuration alone: :func:`plan_checks`.
"""

from ._argv import fork_argv, service_argv
from ._client import ClientConnection, ClientState
from ._clients import (
    CLIENT_KINDS,
    QUOTA_CONNECT_TIMEOUT,
    SIEVE_CONNECT_TIMEOUT,
    SIEVE_DEFAULT_EXEC_TIMEOUT,
    SIEVE_ENV,
    ClientCall,
    QuotaOverStatus,
    QuotaWarning,
    SieveSettings,
    Verdict,
    Welcome,
    find_quota_over_status,
    find_welcome,
    pick_quota_warning,
    quota_over_status_call,
    quota_warning_call,
    quota_warnings,
    sieve_call,
    sieve_extension_settings,
    to_crlf,
    to_lf,
    welcome_call,
    with_alarm,
)
from ._config import (
    ConfigLoader,
    ConfigSection,
    ScriptCommand,
    ServiceSettings,
    convert_legacy_args,
    execute_settings,
    filter_kind,
    find_execute,
    find_service,
    legacy_executes,
    list_executes,
    parse_config,
    parse_script_command,
    sieve_programs,
)
from ._doctor import (
    SIEVE_CONNECT_TIMEOUT_MS,
    ClientPlan,
    DoctorPlan,
    Finding,
    ListenerPlan,
    ServicePlan,
    may_access,
    parse_shebang,
    plan_checks,
    script_environment,
    stdout_writes,
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
    "CLIENT_KINDS",
    "DEFAULT_BASE_DIR",
    "DEFAULT_LIBEXEC_DIR",
    "DEFAULT_MAX_HEADER_BYTES",
    "DRIVERS",
    "NEED_DATA",
    "QUOTA_CONNECT_TIMEOUT",
    "SCRIPT_MAJOR_VERSION",
    "SIEVE_CONNECT_TIMEOUT",
    "SIEVE_CONNECT_TIMEOUT_MS",
    "SIEVE_DEFAULT_EXEC_TIMEOUT",
    "SIEVE_ENV",
    "BytesLike",
    "ClientCall",
    "ClientConnection",
    "ClientPlan",
    "ClientState",
    "ConfigError",
    "ConfigLoader",
    "ConfigSection",
    "Data",
    "DoctorPlan",
    "DotDecoder",
    "DotEncoder",
    "EndOfInput",
    "EnvEntry",
    "EnvLike",
    "ErrorKind",
    "ExchangeObserver",
    "ExchangeSummary",
    "ExecuteSettings",
    "Finding",
    "ForkTarget",
    "HeaderParser",
    "ListenerPlan",
    "LocalProtocolError",
    "Output",
    "ParsedHeader",
    "ProtocolError",
    "QuotaOverStatus",
    "QuotaWarning",
    "RemoteProtocolError",
    "Request",
    "Result",
    "ResultCodeFilter",
    "ScriptCommand",
    "ScriptExited",
    "ScriptRequest",
    "ServiceConnection",
    "ServicePlan",
    "ServiceSettings",
    "ServiceState",
    "SieveSettings",
    "Status",
    "Target",
    "TcpTarget",
    "UnixTarget",
    "Verdict",
    "Welcome",
    "__version__",
    "convert_legacy_args",
    "encode_request",
    "execute_settings",
    "expand_args",
    "expand_value",
    "filter_kind",
    "find_execute",
    "find_quota_over_status",
    "find_service",
    "find_welcome",
    "fork_argv",
    "legacy_executes",
    "list_executes",
    "may_access",
    "parse_config",
    "parse_env_allowlist",
    "parse_hostport",
    "parse_script_command",
    "parse_shebang",
    "parse_target",
    "pick_quota_warning",
    "plan_checks",
    "quota_over_status_call",
    "quota_warning_call",
    "quota_warnings",
    "script_environment",
    "service_argv",
    "sieve_call",
    "sieve_extension_settings",
    "sieve_programs",
    "stdout_writes",
    "tab_escape",
    "tab_unescape",
    "to_crlf",
    "to_lf",
    "welcome_call",
    "with_alarm",
]
