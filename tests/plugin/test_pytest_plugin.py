"""The pytest plugin, run the way its users run it: test files under pytester.

Each scenario is a real test file with real scripts (``/bin/sh`` and Python
ones), run by an inner pytest that loads the plugin from its entry point.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"
PY = sys.executable

# Scripts as script authors write them; the paths they need come as arguments.
SCRIPTS = {
    # A quota warning: append the arguments to the log named by the service's argument.
    "quota-warning.sh": '#!/bin/sh\necho "$@" >> "$1"\n',
    # A Sieve pipe: keep the message and what the script was given.
    "keep.py": f"""#!{PY}
import json, os, sys
message = sys.stdin.buffer.read()
# Python adds LC_CTYPE itself when it starts in the C locale (PEP 538).
env = {{k: v for k, v in os.environ.items() if k != "LC_CTYPE"}}
with open(sys.argv[1], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": env,
               "message": message.decode("latin-1")}}, f)
""",
    # A Sieve filter: rewrite the message.
    "upper.py": f"#!{PY}\nimport sys\nsys.stdout.buffer.write(sys.stdin.buffer.read().upper())\n",
    "fail.sh": "#!/bin/sh\necho no\nexit 1\n",
    "sleep.sh": "#!/bin/sh\necho started\nexec /bin/sleep \"${1:-30}\"\n",
    # Shows its arguments and stdin, for the framing of Dovecot's requests.
    "show.py": f"#!{PY}\nimport sys\nprint(sys.argv[1:], repr(sys.stdin.read()))\n",
}

EXAMPLE = r'''
import json
import time
from pathlib import Path

import pytest

import execproto
from execproto import ErrorKind, Status, with_alarm
from execproto.adapters import pytest_plugin

HERE = Path(__file__).parent


def sent_as_described(svc):
    """The bytes on the wire are the core's description of the call, no more."""
    call = svc.last_call
    wire = call.header() if svc.alarm is None else with_alarm(call.header(), svc.alarm)
    return svc.last_request == wire + (call.input or b"")


def test_quota_warning_appends_its_args(dovecot_script, tmp_path):
    log = tmp_path / "warnings.log"
    svc = dovecot_script(HERE / "quota-warning.sh", [str(log)])
    result = svc.quota_warning("10 %{user}", user="frank")
    assert (result.status, result.output, result.returncode) == (Status.SUCCESS, b"", 0)
    assert log.read_text() == f"{log} 10 frank\n"
    # PROTOCOL.md 2.11: what 2.3.19's quota warning was measured to send.
    assert svc.last_request == b"VERSION\tscript\t4\t0\nnoreply\n10\nfrank\n\n"
    assert sent_as_described(svc) and svc.last_call.kind == "quota-warning"
    assert svc.last_verdict.ok and "never known" in svc.last_verdict.message
    assert svc.quota_warning(["95", "frank"]).ok
    assert log.read_text().splitlines()[1] == f"{log} 95 frank"


def test_sieve_pipe_reads_the_message_with_crlf(dovecot_script, tmp_path):
    seen = tmp_path / "seen.json"
    names = ["USER", "HOME", "HOST", "SENDER", "RECIPIENT", "ORIG_RECIPIENT"]
    svc = dovecot_script(HERE / "keep.py", [str(seen)], env_allowlist=names)
    result = svc.sieve_pipe(b"Subject: hi\n\nbody\r\nend\n", ["one", "two words"],
                            user="root", home="/root", host="vm", sender="a@b",
                            recipient="recipient@example.com",
                            orig_recipient="recipient@example.com")
    assert (result.status, result.returncode) == (Status.SUCCESS, 0)
    got = json.loads(seen.read_text())
    assert got["argv"] == [str(seen), "one", "two words"]
    assert got["message"] == "Subject: hi\r\n\r\nbody\r\nend\r\n"
    assert got["env"] == {"USER": "root", "HOME": "/root", "HOST": "vm", "SENDER": "a@b",
                          "RECIPIENT": "recipient@example.com",
                          "ORIG_RECIPIENT": "recipient@example.com"}
    # PROTOCOL.md 2.11: what Pigeonhole 0.5.19 was measured to send.
    assert svc.last_request == (
        b"VERSION\tscript\t4\t0\nenv_USER=root\nenv_HOME=/root\nenv_HOST=vm\n"
        b"env_SENDER=a@b\nenv_RECIPIENT=recipient@example.com\n"
        b"env_ORIG_RECIPIENT=recipient@example.com\n-\none\ntwo words\n\n"
        b"Subject: hi\r\n\r\nbody\r\nend\r\n")
    assert sent_as_described(svc)
    assert svc.last_verdict.message == "piped message to program 'keep.py'"


