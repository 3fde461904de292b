"""The first difference between two JSON-like settings, named by its dotted key: the one way a resume, or a result
reused, under settings other than its own is refused."""

from __future__ import annotations

from collections.abc import Mapping


def first_difference(there: Mapping, here: Mapping, now: str = "now", prefix: str = "") -> str | None:
    """``train.lr is 0.001 there, 0.002 now`` for the first key (``here``'s order, then keys only ``there`` holds)
    whose values differ, looking into the dicts both hold; None when they agree. A missing key reads as None."""
    for key in [*here, *(k for k in there if k not in here)]:
        before, after = there.get(key), here.get(key)
        if before == after:
            continue
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            return first_difference(before, after, now, f"{prefix}{key}.")
        return f"{prefix}{key} is {before!r} there, {after!r} {now}"
    return None
