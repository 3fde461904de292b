"""Dataclasses from their JSON form: one reading of ``to_dict``'s output for every settings, config and record type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def from_json(cls: type, data: Mapping, *, error: type[Exception] = ValueError, tuples: bool = False, where: str = ""):
    """``cls(**data)``, refusing keys that are not fields of ``cls`` (a misspelt or foreign file) with ``error``
    (its message starts with ``where``); ``tuples`` turns JSON lists back into the tuples the fields hold."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{where}unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {k: tuple(v) if tuples and isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)
