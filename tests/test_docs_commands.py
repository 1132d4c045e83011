"""The documentation cannot drift from the tool.

1. Every ``histoscan ...`` command line in README.md and docs/**/*.md (fenced code blocks, and inline code
   spans that start with ``histoscan``) is parsed with the real command-line parser: an unknown command, an
   unknown option, an option missing its value or a surplus argument fails. Placeholders (``RUN``,
   ``STORE``) are fine: values are not converted, only the command line's shape is checked.
2. Every error line the docs quote (``error: ...``) is one the tool prints: it matches a message template
   in src/histoscan (an f-string's literal parts, its fields as wildcards), or, for messages whose wording
   comes from pydantic, it is produced here by feeding the tool the file the docs describe.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer

from histoscan.cli import app

ROOT = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"bash", "sh", "shell", "console"}  # output blocks (text, unlabelled) are not commands


def doc_files() -> list[Path]:
    """README.md and every Markdown page under docs/ (drafts in docs/incoming/ are checked once they are pages)."""
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md")) if "incoming" not in p.relative_to(ROOT / "docs").parts]
    return [ROOT / "README.md", *pages]


def _fenced_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """``(line number, fence language, line)`` for every line inside a fenced code block."""
    lang: str | None = None
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            lang = (
                stripped[3:].strip().split()[0]
                if lang is None and stripped[3:].strip()
                else ("" if lang is None else None)
            )
            continue
        if lang is not None:
            yield no, lang, line


def _join_continuations(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    buf, start = "", 0
    for no, line in lines:
        if not buf:
            start = no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""
    if buf:
        yield start, buf


def _segments(line: str) -> Iterator[str]:
    """The pieces of a shell line that run ``histoscan``: split on ``&&``, ``||``, ``;`` and ``|``."""
    line = re.sub(r"(^|\s)#.*$", "", line)  # a trailing comment
    for part in re.split(r"&&|\|\||;|\|(?!\S*\|)", line):
        part = part.strip().removeprefix("$ ").strip()
        while re.match(r"^[A-Z_][A-Z0-9_]*=\S*\s", part):  # leading VAR=value assignments
            part = part.split(None, 1)[1]
        part = re.sub(r"^(nice -n \d+|time|srun|python -m)\s+", "", part)
        if part.startswith("histoscan "):
            yield part


def command_lines() -> list[tuple[str, str]]:
    """``(where, command line)`` for every histoscan command the docs show."""
    found: list[tuple[str, str]] = []
    for path in doc_files():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        shell = [(no, line) for no, lang, line in _fenced_lines(text) if lang in SHELL_FENCES]
        for no, line in _join_continuations(shell):
            found += [(f"{rel}:{no}", seg) for seg in _segments(line)]
        for no, line in enumerate(text.splitlines(), 1):
            for span in re.findall(r"`(histoscan [^`]+)`", line):
                found.append((f"{rel}:{no}", span))
    return found


def _tokens(line: str) -> list[str]:
    """Shell words of a command line, with the docs' notation for optional parts and repeats undone."""
    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)  # [--folds K] -> --folds K
    line = line.replace("...", "")
    words = shlex.split(line, comments=True)
    keep: list[str] = []
    for w in words:
        if w in ("&", ">", ">>", "2>", "<") or re.fullmatch(r"\d?>+\S*", w):  # background, redirections
            break
        keep.append(w)
    return keep


@cache
def _root() -> Any:
    return typer.main.get_command(app)


def check_command(words: list[str]) -> None:
    """Raise (a click UsageError, or AssertionError) unless ``words`` (after ``histoscan``) parse."""
    cmd = _root()
    ctx = cmd.context_class(cmd, info_name="histoscan")
    rest = list(words)
    while hasattr(cmd, "list_commands"):
        if not rest or rest[0].startswith("-"):  # 'histoscan --version', 'histoscan stain --help'
            assert all(w in ("--help", "--version") for w in rest), f"not a command: {rest}"
            return
        # the group's own resolution: default sub-commands ('slide RUN' is 'slide scan RUN'), unknown
        # commands and options that belong to another command fail here as they fail for a user
        name, sub, rest = cmd.resolve_command(ctx, rest)
        cmd, ctx = sub, sub.context_class(sub, info_name=name, parent=ctx)
    if "--help" in rest:
        return
    _opts, extra, _order = cmd.make_parser(ctx).parse_args(args=rest)
    assert not extra, f"unexpected arguments {extra}"


COMMANDS = command_lines()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 50, "the extraction found almost no command lines: is it broken?"


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{w} {c[:60]}" for w, c in COMMANDS])
def test_every_documented_command_parses(where: str, line: str) -> None:
    words = _tokens(line)
    assert words[0] == "histoscan"
    try:
        check_command(words[1:])
    except Exception as exc:  # UsageError from click, AssertionError from check_command
        pytest.fail(f"{where}: `{line}` does not parse: {exc}")


@pytest.mark.parametrize(
    "line",
    [
        "histoscan trian --data STORE",
        "histoscan train --data STORE --no-such-option 3",
        "histoscan download serve RUN",
        "histoscan info",  # fine: required arguments are not the parser's business here ...
    ],
)
def test_the_checker_refuses_what_the_tool_refuses(line: str) -> None:
    words = _tokens(line)
    if line == "histoscan info":
        check_command(words[1:])
        return
    with pytest.raises(Exception, match=r"(?i)no such command|no such option"):
        check_command(words[1:])


