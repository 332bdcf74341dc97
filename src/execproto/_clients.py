"""What each Dovecot client sends, and how it judges the answer.

One place for the requests Dovecot's own clients make: the quota plugin's
warnings and quota_over_status script, the welcome plugin, and Pigeonhole's
``vnd.dovecot.pipe``, ``.filter`` and ``.execute``.  Each function takes the
settings the configuration gave (see :func:`pick_quota_warning`,
:func:`find_quota_over_status`, :func:`find_welcome`,
:func:`sieve_extension_settings`; :func:`execproto.sieve_programs` for the
Sieve target) and the values a real delivery would bring (the user, the
message, the envelope), and returns a :class:`ClientCall`: the target, the
arguments after variable expansion, the environment in Dovecot's order, the
reply mode, the payload as Dovecot transforms it, the timeouts, and
:meth:`ClientCall.judge`, which says what that client does with the result.
Without a configuration, an :class:`ExecuteSettings` made on the spot and
the ``args=`` list do (the pytest plugin builds its requests so);
:func:`with_alarm` adds the ``alarm=N`` line of the FTS decoder's client.

Nothing here does I/O: a caller runs the call (``execproto trigger`` does so
with the blocking adapter) and hands the outcome back to ``judge``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._config import (
    ConfigSection,
    convert_legacy_args,
    describe_section,
    filter_kind,
    find_execute,
    legacy_target,
)
from ._config import _top_setting as top_setting
from ._errors import ConfigError, LocalProtocolError
from ._escape import tab_escape
from ._events import ErrorKind, Status
from ._header import _UINT32_MAX, _VERSION_LINE, SCRIPT_MAJOR_VERSION
from ._settings import DEFAULT_BASE_DIR, ExecuteSettings, Target, TcpTarget, UnixTarget

__all__ = [
    "CLIENT_KINDS",
    "QUOTA_CONNECT_TIMEOUT",
    "SIEVE_CONNECT_TIMEOUT",
    "SIEVE_DEFAULT_EXEC_TIMEOUT",
    "SIEVE_ENV",
    "WELCOME_23_TIMEOUT",
    "ClientCall",
    "QuotaOverStatus",
    "QuotaWarning",
    "SieveSettings",
    "Verdict",
    "Welcome",
    "find_quota_over_status",
    "find_welcome",
    "pick_quota_warning",
    "quota_over_status_call",
    "quota_warning_call",
    "quota_warnings",
    "sieve_call",
    "sieve_extension_settings",
    "to_crlf",
    "to_lf",
    "welcome_call",
    "with_alarm",
]

#: The clients, as ``execproto trigger`` names them.
CLIENT_KINDS = ("quota-warning", "quota-over-status", "welcome", "sieve-pipe", "sieve-filter",
                "sieve-execute")

#: quota.c, quota_warning_execute(): ``.client_connect_timeout_msecs = 1000``
#: (2.3 and 2.4); 2.4's welcome-plugin.c uses the same value.
QUOTA_CONNECT_TIMEOUT = 1.0
#: sieve-extprograms-common.c: ``#define SIEVE_EXTPROGRAMS_CONNECT_TIMEOUT_MSECS 5``.
SIEVE_CONNECT_TIMEOUT = 0.005
#: The environment Pigeonhole's extprograms send, in their order (USER always;
#: the rest when known).
SIEVE_ENV = ("USER", "HOME", "HOST", "SENDER", "RECIPIENT", "ORIG_RECIPIENT")
#: sieve-extprograms: ``sieve_<ext>_exec_timeout`` defaults to 10 seconds.
SIEVE_DEFAULT_EXEC_TIMEOUT = 10.0
#: 2.3's welcome-plugin.c: ``alarm(WELCOME_SOCKET_TIMEOUT_SECS)``, 30 s for the exchange.
WELCOME_23_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a Dovecot client makes of a run.

    Fields:
        ok: the client carries on as after a success (it may still not have
            learnt the script's exit status: quota warnings never do).
        status: the status the client acts on (``FAILURE`` where it reports
            the script's failure, ``INTERNAL_FAILURE`` where it logs an error).
        message: one line, in the client's terms (its log message where it
            writes one).
    """

    ok: bool
    status: Status
    message: str


