"""The ``execproto`` command: run, trigger, serve, trace, doctor, demo, vectors.

Exit status of ``execproto run``: 0 success, 1 failure (the script said
``-``, exited non-zero or died of a signal), 75 (EX_TEMPFAIL) internal
failure (cannot connect, timeout, protocol violation, truncated reply),
64 (EX_USAGE) for an invalid target or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from execproto import (
    CLIENT_KINDS,
    DEFAULT_BASE_DIR,
    DEFAULT_LIBEXEC_DIR,
    DEFAULT_MAX_HEADER_BYTES,
    NEED_DATA,
    ClientCall,
    ClientConnection,
    ConfigError,
    Data,
    EndOfInput,
    ExecuteSettings,
    ForkTarget,
    LocalProtocolError,
    Output,
    Request,
    Status,
    Target,
    TcpTarget,
    UnixTarget,
    __version__,
    find_execute,
    find_quota_over_status,
    find_service,
    find_welcome,
    list_executes,
    parse_config,
    parse_env_allowlist,
    parse_hostport,
    parse_target,
    pick_quota_warning,
    quota_over_status_call,
    quota_warning_call,
    sieve_call,
    sieve_extension_settings,
    sieve_programs,
    welcome_call,
)

from ._common import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    FdListener,
    Listener,
    RunResult,
    TcpListener,
    UnixListener,
)

__all__ = ["main"]

EX_USAGE = 64
EX_TEMPFAIL = 75
ADAPTERS = ("blocking", "asyncio", "trio")
SD_LISTEN_FDS_START = 3


class UsageError(Exception):
    """A bad command line or configuration: one line, exit 64."""


# --- shared helpers ------------------------------------------------------------


def _pairs(values: Sequence[str] | None, what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or ():
        name, eq, val = value.partition("=")
        if not eq or not name:
            raise UsageError(f"{what} expects NAME=VALUE, got {value!r}")
        pairs.append((name, val))
    return pairs


def _brace_expand(pattern: str) -> list[str]:
    """glob(3)'s GLOB_BRACE: ``a{b,c}d`` is ``abd`` and ``acd`` (nesting allowed).

    As glibc, ``{x}`` is ``x``; an unclosed ``{`` is kept as written.
    """
    depth, start = 0, -1
    for i, c in enumerate(pattern):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                body, parts, level, last = pattern[start + 1 : i], [], 0, 0
                for j, d in enumerate(body):
                    level += (d == "{") - (d == "}")
                    if d == "," and level == 0:
                        parts.append(body[last:j])
                        last = j + 1
                parts.append(body[last:])
                return [expanded for part in parts
                        for expanded in _brace_expand(pattern[:start] + part + pattern[i + 1 :])]
    return [pattern]


def _relative_to(path: str, parent: str) -> str:
    """Dovecot's fix_relative_path(): relative to the including file's directory."""
    if path.startswith("/") or "/" not in parent:
        return path
    return parent.rsplit("/", 1)[0] + "/" + path


def _read_text(path: str) -> str:
    return Path(path).read_bytes().decode("utf-8", "surrogateescape")


class _FileLoader:
    """Includes and ``<file`` values with Dovecot's rules (config-parser.c).

    A relative path is relative to the including file's directory; a pattern
    is a glob(3) pattern with braces, its matches read in sorted order; an
    ``!include`` without match is an error, an ``!include_try`` is not.
    *root* is prepended to every path read (a chroot's directory); names in
    messages stay as Dovecot inside it would write them.
    """

    def __init__(self, root: str = "") -> None:
        self.root = root.rstrip("/")

    def _real(self, name: str) -> str:
        return self.root + name if self.root and name.startswith("/") else name

    def include(self, pattern: str, parent: str, optional: bool) -> list[tuple[str, str]]:
        full = _relative_to(pattern, parent)
        matches: list[str] = []
        for one in _brace_expand(full):
            real = self._real(one)
            found = glob.glob(real) if glob.has_magic(real) else (
                [real] if os.path.lexists(real) else [])
            matches.extend(name[len(self.root):] if real != one else name
                           for name in sorted(found))
        if not matches:
            if optional:
                return []
            raise ConfigError("No matches")
        files = []
        for name in matches:
            try:
                files.append((name, _read_text(self._real(name))))
            except OSError as exc:
                if not optional:
                    raise ConfigError(
                        f"Couldn't open include file {name}: {exc.strerror}") from None
        return files

    def read(self, path: str, parent: str) -> str:
        full = _relative_to(path, parent)
        try:
            return _read_text(self._real(full))
        except OSError as exc:
            raise ConfigError(f"Can't open file {full}: {exc.strerror}") from None


def _config_error(path: str, exc: ConfigError) -> UsageError:
    """One line naming the file the error is in (the included one if so)."""
    return UsageError(exc.message if exc.file else f"{path}: {exc.message}")


def _read_config(path: str) -> Any:
    try:
        return parse_config(_read_text(path), loader=_FileLoader(), name=path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except ConfigError as exc:
        raise _config_error(path, exc) from None


def _call_flavour(adapter: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call ``execproto.adapters.<adapter>.<name>`` from synchronous code."""
    if adapter == "blocking":
        from . import blocking

        return getattr(blocking, name)(*args, **kwargs)
    if adapter == "asyncio":
        import asyncio

        from . import asyncio as aio_flavour

        return asyncio.run(getattr(aio_flavour, name)(*args, **kwargs))
    import trio

    from . import trio as trio_flavour

    return trio.run(functools.partial(getattr(trio_flavour, name), *args, **kwargs))


# --- run -------------------------------------------------------------------------


def _pick_execute(root: Any, name: str | None, filters: list[str]) -> ExecuteSettings:
    """The execute block ``run --config`` uses.

    With --execute NAME: the block of that name anywhere (2.4 named filters,
    2.3 plugin settings), --filter choosing among several.  Without it:
    Dovecot's rule at top level when there are top-level blocks, else the
    one block of the file.
    """
    if name is None and not filters and any(s.kind == "execute" for s in root.sections):
        return find_execute(root)
    if name is None:
        everything = list_executes(root)
        names = sorted({s.name for _, s in everything if isinstance(s, ExecuteSettings)})
        if not everything:
            raise ConfigError("no execute { .. } block (nor 2.3 quota_warning or "
                              "welcome_script setting) found")
        if len(names) != 1:
            listed = "; ".join(where for where, _ in everything) or "none"
            raise ConfigError(f"{len(everything)} execute blocks, choose one with --execute "
                              f"NAME (and --filter): {listed}")
        name = names[0]
    try:
        return find_execute(root, name, filters=filters)
    except ConfigError as exc:
        if "choose one by its filters" in exc.message:
            raise ConfigError(exc.message.replace("choose one by its filters",
                                                  "choose one with --filter")) from None
        raise


def _pick_sieve(root: Any, extension: str, program: str, base_dir: str) -> ExecuteSettings:
    """Pigeonhole's choice: the program's socket if it exists, else its binary."""
    candidates = sieve_programs(root, extension, program)
    for settings in candidates:
        target = settings.target(base_dir=base_dir)
        if isinstance(target, UnixTarget):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(target.path).st_mode):
                    return settings
        else:
            return settings
    return candidates[0]


def _load_config(path: str, base_dir: str | None) -> tuple[Any, str]:
    """The parsed configuration and the base_dir to use (``--base-dir`` wins)."""
    root = _read_config(path)
    try:
        return root, base_dir or root.get("base_dir") or DEFAULT_BASE_DIR
    except ConfigError as exc:
        raise _config_error(path, exc) from None


def _resolve_run_target(ns: argparse.Namespace) -> tuple[Target, list[str]]:
    variables = dict(_pairs(ns.var, "--var"))
    if not ns.config and (ns.sieve or ns.execute or ns.filter):
        raise UsageError("--execute, --filter and --sieve need --config FILE")
    if ns.sieve and (ns.execute or ns.filter):
        raise UsageError("--sieve and --execute/--filter exclude each other")
    if ns.config:
        root, base_dir = _load_config(ns.config, ns.base_dir)
        try:
            if ns.sieve:
                settings = _pick_sieve(root, ns.sieve[0], ns.sieve[1], base_dir)
            else:
                settings = _pick_execute(root, ns.execute, ns.filter or []).expand(variables)
            target = settings.target(base_dir=base_dir)
            args = list(settings.expand_args(variables))
        except ConfigError as exc:
            raise _config_error(ns.config, exc) from None
        extra = ([ns.target] if ns.target else []) + ns.args
        return target, args + extra
    if not ns.target:
        raise UsageError("run needs a TARGET (unix:PATH, tcp:HOST:PORT, exec:PATH) or --config")
    try:
        return parse_target(ns.target, base_dir=ns.base_dir), list(ns.args)
    except ConfigError as exc:
        raise UsageError(exc.message) from None


def cmd_run(ns: argparse.Namespace) -> int:
    """Run one script; stdin is the payload, stdout the output."""
    target, args = _resolve_run_target(ns)
    env = _pairs(ns.env, "--env")
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    use_stdin = not ns.no_input and stdin is not None and not stdin.isatty()
    out = sys.stdout.buffer

    def write(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    try:
        result: RunResult = _call_flavour(
            ns.adapter, "run", target, args,
            input=stdin if use_stdin else None,
            env=env, noreply=ns.noreply, connect_timeout=ns.connect_timeout,
            timeout=ns.timeout, output=write,
        )
    except LocalProtocolError as exc:
        raise UsageError(exc.message) from None
    if result.status is Status.SUCCESS:
        return 0
    if result.status is Status.FAILURE:
        if result.detail:
            print(f"execproto: {result.target}: {result.detail}", file=sys.stderr)
        return 1
    print(f"execproto: {result.target}: internal failure ({result.kind.value}): {result.detail}",
          file=sys.stderr)
    return EX_TEMPFAIL


# --- trigger ---------------------------------------------------------------------


def _hostdomain(root: Any) -> str:
    """Dovecot's host name: the ``hostname`` setting, else ``my_hostdomain()``.

    lib/hostpid.c: ``$DOVECOT_HOSTDOMAIN``, else the canonical name
    ``gethostbyname()`` gives for the host name, else the host name.
    """
    configured = root.get("hostname")
    if configured:
        return str(configured)
    name = os.environ.get("DOVECOT_HOSTDOMAIN")
    if name is not None:
        return name
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname_ex(hostname)[0] or hostname
    except OSError:
        return hostname


def _message(path: str | None) -> bytes | None:
    if path is None:
        return None
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --message {path}: {exc.strerror}") from None


def _trigger_call(ns: argparse.Namespace, root: Any, base_dir: str) -> ClientCall:
    """Find the kind's settings in the configuration and build its call."""
    variables = {"user": ns.user, **({"home": ns.home} if ns.home else {}),
                 **dict(_pairs(ns.var, "--var"))}
    kind = ns.kind
    if kind == "quota-warning":
        return quota_warning_call(pick_quota_warning(root, ns.level), variables,
                                  base_dir=base_dir)
    if kind == "quota-over-status":
        return quota_over_status_call(find_quota_over_status(root), variables, ns.current,
                                      base_dir=base_dir)
    if kind == "welcome":
        return welcome_call(find_welcome(root), variables, base_dir=base_dir)
    extension = kind.removeprefix("sieve-")
    if not ns.program:
        raise UsageError(f"{kind} needs --program NAME [ARG...]")
    message = _message(ns.message)
    if message is None and kind != "sieve-execute":
        raise UsageError(f"{kind} needs --message FILE (the message Pigeonhole sends; "
                         "- for stdin)")
    program, *program_args = ns.program
    return sieve_call(kind, _pick_sieve(root, extension, program, base_dir), program_args,
                      user=ns.user, message=message, home=ns.home,
                      host=ns.host if ns.host is not None else _hostdomain(root),
                      sender=ns.sender, recipient=ns.recipient,
                      orig_recipient=ns.orig_recipient,
                      extension=sieve_extension_settings(root, extension), base_dir=base_dir)


def _show_call(call: ClientCall) -> None:
    lines = [
        f"client:   {call.kind} (Dovecot {call.dovecot or '2.3 and 2.4'}: {call.source})",
        f"target:   {call.target.label}",
        f"args:     {list(call.args)!r}",
        f"env:      {[f'{n}={v}' for n, v in call.env]!r}",
        f"reply:    {'noreply' if call.noreply else 'result code (+/-)'}"
        f"{'' if call.read_output else ', closes without reading'}",
        f"input:    {'none' if call.input is None else f'{len(call.input)} bytes'}",
        f"timeouts: connect {call.connect_timeout} s, run {call.timeout} s",
    ]
    if not isinstance(call.target, ForkTarget):
        lines.append(f"header:   {_show(call.header(), 2000)}")
    print("\n".join(lines))


def cmd_trigger(ns: argparse.Namespace) -> int:
    """Send what a Dovecot client sends, from the admin's configuration; judge it as it would."""
    if ns.kind not in CLIENT_KINDS:
        raise UsageError(f"unknown KIND {ns.kind!r} (one of: {', '.join(CLIENT_KINDS)})")
    root, base_dir = _load_config(ns.config, ns.base_dir)
    try:
        call = _trigger_call(ns, root, base_dir)
        args, payload = call.for_client()
    except ConfigError as exc:
        raise _config_error(ns.config, exc) from None
    if ns.dry_run:
        _show_call(call)
        return 0
    out = sys.stdout.buffer
    seen = bytearray()

    def write(chunk: bytes) -> None:
        if len(seen) < 1024:
            seen.extend(chunk[: 1024 - len(seen)])
        out.write(chunk)
        out.flush()

    from . import blocking

    try:
        result = blocking.run(
            call.target, args, input=payload, env=list(call.env), noreply=call.noreply,
            read_output=call.read_output, connect_timeout=call.connect_timeout,
            timeout=call.timeout, output=write if call.read_output else None)
    except LocalProtocolError as exc:
        raise UsageError(exc.message) from None
    verdict = call.judge(result.status, result.kind, result.detail, bytes(seen))
    print(f"execproto trigger: {call.kind} via {result.target}: {verdict.message}",
          file=sys.stderr)
    if verdict.ok:
        return 0
    return 1 if verdict.status is Status.FAILURE else EX_TEMPFAIL


# --- serve -----------------------------------------------------------------------


def _systemd_listeners() -> list[Listener]:
    """Sockets passed by systemd socket activation (sd_listen_fds)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [FdListener(SD_LISTEN_FDS_START + i) for i in range(count)]


def _serve_settings(ns: argparse.Namespace) -> dict[str, Any]:
    listeners: list[Listener] = []
    allow: list[str] = []
    for value in ns.e or ():
        allow.extend(p for p in value.replace(",", " ").replace("\t", " ").split(" ") if p)
    passthrough = ns.p
    script, script_args = ns.script, list(ns.args)
    if ns.config:
        if not ns.service:
            raise UsageError("--config needs --service NAME")
        root = _read_config(ns.config)
        try:
            svc = find_service(root, ns.service, base_dir=ns.base_dir)
        except ConfigError as exc:
            raise _config_error(ns.config, exc) from None
        allow.extend(svc.command.env_allowlist)
        passthrough = passthrough or svc.command.passthrough
        if script is None:
            script, script_args = svc.command.script, list(svc.command.script_args) + script_args
        listeners.extend(UnixListener(path, mode) for path, mode in svc.unix_listeners)
        for host, port in svc.inet_listeners:
            listeners.append(TcpListener({"*": "0.0.0.0"}.get(host, host), port))
    if script is None:
        raise UsageError("serve needs a SCRIPT (or --config FILE --service NAME)")
    try:
        mode = int(ns.mode, 8)
    except ValueError:
        raise UsageError(f"--mode expects an octal mode, got {ns.mode!r}") from None
    listeners.extend(UnixListener(path, mode) for path in ns.unix or ())
    for value in ns.tcp or ():
        try:
            # Port 0 asks the kernel for a free port (the log says which).
            host, port = (value[:-2].strip("[]"), 0) if value.endswith(":0") else (
                parse_hostport(value, 0))
        except ConfigError as exc:
            raise UsageError(f"--tcp {value}: {exc.message}") from None
        if not host:
            raise UsageError(f"--tcp {value}: a host is needed (e.g. 127.0.0.1:{port})")
        listeners.append(TcpListener(host, port))
    listeners.extend(_systemd_listeners())
    if not listeners:
        raise UsageError("nothing to listen on: give --unix PATH, --tcp HOST:PORT, "
                         "--config/--service, or run under systemd socket activation")
    return dict(
        listeners=listeners, script=script, script_args=script_args,
        env_allowlist=allow, passthrough=passthrough, header_timeout=ns.header_timeout,
        max_header_bytes=ns.max_header_bytes, max_connections=ns.max_connections,
        libexec_dir=ns.libexec_dir, grace=ns.grace, user=ns.user, group=ns.group,
    )


def _stop_inheriting() -> None:
    """Make every descriptor above 2 close-on-exec: only 0, 1, 2 reach scripts.

    A launcher may leave descriptors inheritable (systemd's LISTEN_FDS
    always are); Python's own never are.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def cmd_serve(ns: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    _stop_inheriting()
    logging.basicConfig(level=getattr(logging, ns.log_level),
                        format="%(asctime)s %(name)s: %(levelname)s: %(message)s")
    settings = _serve_settings(ns)
    if ns.adapter == "blocking":
        _serve_blocking(settings)
    elif ns.adapter == "asyncio":
        _serve_asyncio(settings)
    else:
        _serve_trio(settings)
    return 0


def _serve_blocking(settings: dict[str, Any]) -> None:
    from . import blocking
    from ._common import ServiceConfig

    listeners = settings.pop("listeners")
    try:
        service = blocking.Service(listeners, ServiceConfig(**settings))
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc}") from None
    except LocalProtocolError as exc:
        raise UsageError(exc.message) from None
    stop = lambda *_: service.stop()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("execproto").info("listening on %s", _addresses(service.addresses))
    service.serve_forever()


def _addresses(addresses: Sequence[object]) -> str:
    return ", ".join(
        f"{a[0]}:{a[1]}" if isinstance(a, tuple) else str(a) for a in addresses)


def _serve_asyncio(settings: dict[str, Any]) -> None:
    import asyncio

    from . import asyncio as aio_flavour

    async def main() -> None:
        task = asyncio.ensure_future(aio_flavour.serve(
            ready=lambda a: logging.getLogger("execproto").info("listening on %s", _addresses(a)),
            **settings))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def _serve_trio(settings: dict[str, Any]) -> None:
    import trio

    from . import trio as trio_flavour

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                addresses = await nursery.start(functools.partial(trio_flavour.serve, **settings))
                logging.getLogger("execproto").info("listening on %s", _addresses(addresses))
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


# --- doctor ----------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def cmd_doctor(ns: argparse.Namespace) -> int:
    """Check every script service and client of a configuration; exit 1 with findings."""
    import json

    from .doctor import diagnose, format_finding

    root = _read_config(ns.config)
    plan, findings = diagnose(root, ns.config, mail_user=ns.user, base_dir=ns.base_dir,
                              libexec_dir=ns.libexec_dir)
    counts = {f"{level}s": sum(f.level == level for f in findings)
              for level in ("error", "warning", "note")}
    if ns.json:
        print(json.dumps({"findings": [
            {"file": f.file, "line": f.line, "level": f.level, "code": f.code,
             "message": f.message, "fix": f.fix} for f in findings],
            "services": len(plan.services), "clients": len(plan.clients), **counts}, indent=2))
    else:
        for finding in findings:
            print(format_finding(finding))
        print(", ".join(_count(n, what) for n, what in (
            (len(plan.services), "script service"), (len(plan.clients), "client")))
            + ": " + ", ".join(_count(counts[f"{level}s"], level)
                               for level in ("error", "warning", "note")))
    return 1 if counts["errors"] or counts["warnings"] else 0


# --- trace -----------------------------------------------------------------------


def _trace_listener(value: str, mode: int) -> Listener:
    scheme, colon, rest = value.partition(":")
    if colon and scheme == "unix" and rest:
        return UnixListener(rest, mode)
    if colon and scheme == "tcp":
        try:
            host, port = (rest[:-2].strip("[]"), 0) if rest.endswith(":0") else (
                parse_hostport(rest, 0))
        except ConfigError as exc:
            raise UsageError(f"--listen {value}: {exc.message}") from None
        if host and (port or rest.endswith(":0")):
            return TcpListener(host, port)
    raise UsageError(f"--listen expects unix:PATH or tcp:HOST:PORT, got {value!r}")


def cmd_trace(ns: argparse.Namespace) -> int:
    """Forward one listener to the real service and print what passes, until SIGTERM/SIGINT."""
    from .trace import RecordWriter, Tap, TraceConfig

    logging.basicConfig(level=getattr(logging, ns.log_level),
                        format="%(asctime)s %(name)s: %(levelname)s: %(message)s")
    try:
        mode = int(ns.mode, 8)
    except ValueError:
        raise UsageError(f"--mode expects an octal mode, got {ns.mode!r}") from None
    listener = _trace_listener(ns.listen, mode)
    try:
        upstream = parse_target(ns.to)
    except ConfigError as exc:
        raise UsageError(f"--to {ns.to}: {exc.message}") from None
    if not isinstance(upstream, (UnixTarget, TcpTarget)):
        raise UsageError(f"--to expects unix:PATH or tcp:HOST:PORT, got {ns.to!r}")
    allow = None if ns.e is None else tuple(parse_env_allowlist(ns.e))
    if ns.show_payload < 0 or ns.max_connections < 1:
        raise UsageError("--show-payload must be >= 0 and --max-connections >= 1")
    writer = RecordWriter(sys.stdout, as_json=ns.json, show_payload=ns.show_payload > 0)
    config = TraceConfig(
        upstream=upstream, emit=writer, env_allowlist=allow, keep=ns.show_payload,
        max_connections=ns.max_connections, idle_timeout=ns.idle_timeout or None,
        connect_timeout=ns.connect_timeout, grace=ns.grace)
    try:
        tap = Tap(listener, config)
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc}") from None
    stop = lambda *_: tap.stop()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger = logging.getLogger("execproto")
    logger.info("listening on %s", _addresses([tap.address]))
    logger.info("forwarding to %s", upstream.label)
    tap.serve_forever()
    return 0


