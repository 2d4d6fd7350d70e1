"""`mbv2 data demo | photos | check`: write the demo and photo sets, check a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mbv2train.cli.app import data_app, reports_user_errors
from mbv2train.words import plural

# The commands import their code (and torch) inside, so that --help stays fast (see __init__.py).


@data_app.command("demo")
@reports_user_errors
def data_demo(dest: Annotated[Path, typer.Argument(help="Folder to write train/ and val/ into.")]) -> None:
    """Write the digits demo set: 1,797 real scans in 10 classes.

    scikit-learn's handwritten digits, as an ImageFolder of PNGs.
    """
    from mbv2train.config import preflight

    preflight.for_dataset_writer(dest, "data demo")
    from mbv2train.data.demo import write_demo_dataset

    info = write_demo_dataset(dest)
    state = "written" if info["created"] else "already there"
    typer.echo(f"digits demo dataset {state}: {dest} ({info['train']} train / {info['val']} val images, "
               f"{plural(info['classes'], 'class')})")


@data_app.command("photos")
@reports_user_errors
def data_photos(
    dest: Annotated[Path, typer.Argument(help="Folder to write train/ and val/ into.")],
    classes: Annotated[int, typer.Option(min=1, help="Class folders per split.")] = 100,
    per_class: Annotated[int, typer.Option(min=1, help="Training images per class.")] = 50,
    val_per_class: Annotated[Optional[int], typer.Option(
        min=1, help="Validation images per class (default: a tenth of --per-class, at least 1).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes to write with (default: all cores).")] = None,
) -> None:
    """Write an ImageFolder of ImageNet-like JPEGs for benchmarks.

    Cut from scikit-learn's two sample photos, with ImageNet's sizes, shapes and quality (mostly 500x375,
    quality 85-95): real photographic content for `mbv2 bench`, made offline.

    The same options write the same files; a folder already holding them is left as it is.
    """
    from mbv2train.config import preflight

    preflight.for_dataset_writer(dest, "data photos")
    from mbv2train.data import available_cpus
    from mbv2train.data.demo import write_photo_dataset

    info = write_photo_dataset(dest, classes=classes, per_class=per_class, val_per_class=val_per_class,
                               workers=workers or available_cpus())
    state = "written" if info["created"] else "already there"
    typer.echo(f"photo set {state}: {dest} ({info['train']} train / {info['val']} val JPEGs, "
               f"{plural(info['classes'], 'class')})")


@data_app.command("check")
@reports_user_errors
def data_check(
    folder: Annotated[Path, typer.Argument(help="A dataset root (train/ and val/ inside) or one split folder.")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes to scan with (default: all cores).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail on warnings too (files that train fine but other tools may misread).")] = False,
) -> None:
    """Scan a dataset for unreadable images and class-folder mistakes.

    Finds unreadable images, empty or mismatched class folders and wrong extensions. Exits 1 when it finds
    an error (training would stop or lose files), 0 otherwise; warnings (e.g. PNG data in a .jpg file) are
    reported but exit 0 unless --strict. A folder that is missing or holds a single class is one line and
    exit 2.
    """
    from mbv2train.config import preflight

    preflight.for_data_check(folder)
    from mbv2train.data.check import check_dataset, format_report

    report = check_dataset(folder, workers=workers, strict=strict)
    typer.echo(json.dumps(report) if as_json else format_report(report))
    raise typer.Exit(0 if report["ok"] else 1)