@dataclass(frozen=True, slots=True)
class ClientCall:
    """One request exactly as a Dovecot client makes it.

    Fields:
        kind: one of :data:`CLIENT_KINDS`.
        target: where it goes (unix, tcp or fork).
        args: the arguments after expansion and splitting, appended ones
            included (an empty one stays: see :meth:`header`).
        env: ``(NAME, VALUE)`` in the order Dovecot sets them.
        noreply: ``noreply`` instead of ``-`` in the header.
        read_output: whether the client reads anything back.  ``False``:
            it closes the connection right after sending (quota warnings).
        input: the payload, already transformed as the client transforms it
            (CRLF line ends for Sieve), or ``None`` for none.
        connect_timeout: seconds, ``None`` for none.
        timeout: the run timeout in seconds (Dovecot's ``input_idle_timeout``,
            a total limit), ``None`` for none.
        half_close: whether the client shuts down its sending side after the
            payload (every program client; not 2.3's welcome plugin).
        dovecot: ``"2.3"`` or ``"2.4"``: the form the settings came in;
            ``""`` where both versions' clients send the same.
        source: where in Dovecot's or Pigeonhole's source this is done.
        program: the Sieve program's name (``""`` for the other kinds).
    """

    kind: str
    target: Target
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    noreply: bool = False
    read_output: bool = True
    input: bytes | None = None
    connect_timeout: float | None = None
    timeout: float | None = None
    half_close: bool = True
    dovecot: str = ""
    source: str = ""
    program: str = field(default="")

    def header(self) -> bytes:
        r"""The request header as Dovecot writes it (program-client-remote.c).

        ``VERSION\tscript\t4\t0\n``, one ``env_NAME=VALUE`` line per entry
        (tab-escaped), ``noreply`` or ``-``, one tab-escaped line per argument
        and an empty line.  An empty argument is an empty line, as in
        Dovecot (quirk Q5): the header ends there for the service.
        """
        lines = [f"VERSION\tscript\t{SCRIPT_MAJOR_VERSION}\t0".encode()]
        lines += [b"env_" + tab_escape(f"{name}={value}".encode("utf-8", "surrogateescape"))
                  for name, value in self.env]
        lines.append(b"noreply" if self.noreply else b"-")
        lines += [tab_escape(arg.encode("utf-8", "surrogateescape")) for arg in self.args]
        return b"\n".join(lines) + b"\n\n"

    def for_client(self) -> tuple[tuple[str, ...], bytes | None]:
        r"""Arguments and payload that make execproto's client send :meth:`header`.

        execproto's client sends an empty argument as ``\x01`` (it unescapes
        to ""), Dovecot as an empty line.  Over unix the same bytes come out
        when the arguments from the first empty one on, and the line that
        ends the header, move into the payload.  The fork driver gets the
        arguments as they are.

        Raises:
            ConfigError: an empty argument over tcp, where the payload is
                dot-framed and the header is not (Dovecot itself crashes on
                a synchronous tcp run, quirk Q13).
        """
        if "" not in self.args or not isinstance(self.target, (UnixTarget, TcpTarget)):
            return self.args, self.input
        if isinstance(self.target, TcpTarget):
            raise ConfigError("an empty argument cannot be sent as Dovecot sends it over tcp")
        cut = self.args.index("")
        rest = b"".join(tab_escape(arg.encode("utf-8", "surrogateescape")) + b"\n"
                        for arg in self.args[cut + 1 :])
        return self.args[:cut], rest + b"\n" + (self.input or b"")

    def judge(self, status: Status, kind: ErrorKind = ErrorKind.NONE, detail: str = "",
              output: bytes | None = None) -> Verdict:
        """What this client makes of a run's outcome.

        Args:
            status: the run's status.
            kind: the error kind of an ``INTERNAL_FAILURE``.
            detail: the run's one-line detail.
            output: what the script printed (2.3's welcome judges it).
        """
        problem = f": {detail}" if detail else ""
        if self.kind in ("quota-warning", "quota-over-status"):
            return _judge_quota(self, status, kind, problem)
        if self.kind == "welcome":
            return _judge_welcome(self, status, problem, output)
        return _judge_sieve(self, status, problem)


def with_alarm(header: bytes, seconds: int) -> bytes:
    r"""*header* with the ``alarm=N`` line, as Dovecot's FTS decoder client sends it.

    None of the clients above sends one; fts-parser-script.c does, right
    after the VERSION line::

        #define SCRIPT_HANDSHAKE "VERSION\tscript\t4\t0\nalarm=10\nnoreply\n"

    The service then ends the script after *seconds* (0: no limit).

    Args:
        header: a request header (:meth:`ClientCall.header`, or execproto's
            client's), starting with the VERSION line.
        seconds: the ``alarm=`` value, 0 to 2**32 - 1 as the service reads it.

    Raises:
        LocalProtocolError: *header* does not start with the VERSION line,
            or *seconds* is out of range.
    """
    if not header.startswith(_VERSION_LINE):
        raise LocalProtocolError("alarm=: not a request header (no VERSION line)")
    if not 0 <= seconds <= _UINT32_MAX:
        raise LocalProtocolError(f"alarm={seconds}: out of range (0 to {_UINT32_MAX})")
    return _VERSION_LINE + b"alarm=%d\n" % seconds + header[len(_VERSION_LINE):]


