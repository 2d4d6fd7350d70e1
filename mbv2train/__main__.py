"""Lets ``python -m mbv2train`` work like the ``mbv2`` command."""

from mbv2train.cli import main

main()
