"""Configurations generated from a grammar of dovecot.conf, for the doveconf comparison.

The grammar builds trees of settings execproto reads (script services with
unix and inet listeners; 2.4 quota warnings with ``execute`` blocks; 2.3
``plugin { quota_warning }``) among others it does not (namespaces with
quoted mailbox names, protocol and local filters), with only setting names
the version knows, so that what doveconf rejects is the syntax.  Then it
varies the spelling: quoting and escapes, blanks and tabs, comments after
values (with and without a blank before the ``#``), continuation lines, CRLF,
blank and comment lines, and the split into files (``!include`` globs,
relative paths, ``!include_try``).  Now and then it breaks one line (a
missing or extra ``}``, ``name{``, garbage after ``{``, a lone word, a blank
line inside a continuation) so that both sides must reject it at the same
place.

Generation is derandomized: the same cases every run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .doveconf import Case

__all__ = ["EXAMPLES", "generated_cases"]

#: Generated configurations per Dovecot version.
EXAMPLES = 100

_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=8)
#: Free text: what a greeting or a script argument may hold, quotes included.
_FREE = st.text(alphabet="abcXYZ 09#'\"\\{}=%$<-", min_size=0, max_size=12)
_SPECIAL_USE = ["\\Sent", "\\Trash", "\\Junk"]
_NAME = st.text(alphabet="abcdefghij ABC-_.", min_size=1, max_size=10).filter(
    lambda s: s.strip() == s and s[0].isalnum())


def _rare(draw: st.DrawFn, odds: int) -> bool:
    """True once in *odds* + 1 draws; generation's favourite value (0) means False."""
    return draw(st.integers(0, odds)) == odds


@st.composite
def _value(draw: st.DrawFn, text: str) -> str:
    """*text* written as a value: bare, "double" or 'single' quoted."""
    style = draw(st.sampled_from(["bare", "double", "single"]))
    if style == "bare":
        return text
    quote = '"' if style == "double" else "'"
    escaped = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return quote + escaped + quote


@st.composite
def _section_name(draw: st.DrawFn, name: str) -> str:
    if " " in name or draw(st.booleans()):
        return '"' + name + '"'
    return name


@st.composite
def _service(draw: st.DrawFn, version: str) -> list[tuple[int, str]]:
    """A script service: (depth, line) pairs; ``{`` lines open, ``}`` close."""
    name = draw(st.sampled_from(["qw", "script-a", "do-something", "welcome"]))
    options = draw(st.sampled_from(["", "-p ", "-e FOO ", "-e FOO,BAR -p "]))
    args = " ".join(draw(st.lists(_WORD, max_size=3)))
    command = f"script {options}/usr/local/bin/{draw(_WORD)}.sh {args}".rstrip()
    lines = [(0, f"service {draw(_section_name(name))} {{"),
             (1, f"executable = {draw(_value(command))}")]
    if draw(st.booleans()):
        lines.append((1, f"user = {draw(_WORD)}"))
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from([name, f"sub/{name}", f"/run/x/{name}", "other"]))
        lines.append((1, f"unix_listener {draw(_section_name(path))} {{"))
        if draw(st.booleans()):
            mode = draw(st.sampled_from(["0600", "0666", "0660"]))
            lines.append((2, f"mode = {draw(_value(mode))}"))
        if draw(st.booleans()):
            lines.append((2, f"user = {draw(_WORD)}"))
        lines.append((1, "}"))
    for _ in range(draw(st.integers(0, 1))):
        lines.append((1, f"inet_listener {draw(_WORD)} {{"))
        lines.append((2, f"port = {draw(st.integers(1024, 65535))}"))
        lines.append((1, "}"))
    lines.append((0, "}"))
    return lines


