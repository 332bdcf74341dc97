"""A pytest plugin for script authors: run a script the way Dovecot does.

Installed with execproto (entry point ``pytest11``), it adds one fixture,
:func:`dovecot_script`.  It starts execproto's blocking ``script`` service
on a unix socket in a temporary directory and returns a
:class:`ScriptService` whose methods send what Dovecot's clients send: a
quota warning, a quota_over_status mismatch, a welcome, Pigeonhole's
``pipe``, ``filter`` and ``execute``, or any request (:meth:`ScriptService.run`).
What each client sends and how it judges the result is the core's
(:class:`execproto.ClientCall`, the same as for ``execproto trigger``);
this module only runs the service and the requests.
The script runs as under Dovecot's service: a cleared environment with only
the allowlisted ``env_`` entries, the socket as its stdin and stdout, its
exit status turned into ``+``/``-``, and ``alarm=N`` enforced.

Nothing here runs unless a test asks for the fixture: merely having
execproto installed adds no autouse fixture, hook or marker, and the
service and client (the blocking flavour) are imported on first use only.
Loading the plugin still imports the ``execproto`` and
``execproto.adapters`` packages, its parents.  Disable the plugin with
``-p no:execproto``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import pytest

# The core is this package's parent, imported already: no cost.
from execproto import (
    ClientCall,
    ExecuteSettings,
    QuotaOverStatus,
    Verdict,
    Welcome,
    quota_over_status_call,
    quota_warning_call,
    sieve_call,
    to_crlf,
    welcome_call,
    with_alarm,
)

if TYPE_CHECKING:
    from execproto import ClientConnection

    from ._common import RunResult
    from .blocking import Service

# to_crlf (Pigeonhole's line ends) has been part of this module's API: the core's, re-exported.
__all__ = ["ScriptFactory", "ScriptService", "dovecot_script", "to_crlf"]

# How long teardown waits for the service thread, on top of its grace:
# the service itself bounds every step (SIGTERM, SIGKILL, drain).
_STOP_GRACE = 2.0
# A request's log line follows the close of its connection by microseconds;
# waiting for it is bounded all the same.
_LOG_WAIT = 5.0
_EXIT = re.compile(r"(?:exit (\d+)|killed by signal (\d+))")


class _Records(logging.Handler):
    """Keeps the service's log lines and counts the per-request ones."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.exits: list[int | None] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.lines.append(record.getMessage())
            # The one line per request (log_request in _common.py):
            # "PEER: args=[...] HOW duration=S", HOW saying how the script ended.
            if isinstance(record.msg, str) and " args=[" in record.msg:
                args = record.args if isinstance(record.args, tuple) else ()
                found = _EXIT.search(str(args[2])) if len(args) > 2 else None
                code: int | None = None
                if found is not None:
                    code = int(found[1]) if found[1] else -int(found[2])
                self.exits.append(code)
            self.changed.notify_all()