# --- vectors ---------------------------------------------------------------------


def cmd_vectors(ns: argparse.Namespace) -> int:
    """Write the conformance vectors (JSON) to --out or stdout."""
    data = resources.files("execproto").joinpath("vectors.json").read_bytes()
    if ns.out:
        Path(ns.out).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


# --- demo ------------------------------------------------------------------------

_DEMO_SCRIPT = '''#!{python}
"""execproto demo script: echo args, env and the upper-cased payload."""
import os, sys
dot = sys.argv[1] == "--dot"
args = sys.argv[2:]
data = sys.stdin.buffer.read()
if dot:  # behind tcp the payload is dot-encoded and the output must be too
    from execproto import DotDecoder, DotEncoder
    decoder = DotDecoder()
    data = decoder.decode(data)
    decoder.finish()
# /proc tells the real environment (Python adds LC_CTYPE to os.environ itself).
with open("/proc/self/environ", "rb") as f:
    env = " ".join(sorted(e.decode() for e in f.read().split(b"\\0") if e))
text = ("args: %r\\nenv: %s\\npayload: %s\\n" % (args, env or "(empty)",
        data.decode("utf-8", "replace").upper())).encode()
if dot:
    encoder = DotEncoder()
    text = encoder.encode(text) + encoder.finish()
sys.stdout.buffer.write(text)
'''


