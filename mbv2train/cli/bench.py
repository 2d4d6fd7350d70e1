"""`mbv2 bench data | model | train`: measure the loader, the model step, and both together."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import (ConfigOption, DataOption, JsonOption, SetOption, bench_app,
                               reports_user_errors)

# The commands import their code (and torch) inside, so that --help stays fast (see __init__.py).


def _load(config, overrides, **options):
    from mbv2train.config import load_config

    return load_config(config, overrides or [], options=options)


def _print(result: dict, as_json: bool, text) -> None:
    typer.echo(json.dumps(result) if as_json else text(result))


@bench_app.command("data")
@reports_user_errors
def bench_data(
    config: ConfigOption = None,
    data: DataOption = None,
    decode: Annotated[Optional[str], typer.Option(
        help="Where JPEGs are decoded: workers or device (sets data.decode).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Loader worker processes (sets data.num_workers); 0: the main process alone, on one thread, "
             "which gives the figure per core.")] = None,
    batches: Annotated[Optional[int], typer.Option(
        min=1, help="Timed batches per pipeline, over 3 rounds (default: 30, or 12 per worker if more).")] = None,
    reference: Annotated[bool, typer.Option(
        "--reference/--no-reference",
        help="Also measure torchvision's reference pipeline (PIL, float in the workers), in alternating "
             "rounds.")] = True,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Time the training loader alone, against torchvision's pipeline.

    Images/s, in all and per worker. Both read the same folder with the same batch size and workers, in
    alternating rounds; with --workers 0 each runs in this process on one thread, so the figure is per core.
    """
    cfg = _load(config, overrides, **{"data.root": ("--data", str(data) if data is not None else None),
                                      "data.decode": ("--decode", decode),
                                      "data.num_workers": ("--workers", workers)})
    from mbv2train.config import preflight

    preflight.for_bench(cfg)
    from mbv2train.bench.data import bench_data as measure, format_data_result

    _print(measure(cfg, batches=batches, reference=reference), as_json, format_data_result)


@bench_app.command("model")
@reports_user_errors
def bench_model(
    config: ConfigOption = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Images per step (default: data.batch_size).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (sets train.device).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        min=1, help="Timed steps per setting (default: 3 on a CPU, 50 on a GPU).")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        min=1, help="Untimed steps first (default: 1 on a CPU, 10 on a GPU).")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(
        help="fp32, bf16 or fp16 (repeatable; default: all the device has).")] = None,
    memory_format: Annotated[Optional[list[str]], typer.Option(
        help="contiguous or channels_last (repeatable; default: both).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Also each setting under torch.compile.")] = False,
    reference: Annotated[bool, typer.Option(
        "--reference/--no-reference", help="Also time a textbook PyTorch loop (fp32, contiguous).")] = True,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Time the model step alone, per precision and memory format.

    Training and inference images/s on synthetic batches already in memory; with --compile also each
    setting under torch.compile; peak memory on a GPU. The model and the image size come from the config.
    """
    cfg = _load(config, overrides, **{"train.device": ("--device", device)})
    from mbv2train.bench.model import MEMORY_FORMATS, bench_model as measure, format_model_result
    from mbv2train.devices import resolve_device

    where = resolve_device(cfg.train.device)
    on_gpu = where.type == "cuda"
    result = measure(cfg, where, batch_size=batch_size or cfg.data.batch_size,
                     steps=steps or (50 if on_gpu else 3), warmup=warmup or (10 if on_gpu else 1),
                     precisions=precision, memory_formats=memory_format or MEMORY_FORMATS, compile=compile,
                     reference=reference)
    _print(result, as_json, format_model_result)


@bench_app.command("train")
@reports_user_errors
def bench_train(
    config: ConfigOption = None,
    data: DataOption = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed training steps.")] = 50,
    warmup: Annotated[Optional[int], typer.Option(
        min=1, help="Untimed steps first (default: a fifth of --steps, 2 to 20).")] = None,
    worker_trial: Annotated[bool, typer.Option(
        "--worker-trial/--no-worker-trial",
        help="When the steps wait for data and CPUs are left, time them again with more loader workers, and "
             "advise more only if that was faster.")] = True,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Time real training steps, loader and model together.

    Images/s, the time spent waiting for data; data-bound, compute-bound, or oversubscribed (other
    processes held CPUs the run needed). The steps run as `mbv2 train` runs them, with the threads it would
    choose, without a run directory, checkpoints or validation.
    """
    cfg = _load(config, overrides, **{"data.root": ("--data", str(data) if data is not None else None)})
    from mbv2train.config import preflight

    preflight.for_bench(cfg)
    from mbv2train.bench.train import bench_train as measure, format_train_result

    result = measure(cfg, steps=steps, warmup=warmup or max(2, min(20, steps // 5)), worker_trial=worker_trial)
    _print(result, as_json, format_train_result)