# --- quoted error messages -------------------------------------------------------------------------------------


@cache
def message_patterns() -> list[re.Pattern[str]]:
    """A regex per string literal / f-string in src/histoscan with enough fixed text to identify a message."""
    patterns: list[re.Pattern[str]] = []
    for path in (ROOT / "src" / "histoscan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            parts: list[str] = []
            if isinstance(node, ast.JoinedStr):
                for v in node.values:
                    if isinstance(v, ast.Constant) and isinstance(v.value, str):
                        parts.append(re.escape(v.value))
                    else:
                        parts.append("(.+?)")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts.append(re.escape(node.value))
            fixed = sum(len(p) for p in parts if p != "(.+?)")
            if fixed >= 15:
                patterns.append(re.compile("".join(parts)))
    return patterns


def quoted_errors() -> list[tuple[str, str]]:
    """``(where, message)`` for every ``error: ...`` line the docs quote (fenced or inline), ``error: `` removed."""
    found: list[tuple[str, str]] = []
    for path in doc_files():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for no, _lang, line in _fenced_lines(text):
            if line.startswith("error: "):
                found.append((f"{rel}:{no}", line.removeprefix("error: ")))
        for no, line in enumerate(text.splitlines(), 1):
            found += [(f"{rel}:{no}", m) for m in re.findall(r"`error: ([^`]+)`", line)]
    return found


def _run_folder(tmp: Path, **changes: Any) -> Path:
    """A valid run folder's model.json with ``changes`` applied (a value of None removes the field)."""
    doc: dict[str, Any] = {
        "format": "histoscan-model",
        "schema_version": 2,
        "kind": "model",
        "architecture": "simple_cnn",
        "classes": ["normal", "tumor"],
        "preprocessing": {"image_size": [96, 96], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
    }
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    run = tmp / "runs" / "NAME"
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.json").write_text(json.dumps(doc))
    return run


def _produced(tmp: Path) -> set[str]:
    """Messages whose wording comes from pydantic, produced by reading the files the docs describe."""
    from histoscan.bundle import read_bundle
    from histoscan.errors import HistoscanError

    cases: list[dict[str, Any]] = [
        {"classes": "normal"},
        {"calibration": {"temperature": 0}},
        {"preprocessing__mean": None},
        {"preprocessing__std": [0.2, 0.0, 0.2]},
    ]
    out: set[str] = set()
    for changes in cases:
        run = _run_folder(tmp, **changes)
        with pytest.raises(HistoscanError) as info:
            read_bundle(run)
        out.add(str(info.value).replace(str(tmp) + "/", ""))
    run = _run_folder(tmp)
    (run / "model.json").write_text("[]")
    with pytest.raises(HistoscanError) as info:
        read_bundle(run)
    out.add(str(info.value).replace(str(tmp) + "/", ""))
    return out


QUOTED = quoted_errors()


def test_the_docs_quote_errors() -> None:
    assert len(QUOTED) >= 5, "the extraction found almost no quoted errors: is it broken?"


def test_every_quoted_error_is_one_the_tool_prints(tmp_path: Path) -> None:
    produced = _produced(tmp_path)
    unknown = []
    for where, message in QUOTED:
        if message in produced:
            continue
        if any(p.fullmatch(message) or p.fullmatch(message.split(": ", 1)[-1]) for p in message_patterns()):
            continue
        unknown.append(f"{where}: error: {message}")
    assert not unknown, "quoted errors the tool does not print:\n" + "\n".join(unknown)


# --- the README's headline figures -----------------------------------------------------------------------------


def _leaves(value: Any) -> Iterator[float]:
    """Every number in a JSON document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)


def test_readme_headline_figures_come_from_benchmark_results() -> None:
    """Each row of the README's headline table names a results file that holds its figure (as rounded)."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if re.search(r"\| `[\w-]+\.json` \|$", line)]
    assert rows, "the README's headline table is gone or no longer names its result files"
    for row in rows:
        _what, figure, source = (c.strip() for c in row.strip("|").split("|"))
        number = re.search(r"\d[\d,]*(?:\.\d+)?", figure)
        assert number, row
        text = number.group(0).replace(",", "")
        decimals = len(text.split(".")[1]) if "." in text else 0
        doc = json.loads((ROOT / "benchmarks" / "results" / source.strip("`")).read_text())
        assert any(round(v, decimals) == float(text) for v in _leaves(doc)), f"{figure} is not in {source}: {row}"


# --- Python names --------------------------------------------------------------------------------------------------


def _resolves(name: str) -> bool:
    """Whether a dotted ``histoscan.…`` name is a module, or an attribute reachable from one."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_python_name_the_docs_give_exists() -> None:
    """``histoscan.x.y`` in README.md and docs/ names a module, class or function that exists today."""
    missing = []
    for path in doc_files():
        for no, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"\bhistoscan(?:\.[A-Za-z_]\w*)+", line):
                if not _resolves(name):
                    missing.append(f"{path.relative_to(ROOT)}:{no}: {name}")
    assert not missing, "names the docs give that the package lacks:\n" + "\n".join(missing)