@st.composite
def _namespace(draw: st.DrawFn) -> list[tuple[int, str]]:
    lines = [(0, "namespace inbox {"), (1, "inbox = yes")]
    for name in draw(st.lists(_NAME, max_size=3, unique=True)):
        lines.append((1, f"mailbox {draw(_section_name(name))} {{"))
        use = draw(st.sampled_from(_SPECIAL_USE))
        lines.append((2, f"special_use = {use}"))
        lines.append((1, "}"))
    lines.append((0, "}"))
    return lines


@st.composite
def _filters(draw: st.DrawFn) -> list[tuple[int, str]]:
    """Named filters nested a few deep around a greeting."""
    greeting = draw(_value(draw(_FREE)))
    outer = draw(st.sampled_from([["protocol imap"], ["local 127.0.0.1", "protocol imap"],
                                  ["remote 10.0.0.0/8", "protocol pop3"],
                                  ["local 127.0.0.1", "remote 10.1.1.1"]]))
    lines = [(depth, f"{head} {{") for depth, head in enumerate(outer)]
    lines.append((len(outer), f"login_greeting = {greeting}"))
    lines.extend((depth, "}") for depth in reversed(range(len(outer))))
    return lines


@st.composite
def _quota_24(draw: st.DrawFn) -> list[tuple[int, str]]:
    """Dovecot 2.4: quota warnings with execute blocks, inside a quota filter or not."""
    inside = draw(st.booleans())
    lines: list[tuple[int, str]] = []
    base = 0
    if inside:
        root_name = draw(st.sampled_from(["User quota", "q"]))
        lines.append((0, f"quota {draw(_section_name(root_name))} {{"))
        base = 1
    for level in draw(st.lists(st.integers(1, 99), min_size=1, max_size=3, unique=True)):
        keyword = "warning" if inside and draw(st.booleans()) else "quota_warning"
        lines.append((base, f"{keyword} {draw(_section_name(f'warn-{level}'))} {{"))
        lines.append((base + 1, f"quota_storage_percentage = {level}"))
        name = draw(st.sampled_from(["quota-warning", "/usr/local/bin/qw.sh", "qw"]))
        lines.append((base + 1, f"execute {draw(_section_name(name))} {{"))
        if name.startswith("/"):
            lines.append((base + 2, draw(st.sampled_from(["driver = fork",
                                                          "execute_driver = fork"]))))
        args = draw(st.sampled_from(["%{user}", "%{user | username}", "x %{user | domain}"]))
        lines.append((base + 2, f"args = {draw(_value(f'{level} {args}'))}"))
        lines.append((base + 1, "}"))
        lines.append((base, "}"))
    if inside:
        lines.append((0, "}"))
    return lines


@st.composite
def _quota_23(draw: st.DrawFn) -> list[tuple[int, str]]:
    """Dovecot 2.3: quota warnings as plugin settings."""
    lines = [(0, "plugin {")]
    for index, level in enumerate(draw(st.lists(st.integers(1, 99), min_size=1, max_size=3,
                                                unique=True))):
        key = "quota_warning" + (str(index + 1) if index else "")
        target = draw(st.sampled_from(["quota-warning", "unix:/run/qw.sock", "exec:/bin/qw"]))
        lines.append((1, f"{key} = storage={level}%% {target} {level} %u"))
    lines.append((0, "}"))
    return lines


@st.composite
def _items(draw: st.DrawFn, version: str) -> list[list[tuple[int, str]]]:
    choices = [_service(version), _namespace(), _filters(),
               st.just([(0, f"login_greeting = {draw(_value(draw(_FREE)))}")])]
    choices.append(_quota_24() if version.startswith("2.4") else _quota_23())
    return draw(st.lists(st.one_of(*choices), min_size=1, max_size=5))


_BREAKS = ["drop_close", "extra_close", "tight_brace", "garbage", "lone_word",
           "blank_in_continuation", "empty_key"]


