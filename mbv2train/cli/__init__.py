"""The ``mbv2`` command: parses options and calls one function per command.

torch is imported inside the commands that need it, and only after preflight.py has checked the files
and folders they were given, so ``mbv2 --help``, config errors and a missing checkpoint or data folder
answer at once instead of after the seconds that importing torch takes.

app.py       the Typer apps, shared options, and the wrapper that turns user errors into one line
helptext.py  how --help reads: flags without placeholders, arguments by name, paragraphs wrapped once
training.py  mbv2 train, mbv2 eval
predict.py   mbv2 predict
datasets.py  mbv2 data demo | photos | check
bench.py     mbv2 bench data | model | train
deploy.py    mbv2 export, mbv2 quantize
describe.py  mbv2 summary, mbv2 config show
"""

from __future__ import annotations

import sys

# Importing a command module registers its commands on the app, in this order in --help.
from mbv2train.cli import training  # noqa: F401
from mbv2train.cli import predict  # noqa: F401
from mbv2train.cli import deploy  # noqa: F401
from mbv2train.cli import datasets  # noqa: F401
from mbv2train.cli import bench  # noqa: F401
from mbv2train.cli import describe  # noqa: F401
from mbv2train.cli.app import _cut_short_by_ctrl_c, app, reports_user_errors

__all__ = ["app", "main", "reports_user_errors", "_cut_short_by_ctrl_c"]


def main() -> None:
    app(prog_name="mbv2")


if __name__ == "__main__":
    sys.exit(main())
