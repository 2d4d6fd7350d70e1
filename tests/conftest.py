"""Fixtures for every test (unit/ and integration/); what is not a fixture is in helpers.py. Under
pytest-xdist each worker computes with 1 torch thread, so that 2 workers on 2 cores do not oversubscribe them."""

import os

import pytest
from typer.testing import CliRunner

from helpers import MACHINE_THREADS, REPO, TINY_RUN, make_image_folder, torch_threads
from mbv2train.cli import app


def _pin_torch_threads() -> None:
    """OMP_NUM_THREADS set to torch's own count, unless a thread variable is set already: commands run in
    this process or started from it then leave the count alone (mbv2train/cpu_threads.py), so a test gives
    the same floats however busy the machine is, and a resumed run the same as an uninterrupted one. The
    tests of the choice itself remove the variable.

    A pytest-xdist worker (PYTEST_XDIST_WORKER set) takes 1 thread instead, whatever the controller passed
    down: the workers share the machine's cores, and a fixed count keeps the floats the same there too."""
    from mbv2train.cpu_threads import THREAD_ENV_VARS

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif not any(os.environ.get(name, "").strip() for name in THREAD_ENV_VARS):
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


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """(digits root, best.pt) of the demo recipe (configs/demo.yaml) trained for 3 of its 10 epochs: a real,
    imperfect model for the export and quantization tests (about 25 s on 2 cores)."""
    pytest.importorskip("sklearn")
    from mbv2train.data.demo import write_demo_dataset

    base = tmp_path_factory.mktemp("trained_digits")
    root = base / "digits"
    write_demo_dataset(root)
    demo = REPO / "configs" / "demo.yaml"
    with torch_threads(MACHINE_THREADS):  # the model test_quantize's int8 threshold was measured on
        result = CliRunner().invoke(app, ["train", "--config", str(demo), "--data", str(root), "--output-dir",
                                          str(base / "run"), "--set", "train.epochs=3", "--set", "train.tb_images=0"])
    assert result.exit_code == 0, result.output[-3000:]
    return root, base / "run" / "best.pt"
