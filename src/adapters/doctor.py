"""``execproto doctor``: look at the system the configuration describes.

The core's :func:`execproto._doctor.plan_checks` says what each client
would connect to and which service serves it; this module looks: whether
the socket exists and something listens on it, whether the mail user may
connect (permission bits of the socket and every directory above it, for
the user's uid and groups from ``pwd``/``grp``; ACLs are not read), whether
the script exists, is executable by the service's user and its interpreter
too, the listen backlog of the socket (Linux ``sock_diag``, as ``ss -xl``
shows it) and a static reading of shell scripts behind ``noreply`` clients.
Nothing is connected to and nothing is run: a probe connection would start
a script (and Dovecot throttles a service whose processes fail).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from execproto import (
    DEFAULT_LIBEXEC_DIR,
    ClientPlan,
    ConfigSection,
    DoctorPlan,
    Finding,
    ForkTarget,
    ListenerPlan,
    ServicePlan,
    TcpTarget,
    UnixTarget,
    may_access,
    parse_shebang,
    plan_checks,
    stdout_writes,
)

__all__ = ["LEVELS", "ROOT", "Doctor", "MailUser", "diagnose", "format_finding", "listening_unix",
           "lookup_user"]

#: The levels, worst first; ``note`` lines are not findings for the exit status.
LEVELS = ("error", "warning", "note")
#: Dovecot retries a unix connect that met a full queue after this long.
RETRY_MS = 100
#: Where ``execvp`` looks for a name without ``/`` when there is no PATH.
DEFAULT_PATH = ("/bin", "/usr/bin")


@dataclass(frozen=True)
class MailUser:
    """A user the checks are made for: name, uid and every group id."""

    name: str
    uid: int
    gids: tuple[int, ...]


#: Who checks are made for when no user applies (a missing service user, no mail user).
ROOT = MailUser("root", 0, (0,))


def lookup_user(spec: str, group: str = "") -> MailUser | None:
    """A user by name or number, with its groups (``None``: no such user).

    A number without a passwd entry is a user too (virtual mail users often
    are, ``mail_uid = 5000``): its group is *group* (``mail_gid``), if any.
    """
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, OverflowError):
        if not spec.isdigit():
            return None
        gid = int(group) if group.isdigit() else _group_id(group) if group else None
        return MailUser(spec, int(spec), () if gid is None else (gid,))
    gids = tuple(sorted({entry.pw_gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}))
    return MailUser(entry.pw_name, entry.pw_uid, gids)


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, OverflowError):
        return None


# --- listening unix sockets -----------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_UDIAG_SHOW_NAME, _UDIAG_SHOW_RQLEN = 0x1, 0x10
_UNIX_DIAG_NAME, _UNIX_DIAG_RQLEN = 0, 4


def _sock_diag() -> dict[str, tuple[int, int]]:
    """Listening unix stream sockets: path -> (queued connections, max backlog)."""
    request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0,
                          _UDIAG_SHOW_NAME | _UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
    found: dict[str, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5)
        sock.sendall(header + request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag answered with an error")
                body = data[offset + 16 : offset + length]
                sock_type = body[1]
                name, queues = None, None
                pos = 16
                while pos + 4 <= len(body):
                    attr_len, attr_type = struct.unpack_from("=HH", body, pos)
                    if attr_len < 4:
                        break
                    value = body[pos + 4 : pos + attr_len]
                    if attr_type == _UNIX_DIAG_NAME:
                        name = value
                    elif attr_type == _UNIX_DIAG_RQLEN and len(value) >= 8:
                        queues = struct.unpack_from("=II", value)
                    pos += (attr_len + 3) & ~3
                if sock_type == socket.SOCK_STREAM and name and not name.startswith(b"\0"):
                    # The kernel keeps the length bind() was given: a NUL may end it.
                    found[os.fsdecode(name.partition(b"\0")[0])] = queues or (0, 0)
                offset += (length + 3) & ~3


def _proc_net_unix() -> dict[str, tuple[int, int]]:
    """The same from /proc/net/unix, without the queues (``(-1, -1)``)."""
    found: dict[str, tuple[int, int]] = {}
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON is 0x10000.
            if len(fields) == 8 and int(fields[3], 16) & 0x10000:
                found[fields[7]] = (-1, -1)
    return found


def listening_unix() -> dict[str, tuple[int, int]]:
    """Every listening unix socket path, with its queue and backlog when known.

    ``(queued, backlog)`` come from ``sock_diag`` (``ss -xl``'s Recv-Q and
    Send-Q); from ``/proc/net/unix`` they are ``(-1, -1)``.
    """
    try:
        return _sock_diag()
    except OSError:
        try:
            return _proc_net_unix()
        except OSError:
            return {}


# --- the prober -------------------------------------------------------------------


def _mode(st: os.stat_result) -> str:
    owner = _user_name(st.st_uid)
    group = _group_name(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, {owner}:{group}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _blocked(path: str, user: MailUser, want: int) -> str | None:
    """Why *user* may not use *path* with *want* bits, or ``None`` when it may."""
    parts = path.rstrip("/").split("/")
    for i in range(1, len(parts)):
        directory = "/".join(parts[:i]) or "/"
        try:
            st = os.stat(directory)
        except OSError:
            return None  # reported as missing elsewhere
        if not may_access(st.st_mode, st.st_uid, st.st_gid, user.uid, user.gids, 1):
            return f"no search permission on the directory {directory} ({_mode(st)})"
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not may_access(st.st_mode, st.st_uid, st.st_gid, user.uid, user.gids, want):
        what = {2: "write", 5: "read and execute", 1: "execute", 4: "read"}.get(want, "access")
        return f"no {what} permission on {path} ({_mode(st)})"
    return None


@dataclass
class Doctor:
    """Probe what a configuration describes; :meth:`run` returns every finding.

    Args:
        plan: from :func:`plan_checks`.
        config: the main configuration file, for findings without a setting.
        mail_user: who the clients run as (``--user``), else ``mail_uid``.
        libexec_dir: base of relative script paths.
        listening: listening unix sockets (default: asked from the kernel).
    """

    plan: DoctorPlan
    config: str
    mail_user: str | None = None
    libexec_dir: str = DEFAULT_LIBEXEC_DIR
    listening: dict[str, tuple[int, int]] | None = None
    findings: list[Finding] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)

    def _add(self, level: str, code: str, where: tuple[str | None, int | None], message: str,
             fix: str = "") -> None:
        self.findings.append(Finding(level, code, where[0] or self.config, where[1], message,
                                     fix))

    def run(self) -> list[Finding]:
        """Every finding, the configuration's own first, sorted by file and line."""
        if self.listening is None:
            self.listening = listening_unix()
        self.findings = [Finding(f.level, f.code, f.file or self.config, f.line, f.message,
                                 f.fix) for f in self.plan.findings]
        user = self._user()
        # The sockets some client connects to (the others are checked as listeners).
        self.reached = {c.target.path for c in self.plan.clients
                        if isinstance(c.target, UnixTarget) and not c.directory}
        self.reached |= {lst.path for c in self.plan.clients if c.directory
                         for s in c.services for lst in s.listeners}
        for service in self.plan.services:
            self._service(service, user)
        for client in self.plan.clients:
            self._client(client, user)
        order = {level: i for i, level in enumerate(LEVELS)}
        return sorted(self.findings, key=lambda f: (f.file or "", f.line or 0,
                                                    order.get(f.level, 9)))

    # --- who -----------------------------------------------------------------------

    def _user(self) -> MailUser | None:
        where: tuple[str | None, int | None] = (None, None)
        spec = self.mail_user
        if not spec:
            spec, where = self.plan.mail_user
        if not spec:
            if self.plan.clients:
                self._add("note", "mail-user", (None, None),
                          "no mail user (no --user, mail_uid not set): whether clients may "
                          "connect or run programs is not checked",
                          "give --user MAILUSER (the uid mail processes run as, e.g. vmail)")
            return None
        found = lookup_user(spec, self.plan.mail_group)
        if found is None:
            self._add("error", "mail-user", where, f"mail user {spec} does not exist",
                      "create the user or name an existing one (--user, mail_uid)")
        return found

    # --- services ------------------------------------------------------------------

    def _service(self, service: ServicePlan, mail: MailUser | None) -> None:
        at = (service.file, service.line)
        runs_as = lookup_user(service.user or "root")
        if runs_as is None:
            self._add("error", "service-user", service.user_at,
                      f"service {service.name}: user {service.user} does not exist: Dovecot "
                      "refuses to start", f"create {service.user} or set another user")
            runs_as = ROOT
        script = service.script if service.script.startswith("/") else (
            f"{self.libexec_dir}/{service.script}")
        self._program(script, runs_as, at, f"service {service.name}: script", sieve_bin=False)
        for listener in service.listeners:
            for what, name, where in (("user", listener.user, listener.user_at),
                                      ("group", listener.group, listener.group_at)):
                if name and (lookup_user(name) if what == "user" else _group_id(name)) is None:
                    self._add("error", "listener-owner", where,
                              f"service {service.name}: unix_listener {listener.path}: {what} "
                              f"{name} does not exist: Dovecot refuses to start",
                              f"create the {what} or change the setting")
            if listener.path not in (self.listening or {}):
                self._socket_directory_exists(service, listener)
            if listener.path not in self.reached:
                self._unreached(service, listener)
            elif mail is not None:
                self._listener_mode(service, listener, mail)

    def _socket_directory_exists(self, service: ServicePlan, listener: ListenerPlan) -> None:
        """Whether Dovecot can bind the listener: its directory exists or is made.

        The master makes base_dir (with its parents).  2.3 makes nothing
        else; 2.4 also makes a listener's directory below base_dir, one
        level only (``mkdir(...) failed: No such file or directory``).
        """
        directory = listener.path.rsplit("/", 1)[0] or "/"
        base = self.plan.base_dir
        if directory == base or os.path.isdir(directory):
            return
        parent = directory.rsplit("/", 1)[0] or "/"
        if self.plan.version24 and directory.startswith(base + "/"):
            if parent == base or os.path.isdir(parent):
                return
            self._add("error", "socket-directory", (listener.file, listener.line),
                      f"service {service.name}: the directory {parent} above its socket "
                      f"{listener.path} does not exist: Dovecot 2.4 creates only the last "
                      f"directory and fails to start (mkdir({directory}) failed: No such file "
                      "or directory)", f"mkdir {parent} (e.g. tmpfiles.d if under /run)")
            return
        where = "outside base_dir, " if self.plan.version24 else ""
        self._add("error", "socket-directory", (listener.file, listener.line),
                  f"service {service.name}: the directory {directory} of its socket does not "
                  f"exist: {where}Dovecot does not create it and fails to start its listeners "
                  f"(bind({listener.path}) failed: No such file or directory)",
                  f"mkdir {directory} (e.g. tmpfiles.d if under /run)")

    def _unreached(self, service: ServicePlan, listener: ListenerPlan) -> None:
        """Check that something listens on a socket no client here connects to."""
        at = (listener.file, listener.line)
        if listener.path in (self.listening or {}):
            return
        if os.path.lexists(listener.path):
            self._add("error", "not-listening", at,
                      f"service {service.name}: nothing listens on {listener.path} (a socket "
                      "file left by a service that is gone: Connection refused)",
                      "start Dovecot (or execproto serve) with this service")
        else:
            self._add("error", "socket-missing", at,
                      f"service {service.name}: no socket at {listener.path}: the service is "
                      "not running", "start Dovecot (or execproto serve) with this service")

    def _listener_mode(self, service: ServicePlan, listener: ListenerPlan,
                       mail: MailUser) -> None:
        owner = lookup_user(listener.user) if listener.user else ROOT
        group = _group_id(listener.group) if listener.group else 0
        if owner is None or group is None:
            return
        if may_access(listener.mode, owner.uid, group, mail.uid, mail.gids, 2):
            return
        where = listener.mode_at if listener.mode_at[1] else (listener.file, listener.line)
        owner_text = f"{listener.user or 'root'}:{listener.group or 'root'}"
        self._add("error", "listener-permission", where,
                  f"service {service.name}: unix_listener {listener.path} is created mode "
                  f"{listener.mode:04o}, {owner_text}: mail user {mail.name} cannot connect "
                  f"(net_connect_unix({listener.path}) failed: Permission denied)",
                  f"in unix_listener set user = {mail.name} (mode 0600), or a group of "
                  f"{mail.name} with mode 0660")

    # --- programs ------------------------------------------------------------------

    def _program(self, path: str, user: MailUser, at: tuple[str | None, int | None],
                 what: str, *, sieve_bin: bool) -> ForkTarget | None:
        """Exists, is a regular file, executable (and readable for a script) by *user*."""
        if "/" not in path:
            for directory in DEFAULT_PATH:
                if os.path.exists(f"{directory}/{path}"):
                    path = f"{directory}/{path}"
                    break
            else:
                self._add("error", "script-missing", at,
                          f"{what} {path} is not in /bin or /usr/bin, where it is searched "
                          "(the environment has no PATH)", "give the program's full path")
                return None
        try:
            st = os.stat(path)
        except OSError as exc:
            self._add("error", "script-missing", at, f"{what} {path}: {exc.strerror}",
                      f"install it at {path} or correct the path")
            return None
        if not stat.S_ISREG(st.st_mode):
            self._add("error", "script-not-file", at, f"{what} {path} is not a regular file",
                      "name the script file itself")
            return None
        if sieve_bin and st.st_mode & stat.S_IWOTH:
            self._add("error", "script-world-writable", at,
                      f"{what} {path} is world-writable: Pigeonhole refuses to run it",
                      f"chmod o-w {path}")
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            head = b""  # doctor itself may not read it: the #! line is not checked
        shebang = parse_shebang(head)
        if not may_access(st.st_mode, st.st_uid, st.st_gid, user.uid, user.gids, 1):
            self._add("error", "script-not-executable", at,
                      f"{what} {path} is not executable for {user.name} ({_mode(st)}): the "
                      "exec fails with Permission denied", f"chmod +x {path}")
        elif shebang is not None and (why := _blocked(path, user, 4)):
            self._add("error", "script-not-readable", at,
                      f"{what} {path}: {user.name} may execute it but the interpreter cannot "
                      f"read it: {why}", f"chmod +r {path}")
        elif why := _blocked(path, user, 1):
            self._add("error", "script-not-executable", at, f"{what} {path}: {why}",
                      "give the user search permission on the directories")
        if shebang is not None:
            self._interpreter(path, shebang, user, at, what)
        return ForkTarget(path)

    def _interpreter(self, path: str, shebang: tuple[str, str], user: MailUser,
                     at: tuple[str | None, int | None], what: str) -> None:
        interpreter, arg = shebang
        try:
            st = os.stat(interpreter)
        except OSError:
            self._add("error", "interpreter-missing", at,
                      f"{what} {path}: its interpreter {interpreter} does not exist (the exec "
                      "fails with No such file or directory)",
                      f"install {interpreter} or correct the #! line")
            return
        if not may_access(st.st_mode, st.st_uid, st.st_gid, user.uid, user.gids, 1):
            self._add("error", "interpreter-not-executable", at,
                      f"{what} {path}: its interpreter {interpreter} is not executable for "
                      f"{user.name} ({_mode(st)})", f"chmod +x {interpreter}")
        if interpreter.rsplit("/", 1)[-1] == "env" and arg:
            name = arg.split()[0]
            if "/" not in name and not any(os.path.exists(f"{d}/{name}") for d in DEFAULT_PATH):
                self._add("error", "interpreter-missing", at,
                          f"{what} {path}: #!{interpreter} {name}: the script runs without "
                          f"PATH, so env looks in /bin:/usr/bin only, and {name} is not there",
                          f"write the interpreter's full path in the #! line of {path}")

    # --- clients -------------------------------------------------------------------

    def _client(self, client: ClientPlan, mail: MailUser | None) -> None:
        at = (client.file, client.line)
        target = client.target
        if isinstance(target, TcpTarget):
            self._add("note", "tcp-not-checked", at,
                      f"{client.label}: {target.label} is not checked (tcp)")
            return
        if client.directory and isinstance(target, UnixTarget):
            self._socket_directory(client, target.path, mail)
            return
        if client.directory and isinstance(target, ForkTarget):
            self._bin_directory(client, target.path, mail)
            return
        if "%" in getattr(target, "path", ""):
            self._add("note", "target-varies", at,
                      f"{client.label}: {target.label} depends on variables of the mail user "
                      "(%...): one socket per user, not checked")
            return
        if isinstance(target, ForkTarget):
            self._program(target.path, mail or ROOT, at, f"{client.label}: program",
                          sieve_bin=False)
            return
        self._socket(client, target.path, client.services, mail)

    @staticmethod
    def _refusal(path: str, mail: MailUser | None) -> str:
        """What connect() says for a file that is not a socket."""
        if mail is not None and _blocked(path, mail, 2):
            return "Permission denied"
        return "Connection refused" if mail is not None else "Permission denied or refused"

    def _socket(self, client: ClientPlan, path: str, services: Iterable[ServicePlan],
                mail: MailUser | None) -> None:
        at = (client.file, client.line)
        services = tuple(services)
        listening = self.listening or {}
        served = ", ".join(f"service {s.name} ({s.file or self.config}:{s.line})"
                           for s in services)
        try:
            st = os.stat(path)
        except OSError:
            fix = (f"start Dovecot (or execproto serve) with {served}" if services else
                   "add a script service with a unix_listener at that path, or correct the "
                   "client's target")
            self._add("error", "socket-missing", at,
                      f"{client.label}: no socket at {path}"
                      + ("" if services else " and no script service here listens there"), fix)
            return
        if not stat.S_ISSOCK(st.st_mode):
            if not any(f.code == "target-is-script" and f.line == client.line
                       for f in self.findings):
                self._add("error", "target-not-socket", at,
                          f"{client.label}: {path} is a file, not a socket: Dovecot connects "
                          f"to it and fails (net_connect_unix({path}) failed: "
                          f"{self._refusal(path, mail)})",
                          "point the client at the script service's socket, or run the "
                          "program directly (exec:PATH in 2.3, driver = fork in 2.4)")
            return
        if path not in listening:
            self._add("error", "not-listening", at,
                      f"{client.label}: nothing listens on {path} (a socket file left by a "
                      "service that is gone: Connection refused)",
                      f"start {served or 'the service'}, or remove the stale file")
            return
        if mail is not None and (why := _blocked(path, mail, 2)):
            self._add("error", "cannot-connect", at,
                      f"{client.label}: mail user {mail.name} cannot connect to {path}: {why}",
                      f"give {mail.name} write permission on the socket (unix_listener user, "
                      "group, mode) and search permission on its directories")
        if not services:
            self._add("note", "unknown-service", at,
                      f"{client.label}: {path} is served by something outside this "
                      "configuration: its script and -e list are not checked")
        queued, backlog = listening[path]
        if client.connect_timeout_ms < RETRY_MS and backlog >= 0:
            self._backlog(client, path, queued, backlog)
        elif client.connect_timeout_ms < RETRY_MS:
            self._add("note", "backlog-unknown", at,
                      f"{client.label}: the listen backlog of {path} is not known here (no "
                      "sock_diag: load the unix_diag module, or see ss -xl): not checked")
        if client.noreply:
            for service in services:
                self._noreply_output(client, service)

    def _backlog(self, client: ClientPlan, path: str, queued: int, backlog: int) -> None:
        at = (client.file, client.line)
        limit, limit_at = self.plan.lmtp_process_limit
        why = (f"a connect that finds the queue full is retried by Dovecot after {RETRY_MS} "
               f"ms, and the {client.kind} client gives up after {client.connect_timeout_ms} ms")
        fix = ("raise the service's process_limit and client_limit (Dovecot's backlog is "
               "process_limit x client_limit, at least 4, at most net.core.somaxconn), or "
               "execproto serve --max-connections; make the script quicker")
        if queued > backlog:
            self._add("error", "backlog-full", at,
                      f"{client.label}: the listen queue of {path} is full now ({queued} "
                      f"waiting, backlog {backlog}): {why}", fix)
        elif backlog < limit:
            source = (f"{limit_at[0] or self.config}:{limit_at[1]}" if limit_at[1]
                      else "the default")
            self._add("warning", "backlog-small", at,
                      f"{client.label}: {path} listens with a backlog of {backlog}, below the "
                      f"{limit} deliveries that may run Sieve at once (lmtp process_limit, "
                      f"{source}): once {backlog} wait, {why}", fix)

    def _noreply_output(self, client: ClientPlan, service: ServicePlan) -> None:
        at = (client.file, client.line)
        script = service.script if service.script.startswith("/") else (
            f"{self.libexec_dir}/{service.script}")
        try:
            with open(script, "rb") as f:
                text = f.read(1 << 20).decode("utf-8", "surrogateescape")
        except OSError:
            return
        lines = stdout_writes(text)
        if lines is None:
            self._add("note", "noreply-output-unknown", at,
                      f"{client.label}: asks for no reply; whether {script} writes to its "
                      "output is not known (not a shell script, and doctor does not run it)",
                      "make sure it writes nothing to stdout")
        elif lines:
            shown = ", ".join(str(n) for n in lines[:5]) + (", ..." if len(lines) > 5 else "")
            self._add("warning", "noreply-output", at,
                      f"{client.label}: asks for no reply and reads nothing, but {script} "
                      f"writes to its output (line {shown}, read without running it): the "
                      "output is lost, and once the client has closed the write fails (EPIPE: "
                      "Dovecot starts scripts with SIGPIPE ignored), which stops a set -e script "
                      "there",
                      "send the output to a log (>>FILE, logger) or start the script with "
                      "exec >/dev/null")

    def _socket_directory(self, client: ClientPlan, directory: str,
                          mail: MailUser | None) -> None:
        at = (client.file, client.line)
        if not os.path.isdir(directory):
            self._add("error", "sieve-directory", at,
                      f"{client.label}: {directory} does not exist: no program is found there",
                      f"mkdir {directory}, or start the services listening in it"
                      + (" (Dovecot 2.4 creates it then)" if self.plan.version24 else ""))
            return
        by_path = {lst.path: s for s in client.services for lst in s.listeners}
        names = set(by_path)
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(entry.stat().st_mode):
                        names.add(entry.path)
        for path in sorted(names):
            program = path.rsplit("/", 1)[-1]
            one = ClientPlan(client.kind, f"{client.label} program {program}", UnixTarget(path),
                             client.file, client.line, client.noreply, client.env,
                             client.connect_timeout_ms,
                             (by_path[path],) if path in by_path else ())
            self._socket(one, path, one.services, mail)

    def _bin_directory(self, client: ClientPlan, directory: str,
                       mail: MailUser | None) -> None:
        at = (client.file, client.line)
        if not os.path.isdir(directory):
            self._add("warning", "sieve-directory", at,
                      f"{client.label}: {directory} does not exist: every program looked up "
                      "there is \"not found\"", f"mkdir {directory} and put the programs there")
            return
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if entry.is_file():
                    self._program(entry.path, mail or ROOT, at, f"{client.label}: program",
                                  sieve_bin=True)


def format_finding(finding: Finding) -> str:
    """``FILE:LINE: LEVEL: message — fix: ...`` (no line: ``FILE: ...``)."""
    where = f"{finding.file}:{finding.line}" if finding.line else f"{finding.file}"
    fix = f" — fix: {finding.fix}" if finding.fix else ""
    return f"{where}: {finding.level}: {finding.message}{fix}"


def diagnose(root: ConfigSection, config: str, *, mail_user: str | None = None,
             base_dir: str | None = None, libexec_dir: str = DEFAULT_LIBEXEC_DIR,
             listening: dict[str, tuple[int, int]] | None = None) -> tuple[DoctorPlan,
                                                                            list[Finding]]:
    """Plan and probe: the plan and every finding for a parsed configuration."""
    plan = plan_checks(root, base_dir=base_dir)
    doctor = Doctor(plan, config, mail_user=mail_user, libexec_dir=libexec_dir,
                    listening=listening)
    return plan, doctor.run()
