"""What ``execproto doctor`` checks, worked out from a configuration alone.

:func:`plan_checks` reads a parsed dovecot.conf (2.3 or 2.4) and lists the
script services (their script, ``-e`` list, service user and unix listeners
with mode, user and group) and every client that reaches a script: quota
warnings, quota_over_status, welcome, other ``execute`` blocks, and the
Sieve extprograms socket and bin directories.  Each client carries its
target, the service serving that target (matched by listener path), whether
it asks for no reply, the environment names it sends and its connect
timeout, all with the file and line of the setting.  It also reports the
problems that need no look at the system (a target that names a script
instead of a socket, a client whose environment the service drops, an
extension that is enabled but unconfigured) as :class:`Finding` values.

The rest is arithmetic the prober uses: :func:`script_environment`,
:func:`may_access` (UNIX permission bits for a uid and its groups),
:func:`parse_shebang` and :func:`stdout_writes` (a static reading of a shell
script).  Nothing here touches the file system.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._clients import QUOTA_CONNECT_TIMEOUT, SIEVE_CONNECT_TIMEOUT, SIEVE_ENV
from ._config import (
    SIEVE_EXTENSIONS,
    ConfigSection,
    _grouped,
    _legacy,
    _listener_get,
    _merged,
    _runs_script,
    _top_setting,
    describe_section,
    execute_settings,
    filter_kind,
    legacy_target,
    parse_script_command,
)
from ._errors import ConfigError
from ._settings import (
    DEFAULT_BASE_DIR,
    ExecuteSettings,
    ForkTarget,
    Target,
    TcpTarget,
    UnixTarget,
)

__all__ = [
    "PLUGIN_CONNECT_TIMEOUT_MS",
    "SIEVE_CONNECT_TIMEOUT_MS",
    "ClientPlan",
    "DoctorPlan",
    "Finding",
    "ListenerPlan",
    "ServicePlan",
    "may_access",
    "parse_shebang",
    "plan_checks",
    "script_environment",
    "stdout_writes",
]

#: Pigeonhole's connect timeout for extprograms (SIEVE_EXTPROGRAMS_CONNECT_TIMEOUT_MSECS).
SIEVE_CONNECT_TIMEOUT_MS = round(SIEVE_CONNECT_TIMEOUT * 1000)
#: The quota and welcome clients' connect timeout.
PLUGIN_CONNECT_TIMEOUT_MS = round(QUOTA_CONNECT_TIMEOUT * 1000)

Where = tuple[str | None, int | None]


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report.

    Fields:
        level: ``error`` (it cannot work), ``warning`` (it works wrongly or
            may fail) or ``note`` (worth knowing; not a finding for the exit
            status).
        code: a stable name for the kind of finding (``target-is-script``).
        file, line: the setting the finding is about (``None`` if unknown).
        message: what is wrong.
        fix: what to change.
    """

    level: str
    code: str
    file: str | None
    line: int | None
    message: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """A script service's ``unix_listener`` as Dovecot creates it.

    Fields:
        path: the socket path (relative ones joined to base_dir).
        mode: the file mode (default 0600).
        user, group: the owner settings; ``""`` is the master's own (root).
        file, line: the ``unix_listener`` block.
        mode_at, user_at, group_at: where each setting is (``(None, None)``
            when it is not set).
    """

    path: str
    mode: int
    user: str
    group: str
    file: str | None
    line: int
    mode_at: Where = (None, None)
    user_at: Where = (None, None)
    group_at: Where = (None, None)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """A ``service`` block that runs Dovecot's ``script`` binary.

    Fields:
        name: the service name.
        script: the script path as written (relative: under libexec_dir).
        env_allowlist: the ``-e`` names.
        passthrough: ``-p`` was given.
        user: the service's ``user`` (``""``: root), variables resolved.
        file, line: the ``executable`` setting.
        user_at: where ``user`` is set.
        listeners: the unix listeners.
        process_limit, client_limit: as set in the block (``None``: default).
    """

    name: str
    script: str
    env_allowlist: tuple[str, ...]
    passthrough: bool
    user: str
    file: str | None
    line: int
    user_at: Where
    listeners: tuple[ListenerPlan, ...]
    process_limit: int | None = None
    client_limit: int | None = None