def _judge_quota(call: ClientCall, status: Status, kind: ErrorKind, problem: str) -> Verdict:
    # quota.c: (void)program_client_run(pc); the status is not looked at.
    if status is Status.INTERNAL_FAILURE:
        return Verdict(False, status, f"the quota plugin logs an error ({kind.value}{problem}) "
                                      "and goes on without the script")
    if isinstance(call.target, (UnixTarget, TcpTarget)):
        return Verdict(True, Status.SUCCESS, "sent; the quota plugin closes the connection "
                                             "without waiting (noreply): the script's exit "
                                             "status is never known")
    exit_status = "exit 0" if status is Status.SUCCESS else f"a failure{problem}"
    return Verdict(True, Status.SUCCESS, f"the program ran ({exit_status}); the quota plugin "
                                         "ignores its exit status")


def _judge_welcome(call: ClientCall, status: Status, problem: str,
                   output: bytes | None) -> Verdict:
    if call.dovecot == "2.3" and not call.noreply:
        # welcome-plugin.c (2.3): one read() of up to 1024 bytes.
        if status is Status.INTERNAL_FAILURE:
            return Verdict(False, status, f"the welcome plugin logs an error{problem}")
        data = ((output or b"") + (b"+\n" if status is Status.SUCCESS else b"-\n"))[:1024]
        if data[:1] != b"+":
            return Verdict(False, Status.FAILURE,
                           "the welcome plugin logs \"Script returned error\" (it reads "
                           "the first byte of the reply, so any output counts as failure)")
        return Verdict(True, Status.SUCCESS, "the welcome plugin reads '+': success")
    if call.noreply and status is not Status.INTERNAL_FAILURE:
        return Verdict(True, Status.SUCCESS, "sent; welcome (wait = no) does not learn the "
                                             "script's exit status")
    if status is Status.SUCCESS:
        return Verdict(True, status, "the welcome plugin reports success")
    # welcome-plugin.c (2.4), script_finish(): e_error(..., "Execution failed: %d", ret);
    return Verdict(False, status, f"the welcome plugin logs \"Execution failed: "
                                  f"{int(status)}\"{problem}; the INBOX is created anyway")


_SIEVE_SUCCESS = {
    "sieve-pipe": "piped message to program '{p}'",
    "sieve-filter": "executed program successfully: its output replaces the message",
    "sieve-execute": "executed program successfully (with :output, the output is assigned)",
}
_SIEVE_FALSE = {
    "sieve-pipe": "failed to execute to program '{p}': the pipe action fails "
                  "(with :try the script goes on)",
    "sieve-filter": "filter action: program indicated false result: the message stays as "
                    "it was (as a test: false)",
    "sieve-execute": "execute action: program indicated false result (as a test: false)",
}
_SIEVE_ERROR = {
    "sieve-pipe": "failed to pipe message to program '{p}': the pipe action fails "
                  "(with :try the script goes on)",
    "sieve-filter": "filter action: failed to execute to program '{p}': the script fails "
                    "(as a test: false)",
    "sieve-execute": "execute action: failed to execute to program '{p}': the script fails "
                     "(as a test: false)",
}


def _judge_sieve(call: ClientCall, status: Status, problem: str) -> Verdict:
    # sieve_extprogram_run(): INTERNAL_FAILURE -1, FAILURE 0, SUCCESS 1;
    # cmd-pipe.c, cmd-filter.c, cmd-execute.c act on that.
    if status is Status.SUCCESS:
        return Verdict(True, status, _SIEVE_SUCCESS[call.kind].format(p=call.program))
    if status is Status.FAILURE:
        return Verdict(False, status, _SIEVE_FALSE[call.kind].format(p=call.program) + problem)
    return Verdict(False, status, _SIEVE_ERROR[call.kind].format(p=call.program) + problem)


# --- the configuration: which warning, which welcome, which Sieve settings ---------------

_LEGACY_WARNING = re.compile(r"(quota[0-9]*)_warning([0-9]*)")
_RULE_NUMBER = re.compile(r"(storage|bytes|messages)=([0-9]+)")


