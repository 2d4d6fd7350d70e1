"""What many test files need and is not a fixture: datasets written on the spot, `mbv2 train` argument lists,
the torchrun command line, reading checkpoints and metrics.jsonl, and waiting on child processes. Imported as
``from helpers import ...`` (pyproject.toml puts tests/ on sys.path); fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SUPPORT = TESTS / "support"  # scripts the tests start as processes (probes) and model builders they import

# A seconds-long CPU run: 24 train and 12 val images of 16 px (image_root), 3 steps of 8 per epoch, 2 epochs.
TINY_RUN = [
    "model.width_mult=0.25", "data.image_size=16", "data.val_resize=16", "data.val_crop=16",
    "data.batch_size=8", "data.num_workers=0", "data.hflip=0.5", "optim.lr=0.05", "schedule.warmup_epochs=0.5",
    "train.epochs=2", "train.log_every_steps=1", "train.tb_images=4",
]

# 2 images per step, 12 steps per epoch on image_root: room to stop mid-epoch.
SMALL_STEPS = ["data.batch_size=2", "train.ema=true", "train.epochs=2"]

# The CPUs this process may use: the thread count the suite computed with before it ran on xdist workers of
# one thread each (conftest.py).
MACHINE_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(count: int):
    """Compute with ``count`` torch threads inside the block (OMP_NUM_THREADS too, which mbv2 then keeps).
    For the few fixtures whose figures a test holds to a threshold measured with the machine's own count:
    the floats of a trained model depend on the thread count, and a threshold such as int8's drop of at most
    a point was measured on that model, not on a one-thread one."""
    import torch

    before, before_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


# ------------------------------------------------------------------------------------------ datasets

def make_image_folder(root, classes=("circle", "square", "triangle"), train_per_class=8, val_per_class=4,
                      size=24):
    """An ImageFolder root/{train,val}/<class>/*.png of learnable images: each class has its own tint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.zeros(3)
            tint[c % 3] = 160
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3)) + tint
                Image.fromarray(pixels.clip(0, 255).astype("uint8"), "RGB").save(folder / f"{i:03d}.png")
    return root


def write_images(folder, count: int, size=(20, 24), start: int = 0, ext: str = ".png"):
    """``count`` random RGB images folder/img{start}..{ext}; the same folder and start give the same pixels."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(zlib.crc32(str(folder).encode()) + start)
    for i in range(start, start + count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=gen)
        Image.fromarray(pixels.numpy(), "RGB").save(folder / f"img{i}{ext}")


def write_dataset(root, classes, train_per_class: int, val_per_class: int):
    """root/{train,val}/<class>/img*.png of random pixels (write_images); returns root."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            write_images(root / split / name, count)
    return root


def truncated_jpeg() -> bytes:
    """The first half of a valid 64x64 JPEG: opens, but fails to decode."""
    import torch
    from PIL import Image

    buffer = io.BytesIO()
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:buffer.tell() // 2]


# ------------------------------------------------------------------------------------------ commands

def train_args(data, run, *overrides: str, base: Sequence[str] = TINY_RUN, options: Sequence[Any] = ()) -> list[str]:
    """``train --data DATA --output-dir RUN OPTIONS... --set ITEM...`` for each of ``base`` then ``overrides``
    (later items win): the arguments of `mbv2 train` for the cli fixture or a child process."""
    args = ["train", "--data", str(data), "--output-dir", str(run), *map(str, options)]
    for item in [*base, *overrides]:
        args += ["--set", item]
    return args


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, 1 torch thread per process (several run side by side
    on few cores) and unbuffered output (a test reads lines as they come)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun_command(*args: Any, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS...``: one machine, a free
    rendezvous port each time (so runs, and test workers, can go side by side). ``args`` are torchrun's own
    options, then the program (``-m mbv2train ...`` or a script) and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *map(str, args)]


def torchrun(args: Sequence[Any], *faults: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mbv2 ARGS --fault F...`` in ``nproc`` processes under torchrun, run to the end; the CompletedProcess."""
    fault_args = [item for fault in faults for item in ("--fault", fault)]
    return subprocess.run(torchrun_command("-m", "mbv2train", *args, *fault_args, nproc=nproc), env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def eval_json(cli, *args: Any) -> dict:
    """``mbv2 eval ARGS --json`` through the cli fixture, which must succeed; its JSON report."""
    import json

    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def start(args: Sequence[Any]) -> subprocess.Popen:
    """``python -m mbv2train ARGS`` started in its own session (a test may signal its whole group), with pipes."""
    return subprocess.Popen([sys.executable, "-m", "mbv2train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def progress_line(global_step: int, steps_per_epoch: int = 12, epochs: int = 2) -> str:
    """How the plain progress output (stdout not a terminal) starts the line of an optimizer step."""
    epoch, step = divmod(global_step - 1, steps_per_epoch)
    return f"epoch {epoch + 1}/{epochs} {step + 1}/{steps_per_epoch} "


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun process started (its children carrying RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


# ------------------------------------------------------------------------------------------ a run's files

def load_ckpt(path) -> dict:
    """A checkpoint file read as mbv2 reads its own: torch.load with weights_only=True."""
    import torch

    return torch.load(path, weights_only=True)


def run_ckpt(run, name: str = "last.pt") -> dict:
    """The checkpoint ``name`` (last.pt unless told) of the run directory ``run``, weights only."""
    return load_ckpt(Path(run) / name)


def run_metrics(run) -> list[dict]:
    """The rows of run/metrics.jsonl, as written (none if the file is not there)."""
    from mbv2train.train.tracking import read_metrics

    return read_metrics(Path(run) / "metrics.jsonl")


def metric_rows(run) -> list[dict]:
    """run/metrics.jsonl without the timing columns: what two runs that compute the same must share."""
    from mbv2train.train.tracking import without_timing

    return [without_timing(row) for row in run_metrics(run)]


def read_events(run):
    """The TensorBoard events of run/tb, everything kept (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run) / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def same_state(a: dict, b: dict) -> None:
    """Model, EMA and optimizer state of two checkpoints are bit-identical."""
    import torch

    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for index, values in a["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"
    assert a["global_step"] == b["global_step"]


# ------------------------------------------------------------------------------------------ waiting

def wait_until(condition, what: str, timeout: float = 300):
    """Poll ``condition`` until it returns something true (which is returned): for events a test cannot be
    told of (a file appearing, a process starting); AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class LineReader:
    """Reads a child process's text stream on a thread, so a test can wait for a line without blocking
    forever on a pipe and without a fixed sleep."""

    def __init__(self, stream):
        import queue
        import threading

        self.lines: list[str] = []
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 300) -> str:
        """The first line (from now on) containing ``text``; fails if the stream ends or time runs out."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; "
                                     f"got:\n{self.text(finished=False)}") from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"the stream ended without a line with {text!r}; "
                                     f"got:\n{self.text(finished=False)}")
            self.lines.append(line)
            if text in line:
                return line

    def text(self, finished: bool = True) -> str:
        """Everything read so far; with ``finished`` (the process has ended), everything it wrote."""
        import queue

        if finished:
            self._thread.join(timeout=60)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return "".join(self.lines)
