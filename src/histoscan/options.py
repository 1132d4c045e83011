"""Command-line options generated from documented dataclasses, so each option's default and help exist once.

A settings dataclass (``TrainConfig``, ``ServeSettings``, ``TuneSettings``) documents each field with
``doc(help, default)`` or ``field(default=..., metadata={"help": ...})``. ``dataclass_options`` turns every
documented field into a Typer parameter: ``Literal`` fields become a choice of their values, bools a
``--x/--no-x`` flag, lists and mappings a YAML value. Each option's default is read from its field (or, for
settings a config file fills first, None: "not given"); ``given_values`` keeps only the values given.

Optional field metadata besides ``help``: ``flags`` (the option's declaration, e.g. ``"--model-process/--in-process"``),
``argument`` (a positional argument; a list field takes one or more), ``multiple`` (a list field given by repeating
the option, e.g. ``--stain-donor A --stain-donor B``), ``hidden`` (left out of ``--help``, e.g. a deprecated
spelling), ``metavar``, and ``cli: False`` (not on the command line, e.g. a secret). ``Path`` fields reach the
command as ``Path``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from histoscan.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
WORKERS_HELP = "Workers reading and decoding the inputs in parallel (default: one per core)."
_SCALARS: tuple[type, ...] = (bool, int, float, str, Path)


def doc(text: str, default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with its help text (and optional option metadata, see the module docstring)."""
    metadata = {"help": text, **meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a field's annotation says about the values it takes."""

    scalar: type  # bool, int, float, str or Path (anything else is given as str)
    choices: tuple[str, ...] = ()
    optional: bool = False
    structured: bool = False  # a list or mapping, given as YAML


def field_type(hint: Any, multiple: bool = False) -> FieldType:
    """Classify an annotation: ``int | None``, ``Literal["a", "b"]``, ``dict[str, Any]``, ``str | Pruner``...

    With ``multiple`` (a list given by repeating an option, or a list argument) a ``list[X]`` is classified as X.
    """
    if multiple and get_origin(hint) is list:
        return field_type(get_args(hint)[0])
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    optional = type(None) in args
    args = tuple(a for a in args if a is not type(None))
    choices = tuple(str(c) for a in args if get_origin(a) is Literal for c in get_args(a))
    if choices:
        return FieldType(str, choices, optional)
    if any((get_origin(a) or a) in (list, dict, tuple) for a in args):
        return FieldType(str, (), optional, structured=True)
    scalar = next((a for a in args if a in _SCALARS), str)
    return FieldType(scalar, (), optional)


def documented_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a dataclass that carry help text and are not hidden from the command line."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("help") and f.metadata.get("cli", True)]


def _shown_default(f: dataclasses.Field[Any]) -> str | bool:
    """The field's default as ``--help`` shows it (False: show none)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return False
    return False if value in (None, "") or value == [] or value == {} else _shown_value(f, value)


def _shown_value(f: dataclasses.Field[Any], value: Any) -> str:
    """``value`` as ``--help`` shows a default (a bool as the flag that gives it)."""
    if isinstance(value, bool):
        flags = str(f.metadata.get("flags", "")).split("/")
        name = f.name.replace("_", "-")
        return (flags[0] if value else flags[-1]) if len(flags) == 2 else f"--{'' if value else 'no-'}{name}"
    return str(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else ...


def _is_list(hint: Any) -> bool:
    """Whether an annotation is a list (``list[Path]``, ``list[float]``)."""
    return get_origin(hint) is list


def _parameter(f: dataclasses.Field[Any], hint: Any, defaults: bool, shown: Any = None) -> inspect.Parameter:
    import typer

    help_text: str = f.metadata["help"]
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    many = _is_list(hint) and bool(f.metadata.get("multiple") or f.metadata.get("argument"))
    kind = field_type(hint, multiple=many)
    scalar: Any = Literal[kind.choices] if kind.choices else kind.scalar  # Typer lists a Literal's values
    if many:
        scalar = list[scalar]
    if f.metadata.get("argument"):
        info: Any = typer.Argument(
            ... if required else (_default(f) if defaults else None),
            help=help_text,
            show_default=True if defaults and not required and _default(f) is not None else _shown_default(f),
            metavar=f.metadata.get("metavar"),
        )
        annotation: Any = scalar if required else scalar | None
        return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info, annotation=annotation)
    flag = "--" + f.name.replace("_", "-")
    flags = f.metadata.get("flags", f"{flag}/--no-{flag[2:]}" if kind.scalar is bool and not many else flag)
    default = _default(f) if defaults and not kind.structured else None
    extra: dict[str, Any] = {"show_default": True if defaults and default is not None else _shown_default(f)}
    if shown is not None:  # the command's own default of a shared option whose field default is None
        extra["show_default"] = _shown_value(f, shown)
    if kind.structured:
        help_text += " YAML, e.g. '[1, 1.5]'."
        extra["metavar"] = "YAML"
    if "metavar" in f.metadata:
        extra["metavar"] = f.metadata["metavar"]
    if f.metadata.get("hidden"):
        extra["hidden"] = True
    info = typer.Option(... if required else default, flags, help=help_text, **extra)
    annotation = scalar if required else scalar | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def dataclass_options(
    cls: type,
    *,
    defaults: bool = True,
    only: Collection[str] | None = None,
    shown: Mapping[str, Any] | None = None,
) -> list[inspect.Parameter]:
    """One Typer parameter per documented field of ``cls`` (positional arguments first).

    With ``defaults=False`` every option defaults to None ("not given") and only shows the field's default
    in ``--help``: for settings that a config file fills before the command line overrides it. ``only`` keeps
    the named fields; ``shown`` gives the default ``--help`` shows for a field whose own default is None (a
    shared option such as ``--batch-size`` whose default is each command's).
    """
    hints = get_type_hints(cls)
    shown = shown or {}
    params = [
        _parameter(f, hints[f.name], defaults, shown.get(f.name))
        for f in documented_fields(cls)
        if only is None or f.name in only
    ]
    return sorted(params, key=lambda p: p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD)


def with_parameters(fn: F, params: list[inspect.Parameter]) -> F:
    """Give ``fn(**values)`` the signature Typer reads its options from."""
    cast(Any, fn).__signature__ = inspect.Signature(params)
    return fn


def parse_yaml(text: str, name: str) -> Any:
    """A YAML value given on the command line (lists, mappings, numbers)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--{name.replace('_', '-')}: not valid YAML ({exc})") from exc


def given_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (None means not given), with YAML-valued fields parsed."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        many = fields[name].metadata.get("multiple") or fields[name].metadata.get("argument")
        out[name] = parse_yaml(value, name) if field_type(hints[name], bool(many)).structured else value
    return out


def check_choices(obj: Any) -> None:
    """Raise ConfigError naming the field and the allowed values when a ``Literal`` field holds another value."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind = field_type(hints[f.name])
        value = getattr(obj, f.name)
        if not kind.choices or (value is None and kind.optional) or not isinstance(value, (str, int, float)):
            continue  # an object (e.g. an Optuna pruner) where the field also takes one is the caller's choice
        if str(value) not in kind.choices:
            raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(kind.choices)}")


@dataclasses.dataclass(frozen=True)
class Deprecated:
    """An old option spelling that still works until the next minor version.

    An old option spelling that still works until the next minor version: ``use`` is its new spelling
    (None: the option does nothing and is dropped), ``note`` says why in a few words.
    """

    use: str | None
    note: str = ""

    def message(self, old: str) -> str:
        """The one warning line for ``old``."""
        text = f"option {old} is deprecated: " + (f"use {self.use}" if self.use else "it does nothing")
        return text + (f" ({self.note})" if self.note else "")


def _option_name(token: str) -> str:
    return token.split("=", 1)[0] if token.startswith("--") else token


def deprecated_args(
    args: list[str], old: Mapping[str, Deprecated], warn: Callable[[str], None], flags: Collection[str] = ()
) -> list[str]:
    """Replace old option spellings by new ones, warning once about each.

    ``args`` with old option spellings replaced by new ones (``--old=v`` too), each old spelling warned about
    once however often it is given; a dropped option is removed, with its value unless it is in ``flags``.
    Arguments after ``--`` are left alone.
    """
    out: list[str] = []
    warned: set[str] = set()
    rest = iter(args)
    for token in rest:
        if token == "--":
            out += [token, *rest]
            break
        name = _option_name(token)
        if name not in old:
            out.append(token)
            continue
        if name not in warned:
            warned.add(name)
            warn(old[name].message(name))
        new = old[name].use
        if new is not None:
            out.append(new + token[len(name) :])
        elif "=" not in token and name not in flags:
            next(rest, None)  # the dropped option's value
    return out


def misplaced_option(command: str, args: list[str], elsewhere: Mapping[str, str]) -> None:
    """Refuse an option that belongs to another command or mode.

    Raise ConfigError when the arguments of ``command`` hold an option of another command or mode
    (``elsewhere``: option -> which command to use instead).
    """
    for token in args:
        if token == "--":
            return
        name = _option_name(token)
        if name in elsewhere:
            raise ConfigError(f"{name} is not an option of 'histoscan {command}': {elsewhere[name]}")