def _show(data: bytes, limit: int = 400) -> str:
    text = repr(data)[2:-1]
    return text if len(text) <= limit else text[:limit] + f"... ({len(data)} bytes)"


def _tap_exchange(target: Target, args: list[str], env: dict[str, str],
                  payload: bytes) -> tuple[bytes, bytes, list[bytes], Any]:
    """Run one request with the sans-IO core over a plain socket, keeping the wire bytes."""
    if isinstance(target, UnixTarget):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(target.path)
    else:
        assert isinstance(target, TcpTarget)
        sock = socket.create_connection((target.host, target.port), timeout=10)
    conn = ClientConnection(dot=isinstance(target, TcpTarget))
    sent = conn.send(Request(args=args, env=env))
    sent += conn.send(Data(data=payload)) + conn.send(EndOfInput())
    received, outputs = b"", []
    with sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                chunk = sock.recv(65536)
                received += chunk
                conn.receive_data(chunk)
            elif isinstance(event, Output):
                outputs.append(event.data)
            else:
                return sent, received, outputs, event


def cmd_demo(ns: argparse.Namespace) -> int:
    """Serve a sample script on a temporary unix socket and tcp port, run it three ways."""
    from . import blocking
    from ._common import ServiceConfig

    quiet = logging.getLogger("execproto.demo")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    with tempfile.TemporaryDirectory(prefix="execproto-demo-") as tmp:
        script = Path(tmp) / "demo-script"
        script.write_text(_DEMO_SCRIPT.format(python=sys.executable))
        script.chmod(0o755)
        sock_path = str(Path(tmp) / "demo.sock")
        unix_service = blocking.Service(
            [UnixListener(sock_path)],
            ServiceConfig(script=str(script), script_args=("--plain",),
                          env_allowlist=("GREETING",), logger=quiet))
        tcp_service = blocking.Service(
            [TcpListener("127.0.0.1", 0)],
            ServiceConfig(script=str(script), script_args=("--dot",),
                          env_allowlist=("GREETING",), logger=quiet))
        threads = [threading.Thread(target=s.serve_forever, daemon=True)
                   for s in (unix_service, tcp_service)]
        for thread in threads:
            thread.start()
        tcp_address = tcp_service.addresses[0]
        assert isinstance(tcp_address, tuple)
        host, port = tcp_address
        args = ["alice", "two words", "tab\there"]
        env: dict[str, str] = {"GREETING": "hello", "SECRET": "not on the allowlist"}
        payload = b"Hello, world!\n.a line starting with a dot\n"
        print("execproto demo: one script, three drivers")
        print(f"script: {script} (prints its args, env and upper-cased payload)")
        print(f"request: args={args!r} env={env!r} payload={payload!r}\n")
        failures = 0
        try:
            for title, target in (
                (f"unix (service on {sock_path}, -e GREETING)", UnixTarget(sock_path)),
                (f"tcp (service on 127.0.0.1:{port}, -e GREETING, dot framing)",
                 TcpTarget(str(host), int(port))),
            ):
                sent, received, outputs, result = _tap_exchange(target, args, env, payload)
                print(f"== {title} ==")
                print(f"  sent:     {_show(sent)}")
                print(f"  received: {_show(received)}")
                print(f"  output:   {_show(b''.join(outputs))}")
                print(f"  result:   {result.status.name}\n")
                failures += result.status is not Status.SUCCESS
            fork = blocking.run(f"exec:{script}", ["--plain", *args], input=payload, env=env)
            print("== fork (exec, no service; the whole env is what the client gives) ==")
            print(f"  argv:     {[str(script), '--plain', *args]!r}")
            print(f"  output:   {_show(fork.output or b'')}")
            print(f"  result:   {fork.status.name} (exit code {fork.returncode})")
            failures += fork.status is not Status.SUCCESS
        finally:
            for service in (unix_service, tcp_service):
                service.stop()
            for thread in threads:
                thread.join(15)
    print("\nall three drivers worked" if not failures else f"\n{failures} driver(s) failed")
    return 0 if not failures else 1


