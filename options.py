"""Settings as frozen dataclasses: one field per setting, with its help; the command-line options
generated from the fields, and the dataclasses rebuilt from JSON dicts (config.json, checkpoints).

train.py's `Config`, eval.py's `EvalConfig` and the experiments' settings are all made this way:

    @dataclasses.dataclass(frozen=True)
    class Settings:
        steps: int = field(100, "training steps")

    parser = argparse.ArgumentParser()
    add_options(parser, Settings, Settings())   # --steps STEPS (default: 100)
    settings = apply(Settings(), vars(parser.parse_args()))
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def field(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text; `extra` metadata: `choices`, `flag` (the option's name
    when not `--<field-name>`), `required`."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    """The command-line option of a field (`data_resolution` -> `--data-resolution`, `model.widths`
    -> `--model-widths`)."""
    return "--" + name.replace(".", "-").replace("_", "-")


def _option_type(hint: Any) -> tuple[Callable[[str], Any], bool, bool]:
    """(parse one token, optional, is a tuple) for a field's annotation."""
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _option(target: Any, f: dataclasses.Field, hint: Any, *, dest: str, default: Any) -> None:
    """Add the option of one field to a parser or argument group."""
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    shown = "none" if default is None else shown  # as the option is typed (`--k none`)
    required = f.metadata.get("required", False)
    help_text = f.metadata.get("help", f.name) + (
        " (required)" if required else f" (default: {shown})"
    )
    kwargs: dict[str, Any] = dict(
        dest=dest, default=argparse.SUPPRESS, help=help_text, required=required
    )
    name = f.metadata.get("flag") or flag(dest)
    parse, optional, is_tuple = _option_type(hint)
    if parse is bool:
        target.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        return
    kwargs["type"] = (
        (lambda s, parse=parse: None if s.lower() == "none" else parse(s)) if optional else parse
    )
    kwargs["metavar"] = f.name.upper() + ("|none" if optional and not required else "")
    if is_tuple:
        kwargs["nargs"] = "+"
    if "choices" in f.metadata:
        kwargs.update(choices=f.metadata["choices"], metavar=None)
    target.add_argument(name, **kwargs)


def add_options(
    parser: Any,
    cls: type,
    defaults: Any,
    *,
    groups: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """One option per dataclass field (nested dataclasses as `--model-<field>`), defaults shown but
    suppressed, so that only the options actually given come back as overrides. `parser`: an
    `argparse.ArgumentParser` or one of its argument groups. `groups` maps a
    section's name to its --help title and fields, in the order the sections are listed; returns
    the sections (argument groups) by name."""
    sections, where = {}, {}
    for name, (title, names) in (groups or {}).items():
        sections[name] = parser.add_argument_group(title)
        where.update(dict.fromkeys(names, sections[name]))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest, default = prefix + f.name, getattr(defaults, f.name)
        target = where.get(f.name, parser)
        if dataclasses.is_dataclass(default):  # the preset's model family gives the options
            add_options(target, type(default), default, prefix=dest + ".")
        else:
            _option(target, f, hints[f.name], dest=dest, default=default)
    return sections


def apply(base: Any, overrides: Mapping[str, Any]) -> Any:
    """`dataclasses.replace` with dotted names (`model.widths`) for nested dataclasses."""
    nested: dict[str, dict[str, Any]] = {}
    flat = {}
    for name, value in overrides.items():
        head, dot, rest = name.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    for head, sub in nested.items():
        flat[head] = apply(getattr(base, head), sub)
    return dataclasses.replace(base, **flat)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """The dataclass `cls` from JSON values (nested dicts, lists for tuples); unknown names raise
    ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} fields {unknown}: written by another version of this code?"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            value = from_dict(hints[name], value)
        elif isinstance(value, dict):  # a union of dataclasses: the one with these fields
            value = from_dict(dataclass_of(hints[name], set(value)), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def dataclass_of(hint: Any, names: set[str]) -> type:
    """The dataclass in a union annotation (`UViTConfig | MLPConfig`) that has all these fields."""
    for cls in typing.get_args(hint):
        if names <= {f.name for f in dataclasses.fields(cls)}:
            return cls
    raise ValueError(f"no {hint} has the fields {sorted(names)}: written by another version?")