def test_sieve_filter_rewrites_the_message(dovecot_script):
    svc = dovecot_script(HERE / "upper.py")
    result = svc.sieve_filter(b"Subject: x\n\nquiet\n", user="frank", sender="")
    assert (result.status, result.output) == (Status.SUCCESS, b"SUBJECT: X\r\n\r\nQUIET\r\n")
    assert b"SENDER" not in svc.last_request  # the null sender is not sent
    svc.sieve_filter(b"x\n", user="frank", sender="<>", recipient="<>")
    assert b"SENDER" not in svc.last_request  # nor is it written <> (smtp_address_isnull)
    svc.sieve_filter(b"x\n", user="")
    assert b"\nenv_USER=\n" in svc.last_request  # USER is always sent
    assert sent_as_described(svc)


def test_sieve_execute_with_input(dovecot_script):
    svc = dovecot_script(HERE / "upper.py")
    assert svc.sieve_execute(["x"], input=b"a\nb", user="frank").output == b"A\r\nB"
    assert svc.sieve_execute(user="frank").output == b""
    assert sent_as_described(svc) and svc.last_call.input is None


def test_a_failing_script(dovecot_script):
    svc = dovecot_script(HERE / "fail.sh")
    result = svc.sieve_pipe(b"m\n", user="frank")
    assert (result.status, result.output, result.returncode) == (Status.FAILURE, b"no\n", 1)
    assert "the pipe action fails" in svc.last_verdict.message
    # noreply: Dovecot's quota warning cannot tell; the exit status is still here.
    result = svc.quota_warning()
    assert (result.status, result.returncode) == (Status.SUCCESS, 1)
    assert svc.welcome(wait=True).status is Status.FAILURE
    assert 'logs "Execution failed: 0"' in svc.last_verdict.message
    assert "exit 1" in svc.log[-1]


@pytest.mark.parametrize("alarm", [None, 30])
def test_big_messages(dovecot_script, alarm):
    # Unread (the service drains it) and echoed (read and written at once).
    message = b"x" * 1_000_000 + b"\n"
    result = dovecot_script(HERE / "fail.sh", alarm=alarm).sieve_pipe(message, user="frank")
    assert (result.status, result.output, result.returncode) == (Status.FAILURE, b"no\n", 1)
    result = dovecot_script(HERE / "upper.py", alarm=alarm).sieve_filter(message, user="frank")
    assert (result.status, result.output) == (Status.SUCCESS, message.upper()[:-1] + b"\r\n")


def test_env_not_on_the_allowlist_is_not_seen(dovecot_script, monkeypatch):
    monkeypatch.setenv("FROM_THE_TEST_PROCESS", "1")
    # env(1) itself as the script: it prints exactly the environment it got.
    svc = dovecot_script("/usr/bin/env", env_allowlist=["USER"])
    result = svc.run(env={"USER": "frank", "SECRET": "s3cret"})
    assert result.output == b"USER=frank\n"  # no SECRET, no PATH, nothing inherited
    result = svc.sieve_pipe(b"", user="frank", home="/home/frank", sender="a@b")
    assert result.output == b"USER=frank\n"


def test_alarm_ends_the_script(dovecot_script):
    svc = dovecot_script(HERE / "sleep.sh", alarm=1)
    started = time.monotonic()
    result = svc.run(["30"])
    assert time.monotonic() - started < 10
    assert (result.status, result.output, result.returncode) == (
        Status.FAILURE, b"started\n", -15)
    assert svc.last_request == b"VERSION\tscript\t4\t0\nalarm=1\n-\n30\n\n"
    assert svc.last_call is None and svc.last_verdict is None  # run() is no Dovecot client
    assert svc.quota_warning(["30"]).returncode == -15
    assert svc.last_request == b"VERSION\tscript\t4\t0\nalarm=1\nnoreply\n30\n\n"
    assert sent_as_described(svc)


def test_the_client_timeout(dovecot_script):
    svc = dovecot_script(HERE / "sleep.sh", timeout=0.5)
    result = svc.run()
    assert (result.status, result.kind) == (Status.INTERNAL_FAILURE, ErrorKind.RUN_TIMEOUT)
    # That script still runs: exit statuses can no longer be matched to runs.
    result = svc.run(["0"])
    assert (result.status, result.output, result.returncode) == (
        Status.SUCCESS, b"started\n", None)