@dataclass(frozen=True, slots=True)
class ClientPlan:
    """A Dovecot client that runs a script.

    Fields:
        kind: ``quota warning``, ``quota_over_status``, ``welcome``,
            ``execute`` (another consumer), ``sieve pipe`` (``filter``,
            ``execute``) socket or bin directory.
        label: where it is, for messages (``plugin / quota_warning2``).
        target: where it goes; for a Sieve directory, a ``UnixTarget`` of
            the socket directory or a ``ForkTarget`` of the bin directory.
        file, line: the setting that names the target.
        noreply: the client asks for no result and reads no output.
        env: the environment names it sends.
        connect_timeout_ms: how long it waits to connect.
        services: the script services serving the target (for a Sieve socket
            directory: every service listening inside it).
        directory: the target is a Sieve directory of sockets or programs.
    """

    kind: str
    label: str
    target: Target
    file: str | None
    line: int | None
    noreply: bool
    env: tuple[str, ...]
    connect_timeout_ms: int
    services: tuple[ServicePlan, ...] = ()
    directory: bool = False


@dataclass
class DoctorPlan:
    """Everything :func:`plan_checks` found.

    Fields:
        base_dir: the base directory used for relative socket paths.
        mail_user: ``mail_uid``'s value (``""`` when not set) and where.
        mail_group: ``mail_gid``'s value (``""`` when not set).
        version24: the file is a 2.4 configuration (``dovecot_config_version``).
        services: the script services.
        clients: the clients, in text order.
        findings: problems visible in the configuration alone.
        lmtp_process_limit: how many deliveries (and so Sieve runs) the
            ``lmtp`` service allows at once, and where that comes from.
    """

    base_dir: str
    mail_user: tuple[str, Where]
    mail_group: str = ""
    version24: bool = False
    services: list[ServicePlan] = field(default_factory=list)
    clients: list[ClientPlan] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    lmtp_process_limit: tuple[int, Where] = (100, (None, None))


def _where(section: ConfigSection, key: str) -> Where:
    found = section.where(key)
    return (found[0] or None, found[1]) if found else (None, None)


def _resolve_var(value: str, root: ConfigSection) -> str:
    """``$default_internal_user`` and friends (2.3), ``%{...}``-free names."""
    if value.startswith("$"):
        name = value[1:].strip("{}")
        defaults = {"default_internal_user": "dovecot", "default_login_user": "dovenull",
                    "default_internal_group": "dovecot"}
        return root.get(name) or defaults.get(name, value)
    return value


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _services(root: ConfigSection, base: str, findings: list[Finding]) -> list[ServicePlan]:
    found: list[ServicePlan] = []
    groups: dict[str, list[ConfigSection]] = {}
    for section in root.sections:
        if section.kind == "service":
            groups.setdefault(section.name, []).append(section)
    for name, blocks in groups.items():
        section = _merged(blocks)
        if not _runs_script(section):
            continue
        key = "executable" if section.where("executable") else "execute"
        file, line = _where(section, key)
        words = (section.get(key) or "").split()
        try:
            command = parse_script_command(words[1:])
        except ConfigError as exc:
            findings.append(Finding("error", "service-command", file, line,
                                    f"service {name}: {exc.reason}",
                                    "write it as executable = script [-e NAMES] [-p] "
                                    "/path/to/script [ARGS]"))
            continue
        listeners = []
        for sub in _grouped(section.sections, ("unix_listener",)):
            path = _listener_get(sub, "path") or sub.name
            mode_text = _listener_get(sub, "mode") or "0600"
            try:
                mode = int(mode_text, 8)
            except ValueError:
                mode = 0o600
            listeners.append(ListenerPlan(
                path=path if path.startswith("/") else f"{base}/{path}", mode=mode,
                user=_resolve_var(_listener_get(sub, "user") or "", root),
                group=_resolve_var(_listener_get(sub, "group") or "", root),
                file=sub.file or None, line=sub.line,
                mode_at=_listener_where(sub, "mode"), user_at=_listener_where(sub, "user"),
                group_at=_listener_where(sub, "group")))
        found.append(ServicePlan(
            name=name, script=command.script, env_allowlist=command.env_allowlist,
            passthrough=command.passthrough,
            user=_resolve_var(section.get("user") or "", root), file=file, line=line or 0,
            user_at=_where(section, "user"), listeners=tuple(listeners),
            process_limit=_int(section.get("process_limit")),
            client_limit=_int(section.get("client_limit"))))
    return found


