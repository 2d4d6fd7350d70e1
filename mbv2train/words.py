"""Counts in words for what mbv2 prints: "1 file", "2 files"."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, with the noun's last word in the plural unless the count is one:
    plural(1, "class") is "1 class", plural(3, "class folder") is "3 class folders"."""
    return f"{count} {noun if count == 1 else _plural_of(noun)}"


def is_or_are(count: int) -> str:
    """The verb that agrees with ``count`` things: "1 CPU is", "2 CPUs are"."""
    return "is" if count == 1 else "are"


def _plural_of(noun: str) -> str:
    # the nouns mbv2 counts are regular: files, classes, processes, batches, CPUs
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