@dataclass(frozen=True, slots=True)
class QuotaWarning:
    """One quota warning of a configuration.

    Fields:
        name: 2.4: the warning's name (``warn-95``); 2.3: the setting
            (``quota_warning2``).
        where: its filters (2.3: its setting), file and line.
        under: it runs when usage goes back below the limit (2.4
            ``threshold = under``, 2.3 a rule starting with ``-``).
        limits: the percentages it names: ``("storage 95%",)``.
        settings: its ``execute`` block, or the error reading it.
        dovecot: ``"2.3"`` or ``"2.4"``.
    """

    name: str
    where: str
    under: bool
    limits: tuple[str, ...]
    settings: ExecuteSettings | ConfigError
    dovecot: str

    def describe(self) -> str:
        """One line: name, threshold and limits, place."""
        what = ", ".join(self.limits) or "no limit"
        return f"{self.name} ({'under' if self.under else 'over'} {what}) at {self.where}"


def _only_filter(root: ConfigSection, kind: str) -> ConfigSection | None:
    """The one ``KIND { }`` filter of a configuration, or None; several are an error."""
    sections = [s for s in root.walk() if s.parent is not None and filter_kind(s) == kind]
    if len(sections) > 1:
        raise ConfigError(f"several {kind} {{ }} filters: "
                          + "; ".join(describe_section(s) for s in sections))
    return sections[0] if sections else None


def _section_value(section: ConfigSection, *keys: str) -> str | None:
    """The last of *keys* set in *section* or, failing that, an enclosing one."""
    current: ConfigSection | None = section
    while current is not None:
        found: tuple[int, str] | None = None
        for key in keys:
            where = current.where(key)
            if where is not None and (found is None or where[1] >= found[0]):
                found = (where[1], key)
        if found is not None:
            return current.get(found[1])
        current = current.parent
    return None


def _execute_in(section: ConfigSection) -> ExecuteSettings | ConfigError:
    try:
        return find_execute(section)
    except ConfigError as exc:
        return exc


def _plugin_values(root: ConfigSection) -> dict[str, tuple[str, int, str | None]]:
    """2.3's ``plugin { }`` settings at top level: the last value of each key wins."""
    values: dict[str, tuple[str, int, str | None]] = {}
    for plugin in (s for s in root.sections if s.kind == "plugin"):
        for key, _, _ in plugin.settings:
            where = plugin.where(key)
            assert where is not None
            values[key] = (plugin.get(key) or "", where[1], where[0] or None)
    return values


def _legacy_program(key: str, value: str, line: int, file: str | None,
                    ) -> ExecuteSettings | ConfigError:
    words = [w for w in value.split(" ") if w]
    if not words:
        return ConfigError(f"{key}: no command", line, file)
    try:
        return legacy_target(words[0], words[0], line, file, " ".join(words[1:]))
    except ConfigError as exc:
        return exc


def quota_warnings(root: ConfigSection) -> list[QuotaWarning]:
    """Every quota warning of a parsed dovecot.conf, 2.4 and 2.3 forms.

    2.4: ``quota_warning NAME { }`` filters (``warning NAME`` inside a
    ``quota`` filter), each with its ``execute`` block; ``threshold =
    under`` (``quota_warning_threshold``) marks the one for going back
    below.  2.3: ``plugin { quota_warning = RULE TARGET ARGS }``, then
    ``quota_warning2``, ``quota_warning3``... as long as they follow each
    other (quota.c, quota_root_add_warning_rules()); a rule starting with
    ``-`` is for going back below.
    """
    found: list[QuotaWarning] = []
    for section in root.walk():
        if section.parent is None or filter_kind(section) != "quota_warning":
            continue
        threshold = _section_value(section, "threshold", "quota_warning_threshold",
                                   "warning_threshold") or "over"
        limits = []
        for resource in ("storage", "message"):
            value = section.get(f"quota_{resource}_percentage")
            if value:
                limits.append(f"{resource} {value.strip()}%")
        found.append(QuotaWarning(section.name, describe_section(section),
                                  threshold.strip().lower() == "under", tuple(limits),
                                  _execute_in(section), "2.4"))
    values = _plugin_values(root)
    roots = sorted({m.group(1) for key in values if (m := _LEGACY_WARNING.fullmatch(key))})
    for quota_root in roots:
        key, number = f"{quota_root}_warning", 2
        while key in values:
            value, line, file = values[key]
            rule, _, command = value.strip(" ").partition(" ")
            named = tuple(f"{kind} {pct}%" for kind, pct in _RULE_NUMBER.findall(rule))
            where = f"plugin {{ {key} }} ({file + ' ' if file else ''}line {line})"
            found.append(QuotaWarning(key, where, rule.startswith("-"), named,
                                      _legacy_program(key, command, line, file), "2.3"))
            key, number = f"{quota_root}_warning{number}", number + 1
    return found