@st.composite
def _render(draw: st.DrawFn, lines: list[tuple[int, str]]) -> list[str]:
    """Spell the lines out: indentation, comments, continuations, blank lines."""
    out: list[str] = []
    for depth, line in lines:
        indent = draw(st.sampled_from(["  ", "\t", " ", ""])) * depth
        if _rare(draw, 9):
            out.append(draw(st.sampled_from(["", "# a comment", "   # indented comment"])))
        if line.endswith("{") and _rare(draw, 4):
            line = line.replace(" ", "\t", 1)
        if "=" in line and _rare(draw, 3) and '"' not in line and "'" not in line:
            line += draw(st.sampled_from([" # trailing", "\t# tab comment", "#tight"]))
        elif (line == "}" or line.endswith("{")) and _rare(draw, 5):
            line += " # closing note" if line == "}" else " # section"
        if " " in line.strip() and _rare(draw, 5):
            head, _, tail = line.partition(" ")
            out.append(indent + head + draw(st.sampled_from([" \\", "\\", " \\  "])))
            line = "    " + tail
            indent = ""
        out.append(indent + line)
    return out


@st.composite
def _break(draw: st.DrawFn, out: list[str]) -> list[str]:
    kind = draw(st.sampled_from(_BREAKS))
    where = draw(st.integers(0, len(out)))
    out = list(out)
    if kind == "drop_close":
        closes = [i for i, line in enumerate(out) if line.strip().startswith("}")]
        if closes:
            del out[draw(st.sampled_from(closes))]
    elif kind == "extra_close":
        out.insert(where, "}")
    elif kind in ("tight_brace", "garbage"):
        opens = [i for i, line in enumerate(out) if line.rstrip().endswith("{")]
        if opens:
            i = draw(st.sampled_from(opens))
            out[i] = out[i].rstrip()[:-1].rstrip() + "{" if kind == "tight_brace" else (
                out[i].rstrip() + " x = 1")
    elif kind == "lone_word":
        out.insert(where, "just words")
    elif kind == "blank_in_continuation":
        out[where:where] = ["login_greeting = a \\", "", "  b"]
    else:
        out.insert(where, "= value")
    return out


@st.composite
def _config(draw: st.DrawFn, version: str) -> dict[str, str]:
    """A configuration tree: relative path -> text, ``dovecot.conf`` the main file."""
    items = draw(_items(version))
    rendered = [draw(_render(item)) for item in items]
    if _rare(draw, 3):
        index = draw(st.integers(0, len(rendered) - 1))
        rendered[index] = draw(_break(rendered[index]))
    header = ["dovecot_config_version = 2.4.0", "dovecot_storage_version = 2.4.0"] if (
        version.startswith("2.4")) else []
    files: dict[str, list[str]] = {"dovecot.conf": list(header)}
    layout = draw(st.sampled_from(["one", "glob", "relative", "try"]))
    if layout == "glob":
        files["dovecot.conf"].append("!include conf.d/*.conf")
    elif layout == "relative":
        files["dovecot.conf"].append("!include sub/main.conf")
        files["sub/main.conf"] = ["!include_try parts/*.conf"]
    elif layout == "try":
        files["dovecot.conf"].append("!include_try missing.d/*.conf")
    for index, lines in enumerate(rendered):
        if layout == "glob" and draw(st.booleans()):
            files[f"conf.d/{index:02d}-{draw(_WORD)}.conf"] = lines
        elif layout == "relative" and draw(st.booleans()):
            files[f"sub/parts/{index:02d}.conf"] = lines
        else:
            files["dovecot.conf"].extend(lines)
    newline = "\r\n" if _rare(draw, 9) else "\n"
    return {name: newline.join(lines) + newline for name, lines in files.items()}


def generated_cases(version: str, count: int = EXAMPLES) -> list[Case]:
    """*count* generated configurations for *version*, the same each run."""
    found: list[dict[str, str]] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(_config(version))
    def collect(files: dict[str, str]) -> None:
        found.append(files)

    collect()
    return [Case(f"generated #{index}", files) for index, files in enumerate(found)]