def _listener_where(listener: ConfigSection, key: str) -> Where:
    for k in (key, f"{listener.kind}_{key}"):
        if listener.where(k):
            return _where(listener, k)
    return (None, None)


def _serving(services: Iterable[ServicePlan], path: str) -> tuple[ServicePlan, ...]:
    return tuple(s for s in services if any(lst.path == path for lst in s.listeners))


def _kind_of(section: ConfigSection) -> str:
    kinds = [filter_kind(s) for s in section.path()[:-1]]
    for kind, name in (("quota_warning", "quota warning"),
                       ("quota_over_status", "quota_over_status"), ("welcome", "welcome")):
        if kind in kinds:
            return name
    return "execute"


def _wait(root: ConfigSection, section: ConfigSection | None) -> bool:
    """``welcome_wait`` (2.3 plugin, 2.4 top level or ``welcome { wait }``)."""
    scopes = [s for s in (section.path() if section else []) if s.kind == "welcome"]
    for scope in reversed(scopes):
        value = scope.get("wait") or scope.get("welcome_wait")
        if value is not None:
            return value.strip().lower() == "yes"
    found = _top_setting(root, "welcome_wait")
    return found is not None and found[0].strip().lower() == "yes"


_QUOTA_OVER = re.compile(r"quota[0-9]*_over_script")


def _legacy_over(root: ConfigSection) -> list[tuple[str, ExecuteSettings]]:
    """2.3's ``quota_over_script = TARGET ARGS`` settings (last value of each wins)."""
    last: dict[tuple[int, str], tuple[ConfigSection, int]] = {}
    for plugin in root.walk():
        if plugin.kind == "plugin":
            for index, (key, _, _) in enumerate(plugin.settings):
                if _QUOTA_OVER.fullmatch(key):
                    last[(id(plugin.parent), key)] = (plugin, index)
    found = []
    for (_, key), (plugin, index) in last.items():
        _, value, line = plugin.settings[index]
        words = value.split()
        if not words:
            continue
        file = plugin._origin(index)[0] or None
        try:
            settings = legacy_target(words[0], words[0], line, file, " ".join(words[1:]))
        except ConfigError:
            continue
        found.append((f"plugin / {key}", settings))
    return found


def _execute_clients(root: ConfigSection, plan: DoctorPlan) -> None:
    for section in root.walk():
        if section.kind != "execute":
            continue
        label = describe_section(section).rsplit(" (", 1)[0]
        try:
            settings = execute_settings(section)
            target = settings.target(base_dir=plan.base_dir)
        except ConfigError as exc:
            plan.findings.append(Finding("error", "execute-invalid", exc.file, exc.line,
                                         f"{label}: {exc.reason}",
                                         "see the execute settings: driver, unix_socket_path, "
                                         "fork_path, tcp_host, tcp_port, args"))
            continue
        kind = _kind_of(section)
        key = {"unix": "unix_socket_path", "fork": "fork_path"}.get(settings.driver, "tcp_host")
        file: str | None = section.file or None
        line: int | None = section.line
        for k in (key, f"execute_{key}"):
            if section.where(k):
                file, line = _where(section, k)
        noreply = kind in ("quota warning", "quota_over_status") or (
            kind == "welcome" and not _wait(root, section))
        plan.clients.append(ClientPlan(kind, label, target, file, line, noreply, (),
                                       PLUGIN_CONNECT_TIMEOUT_MS))


