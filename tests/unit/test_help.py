"""`--help` of every command: flags without a value placeholder, arguments by name, one line per command in
the command lists, and descriptions wrapped once, by the terminal."""

import json
import re

import pytest
import typer.main
from typer.testing import CliRunner

from mbv2train.cli import app


def command_paths(command, path=()) -> list[tuple[str, ...]]:
    """The path of every visible command and group under ``command`` (a click command), itself first."""
    paths = [path]
    if hasattr(command, "commands"):  # a group
        for name, sub in command.commands.items():
            if not sub.hidden:
                paths += command_paths(sub, (*path, name))
    return paths


ALL = command_paths(typer.main.get_command(app))


def help_text(path: tuple[str, ...], columns: int) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def usage_line(text: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith("Usage:"))


def panel_rows(text: str, title: str) -> list[str]:
    """The lines inside the box titled ``title``, without its borders."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"╭─ {title} "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    return [line.strip("│").rstrip() for line in lines[start + 1:end]]


def description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first box, each as the lines it takes."""
    lines = text.splitlines()
    usage = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    paragraphs, current = [], []
    for line in lines[usage + 1:end]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else [])


def test_the_command_tree_is_walked():
    assert {("train",), ("eval",), ("data", "check"), ("bench", "train"), ("config", "show")} <= set(ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda path: " ".join(path) or "mbv2")
def test_flags_show_no_value_placeholder_and_arguments_show_their_name(path):
    text = help_text(path, 100)
    assert "<bool>" not in text
    assert not re.search(r"\{\w+\}", usage_line(text)), usage_line(text)


def test_arguments_read_as_names_in_the_usage_line():
    assert usage_line(help_text(("data", "check"), 100)).endswith(" data check [OPTIONS] FOLDER")
    assert usage_line(help_text(("predict",), 100)).endswith(" predict [OPTIONS] PATHS...")


@pytest.mark.parametrize("path", [(), ("config",), ("data",), ("bench",)], ids=lambda p: " ".join(p) or "mbv2")
def test_each_command_is_listed_on_one_line_of_an_80_column_terminal(path):
    rows = panel_rows(help_text(path, 80), "Commands")
    # a continuation line of a wrapped description starts with blanks where the command's name stands
    assert rows and all(not row.startswith("  ") for row in rows), "\n".join(rows)


@pytest.mark.parametrize("path", ALL, ids=lambda path: " ".join(path) or "mbv2")
def test_descriptions_are_wrapped_by_the_terminal_only(path):
    # on a terminal wide enough for any paragraph, a paragraph broken over lines was wrapped in the source
    paragraphs = description(help_text(path, 1000))
    assert paragraphs
    assert all(len(lines) == 1 for lines in paragraphs), paragraphs


def test_json_is_still_a_flag(cli):
    result = cli("summary", "--json", "--depth", "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "MobileNetV2"
    assert cli("summary", "--json", "true").exit_code == 2  # a flag takes no value
