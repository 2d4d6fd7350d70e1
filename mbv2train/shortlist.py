"""How a message lists names (classes, files, keys): the first few, then how many it left out.

A list cut short without a count ("missing: 2, 4, 5, 6, 7") reads as complete; every message that names
a set of things goes through here so that none hides how many there are.
"""

from __future__ import annotations

from typing import Iterable

SHOWN = 5  # names a message lists before "and N more"


def shortlist(names: Iterable[object], limit: int = SHOWN) -> str:
    """"a, b, c" for up to ``limit`` names; "a, b, c, d, e and 3 more" past it; "-" for none."""
    names = [str(name) for name in names]
    if not names:
        return "-"
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def differences(left_name: str, left: Iterable[str], right_name: str, right: Iterable[str]) -> str:
    """What two sets of names do not share: "only in train: a, b; only in val: c" (sorted, shortlisted)."""
    left, right = set(left), set(right)
    parts = [f"only in {name}: {shortlist(sorted(only))}"
             for name, only in ((left_name, left - right), (right_name, right - left)) if only]
    return "; ".join(parts)