def test_quota_over_status_with_an_empty_value(dovecot_script):
    svc = dovecot_script(HERE / "show.py")
    result = svc.quota_over_status("mismatch %{user}", current="", user="frank")
    # Dovecot writes the empty argument as an empty line: the header ends
    # there and the blank line meant to end it is the script's stdin (Q21).
    assert result.output == b"['mismatch', 'frank'] '\\n'\n"
    assert svc.last_request == b"VERSION\tscript\t4\t0\nnoreply\nmismatch\nfrank\n\n\n"
    assert sent_as_described(svc) and svc.last_call.args == ("mismatch", "frank", "")
    result = svc.quota_over_status(["mismatch", "frank"], current="TRUE")
    assert result.output == b"['mismatch', 'frank', 'TRUE'] ''\n"
    # execproto's own client delivers an empty argument.
    assert svc.run(["a", "", "b"]).output == b"['a', '', 'b'] ''\n"


def test_welcome(dovecot_script):
    svc = dovecot_script(HERE / "show.py", ["welcome"])
    result = svc.welcome("%{user}", user="frank")
    assert (result.status, result.returncode) == (Status.SUCCESS, 0)
    assert svc.last_request == b"VERSION\tscript\t4\t0\nnoreply\nfrank\n\n"
    assert svc.welcome(["frank"], wait=True).output == b"['welcome', 'frank'] ''\n"
    assert svc.last_request == b"VERSION\tscript\t4\t0\n-\nfrank\n\n"
    assert svc.last_verdict.message == "the welcome plugin reports success"


def test_args_mistakes(dovecot_script):
    svc = dovecot_script(HERE / "show.py")
    with pytest.raises(TypeError, match="only apply to an args template"):
        svc.quota_warning(["%{user}"], user="frank")
    with pytest.raises(execproto.ConfigError, match="unknown variable 'user'"):
        svc.welcome("%{user}")
    assert svc.last_request == b""  # nothing was sent


def test_the_core_line_ends():
    assert pytest_plugin.to_crlf is execproto.to_crlf


def test_a_script_that_is_not_executable(dovecot_script):
    with pytest.raises(ValueError, match="not an executable file"):
        dovecot_script(HERE / "test_example.py")
'''

# test_big_messages runs twice.
N_EXAMPLE = len(re.findall(r"^def test_", EXAMPLE, re.MULTILINE)) + 1


def write_scripts(pytester: pytest.Pytester, scripts: dict[str, str]) -> None:
    for name, text in scripts.items():
        path = pytester.path / name
        path.write_text(text)
        path.chmod(0o755)


def test_the_fixture_in_a_test_file(pytester: pytest.Pytester) -> None:
    write_scripts(pytester, SCRIPTS)
    pytester.makepyfile(test_example=EXAMPLE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=N_EXAMPLE)


def readme_example() -> tuple[dict[str, str], str]:
    """The scripts and the test file of the README's pytest section."""
    text = README.read_text()
    section = text.split("### Test your scripts with pytest", 1)[1].split("\n### ", 1)[0]
    scripts: dict[str, str] = {}
    tests = []
    for lang, block in re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL):
        if lang == "python":
            tests.append(block)
        elif block.startswith("#!"):
            name = re.search(r"^# (\S+):", block, re.MULTILINE)
            assert name is not None, block
            scripts[name[1]] = block
    assert len(tests) == 1 and len(scripts) == 2
    return scripts, tests[0]


def test_the_readme_example(pytester: pytest.Pytester) -> None:
    # A subprocess: the plugin comes from the installed entry point alone.
    scripts, test_file = readme_example()
    write_scripts(pytester, scripts)
    pytester.makepyfile(test_mail_scripts=test_file)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(re.findall(r"^def test_", test_file, re.MULTILINE)))


def test_the_quota_warning_page_example(pytester: pytest.Pytester) -> None:
    # docs/tasks/quota-warning.md: its script and test file, as a reader copies them.
    page = README.parent / "docs" / "tasks" / "quota-warning.md"
    blocks = re.findall(r"```(\w+)\n(.*?)```", page.read_text(), re.DOTALL)
    (script,) = [block for lang, block in blocks if lang == "sh" and block.startswith("#!")]
    (test_file,) = [block for lang, block in blocks if lang == "python"]
    write_scripts(pytester, {"quota-warning.sh": script})
    pytester.makepyfile(test_quota_warning=test_file)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_loading_the_plugin_imports_no_adapter(pytester: pytest.Pytester) -> None:
    # Installed, the plugin loads in every pytest run: it must stay light.
    pytester.makepyfile(test_light=textwrap.dedent("""
        import sys

        def test_nothing_loaded(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("execproto")
            loaded = [m for m in ("execproto.adapters.blocking", "execproto.adapters.trio",
                                  "execproto.adapters.asyncio", "trio") if m in sys.modules]
            assert loaded == []
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_off="def test_off(dovecot_script):\n    pass\n")
    result = pytester.runpytest("-p", "no:execproto", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'dovecot_script' not found*"])
