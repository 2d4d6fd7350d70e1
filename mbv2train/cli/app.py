"""The Typer apps every command module registers on, the shared options, and the error wrapper."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train import __version__, cpu_threads, launch
from mbv2train.cli.helptext import Typer
from mbv2train.errors import UserError

app = Typer(
    help="Train, evaluate and inspect MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = Typer(help="Inspect and check YAML configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = Typer(help="Datasets: write the demo and photo sets, check a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
bench_app = Typer(help="Measure where training time goes: loader, model step, both.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML config file; settings it leaves out keep their defaults.")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one setting, e.g. --set model.width_mult=0.75 (repeatable).")]
DataOption = Annotated[Optional[Path], typer.Option(
    help="Dataset folder with train/ and val/ inside (sets data.root).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def echo_once(text: str, err: bool = False) -> None:
    """typer.echo, but under torchrun once per job: the processes of a job meet a stop, and most mistakes,
    all at once, and their copies of the same line would only repeat it (distributed.first_to_say). A line
    that only one process has, such as its own failure, is said by that process."""
    if launch.world_size() > 1:  # torch is imported only here: a config mistake outside torchrun goes without
        from mbv2train.distributed import first_to_say

        if not first_to_say(text):
            return
    typer.echo(text, err=err)


def reports_user_errors(command):
    """Turn the project's UserError into one line on stderr and its exit code (2, or 1 for a failed check),
    never a traceback; under torchrun, one line per job (echo_once)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            exc.__traceback__ = None  # frees a failed DataLoader's workers now, not at some later collection
            one_line = str(exc).replace("\n", "\\n")  # a value typed with a newline stays on the line
            echo_once(f"error: {one_line}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            echo_once("error: interrupted; nothing was saved for the current step", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if not _cut_short_by_ctrl_c(exc):
                raise
            echo_once("error: interrupted; nothing was saved for the current step", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _cut_short_by_ctrl_c(exc: BaseException) -> bool:
    """Whether an error was raised while a KeyboardInterrupt was unwinding: a Ctrl-C can land inside a
    library's half-done bookkeeping (tqdm's lock, say), whose cleanup then fails with an error of its own."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mbv2train {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train, evaluate and inspect MobileNetV2 (Sandler et al., 2018) on ImageNet-style image folders."""
    cpu_threads.start_reading()  # before torch: importing it is the interval other processes' load is read over
