import io
import time
import zlib

import pytest
from typer.testing import CliRunner

from mbv2train.cli import app


def _pin_torch_threads() -> None:
    """OMP_NUM_THREADS set to torch's own count, unless a thread variable is set already: commands run in
    this process or started from it then leave the count alone (mbv2train/cpu_threads.py), so a test gives
    the same floats however busy the machine is, and a resumed run the same as an uninterrupted one. The
    tests of the choice itself remove the variable."""
    import os

    from mbv2train.cpu_threads import THREAD_ENV_VARS

    if not any(os.environ.get(name, "").strip() for name in THREAD_ENV_VARS):
        import torch

        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


_pin_torch_threads()


@pytest.fixture
def cli():
    """Run ``mbv2 ARGS...`` in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def shared_umask():
    """The umask 027 for the test (the group may read new files, others nothing); gives the mode a new file
    then has, 0640. mkstemp's files are 0600 whatever the umask, so this tells the two apart."""
    import os

    before = os.umask(0o027)
    yield 0o640
    os.umask(before)


@pytest.fixture
def write_yaml(tmp_path):
    """Write text to a YAML file in tmp_path and return its path."""

    def write(text: str, name: str = "config.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


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


TINY_RUN = [
    "model.width_mult=0.25", "data.image_size=16", "data.val_resize=16", "data.val_crop=16",
    "data.batch_size=8", "data.num_workers=0", "data.hflip=0.5", "optim.lr=0.05", "schedule.warmup_epochs=0.5",
    "train.epochs=2", "train.log_every_steps=1", "train.tb_images=4",
]


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """A small 3-class dataset shared by the training tests (read-only: tests must not write into it)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def tiny_config(image_root, tmp_path):
    """load_config for a seconds-long CPU run on image_root, writing into tmp_path/run."""
    from mbv2train.config import load_config

    def make(*overrides: str, run_dir=None):
        run_dir = run_dir or tmp_path / "run"
        return load_config(None, [*TINY_RUN, f"data.root={image_root}", f"train.output_dir={run_dir}", *overrides])

    return make


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
        import time

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


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """(digits root, best.pt) of the demo recipe (configs/demo.yaml) trained for 3 of its 10 epochs: a real,
    imperfect model for the export and quantization tests (about 25 s on 2 cores)."""
    pytest.importorskip("sklearn")
    from pathlib import Path

    from mbv2train.data.demo import write_demo_dataset

    base = tmp_path_factory.mktemp("trained_digits")
    root = base / "digits"
    write_demo_dataset(root)
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = CliRunner().invoke(app, ["train", "--config", str(demo), "--data", str(root), "--output-dir",
                                      str(base / "run"), "--set", "train.epochs=3", "--set", "train.tb_images=0"])
    assert result.exit_code == 0, result.output[-3000:]
    return root, base / "run" / "best.pt"
