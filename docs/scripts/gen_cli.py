"""Write the CLI reference (reference/cli.md) from the real Typer app, never by hand.

Walks the click command behind ``histoscan.cli.app`` (sub-groups and lazily built commands included) and
writes one section per command: its help, usage line, arguments and options with type, default and help.
Run by mkdocs-gen-files during ``mkdocs build``; ``python docs/scripts/gen_cli.py`` prints the page.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import typer

PAGE = "reference/cli.md"


# Typer vendors its own copy of click, so the objects are inspected by duck typing, not isinstance(click.X).


def _root() -> Any:
    from histoscan.cli import app

    return typer.main.get_command(app)


def walk(cmd: Any, path: list[str], parent: Any = None) -> Iterator[tuple[list[str], Any]]:
    """Yield ``(words, (command, context))`` for ``cmd`` and, for a group, every sub-command in order."""
    ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent)
    yield path, (cmd, ctx)
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from walk(sub, [*path, name], ctx)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _param_row(param: Any, ctx: Any) -> str:
    """One table row from the help record ``--help`` itself prints for ``param``."""
    record = param.get_help_record(ctx)
    if record is None:  # click gives arguments no help record
        kind = "argument" + (" (one or more)" if param.nargs == -1 else "")
        need = "required" if param.required else "optional"
        return f"| `{param.name.upper()}` | {kind}, {need} | {_cell(getattr(param, 'help', None) or '')} |"
    names, help_text = record
    kind = "argument" if param.param_type_name == "argument" else "option"
    if param.required:
        kind += ", required"
    return f"| `{_cell(names)}` | {kind} | {_cell(help_text)} |"


def render() -> str:
    """The whole CLI reference page as Markdown."""
    lines = [
        "# Command-line reference",
        "",
        "Generated from the `histoscan` command itself (`docs/scripts/gen_cli.py`) on every build of this site:",
        "each command, its arguments and options, as `histoscan COMMAND --help` prints them.",
        "",
    ]
    for words, (cmd, ctx) in walk(_root(), ["histoscan"]):
        title = " ".join(words)
        lines += [f"## {title}", ""]
        help_text = (cmd.help or cmd.short_help or "").strip()
        if help_text:
            lines += [inspect_clean(help_text), ""]
        pieces = " ".join(cmd.collect_usage_pieces(ctx))
        lines += ["```text", f"{title} {pieces}".rstrip(), "```", ""]
        params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) and p.name != "help"]
        if params:
            lines += ["| argument / option | kind | help |", "| --- | --- | --- |"]
            lines += [_param_row(p, ctx) for p in params]
            lines.append("")
    return "\n".join(lines)


def inspect_clean(text: str) -> str:
    """Help text with Typer's ``\\b`` paragraph markers removed and indentation normalised."""
    import inspect

    return inspect.cleandoc(text.replace("\b", ""))


if __name__ == "__main__":
    sys.stdout.write(render())
else:  # run by mkdocs-gen-files
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as fh:
        fh.write(render())