def _legacy_clients(root: ConfigSection, plan: DoctorPlan) -> None:
    entries: list[tuple[str, str, ExecuteSettings]] = []
    for labels, _, settings in _legacy(root):
        kind = "welcome" if labels[-1] == "welcome_script" else "quota warning"
        entries.append((kind, " / ".join(labels), settings))
    entries += [("quota_over_status", label, s) for label, s in _legacy_over(root)]
    for kind, label, settings in entries:
        try:
            target = settings.target(base_dir=plan.base_dir)
        except ConfigError as exc:
            plan.findings.append(Finding("error", "execute-invalid", exc.file, exc.line,
                                         f"{label}: {exc.reason}", "use unix:PATH, "
                                         "tcp:HOST:PORT or exec:PATH as the target"))
            continue
        noreply = kind != "welcome" or not _wait(root, None)
        plan.clients.append(ClientPlan(kind, label, target, settings.file, settings.line,
                                       noreply, (), PLUGIN_CONNECT_TIMEOUT_MS))


def _enabled_extensions(root: ConfigSection) -> dict[str, Where]:
    """The vnd.dovecot.* extensions switched on (2.3 strings, 2.4 boolean lists)."""
    enabled: dict[str, Where] = {}
    for section in root.walk():
        if section.kind in ("sieve_extensions", "sieve_global_extensions"):  # 2.4
            for key, _, _ in section.settings:
                ext = key.removeprefix("vnd.dovecot.")
                if ext in SIEVE_EXTENSIONS and key != ext:
                    if (section.get(key) or "").strip().lower() == "yes":
                        enabled[ext] = _where(section, key)
                    else:
                        enabled.pop(ext, None)
        for key in ("sieve_extensions", "sieve_global_extensions"):  # 2.3
            value = section.get(key) if section.where(key) else None
            if value is None:
                continue
            for word in value.split():
                ext = word.lstrip("+-").removeprefix("vnd.dovecot.")
                if ext in SIEVE_EXTENSIONS and word.lstrip("+-") != ext:
                    if word.startswith("-"):
                        enabled.pop(ext, None)
                    else:
                        enabled[ext] = _where(section, key)
    return enabled


def _sieve_clients(root: ConfigSection, plan: DoctorPlan) -> None:
    enabled = _enabled_extensions(root)
    for ext in SIEVE_EXTENSIONS:
        socket_dir = _top_setting(root, f"sieve_{ext}_socket_dir")
        bin_dir = _top_setting(root, f"sieve_{ext}_bin_dir")
        if socket_dir and socket_dir[0]:
            value, line, file = socket_dir
            directory = f"{plan.base_dir}/{value.lstrip('/')}".rstrip("/")
            inside = tuple(s for s in plan.services if any(
                lst.path.rsplit("/", 1)[0] == directory for lst in s.listeners))
            plan.clients.append(ClientPlan(
                f"sieve {ext} socket", f"sieve_{ext}_socket_dir", UnixTarget(directory), file,
                line, False, SIEVE_ENV, SIEVE_CONNECT_TIMEOUT_MS, inside, directory=True))
        if bin_dir and bin_dir[0]:
            value, line, file = bin_dir
            plan.clients.append(ClientPlan(
                f"sieve {ext} bin", f"sieve_{ext}_bin_dir", ForkTarget(value.rstrip("/")), file,
                line, False, SIEVE_ENV, SIEVE_CONNECT_TIMEOUT_MS, directory=True))
        configured = bool(socket_dir and socket_dir[0]) or bool(bin_dir and bin_dir[0])
        if ext in enabled and not configured:
            plan.findings.append(Finding(
                "error", "sieve-unconfigured", enabled[ext][0], enabled[ext][1],
                f"vnd.dovecot.{ext} is enabled but unconfigured: neither sieve_{ext}_socket_dir "
                f"nor sieve_{ext}_bin_dir is set, so every {ext} command fails (\"program "
                "not found\")",
                f"set sieve_{ext}_socket_dir (sockets under base_dir) or sieve_{ext}_bin_dir"))


