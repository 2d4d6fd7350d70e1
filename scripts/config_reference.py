"""Print the config reference table (every key, its default and meaning) as Markdown.

docs/CONFIG.md's "Config reference" section is this script's output; tests/unit/test_docs.py checks they agree.
    .venv/bin/python scripts/config_reference.py           # print the table
    .venv/bin/python scripts/config_reference.py --write   # put it into docs/CONFIG.md
"""

import re
import sys
from pathlib import Path

from mbv2train.config import describe_settings

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
# The table sits between these two lines of docs/CONFIG.md.
SECTION = re.compile(r"(<!-- config-reference:.*?-->\n)(.*?)(<!-- end config-reference -->)", re.S)


def reference_table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for row in describe_settings():
        default = row["default"]
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        if isinstance(default, list):
            shown = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in default) + "]"
        lines.append(f"| `{row['key']}` | {shown} | {row['help']} |")
    return "\n".join(lines)


def documented_table(text: str) -> str:
    """The table as the document holds it (empty when the markers are missing)."""
    section = SECTION.search(text)
    return section.group(2).strip() if section else ""


def write(path: Path = CONFIG_DOC) -> None:
    text = path.read_text(encoding="utf-8")
    if not SECTION.search(text):
        sys.exit(f"{path}: no config-reference markers")
    path.write_text(SECTION.sub(lambda m: m.group(1) + reference_table() + "\n" + m.group(3), text, count=1),
                    encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(reference_table())