def _level_matches(warning: QuotaWarning, level: str) -> bool:
    if level in ("below", "under"):
        return warning.under
    if level == warning.name:
        return True
    number = level.rstrip("%")
    return number.isdigit() and any(limit.split(" ")[1] == f"{number}%"
                                    for limit in warning.limits)


def pick_quota_warning(root: ConfigSection, level: str | None = None) -> QuotaWarning:
    """The quota warning *level* names, or the configuration's only one.

    *level* is a warning's name (2.4 ``warn-95``, 2.3 ``quota_warning2``),
    a percentage (``95``: the warning whose rule names 95 %), or ``below``
    (``under``) for the one that runs when usage goes back below the limit.

    Raises:
        ConfigError: no warning, none matching, or several (the message
            lists them), or the chosen one's execute settings are invalid.
    """
    everything = quota_warnings(root)
    if not everything:
        raise ConfigError("no quota warning found (2.4: quota_warning NAME { execute ... }; "
                          "2.3: plugin { quota_warning = RULE TARGET ARGS })")
    chosen = everything if level is None else [w for w in everything
                                               if _level_matches(w, level)]
    if len(chosen) != 1:
        listed = "; ".join(w.describe() for w in everything)
        if not chosen:
            raise ConfigError(f"no quota warning matches --level {level}: {listed}")
        head = "several quota warnings" if level is None else (
            f"{len(chosen)} quota warnings match --level {level}")
        listed = "; ".join(w.describe() for w in chosen)
        raise ConfigError(f"{head}, choose one with --level NAME (a name, a percentage "
                          f"or 'below'): {listed}")
    warning = chosen[0]
    if isinstance(warning.settings, ConfigError):
        raise warning.settings
    return warning


@dataclass(frozen=True, slots=True)
class QuotaOverStatus:
    """The quota_over_status script of a configuration.

    Fields:
        settings: its execute settings.
        mask: ``quota_over_status_mask`` (2.3: ``quota_over_flag_value``).
        current: ``quota_over_status_current`` (2.3: ``quota_over_flag``)
            when the configuration sets it (usually the userdb does), or
            ``None``.
        dovecot: ``"2.3"`` or ``"2.4"``.
    """

    settings: ExecuteSettings
    mask: str | None
    current: str | None
    dovecot: str


def find_quota_over_status(root: ConfigSection) -> QuotaOverStatus:
    """The quota_over_status script: 2.4's filter, or 2.3's ``quota_over_script``.

    2.4: ``quota_over_status { execute NAME { } }`` (at top level or in a
    ``quota`` filter) with ``quota_over_status_mask`` and
    ``quota_over_status_current`` in it or around it.  2.3: ``plugin {
    quota_over_script = TARGET ARGS; quota_over_flag_value = MASK }``, the
    flag from ``quota_over_flag``.

    Raises:
        ConfigError: none, several, or an invalid execute block.
    """
    section = _only_filter(root, "quota_over_status")
    if section is not None:
        settings = _execute_in(section)
        if isinstance(settings, ConfigError):
            raise settings
        return QuotaOverStatus(
            settings, _section_value(section, "mask", "quota_over_status_mask"),
            _section_value(section, "current", "quota_over_status_current"), "2.4")
    values = _plugin_values(root)
    if "quota_over_script" in values:
        script, line, file = values["quota_over_script"]
        settings = _legacy_program("quota_over_script", script, line, file)
        if isinstance(settings, ConfigError):
            raise settings
        mask = values.get("quota_over_flag_value")
        flag = values.get("quota_over_flag")
        return QuotaOverStatus(settings, mask[0] if mask else None,
                               flag[0] if flag else None, "2.3")
    raise ConfigError("no quota_over_status script found (2.4: quota_over_status { execute "
                      "... }; 2.3: plugin { quota_over_script = TARGET ARGS })")


@dataclass(frozen=True, slots=True)
class Welcome:
    """The welcome script of a configuration.

    Fields:
        settings: its execute settings (2.3: the socket, base_dir-relative).
        wait: ``welcome_wait``.
        dovecot: ``"2.3"`` or ``"2.4"``.
    """

    settings: ExecuteSettings
    wait: bool
    dovecot: str