# --- argument parsing -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``execproto`` command."""
    parser = argparse.ArgumentParser(
        prog="execproto",
        description="Speak Dovecot's execute-scripts protocol: run scripts through a "
                    "script service (unix, tcp) or directly (fork), or be the service.")
    parser.add_argument("--version", action="version", version=f"execproto {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run one script",
        description="Run one script. stdin is the payload (unless it is a terminal or "
                    "--no-input), stdout receives the output. Options go before TARGET: "
                    "everything after TARGET is passed to the script. Exit status: 0 success, "
                    "1 failure, 75 internal failure (connect, timeout, protocol), 64 usage error.")
    run.add_argument("target", nargs="?", metavar="TARGET",
                     help="unix:PATH, tcp:HOST:PORT, exec:PATH or fork:PATH "
                          "(with --config: an extra argument)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG",
                     help="arguments for the script (appended to the config's args)")
    run.add_argument("--config", metavar="FILE",
                     help="take the target and args from a dovecot.conf: an execute NAME { } "
                          "block (2.4) or a plugin quota_warning/welcome_script setting (2.3)")
    run.add_argument("--execute", metavar="NAME",
                     help="which execute block: the one of that name anywhere, in 2.4 named "
                          "filters or 2.3 plugin settings (default: the only one)")
    run.add_argument("--filter", action="append", metavar="FILTER",
                     help="with several blocks of one name: the one inside this filter, by "
                          "name (warn-95), type (quota_warning) or both (repeatable, "
                          "outermost first)")
    run.add_argument("--sieve", nargs=2, metavar=("EXTENSION", "PROGRAM"),
                     help="with --config: the program a Sieve script's pipe, filter or "
                          "execute command runs (sieve_EXTENSION_socket_dir, else _bin_dir)")
    run.add_argument("--var", action="append", metavar="NAME=VALUE",
                     help="value for %%{NAME} in the config's args (repeatable)")
    run.add_argument("--base-dir", metavar="DIR",
                     help="directory for relative unix socket paths (config default: "
                          f"base_dir or {DEFAULT_BASE_DIR})")
    run.add_argument("--noreply", action="store_true",
                     help="ask the service for no result code (as quota warnings do): the "
                          "script's exit status is not reported; exit 0 once the request is "
                          "sent and the output, if any, is read (over tcp output must be "
                          "dot-framed; none at all is fine)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="environment entry for the script (repeatable; the service keeps "
                          "only its -e names)")
    run.add_argument("--no-input", action="store_true", help="send no payload")
    run.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                     metavar="S", help="seconds to connect (default %(default)s)")
    run.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="total seconds for the run after connecting (default: none)")
    run.add_argument("--adapter", choices=ADAPTERS, default="blocking",
                     help="I/O flavour (default %(default)s)")
    run.set_defaults(func=cmd_run)

    trigger = sub.add_parser(
        "trigger", help="send what a Dovecot client sends (force a quota warning...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Send, from your dovecot.conf (2.3 or 2.4 form), exactly what a Dovecot client
sends: the quota plugin's warning or quota_over_status script, the welcome
plugin, or Pigeonhole's pipe/filter/execute. Same target, args after variable
expansion, env, reply mode, input (Sieve: CRLF line ends) and timeouts; the
result is judged the way that client judges it (one line on stderr).

Exit status: 0 the client would carry on as after success (quota warnings
never learn the script's exit status), 1 it sees the script's failure, 75 it
logs an internal failure (cannot connect, timeout...), 64 usage or
configuration error.""",
        epilog="""\
examples:
  # How can I force a quota notification?
  execproto trigger quota-warning --config /etc/dovecot/dovecot.conf \\
      --user frank@example.org --level 95
  # the one run when usage goes back under the limit
  execproto trigger quota-warning --config /etc/dovecot/dovecot.conf \\
      --user frank@example.org --level below
  # what a Sieve script's  pipe "report" ["spam"];  sends
  execproto trigger sieve-pipe --config /etc/dovecot/dovecot.conf --user frank \\
      --home /home/frank --program report spam --message msg.eml \\
      --sender a@example.com --recipient frank@example.org
  # only show the target, the header bytes and the timeouts
  execproto trigger welcome --config /etc/dovecot/dovecot.conf --user frank --dry-run""")
    trigger.add_argument("kind", metavar="KIND",
                         help="one of: " + ", ".join(CLIENT_KINDS))
    trigger.add_argument("--config", required=True, metavar="FILE",
                         help="the dovecot.conf the client reads")
    trigger.add_argument("--user", required=True, metavar="USER",
                         help="the mail user: %%{user} (2.3: %%u) in args and paths; Sieve's "
                              "USER")
    trigger.add_argument("--level", metavar="NAME",
                         help="quota-warning: which warning: its name (2.4 warn-95, 2.3 "
                              "quota_warning2), a percentage (95), or 'below' for the one run "
                              "when usage goes back under the limit (default: the only one)")
    trigger.add_argument("--current", metavar="VALUE",
                         help="quota-over-status: the user's quota_over_status_current (2.3: "
                              "quota_over_flag), normally from the userdb; appended as the "
                              "last argument (default: the configuration's)")
    trigger.add_argument("--program", nargs="+", metavar=("NAME", "ARG"),
                         help="sieve-*: the program and the Sieve command's arguments, as in "
                              "pipe \"NAME\" [\"ARG\", ...]")
    trigger.add_argument("--message", metavar="FILE",
                         help="sieve-*: the message (- for stdin); sieve-execute sends it "
                              "only when given (:pipe or :input)")
    trigger.add_argument("--sender", metavar="ADDRESS", help="sieve-*: SENDER (envelope)")
    trigger.add_argument("--recipient", metavar="ADDRESS", help="sieve-*: RECIPIENT")
    trigger.add_argument("--orig-recipient", metavar="ADDRESS",
                         help="sieve-*: ORIG_RECIPIENT (the ORCPT address)")
    trigger.add_argument("--home", metavar="DIR",
                         help="the user's home: Sieve's HOME, %%{home} in args")
    trigger.add_argument("--host", metavar="NAME",
                         help="sieve-*: HOST (default: the hostname setting, else Dovecot's "
                              "my_hostdomain(): $DOVECOT_HOSTDOMAIN or the canonical host name)")
    trigger.add_argument("--var", action="append", metavar="NAME=VALUE",
                         help="more %%{NAME} values for args and paths (repeatable)")
    trigger.add_argument("--base-dir", metavar="DIR",
                         help=f"instead of the config's base_dir (default {DEFAULT_BASE_DIR})")
    trigger.add_argument("--dry-run", action="store_true",
                         help="show what would be sent (target, header bytes, timeouts) and "
                              "send nothing")
    trigger.set_defaults(func=cmd_trigger)

    serve = sub.add_parser(
        "serve", help="serve a script like Dovecot's script service",
        description="A stand-alone drop-in for Dovecot's script service. Options go before "
                    "SCRIPT: everything after it is passed to the script. Stops cleanly on "
                    "SIGTERM/SIGINT and removes its socket files. Honours systemd socket "
                    "activation (LISTEN_FDS).")
    serve.add_argument("script", nargs="?", metavar="SCRIPT",
                       help="script path (relative: under --libexec-dir)")
    serve.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG",
                       help="arguments placed before the client's")
    serve.add_argument("--unix", action="append", metavar="PATH", help="listen on a unix socket")
    serve.add_argument("--mode", default="0600", metavar="OCTAL",
                       help="unix socket mode (default %(default)s)")
    serve.add_argument("--tcp", action="append", metavar="HOST:PORT",
                       help="listen on tcp ([::1]:PORT for IPv6)")
    serve.add_argument("-e", action="append", metavar="NAMES",
                       help="env names clients may set, comma/space separated (repeatable)")
    serve.add_argument("-p", action="store_true",
                       help="passthrough: the script reads the raw request, no result code")
    serve.add_argument("--config", metavar="FILE",
                       help="take script, args, -e/-p and listeners from a dovecot.conf")
    serve.add_argument("--service", metavar="NAME", help="the service block to use with --config")
    serve.add_argument("--base-dir", metavar="DIR",
                       help="base of relative unix_listener paths with --config")
    serve.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                       metavar="S", help="seconds for the whole header (default %(default)s)")
    serve.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                       metavar="N", help="header size limit (default %(default)s)")
    serve.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       metavar="N", help="scripts run at once; others wait (default %(default)s)")
    serve.add_argument("--libexec-dir", default=DEFAULT_LIBEXEC_DIR, metavar="DIR",
                       help="base of a relative SCRIPT (default %(default)s)")
    serve.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="S",
                       help="on stop, seconds running scripts get (default %(default)s)")
    serve.add_argument("--user", metavar="USER",
                       help="when started as root: run as USER once listening (scripts too)")
    serve.add_argument("--group", metavar="GROUP",
                       help="with --user: this group instead of USER's primary group")
    serve.add_argument("--log-level", default="INFO",
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument("--adapter", choices=ADAPTERS, default="blocking",
                       help="I/O flavour (default %(default)s)")
    serve.set_defaults(func=cmd_serve)

    doctor = sub.add_parser(
        "doctor", help="check script services and the clients that reach them",
        description="Walk every script service of a dovecot.conf and every client that "
                    "reaches one (quota warnings, quota_over_status, welcome, Sieve socket and "
                    "bin directories) and report what stops them, one line each with the file "
                    "and line of the setting. Connects to nothing and runs nothing. Exit "
                    "status: 0 clean (notes only), 1 errors or warnings, 64 usage error.")
    doctor.add_argument("--config", required=True, metavar="FILE", help="the dovecot.conf")
    doctor.add_argument("--user", metavar="MAILUSER",
                        help="the user mail processes run as, who connects to the sockets "
                             "(default: mail_uid)")
    doctor.add_argument("--base-dir", metavar="DIR",
                        help=f"base of relative socket paths (default: base_dir or "
                             f"{DEFAULT_BASE_DIR})")
    doctor.add_argument("--libexec-dir", default=DEFAULT_LIBEXEC_DIR, metavar="DIR",
                        help="base of relative script paths (default %(default)s)")
    doctor.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    doctor.set_defaults(func=cmd_doctor)


    trace = sub.add_parser(
        "trace", help="tap between Dovecot and its script service, print each request",
        description="A transparent tap: listen where Dovecot connects, forward each connection "
                    "byte for byte to the real service (--to) and print one record per "
                    "connection when it ends: client, args, env lines (and which -e keeps), "
                    "payload size and SHA-256, output size, result code (+, -, noreply, none, "
                    "bad, bad-header, upstream-down) and duration, as text or JSON lines on "
                    "stdout. Bad headers are forwarded unchanged; a tcp --listen means "
                    "dot-framed clients. Stops cleanly on SIGTERM/SIGINT and removes its "
                    "socket file.")
    trace.add_argument("--listen", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                       help="where Dovecot connects (the socket the service had)")
    trace.add_argument("--to", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                       help="the real service")
    trace.add_argument("--mode", default="0600", metavar="OCTAL",
                       help="unix socket mode (default %(default)s; Dovecot's clients often "
                            "need 0666)")
    trace.add_argument("-e", action="append", metavar="NAMES",
                       help="the real service's env allowlist, to show which env lines it "
                            "keeps (comma/space separated, repeatable)")
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.add_argument("--show-payload", type=int, default=0, metavar="N",
                       help="show the first N payload bytes, escaped (default: none)")
    trace.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       metavar="N", help="connections forwarded at once; others wait "
                                         "(default %(default)s)")
    trace.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                       help="close a connection on which nothing moved for S seconds "
                            "(default %(default)s; 0: never)")
    trace.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                       metavar="S", help="seconds to reach the service (default %(default)s)")
    trace.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="S",
                       help="on stop, seconds open connections get (default %(default)s)")
    trace.add_argument("--log-level", default="INFO",
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    trace.set_defaults(func=cmd_trace)

    demo = sub.add_parser("demo", help="show the protocol on all three drivers",
                          description="Start a sample service on a temporary unix socket and a "
                                      "loopback tcp port, run a sample script through the unix, "
                                      "tcp and fork drivers and show what went over the wire.")
    demo.set_defaults(func=cmd_demo)

    vectors = sub.add_parser("vectors", help="write the conformance vectors (JSON)",
                             description="Write the language-neutral conformance vectors.")
    vectors.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    vectors.set_defaults(func=cmd_vectors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``execproto`` command; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except UsageError as exc:
        print(f"execproto {ns.command}: {exc}", file=sys.stderr)
        return EX_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed (e.g. piped into head)
        return EX_TEMPFAIL