class ScriptService:
    """A script behind execproto's ``script`` service, and Dovecot's clients for it.

    Made by the :func:`dovecot_script` fixture; stopped at the end of the
    test.  The methods named after a Dovecot client build their request
    with the core's description of that client (:class:`execproto.ClientCall`
    from :func:`execproto.quota_warning_call` and the other ``*_call``
    functions, as ``execproto trigger`` does), send exactly
    :meth:`~execproto.ClientCall.header` and the call's input (``alarm=N``
    added, when set), and judge the outcome with
    :meth:`~execproto.ClientCall.judge`.  Every method runs one request,
    waits until the script has ended and returns a
    :class:`execproto.adapters.RunResult`:

    * ``status``: what the client makes of the run (the verdict's status):
      SUCCESS or FAILURE from the ``+``/``-`` result code (in noreply mode
      SUCCESS once the request went: Dovecot sees no more);
      INTERNAL_FAILURE when the run could not complete (``kind``, ``detail``).
    * ``output``: what the script wrote to stdout (without the result code).
    * ``returncode``: the script's exit code as the service saw it (``-N``
      when killed by signal N), also in noreply mode, where Dovecot's
      client never learns it; None if the script did not start, or once
      a run of this service has ended in INTERNAL_FAILURE (its script may
      end later, so log lines and runs can no longer be matched).

    Requests run one at a time.

    Attributes:
        script: the script's absolute path.
        socket_path: the unix socket the service listens on.
        alarm: ``alarm=N`` sent with every request, or None.
        timeout: the client's limit on one run, in seconds.
        last_request: the bytes the last request sent (header and payload).
        last_call: the :class:`execproto.ClientCall` of the last request,
            None after :meth:`run`.
        last_verdict: what that client made of it
            (:class:`execproto.Verdict`: ``ok``, ``status`` and its
            ``message``, e.g. Pigeonhole's "piped message to program
            'NAME'"), None after :meth:`run`.
    """

    def __init__(self, script: str, script_args: Sequence[str], *,
                 env_allowlist: Sequence[str], alarm: int | None, timeout: float,
                 directory: str) -> None:
        from ._common import ServiceConfig, UnixListener
        from .blocking import Service

        self.script = script
        self.socket_path = os.path.join(directory, "script.sock")
        self.alarm = alarm
        self.timeout = timeout
        self.last_request = b""
        self.last_call: ClientCall | None = None
        self.last_verdict: Verdict | None = None
        self._lock = threading.Lock()
        self._lost = False
        self._records = _Records()
        self._logger = logging.getLogger(f"execproto.pytest.{id(self):x}")
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self._records)
        config = ServiceConfig.of(script, script_args, {
            "env_allowlist": env_allowlist, "logger": self._logger,
            # A script still running at teardown is ended quickly.
            "grace": 1.0})
        self._service: Service = Service([UnixListener(self.socket_path)], config)
        self._thread = threading.Thread(target=self._service.serve_forever,
                                        name=f"execproto-script {script}", daemon=True)
        self._thread.start()

    @property
    def log(self) -> list[str]:
        """The service's log lines so far, one per request, with the exit status."""
        with self._records.changed:
            return list(self._records.lines)

    def close(self) -> None:
        """Stop the service: running scripts get a second, then SIGTERM and SIGKILL."""
        self._service.stop()
        config = self._service.config
        self._thread.join(config.grace + config.kill_timeout + config.header_timeout
                          + _STOP_GRACE)
        self._logger.removeHandler(self._records)
        if self._thread.is_alive():
            raise RuntimeError(f"the script service for {self.script} did not stop")

    # -- Dovecot's clients ------------------------------------------------

    def quota_warning(self, args: str | Sequence[str] = (), /,
                      **variables: str) -> RunResult:
        """Send what a quota warning sends (:func:`execproto.quota_warning_call`).

        Args:
            args: the ``execute NAME { args = ... }`` value, expanded with
                *variables* (``%{user}``) and split on spaces as Dovecot
                does, or the argument list itself.
            variables: the values of ``%{...}`` in *args*.

        noreply, the arguments, no env, no input; Dovecot closes without
        reading, so a script's output is lost there (returned here so a
        test can check there is none).  2.3 and 2.4 send the same.
        """
        settings, ready = self._execute(args, variables)
        return self._dovecot(quota_warning_call(settings, variables, args=ready))

    def quota_over_status(self, args: str | Sequence[str] = (), /, *, current: str,
                          **variables: str) -> RunResult:
        """Send what a quota_over_status mismatch sends: a quota warning plus *current*.

        :func:`execproto.quota_over_status_call`, as Dovecot 2.4:
        ``quota_over_status_current`` is the last argument even when it is
        empty (quirk Q21): then, as from Dovecot, the header ends early and
        the script gets no last argument and one LF on stdin.  *args* and
        *variables* as for :meth:`quota_warning`.
        """
        settings, ready = self._execute(args, variables)
        over = QuotaOverStatus(settings, mask=None, current=None, dovecot="2.4")
        return self._dovecot(quota_over_status_call(over, variables, current, args=ready))

    def welcome(self, args: str | Sequence[str] = (), /, *, wait: bool = False,
                **variables: str) -> RunResult:
        """Send what the welcome plugin (2.4) sends when a user's INBOX is created.

        :func:`execproto.welcome_call`: no env, no input; ``wait = no``
        (the default) is noreply; with ``wait = yes`` the result code
        counts (Dovecot logs a failure).  2.3's welcome client sends the
        same header but never half-closes and reads one buffer; that is
        not emulated.  *args* and *variables* as for :meth:`quota_warning`.
        """
        settings, ready = self._execute(args, variables)
        welcome = Welcome(settings, wait=wait, dovecot="2.4")
        return self._dovecot(welcome_call(welcome, variables, args=ready))

    def sieve_pipe(self, message: bytes, program_args: Sequence[str] = (), *, user: str,
                   home: str | None = None, host: str | None = None,
                   sender: str | None = None, recipient: str | None = None,
                   orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``pipe "program" [args]`` sends (:func:`execproto.sieve_call`).

        Reply mode; the message is the input with CRLF line ends
        (:func:`execproto.to_crlf`); the environment is ``USER``, then
        ``HOME``, ``HOST``, ``SENDER``, ``RECIPIENT``, ``ORIG_RECIPIENT``
        when given (None, ``""`` or the null address ``<>`` leaves one
        out).  Which of them the script sees depends on the service's
        allowlist (``executable = script -e ...``).  SUCCESS is "piped
        message to program"; anything else fails the action (``:try``
        ignores that).  The program's name, in the verdict's message, is
        the script's file name.  Pigeonhole's own run limit,
        ``sieve_pipe_exec_timeout``, is 10 s by default; here the
        fixture's ``timeout`` applies.
        """
        return self._sieve("sieve-pipe", message, program_args, user, home, host, sender,
                           recipient, orig_recipient)

    def sieve_filter(self, message: bytes, program_args: Sequence[str] = (), *, user: str,
                     home: str | None = None, host: str | None = None,
                     sender: str | None = None, recipient: str | None = None,
                     orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``filter "program" [args]`` sends; the output is the new message.

        The request is that of :meth:`sieve_pipe`.  Only with SUCCESS does
        ``output`` replace the message; FAILURE is "program indicated false
        result" and the message stays as it was.
        """
        return self._sieve("sieve-filter", message, program_args, user, home, host, sender,
                           recipient, orig_recipient)

    def sieve_execute(self, program_args: Sequence[str] = (), *, input: bytes | None = None,
                      user: str, home: str | None = None, host: str | None = None,
                      sender: str | None = None, recipient: str | None = None,
                      orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``execute "program" [args]`` sends.

        Args:
            program_args: the Sieve command's argument list.
            input: the ``:input "..."`` string, or the message for
                ``:pipe``; None for neither (no input).  Either gets
                CRLF line ends too.
            user: ``USER``.
            home: ``HOME``, None for none.
            host: ``HOST``, None for none.
            sender: ``SENDER``, None, ``""`` or ``<>`` for the null sender.
            recipient: ``RECIPIENT``, None for none.
            orig_recipient: ``ORIG_RECIPIENT``, None for none.

        Reply mode; the output is what ``:output "var"`` would assign.
        """
        return self._sieve("sieve-execute", input, program_args, user, home, host, sender,
                           recipient, orig_recipient)

    def run(self, args: Sequence[str] = (), *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, noreply: bool = False) -> RunResult:
        """Send any request, as execproto's own client does.

        Unlike the Dovecot-client methods, an empty argument is sent so that
        the script receives it (``\\x01``, quirk Q5).  Nothing judges the
        result: :attr:`last_call` and :attr:`last_verdict` become None.
        """
        with self._lock:
            self.last_call = self.last_verdict = None
            return self._exchange(tuple(args), tuple((env or {}).items()), input, noreply)

    # -- building and judging the requests -------------------------------

    def _settings(self, args: str = "") -> ExecuteSettings:
        """An execute block (or Sieve program) reaching this service, named after the script."""
        return ExecuteSettings(os.path.basename(self.script), unix_socket_path=self.socket_path,
                               args=args)

    def _execute(self, args: str | Sequence[str], variables: Mapping[str, str],
                 ) -> tuple[ExecuteSettings, tuple[str, ...] | None]:
        """The execute block with an args template, or without one and the ready list."""
        if isinstance(args, str):
            return self._settings(args), None
        if variables:
            raise TypeError("variables only apply to an args template (a str)")
        return self._settings(), tuple(args)

    def _sieve(self, kind: str, message: bytes | None, program_args: Sequence[str], user: str,
               home: str | None, host: str | None, sender: str | None,
               recipient: str | None, orig_recipient: str | None) -> RunResult:
        return self._dovecot(sieve_call(kind, self._settings(), program_args, user=user,
                                        message=message, home=home, host=host, sender=sender,
                                        recipient=recipient, orig_recipient=orig_recipient))

    def _dovecot(self, call: ClientCall) -> RunResult:
        # for_client(): the arguments and payload that make execproto's
        # client send call.header() and call.input, empty arguments
        # included (as execproto trigger sends them).
        args, payload = call.for_client()
        with self._lock:
            result = self._exchange(args, call.env, payload, call.noreply)
            verdict = call.judge(result.status, result.kind, result.detail, result.output)
            self.last_call, self.last_verdict = call, verdict
        return dataclasses.replace(result, status=verdict.status)

    # -- the wire ---------------------------------------------------------

    def _exchange(self, args: tuple[str, ...], env: tuple[tuple[str, str], ...],
                  input: bytes | None, noreply: bool) -> RunResult:
        """Run one request (the lock held) and add the script's exit status."""
        from execproto import ClientConnection, Data, EndOfInput, Request, Status

        # The bytes, computed the way every unix client of execproto makes them.
        conn = ClientConnection()
        wire = conn.send(Request(args=args, env=env, noreply=noreply))
        if self.alarm is not None:
            wire = with_alarm(wire, self.alarm)
        if input is not None:
            wire += conn.send(Data(data=input))
        wire += conn.send(EndOfInput())
        self.last_request = wire
        with self._records.changed:
            seen = len(self._records.exits)
        if self.alarm is None:
            from . import blocking

            # noreply: read to EOF anyway.  Dovecot's quota and welcome
            # clients close at once (program-client-remote.c:
            # `pclient->fd_in = (prclient->noreply && pclient->output == NULL ?
            # -1 : fd);`); reading changes no byte sent, and the
            # service closes only when the script has ended, so a test sees
            # the script's effects.  The only difference: output written
            # here arrives, where under Dovecot the script gets EPIPE.
            result = blocking.run(f"unix:{self.socket_path}", args, input=input, env=env,
                                  noreply=noreply, read_output=True, timeout=self.timeout)
        else:
            result = _run_raw(self.socket_path, conn, wire, self.timeout)
        if result.status is Status.INTERNAL_FAILURE:
            # The script may still be running: its log line comes later,
            # perhaps after the next run's, so none can be matched any more.
            self._lost = True
            return result
        with self._records.changed:
            self._records.changed.wait_for(lambda: len(self._records.exits) > seen, _LOG_WAIT)
            exits = self._records.exits[seen:seen + 1]
        code = exits[0] if exits and not self._lost else None
        return dataclasses.replace(result, returncode=code)


def _run_raw(path: str, conn: ClientConnection, wire: bytes, timeout: float) -> RunResult:
    """Run one request whose bytes are ready (the client API has no ``alarm=``).

    Dovecot's FTS decoder client is the one that sends ``alarm=N``, right
    after the VERSION line (PROTOCOL.md 2.11); the service honours it from
    any client.  The reply is parsed by the same core object that made the
    bytes; a thread writes while this one reads.
    """
    import socket
    import time

    from execproto import ErrorKind, Output, Result

    from ._common import RunResult

    label = f"unix:{path}"
    deadline = time.monotonic() + timeout
    output = bytearray()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            return RunResult.failure(ErrorKind.IO, f"connect({label}) failed: {exc}",
                                     target=label)

        failed: list[str] = []

        def send() -> None:
            try:
                sock.sendall(wire)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failed.append(exc.strerror or str(exc))

        # The core object is used from this thread only: the writer just
        # says whether it failed, which matters once the reply has ended.
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, Output):
                    output += event.data
                elif isinstance(event, Result):
                    return RunResult.from_result(event, output=bytes(output), target=label)
                else:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        chunk = None
                    if not chunk:
                        sender.join(max(deadline - time.monotonic(), 0.001))
                        if failed:
                            conn.send_failed(failed[0])
                    if chunk is None:
                        conn.receive_reset()
                    else:
                        conn.receive_data(chunk)
        except TimeoutError:
            return RunResult.failure(ErrorKind.RUN_TIMEOUT,
                                     f"execution timed out (> {timeout} s)",
                                     target=label, output=bytes(output))
        finally:
            sock.close()
            sender.join(timeout)