def _bool(value: str | None, *, legacy: bool) -> bool:
    if value is None:
        return False
    if legacy:  # mail_user_plugin_getenv_bool(): the first character
        return value[:1] in ("y", "Y", "1")
    return value.strip().lower() in ("yes", "y", "1", "true")


def find_welcome(root: ConfigSection) -> Welcome:
    """The welcome script: 2.4's ``welcome { execute NAME { } }``, or 2.3's ``welcome_script``.

    2.3's welcome plugin has its own client: the first word of
    ``welcome_script`` is a unix socket (relative to base_dir; no scheme),
    the rest are arguments.

    Raises:
        ConfigError: none, several, or an invalid execute block.
    """
    section = _only_filter(root, "welcome")
    if section is not None:
        settings = find_execute(section)
        wait = _section_value(section, "wait", "welcome_wait")
        return Welcome(settings, _bool(wait, legacy=False), "2.4")
    values = _plugin_values(root)
    if "welcome_script" in values:
        value, line, file = values["welcome_script"]
        words = [w for w in value.split(" ") if w]
        if not words:
            raise ConfigError("welcome_script: no socket", line, file)
        settings = ExecuteSettings(name=words[0], unix_socket_path=convert_legacy_args(words[0]),
                                   args=convert_legacy_args(" ".join(words[1:])), line=line,
                                   file=file)
        legacy_wait = values.get("welcome_wait")
        return Welcome(settings, _bool(legacy_wait[0] if legacy_wait else None, legacy=True),
                       "2.3")
    raise ConfigError("no welcome script found (2.4: welcome { execute NAME { ... } }; "
                      "2.3: plugin { welcome_script = SOCKET ARGS })")


@dataclass(frozen=True, slots=True)
class SieveSettings:
    """``sieve_<extension>_exec_timeout`` and ``_input_eol`` of a configuration.

    Fields:
        exec_timeout: seconds (default 10).
        input_eol: ``crlf`` (default) or ``lf``.
    """

    exec_timeout: float = SIEVE_DEFAULT_EXEC_TIMEOUT
    input_eol: str = "crlf"