def script_environment(sent: Sequence[str], service: ServicePlan | None
                       ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a script gets of the names a client sends: ``(kept, dropped)``.

    Behind a ``script`` service only the ``-e`` names survive (nothing of
    the service's own environment, no PATH); a fork target (*service*
    ``None``) gets exactly what the client sends.  A ``-p`` service parses
    nothing: the script gets no environment and reads the raw request.
    """
    if service is None:
        return tuple(sent), ()
    if service.passthrough:
        return (), tuple(sent)
    allow = set(service.env_allowlist)
    return tuple(n for n in sent if n in allow), tuple(n for n in sent if n not in allow)


def may_access(mode: int, owner: int, group: int, uid: int, gids: Iterable[int],
               want: int) -> bool:
    """Whether *uid* (with groups *gids*) has the permission bits *want* (4 r, 2 w, 1 x).

    The classic UNIX rule (no ACLs): root may read and write anything and
    execute what has an execute bit; otherwise the owner's, the group's or
    the others' bits decide, the first class that applies, even if it grants
    less than a later one would.
    """
    if uid == 0:
        return not (want & 1) or bool(mode & 0o111)
    if uid == owner:
        bits = (mode >> 6) & 7
    elif group in set(gids):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def parse_shebang(head: bytes) -> tuple[str, str] | None:
    """The interpreter and its optional argument from a script's first line.

    ``None`` when *head* does not start with ``#!`` (a binary, or a text that
    the kernel will not run).
    """
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip().decode("utf-8", "surrogateescape")
    interpreter, _, arg = line.partition(" ")
    return interpreter, arg.strip()


_SHELLS = ("sh", "bash", "dash", "ksh", "zsh", "ash", "busybox")
_WRITERS = re.compile(r"(?:^|[;&]\s*|\b(?:then|do|else)\s+)(echo|printf|cat)\b")
_HEREDOC = re.compile(r"<<-?\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?")


def stdout_writes(text: str) -> list[int] | None:
    """Lines of a shell script that write to standard output, read without running it.

    ``None`` when the text is not a shell script (its shebang names no
    shell): nothing can be said without running it.  Otherwise the numbers
    of the lines where ``echo``, ``printf`` or ``cat`` run without a
    redirection or pipe on that line; empty when none does, or when an
    ``exec >FILE`` sends everything elsewhere first.  A static reading: a
    command run from a variable or a function's caller is not seen.
    """
    shebang = parse_shebang(text.encode("utf-8", "surrogateescape")[:256])
    if shebang is None:
        return None
    program = shebang[0].rsplit("/", 1)[-1]
    if program == "env":
        program = shebang[1].split(" ")[0]
    if program not in _SHELLS:
        return None
    lines: list[int] = []
    heredoc: str | None = None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if heredoc is not None:
            if line == heredoc:
                heredoc = None
            continue
        if not line or line.startswith("#"):
            continue
        code = line.split(" #", 1)[0]
        match = _HEREDOC.search(code)
        if match:
            heredoc = match.group(1)
        if re.match(r"exec\s+(1?>|&>)", code):
            return [n for n in lines if n < number] if lines else []
        # Redirections of stderr alone (2>&1, 2>/dev/null) leave stdout where it was.
        rest = re.sub(r"(?<![0-9&>])2>>?\s*(?:&1|\S+)", "", code)
        if ">" in rest or "|" in rest:
            continue
        if _WRITERS.search(code):
            lines.append(number)
    return lines


def plan_checks(root: ConfigSection, *, base_dir: str | None = None) -> DoctorPlan:
    """Work out what to check in a parsed configuration (see the module docs).

    *base_dir* overrides the configuration's ``base_dir`` (default
    :data:`DEFAULT_BASE_DIR`).  Clients come in text order: 2.4 ``execute``
    blocks, 2.3 plugin settings, then the Sieve directories.
    """
    base = (base_dir or root.get("base_dir") or DEFAULT_BASE_DIR).rstrip("/") or "/"
    mail_uid = root.get("mail_uid") or ""
    plan = DoctorPlan(base, (mail_uid, _where(root, "mail_uid")), root.get("mail_gid") or "",
                      root.where("dovecot_config_version") is not None)
    plan.services = _services(root, base, plan.findings)
    _execute_clients(root, plan)
    _legacy_clients(root, plan)
    _sieve_clients(root, plan)
    lmtp = [s for s in root.sections if s.kind == "service" and s.name == "lmtp"]
    limit_at: Where = (None, None)
    limit = 100
    if lmtp and _merged(lmtp).where("process_limit"):
        merged = _merged(lmtp)
        limit, limit_at = _int(merged.get("process_limit")) or limit, _where(
            merged, "process_limit")
    elif root.where("default_process_limit"):
        limit = _int(root.get("default_process_limit")) or limit
        limit_at = _where(root, "default_process_limit")
    plan.lmtp_process_limit = (limit, limit_at)
    scripts = {s.script: s for s in plan.services if s.script.startswith("/")}
    for index, client in enumerate(plan.clients):
        target = client.target
        if not isinstance(target, UnixTarget) or client.directory:
            continue
        served = _serving(plan.services, target.path)
        plan.clients[index] = client = ClientPlan(
            client.kind, client.label, target, client.file, client.line, client.noreply,
            client.env, client.connect_timeout_ms, served)
        if target.path in scripts:
            service = scripts[target.path]
            socket = service.listeners[0].path if service.listeners else service.name
            plan.findings.append(Finding(
                "error", "target-is-script", client.file, client.line,
                f"{client.label}: unix:{target.path} is the script of service {service.name}, "
                "not its socket: Dovecot connects to it and fails "
                f"(net_connect_unix({target.path}) failed)",
                f"point the client at the socket {socket}, or run the script itself with "
                "exec:PATH (2.3) / driver = fork (2.4)"))
    for client in plan.clients:
        synchronous = client.kind in ("quota warning", "quota_over_status") or (
            client.kind == "welcome" and not client.noreply)
        if isinstance(client.target, TcpTarget) and synchronous:
            plan.findings.append(Finding(
                "error", "tcp-synchronous", client.file, client.line,
                f"{client.label}: {client.target.label}: Dovecot's synchronous program client "
                "crashes over tcp (the mail process gets SIGSEGV; 2.3.19, 2.4.1 and 2.4.5)",
                "reach the service over a unix socket"))
        plan.findings.extend(_environment_findings(client))
    return plan


def _at(file: str | None, line: int | None) -> str:
    return f"{file or '<config>'}:{line or 0}"


def _environment_findings(client: ClientPlan) -> list[Finding]:
    """What the script behind *client* finds in its environment, with and without ``-e``."""
    sent = ", ".join(client.env) or "nothing"
    if isinstance(client.target, ForkTarget):
        got = ", ".join(client.env) or "an empty environment"
        return [Finding("note", "environment", client.file, client.line,
                        f"{client.label}: the program runs directly and gets {got} "
                        "(no PATH)")]
    found = []
    for service in client.services:
        kept, dropped = script_environment(client.env, service)
        where = _at(service.file, service.line)
        if dropped and service.passthrough:
            found.append(Finding(
                "warning", "environment-dropped", client.file, client.line,
                f"{client.label}: sends {sent}, but service {service.name} ({where}) has -p: "
                "the script gets no environment and reads the raw request",
                "drop -p unless the script parses the request itself"))
        elif dropped:
            has = (f"its -e list is {','.join(service.env_allowlist)}"
                   if service.env_allowlist else "it has no -e list")
            now = ", ".join(kept) or "an empty environment"
            found.append(Finding(
                "warning", "environment-dropped", client.file, client.line,
                f"{client.label}: sends {sent}; service {service.name} ({where}) keeps only "
                f"the -e names and {has}: the script gets {now}",
                f"executable = script -e {','.join([*service.env_allowlist, *dropped])} "
                f"{service.script} at {where}"))
        else:
            now = ", ".join(kept) or "an empty environment (no PATH either)"
            found.append(Finding(
                "note", "environment", client.file, client.line,
                f"{client.label}: sends {sent}; the script of service {service.name} gets "
                f"{now}"))
    return found
