"""Print the config reference table (every key, its default and meaning) as Markdown.

README.md's "Config reference" section is this script's output; tests/unit/test_docs.py checks they agree.
    .venv/bin/python scripts/config_reference.py
"""

from mbv2train.config import describe_settings


def reference_table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for row in describe_settings():
        default = row["default"]
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        if isinstance(default, list):
            shown = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in default) + "]"
        lines.append(f"| `{row['key']}` | {shown} | {row['help']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
