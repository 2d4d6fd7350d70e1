"""How `--help` reads: every Typer app of the CLI is a ``Typer`` from here, so each of its commands and
groups gets these habits without repeating them at every command.

- A flag takes no value, so it shows no type placeholder (Typer writes ``<bool>`` beside ``--json``, which
  then reads as if ``--json true`` were accepted).
- Arguments read as names in the usage line (``FOLDER``, ``PATHS...``), as in man pages, not ``{folder}``.
- Docstrings are wrapped for the source file; the terminal wraps again, so a paragraph is joined into one
  line first, or it breaks twice, mid-sentence.
"""

from __future__ import annotations

import inspect

import typer
from typer.core import TyperCommand, TyperGroup


def unwrapped(text: str) -> str:
    """``text`` with each paragraph (blocks between blank lines) on one line."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _without_placeholder(param) -> None:
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # Typer shows a metavar that is set, and shows nothing for an empty one


class _ReadableHelp:
    """What commands and groups share: unwrapped descriptions, flags without placeholders."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = unwrapped(self.help)
        for param in self.params:
            _without_placeholder(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _without_placeholder(option)
        return option


class Command(_ReadableHelp, TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.name.upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class Group(_ReadableHelp, TyperGroup):
    pass


class Typer(typer.Typer):
    """typer.Typer whose groups and commands are the ones above."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)