class ScriptFactory:
    """What the :func:`dovecot_script` fixture returns: call it to start a service.

    Call with the script and the service's settings, as in
    ``executable = script -e USER,HOME /path/script.sh one``::

        svc = dovecot_script("/path/script.sh", ["one"], env_allowlist=["USER", "HOME"])

    Every service is stopped at the end of the test.
    """

    def __init__(self) -> None:
        self._services: list[ScriptService] = []
        self._dirs: list[str] = []

    def __call__(self, script: str | os.PathLike[str], script_args: Sequence[str] = (), *,
                 env_allowlist: Sequence[str] = (), alarm: int | None = None,
                 timeout: float = 30.0) -> ScriptService:
        """Start a service for *script* and return its clients.

        Args:
            script: the script (made absolute against the current directory;
                it must be executable).
            script_args: the service's arguments, placed before the client's.
            env_allowlist: the ``-e`` names; every other ``env_`` entry is
                dropped, and nothing else of any environment reaches the script.
            alarm: send ``alarm=N`` with every request: the service ends the
                script after N seconds (SIGTERM; SIGKILL 5 s later) and
                replies ``-``.  None (the default) sends none, as quota,
                welcome and Pigeonhole do.
            timeout: the client's limit on one run (seconds); past it the run
                is an INTERNAL_FAILURE of kind RUN_TIMEOUT.

        Raises:
            ValueError: *script* is not an executable file.
        """
        import tempfile

        path = os.path.abspath(os.fspath(script))
        if not os.access(path, os.X_OK) or not os.path.isfile(path):
            raise ValueError(f"{path} is not an executable file")
        # Not tmp_path: a unix socket path is limited to 107 bytes.
        directory = tempfile.mkdtemp(prefix="execproto-")
        self._dirs.append(directory)
        service = ScriptService(path, list(script_args), env_allowlist=list(env_allowlist),
                                alarm=alarm, timeout=timeout, directory=directory)
        self._services.append(service)
        return service

    def close(self) -> None:
        """Stop every service started and remove its directory."""
        import shutil

        errors: list[Exception] = []
        for service in self._services:
            try:
                service.close()
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if errors:
            raise errors[0]


@pytest.fixture
def dovecot_script() -> Iterator[ScriptFactory]:
    """Start scripts behind execproto's ``script`` service; see :class:`ScriptFactory`."""
    factory = ScriptFactory()
    try:
        yield factory
    finally:
        factory.close()