_TIME_UNITS = {
    "ms": 0.001, "msec": 0.001, "msecs": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_TIME = re.compile(r"\s*([0-9]+)\s*([a-z]*)\s*")


def _seconds(text: str, key: str, line: int, file: str | None) -> float:
    match = _TIME.fullmatch(text.lower())
    if match is None or match.group(2) not in _TIME_UNITS:
        raise ConfigError(f"{key}: invalid time interval {text!r}", line, file)
    return int(match.group(1)) * _TIME_UNITS[match.group(2)]


def sieve_extension_settings(root: ConfigSection, extension: str) -> SieveSettings:
    """The run timeout and input line ends Pigeonhole uses for ``vnd.dovecot.EXTENSION``.

    Top-level settings (2.4) or ``plugin { }`` (2.3), as
    :func:`execproto.sieve_programs` reads the directories.

    Raises:
        ConfigError: a timeout that is not a time interval, an unknown
            ``input_eol``.
    """
    settings = SieveSettings()
    timeout = top_setting(root, f"sieve_{extension}_exec_timeout")
    if timeout is not None and timeout[0]:
        settings = SieveSettings(_seconds(timeout[0], f"sieve_{extension}_exec_timeout",
                                          timeout[1], timeout[2]))
    eol = top_setting(root, f"sieve_{extension}_input_eol")
    if eol is not None and eol[0]:
        value = eol[0].strip().lower()
        if value not in ("crlf", "lf"):
            raise ConfigError(f"sieve_{extension}_input_eol: expected crlf or lf, got "
                              f"{eol[0]!r}", eol[1], eol[2])
        settings = SieveSettings(settings.exec_timeout, value)
    return settings


# --- the clients --------------------------------------------------------------------------


def _expanded(settings: ExecuteSettings, variables: Mapping[str, str], base_dir: str,
              args: Sequence[str] | None) -> tuple[Target, tuple[str, ...]]:
    expanded = settings.expand(variables)
    if args is not None:
        return expanded.target(base_dir=base_dir), tuple(args)
    return expanded.target(base_dir=base_dir), expanded.expand_args(variables)



def quota_warning_call(warning: QuotaWarning | ExecuteSettings, variables: Mapping[str, str],
                       *, args: Sequence[str] | None = None,
                       base_dir: str = DEFAULT_BASE_DIR) -> ClientCall:
    """What the quota plugin sends for a warning (2.3 and 2.4 alike on the wire).

    2.4, quota.c, quota_warning_execute()::

        struct program_client_parameters params = {
                .client_connect_timeout_msecs = 1000,
                .no_reply = TRUE,
                .append_args = append_args,     /* { NULL } for warnings */
        };
        ...
        (void)program_client_run(pc);

    2.3 does the same with ``program_client_create(socket_path, args, &set,
    TRUE, ...)`` after ``t_strsplit_spaces(cmd, " ")``; a bare target word
    is a socket under ``base_dir``.  No env, no payload; noreply, and the
    client closes without reading: the exit status is never known.

    Args:
        warning: from :func:`pick_quota_warning`, or an execute block.
        variables: ``%{...}`` values (``user``...).
        args: the argument list itself, sent as it is instead of the
            settings' ``args`` expanded and split (a caller without a
            configuration, such as a test, may have the list already).
        base_dir: for a relative unix socket path.

    Raises:
        ConfigError: an unknown variable, a bad target.
    """
    settings = warning.settings if isinstance(warning, QuotaWarning) else warning
    assert isinstance(settings, ExecuteSettings)
    target, sent = _expanded(settings, variables, base_dir, args)
    return ClientCall("quota-warning", target, sent, noreply=True, read_output=False,
                      connect_timeout=QUOTA_CONNECT_TIMEOUT,
                      dovecot=warning.dovecot if isinstance(warning, QuotaWarning) else "",
                      source="dovecot src/plugins/quota/quota.c, quota_warning_execute()")


def quota_over_status_call(over: QuotaOverStatus, variables: Mapping[str, str],
                           current: str | None = None, *, args: Sequence[str] | None = None,
                           base_dir: str = DEFAULT_BASE_DIR) -> ClientCall:
    """What the quota plugin sends when the over-quota status and the flag disagree.

    A quota warning whose last argument is the user's current flag:
    2.4, quota.c, quota_over_status_check_root()::

        quota_warning_execute(event, root->set->quota_over_status_current,
                              "quota_over_status mismatch");

    appended even when empty (then an empty line ends the header early,
    quirk Q21).  2.3 appends ``quota_over_flag`` only when the user has
    one (``if (last_arg != NULL)``).

    Args:
        over: from :func:`find_quota_over_status`.
        variables: ``%{...}`` values (``user``...).
        current: the flag value (normally from the userdb); ``None``: the
            configuration's, if any.
        args: the argument list itself instead of the settings' ``args``
            (see :func:`quota_warning_call`); *current* still follows it.
        base_dir: for a relative unix socket path.

    Raises:
        ConfigError: an unknown variable, a bad target.
    """
    target, sent = _expanded(over.settings, variables, base_dir, args)
    value = current if current is not None else over.current
    if over.dovecot == "2.3":
        if value is not None:
            sent += (value,)
    else:
        sent += (value or "",)
    return ClientCall("quota-over-status", target, sent, noreply=True, read_output=False,
                      connect_timeout=QUOTA_CONNECT_TIMEOUT, dovecot=over.dovecot,
                      source="dovecot src/plugins/quota/quota.c, quota_over_status_check_root()"
                             if over.dovecot == "2.4" else
                             "dovecot src/plugins/quota/quota.c, quota_over_flag_check_root()")


def welcome_call(welcome: Welcome, variables: Mapping[str, str], *,
                 args: Sequence[str] | None = None,
                 base_dir: str = DEFAULT_BASE_DIR) -> ClientCall:
    """What the welcome plugin sends when a user's INBOX is created.

    2.4, welcome-plugin.c, script_execute()::

        struct program_client_parameters params = {
                .client_connect_timeout_msecs = 1000,
                .no_reply = !wait,
        };

    no env, no payload; with ``wait = no`` it runs asynchronously and does
    not read.  2.3's plugin writes the same header itself over a unix
    socket (connect retried for up to 1000 ms), never half-closes, limits
    the exchange to 30 s with ``alarm()`` and, with ``welcome_wait = yes``,
    judges one ``read()`` of the reply: anything but a leading ``+`` is an
    error.

    Args:
        welcome: from :func:`find_welcome`.
        variables: ``%{...}`` values (``user``...).
        args: the argument list itself instead of the settings' ``args``
            (see :func:`quota_warning_call`).
        base_dir: for a relative unix socket path.

    Raises:
        ConfigError: an unknown variable, a bad target.
    """
    target, sent = _expanded(welcome.settings, variables, base_dir, args)
    legacy = welcome.dovecot == "2.3"
    return ClientCall("welcome", target, sent, noreply=not welcome.wait,
                      read_output=welcome.wait, connect_timeout=QUOTA_CONNECT_TIMEOUT,
                      timeout=WELCOME_23_TIMEOUT if legacy else None, half_close=not legacy,
                      dovecot=welcome.dovecot,
                      source="dovecot src/plugins/welcome/welcome-plugin.c, script_execute()")


_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(message: bytes) -> bytes:
    r"""Pigeonhole's input with ``sieve_<ext>_input_eol = crlf`` (the default).

    ``i_stream_create_crlf()`` (src/lib/istream-crlf.c) puts a CR before
    every LF that has none; a lone CR stays.
    """
    return _BARE_LF.sub(b"\r\n", message)


def to_lf(message: bytes) -> bytes:
    r"""Pigeonhole's input with ``sieve_<ext>_input_eol = lf``: CRLF becomes LF.

    ``i_stream_create_lf()``; a lone CR stays.
    """
    return message.replace(b"\r\n", b"\n")


def sieve_call(kind: str, settings: ExecuteSettings, program_args: Sequence[str], *,
               user: str, message: bytes | None, home: str | None = None,
               host: str | None = None, sender: str | None = None,
               recipient: str | None = None, orig_recipient: str | None = None,
               extension: SieveSettings | None = None,
               base_dir: str = DEFAULT_BASE_DIR) -> ClientCall:
    """What Pigeonhole sends for ``pipe``, ``filter`` or ``execute "PROGRAM" [ARGS]``.

    sieve-extprograms-common.c, sieve_extprogram_create()::

        struct program_client_parameters pc_params = {
                .client_connect_timeout_msecs =
                        SIEVE_EXTPROGRAMS_CONNECT_TIMEOUT_MSECS,    /* 5 */
                .input_idle_timeout_msecs = extctx->set->exec_timeout * 1000,
        };
        ...
        program_client_set_env(sprog->program_client, "USER", svinst->username);
        if (svinst->home_dir != NULL) ... "HOME" ...
        if (svinst->hostname != NULL) ... "HOST" ...
        if (!smtp_address_isnull(sender)) ... "SENDER" ...
        if (!smtp_address_isnull(recipient)) ... "RECIPIENT" ...
        if (!smtp_address_isnull(orig_recipient)) ... "ORIG_RECIPIENT" ...

    Reply mode (unix or fork; never tcp), the message as input through
    sieve_extprogram_set_input() (:func:`to_crlf`, or :func:`to_lf` with
    ``input_eol = lf``).  ``execute`` sends the message only with ``:pipe``
    (or a string with ``:input``): *message* ``None`` sends none.  The
    Sieve arguments are literal strings: nothing is expanded.

    Args:
        kind: ``sieve-pipe``, ``sieve-filter`` or ``sieve-execute``.
        settings: the program's target (:func:`execproto.sieve_programs`).
        program_args: the Sieve command's argument list.
        user: Pigeonhole's user name (2.4's ``sieve-test``: its uid's name).
        message: the message (any line ends), or ``None``.
        home: ``HOME`` (Pigeonhole sends it when the user has a home).
        host: ``HOST`` (Dovecot's host name, ``my_hostdomain()``).
        sender: ``SENDER``, the envelope sender.
        recipient: ``RECIPIENT``, the envelope recipient.
        orig_recipient: ``ORIG_RECIPIENT``, the original recipient (ORCPT).
            ``None`` or ``""`` leaves any of these out; so does a null
            address ``<>`` (``smtp_address_isnull()``).
        extension: :func:`sieve_extension_settings`.
        base_dir: for a socket under ``sieve_<ext>_socket_dir``.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in ("sieve-pipe", "sieve-filter", "sieve-execute"):
        raise ConfigError(f"unknown Sieve client {kind!r}")
    extension = extension or SieveSettings()
    env = [("USER", user)]
    env += [(name, value) for name, value in zip(
        SIEVE_ENV[1:], (home, host, sender, recipient, orig_recipient), strict=True)
        if value and value != "<>"]
    payload = None
    if message is not None:
        payload = to_lf(message) if extension.input_eol == "lf" else to_crlf(message)
    return ClientCall(kind, settings.target(base_dir=base_dir), tuple(program_args),
                      env=tuple(env), input=payload, connect_timeout=SIEVE_CONNECT_TIMEOUT,
                      timeout=extension.exec_timeout or None, program=settings.name,
                      source="pigeonhole src/plugins/sieve-extprograms/"
                             "sieve-extprograms-common.c, sieve_extprogram_create()")
