"""A pytest plugin for script authors: run a script the way Dovecot does.

Installed with execproto (entry point ``pytest11``), it adds one fixture,
:func:`dovecot_script`.  It starts execproto's blocking ``script`` service
on a unix socket in a temporary directory and returns a
:class:`ScriptService` whose methods send what Dovecot's clients send: a
quota warning, a quota_over_status mismatch, a welcome, Pigeonhole's
``pipe``, ``filter`` and ``execute``, or any request (:meth:`ScriptService.run`).
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

if TYPE_CHECKING:
    from execproto import ClientConnection

    from ._common import RunResult
    from .blocking import Service

__all__ = ["ScriptFactory", "ScriptService", "dovecot_script", "to_crlf"]

# How long teardown waits for the service thread, on top of its grace:
# the service itself bounds every step (SIGTERM, SIGKILL, drain).
_STOP_GRACE = 2.0
# A request's log line follows the close of its connection by microseconds;
# waiting for it is bounded all the same.
_LOG_WAIT = 5.0
_EXIT = re.compile(r"(?:exit (\d+)|killed by signal (\d+))")
_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(message: bytes) -> bytes:
    r"""Give every bare LF of *message* a CR, as Pigeonhole does with its input.

    sieve-extprograms-common.c, sieve_extprogram_set_input(), with the
    default ``sieve_extprograms_input_eol = crlf``::

        case SIEVE_EXTPROGRAMS_EOL_CRLF:
            input = i_stream_create_crlf(input);

    ``i_stream_create_crlf()`` (src/lib/istream-crlf.c) inserts a CR before
    every LF not already preceded by one; a lone CR is left as it is.
    """
    return _BARE_LF.sub(b"\r\n", message)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One request as a Dovecot client would put it on the wire."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    input: bytes | None = None
    noreply: bool = False


def _as_args(args: str | Sequence[str], variables: Mapping[str, str]) -> tuple[str, ...]:
    """An ``execute { args = ... }`` value, expanded and split, or a ready list."""
    if isinstance(args, str):
        from execproto import expand_args

        # program-client.c, program_client_create_auto(): the setting comes
        # expanded, then `t_strsplit_spaces(set->execute_args, " ")`.
        return expand_args(args, variables)
    if variables:
        raise TypeError("variables only apply to an args template (a str)")
    return tuple(args)


def _dovecot_framing(call: _Call) -> _Call:
    r"""Send an empty argument the way Dovecot does: as an empty line.

    program-client-remote.c writes every argument as
    ``str_append_tabescaped(str, *args); str_append_c(str, '\n');`` so an
    empty one is an empty line, which ends the header (PROTOCOL.md 2.8.2,
    quirk Q5): the arguments after it and the blank line that was meant to
    end the header reach the script as the start of its stdin.  execproto's
    own client sends ``\x01`` instead, so the same bytes are produced here
    by moving them into the payload.
    """
    if "" not in call.args:
        return call
    from execproto import tab_escape

    cut = call.args.index("")
    rest = b"".join(tab_escape(arg.encode()) + b"\n" for arg in call.args[cut + 1:])
    return dataclasses.replace(call, args=call.args[:cut],
                               input=rest + b"\n" + (call.input or b""))


def _sieve_env(user: str, home: str | None, host: str | None, sender: str | None,
               recipient: str | None, orig_recipient: str | None) -> tuple[tuple[str, str], ...]:
    """The environment Pigeonhole sets, in its order (sieve_extprogram_create())."""
    # program_client_set_env(sprog->program_client, "USER", svinst->username);
    # then HOME and HOST when known, and SENDER, RECIPIENT, ORIG_RECIPIENT
    # `if (!smtp_address_isnull(...))`: a null sender (<>) is not sent.
    pairs = [("USER", user), ("HOME", home), ("HOST", host), ("SENDER", sender),
             ("RECIPIENT", recipient), ("ORIG_RECIPIENT", orig_recipient)]
    return tuple((name, value) for name, value in pairs if value)


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
    test.  Every method runs one request, waits until the script has ended
    and returns a :class:`execproto.adapters.RunResult`:

    * ``status``: SUCCESS or FAILURE from the ``+``/``-`` result code (in
      noreply mode SUCCESS once the request went: Dovecot sees no more);
      INTERNAL_FAILURE when the run could not complete (``kind``, ``detail``).
    * ``output``: what the script wrote to stdout (without the result code).
    * ``returncode``: the script's exit code as the service saw it (``-N``
      when killed by signal N), also in noreply mode, where Dovecot's
      client never learns it; None if the script did not start, or once
      a run of this service has ended in INTERNAL_FAILURE (its script may
      end later, so log lines and runs can no longer be matched).

    Requests run one at a time.  :attr:`last_request` holds the exact bytes
    of the last one (header and payload).

    Attributes:
        script: the script's absolute path.
        socket_path: the unix socket the service listens on.
        alarm: ``alarm=N`` sent with every request, or None.
        timeout: the client's limit on one run, in seconds.
        last_request: the bytes the last request sent.
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
        """The service's log lines so far: one per request, with the exit status."""
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
        """Send what a quota warning sends: noreply, the args, nothing else.

        Args:
            args: the ``execute NAME { args = ... }`` value, expanded with
                *variables* (``%{user}``) and split on spaces as Dovecot
                does, or the argument list itself.
            variables: the values of ``%{...}`` in *args*.

        quota.c, quota_warning_execute() (2.4), which a warning calls with
        ``last_arg`` NULL, so nothing is appended::

            const char *const append_args[] = { last_arg, NULL };
            struct program_client_parameters params = {
                .client_connect_timeout_msecs = 1000,
                .no_reply = TRUE,
                .append_args = append_args,
            };

        No env, no input, and Dovecot closes without reading: a script's
        output is lost there (returned here so a test can check there is
        none).  2.3 sends the same (PROTOCOL.md 9.5.2:
        ``VERSION\\tscript\\t4\\t0\\nnoreply\\n10\\nfrank\\n\\n``).
        """
        return self._dovecot(_Call(_as_args(args, variables), noreply=True))

    def quota_over_status(self, args: str | Sequence[str] = (), /, *, current: str,
                          **variables: str) -> RunResult:
        """Send what a quota_over_status mismatch sends: a quota warning plus *current*.

        quota.c, quota_over_status_check_root()::

            quota_warning_execute(event,
                                  root->set->quota_over_status_current,
                                  "quota_over_status mismatch");

        so ``quota_over_status_current`` is the last argument, even when it
        is empty (quirk Q21): then, as from Dovecot, the header ends early
        and the script gets no last argument and one LF on stdin.
        """
        call = _Call((*_as_args(args, variables), current), noreply=True)
        return self._dovecot(call)

    def welcome(self, args: str | Sequence[str] = (), /, *, wait: bool = False,
                **variables: str) -> RunResult:
        """Send what the welcome plugin (2.4) sends when a user's INBOX is created.

        welcome-plugin.c, script_execute()::

            .no_reply = !wait,

        no env, no input.  ``wait = no`` (the default) is noreply; with
        ``wait = yes`` the result code counts (Dovecot logs a failure).
        2.3's welcome client sends the same header but never half-closes
        and reads one buffer (PROTOCOL.md 9.5.3); that is not emulated.
        """
        return self._dovecot(_Call(_as_args(args, variables), noreply=not wait))

    def sieve_pipe(self, message: bytes, program_args: Sequence[str] = (), *, user: str,
                   home: str | None = None, host: str | None = None,
                   sender: str | None = None, recipient: str | None = None,
                   orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``pipe "program" [args]`` sends.

        The message is the input with CRLF line ends (:func:`to_crlf`),
        with the environment of sieve_extprogram_create(): ``USER``, then
        ``HOME``, ``HOST``, ``SENDER``, ``RECIPIENT``, ``ORIG_RECIPIENT``
        when given (a null sender is not sent).  Reply mode, as the
        parameters set no ``no_reply``::

            struct program_client_parameters pc_params = {
                .client_connect_timeout_msecs =
                    SIEVE_EXTPROGRAMS_CONNECT_TIMEOUT_MSECS,
                .input_idle_timeout_msecs = extctx->set->exec_timeout * 1000,
            };

        cmd-pipe.c takes ``ret > 0`` (SUCCESS) as "piped message to
        program"; anything else fails the action (``:try`` ignores that).
        The output is read and discarded.  Which of these variables the
        script sees depends on the service's allowlist (``executable =
        script -e ...``).  Pigeonhole's own run limit,
        ``sieve_extprograms_exec_timeout``, is 10 s by default; here the
        fixture's ``timeout`` applies.
        """
        env = _sieve_env(user, home, host, sender, recipient, orig_recipient)
        return self._dovecot(_Call(tuple(program_args), env, to_crlf(message)))

    def sieve_filter(self, message: bytes, program_args: Sequence[str] = (), *, user: str,
                     home: str | None = None, host: str | None = None,
                     sender: str | None = None, recipient: str | None = None,
                     orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``filter "program" [args]`` sends; the output is the new message.

        The request is that of :meth:`sieve_pipe`.  cmd-filter.c::

            if (ret > 0)
                newmsg = sieve_extprogram_get_output_seekable(sprog);

        so only with SUCCESS does ``output`` replace the message; FAILURE is
        "program indicated false result" and the message stays as it was.
        """
        env = _sieve_env(user, home, host, sender, recipient, orig_recipient)
        return self._dovecot(_Call(tuple(program_args), env, to_crlf(message)))

    def sieve_execute(self, program_args: Sequence[str] = (), *, input: bytes | None = None,
                      user: str, home: str | None = None, host: str | None = None,
                      sender: str | None = None, recipient: str | None = None,
                      orig_recipient: str | None = None) -> RunResult:
        """Send what Pigeonhole's ``execute "program" [args]`` sends.

        Args:
            program_args: the Sieve command's argument list.
            input: the ``:input "..."`` string, or the message for
                ``:pipe``; None for neither (no input).  Either goes
                through sieve_extprogram_set_input(), so its line ends
                become CRLF too.
            user: ``USER``.
            home: ``HOME``, None for none.
            host: ``HOST``, None for none.
            sender: ``SENDER``, None (or "") for the null sender.
            recipient: ``RECIPIENT``, None for none.
            orig_recipient: ``ORIG_RECIPIENT``, None for none.

        Reply mode; the output is what ``:output "var"`` would assign.
        """
        env = _sieve_env(user, home, host, sender, recipient, orig_recipient)
        data = None if input is None else to_crlf(input)
        return self._dovecot(_Call(tuple(program_args), env, data))

    def run(self, args: Sequence[str] = (), *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, noreply: bool = False) -> RunResult:
        """Send any request, as execproto's own client does.

        Unlike the Dovecot-client methods, an empty argument is sent so that
        the script receives it (``\\x01``, quirk Q5).
        """
        call = _Call(tuple(args), tuple((env or {}).items()), input, noreply)
        return self._send(call)

    # -- the wire ---------------------------------------------------------

    def _dovecot(self, call: _Call) -> RunResult:
        return self._send(_dovecot_framing(call))

    def _send(self, call: _Call) -> RunResult:
        from execproto import ClientConnection, Data, EndOfInput, Request, Status

        # The bytes, computed the way every unix client of execproto makes them.
        conn = ClientConnection()
        wire = conn.send(Request(args=call.args, env=call.env, noreply=call.noreply))
        if self.alarm is not None:
            version, _, rest = wire.partition(b"\n")
            wire = version + b"\nalarm=%d\n" % self.alarm + rest
        if call.input is not None:
            wire += conn.send(Data(data=call.input))
        wire += conn.send(EndOfInput())
        with self._lock:
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
                result = blocking.run(f"unix:{self.socket_path}", call.args,
                                      input=call.input, env=call.env, noreply=call.noreply,
                                      read_output=True, timeout=self.timeout)
            else:
                result = _run_raw(self.socket_path, conn, wire, self.timeout)
            if result.status is Status.INTERNAL_FAILURE:
                # The script may still be running: its log line comes later,
                # perhaps after the next run's, so none can be matched any more.
                self._lost = True
                return result
            with self._records.changed:
                self._records.changed.wait_for(lambda: len(self._records.exits) > seen,
                                               _LOG_WAIT)
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
