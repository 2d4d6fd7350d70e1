import glob
import importlib.util
import re

import pytest

from helpers import REPO
from mbv2train.config import load_config

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Files the pages name as they name a command: scripts/..., configs/..., mbv2train/..., tests/..., docs/...
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|configs|mbv2train|tests|docs)/[\w.*/-]*[\w*])")
# Named in the measurements they took, though no longer shipped.
FORMER_FILES = {"scripts/benchmark.py"}


def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """The page without its code blocks (lines indented by four spaces)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("    "))


def code_lines(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("    ")]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_the_config_reference_in_docs_matches_the_config_classes():
    module = config_reference()
    text = (REPO / "docs" / "CONFIG.md").read_text()
    assert module.documented_table(text) == module.reference_table()


def test_the_config_reference_writer_leaves_a_current_page_as_it_is(tmp_path):
    module = config_reference()
    page = tmp_path / "CONFIG.md"
    text = (REPO / "docs" / "CONFIG.md").read_text()
    page.write_text(text.replace("| `model.dropout` |", "| `model.dropout_old` |"))
    module.write(page)
    assert page.read_text() == text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_file_a_page_names_exists(page):
    named = set(REPO_PATH.findall(page.read_text())) - FORMER_FILES
    assert sorted(path for path in named if not glob.glob(str(REPO / path))) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_mbv2_command_a_page_shows_exists_with_its_options(page):
    """Each `mbv2 ...` line of a code block names a real command, and each --option is one of its own."""
    import typer

    from mbv2train.cli import app

    root = typer.main.get_command(app)
    wrong = []
    for line in code_lines(page.read_text()):
        if not line.startswith("mbv2 "):
            continue
        words = line.split("#")[0].split()[1:]
        command, path = root, ["mbv2"]
        while words and hasattr(command, "commands") and words[0] in command.commands:
            command = command.commands[words[0]]
            path.append(words.pop(0))
        known = {"--help"} | {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words:
            if word.startswith("--") and word.split("=")[0] not in known:
                wrong.append(f"{' '.join(path)}: {word}")
        if hasattr(command, "commands") and words and not words[0].startswith("-"):
            wrong.append(f"{' '.join(path)}: no command {words[0]}")
    assert wrong == []


def test_the_readme_links_every_page_in_docs_and_keeps_the_test_command():
    readme = (REPO / "README.md").read_text()
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    assert {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")} <= linked
    assert "    make test " in readme


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_source(path):
    load_config(path)
    assert path.read_text().startswith("#")
