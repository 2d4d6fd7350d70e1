"""Install torch, torchvision and mbv2train (with extras) into the virtual environment running this script.

Run by `make demo` and `make test` with the venv's own Python, for example

    .venv/bin/python scripts/install_venv.py --extras demo --torch-spec "torch==2.14.1 torchvision==0.29.1"

Why uv: the CUDA build of torch is about 5.5 GB of files once unpacked. pip unpacks wheels one after the
other (about 75 s on two cores); uv unpacks them in parallel (about 25 s). uv does not read pip's
configuration, so the package indexes, wheel folders and constraints that pip is configured with (pip.conf
files and PIP_* variables, as `pip config list` shows them) are handed to uv as options: both installers
then see the same packages. When uv cannot be installed, or fails, pip does the install instead.

Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# pip option (as named in pip's config) -> uv option. Options pip may list that uv has no use for
# (timeouts, the version check, certificates) are left out; uv reads SSL_CERT_FILE for certificates.
_LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
_SINGLE_OPTIONS = {"index-url": "--index-url"}
_FLAG_OPTIONS = {"no-index": "--no-index"}
# Where pip reads install options from, lowest priority first: config files, then environment variables.
_SECTION_PRIORITY = {"global": 0, "install": 1, ":env:": 2}


def parse_pip_config(listing: str) -> dict[str, str]:
    """Read `pip config list` output (lines of `section.key='value'`) into {key: value}.

    When a key is set in several places, the one pip itself gives priority wins: an environment variable
    over an `install` section over a `global` section.
    """
    chosen: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, sep, raw_value = line.partition("=")
        if not sep or "." not in name:
            continue
        section, _, key = name.rpartition(".")
        if section not in _SECTION_PRIORITY:
            continue
        try:
            value = ast.literal_eval(raw_value)
        except (ValueError, SyntaxError):
            value = raw_value
        priority = _SECTION_PRIORITY[section]
        if key not in chosen or priority >= chosen[key][0]:
            chosen[key] = (priority, str(value))
    return {key: value for key, (_, value) in chosen.items()}


def uv_options_from_pip_config(config: dict[str, str]) -> list[str]:
    """Translate pip's configured sources into uv options, so uv finds what pip would find."""
    options: list[str] = []
    for key, flag in _SINGLE_OPTIONS.items():
        if config.get(key):
            options += [flag, config[key]]
    for key, flag in _LIST_OPTIONS.items():
        # pip keeps several values in one setting, separated by spaces or new lines.
        for value in config.get(key, "").split():
            options += [flag, value]
    for key, flag in _FLAG_OPTIONS.items():
        if config.get(key, "").strip().lower() in {"1", "true", "yes", "on"}:
            options.append(flag)
    if options:
        # pip takes the best version found on any index; uv by default stops at the first index that has
        # the package. Ask uv for pip's behaviour so both install the same versions.
        options += ["--index-strategy", "unsafe-best-match"]
    return options


def requirements(torch_spec: str, extras: str) -> list[str]:
    """The torch packages (or options for them) and the project itself, editable, with its extras."""
    target = str(PROJECT_ROOT) + (f"[{extras}]" if extras else "")
    return shlex.split(torch_spec) + ["-e", target]


def uv_install_command(python: str, reqs: list[str], pip_config: dict[str, str], compile_bytecode: bool) -> list[str]:
    command = [python, "-m", "uv", "pip", "install", "--quiet", "--python", python]
    command += uv_options_from_pip_config(pip_config)
    if compile_bytecode:
        # uv compiles every file in site-packages, also those installed by an earlier run without it.
        command.append("--compile-bytecode")
    return command + reqs


def pip_install_command(python: str, reqs: list[str], compile_bytecode: bool) -> list[str]:
    command = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not compile_bytecode:
        command.append("--no-compile")
    return command + reqs


def _run(command: list[str]) -> int:
    print("+ " + shlex.join(command), flush=True)
    return subprocess.call(command)


def _pip_config_listing(python: str) -> str:
    result = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


def install(installer: str, torch_spec: str, extras: str, compile_bytecode: bool) -> int:
    python = sys.executable
    reqs = requirements(torch_spec, extras)
    if installer in ("auto", "uv"):
        got_uv = _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "uv>=0.5"]) == 0
        if got_uv:
            command = uv_install_command(python, reqs, parse_pip_config(_pip_config_listing(python)), compile_bytecode)
            if _run(command) == 0:
                return 0
            reason = "uv could not install the packages"
        else:
            reason = "uv could not be installed"
        if installer == "uv":
            print(f"error: {reason}", file=sys.stderr)
            return 1
        print(f"warning: {reason}; installing with pip instead", file=sys.stderr, flush=True)
    return _run(pip_install_command(python, reqs, compile_bytecode))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-spec", default="torch torchvision", help="torch requirements (and pip/uv options)")
    parser.add_argument("--extras", default="", help="comma-separated extras of mbv2train, e.g. dev,demo")
    parser.add_argument("--installer", choices=("auto", "uv", "pip"), default="auto",
                        help="auto: uv, falling back to pip (default)")
    parser.add_argument("--compile", dest="compile_bytecode", action=argparse.BooleanOptionalAction, default=True,
                        help="byte-compile installed files (default: yes)")
    args = parser.parse_args(argv)
    if sys.prefix == sys.base_prefix:
        parser.error(f"{sys.executable} is not a virtual environment's Python; run this with .venv/bin/python")
    return install(args.installer, args.torch_spec, args.extras, args.compile_bytecode)


if __name__ == "__main__":
    sys.exit(main())
