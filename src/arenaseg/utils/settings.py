"""Settings fields declared once: each dataclass field carries its default, its rule and its help, and the validator,
the JSON reader and the command line all read that one declaration.

- ``integer``, ``number``, ``choice``, ``flag``, ``text``: a field with its rule (``ok``/``need``) and ``help``;
  ``same_as`` reuses another class's field, default, rule and help (one definition per concept).
- ``Config``: a dataclass base that checks every rule on construction (numbers with ``math.isfinite`` first: NaN and
  inf pass any comparison). Errors are ``ValueError`` naming ``Class.field``; a subclass may raise the project's
  UserError instead (``error``).
- ``add_arguments`` / ``from_arguments``: argparse options made from the fields (flag, type, choices, default and
  help), and the dataclass values read back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any, ClassVar

from arenaseg.utils.dataclass_json import from_json

REQUIRED = dataclasses.MISSING


def is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def described(default: Any = REQUIRED, help: str = "", **cli: Any) -> Any:
    """A field with its command-line declaration: ``help``, and optionally ``flag`` (the option's name when it is
    not the field's), ``parse`` (text -> value), ``choices``, ``cube`` (one number on the command line for a
    3-tuple), ``default_text`` (what the help says of a default such as None) and ``negatable`` (False: a switch
    with no --no- form)."""
    return field(default=default, metadata={"help": help, **cli})


def rule(default: Any, need: str, ok: Callable[[Any], bool], help: str = "", **cli: Any) -> Any:
    """A field with its rule: ``ok(value)`` must hold, else "must be ``need``"."""
    return described(default, help, need=need, ok=ok, **cli)


def integer(default: int | None, minimum: int, *, optional: bool = False, help: str = "", **cli: Any) -> Any:
    need = f"an integer >= {minimum}" + (" or None" if optional else "")
    ok = lambda v: (optional and v is None) or is_int(v, minimum)  # noqa: E731
    return rule(default, need, ok, help, parse=int, **cli)


def number(
    default: float | None, minimum: float, *, above: bool = False, optional: bool = False, help: str = "", **cli: Any
) -> Any:
    """A finite number >= ``minimum`` (> with ``above``)."""
    need = f"{'>' if above else '>='} {minimum:g} and finite" + (" (or None)" if optional else "")
    ok = lambda v: (optional and v is None) or (is_number(v) and (v > minimum if above else v >= minimum))  # noqa: E731
    return rule(default, need, ok, help, parse=float, **cli)


def choice(default: str, choices: tuple[str, ...], help: str = "", **cli: Any) -> Any:
    return rule(default, f"one of {', '.join(choices)}", lambda v: v in choices, help, choices=choices, **cli)


def flag(default: bool, help: str = "", **cli: Any) -> Any:
    return rule(default, "True or False", lambda v: isinstance(v, bool), help, **cli)


def same_as(config: type, name: str) -> Any:
    """The field ``name`` of another settings class, default, rule and help: one definition per concept."""
    original = config.__dataclass_fields__[name]
    return field(default=original.default, metadata=original.metadata)


class Config:
    """Base of the settings dataclasses: validated on construction, ``to_dict`` / ``from_dict`` for JSON."""

    error: ClassVar[type[Exception]] = ValueError

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``error`` naming the first field that breaks its rule."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "ok" in f.metadata and not f.metadata["ok"](value):
                raise self.error(f"{type(self).__name__}.{f.name} must be {f.metadata['need']}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        return from_json(cls, d, error=cls.error)


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def option_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parser(f: dataclasses.Field) -> Callable[[str], Any]:
    """Text -> value, checked by the field's rule, so that a bad value is argparse's one-line usage error."""
    parse, ok = f.metadata.get("parse", str), f.metadata.get("ok")

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {f.metadata.get('need', 'valid')}, got {text!r}") from None
        if ok is not None and not ok(value):
            raise argparse.ArgumentTypeError(f"must be {f.metadata['need']}, got {text!r}")
        return value

    return convert


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Iterable[str], **defaults: Any) -> None:
    """One option per field of ``cls`` in ``names``, from its declaration; ``defaults`` replace a field's default
    on this command (the help shows the actual one)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f, meta = fields[name], fields[name].metadata
        default = defaults.get(name, f.default)
        if meta.get("cube") and isinstance(default, tuple):
            default = default[0]
        kwargs: dict[str, Any] = {"dest": name, "help": meta["help"]}
        if default is REQUIRED:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            kwargs["help"] += f" (default: {meta.get('default_text', '%(default)s')})"
        if isinstance(default, bool) or f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
        else:
            kwargs["type"] = _parser(f)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = option_name(f).lstrip("-").replace("-", "_").upper()
        parser.add_argument(option_name(f), **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, names: Iterable[str], **values: Any) -> Any:
    """``cls`` with the fields in ``names`` as parsed (a ``cube`` field from its one number) and ``values``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(args, name)
        values[name] = (value,) * 3 if fields[name].metadata.get("cube") else value
    return cls(**values)
