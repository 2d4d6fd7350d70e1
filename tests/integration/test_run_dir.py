"""A run that fails before its first checkpoint leaves nothing behind: what it created in the run directory
goes again, and only that."""

import shutil

import pytest

from helpers import TINY_RUN
from mbv2train.errors import CheckpointError
from mbv2train.faults import Faults
from mbv2train.preemption import Preempted
from mbv2train.train.trainer import fit

# TensorBoard's writer thread, left running, would fail writing into the folder taken back, with a traceback
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def unreadable_root(image_root, tmp_path):
    """image_root with every training image of one class replaced by bytes no decoder reads: training
    meets one in its first batch (or in the TensorBoard sample drawn before it)."""
    root = tmp_path / "unreadable"
    shutil.copytree(image_root, root)
    for png in (root / "train" / "circle").glob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return root


def train(cli, root, run_dir, *extra):
    """`mbv2 train` of TINY_RUN; ``extra`` holds settings, or options (each followed by its value)."""
    args = ["train", "--data", root, "--output-dir", run_dir]
    items = [*TINY_RUN, *extra]
    while items:
        item = items.pop(0)
        args += [item, items.pop(0)] if item.startswith("--") else ["--set", item]
    return cli(*args)


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("tb_images", [4, 0], ids=["met_by_the_tensorboard_sample", "met_by_the_first_step"])
def test_an_unreadable_image_at_the_start_leaves_no_run_directory(cli, unreadable_root, tmp_path, tb_images):
    run = tmp_path / "runs" / "new" / "run"  # its parents are new too
    result = train(cli, unreadable_root, run, f"train.tb_images={tb_images}")
    assert result.exit_code == 2, result.output
    assert "cannot read image" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_leaves_a_folder_that_was_there_as_it_was(cli, unreadable_root, tmp_path):
    run = tmp_path / "mine"
    (run / "notes").mkdir(parents=True)
    (run / "notes" / "plan.txt").write_text("try lr 0.1")
    (run / "README").write_text("my runs")
    before = listing(run)
    result = train(cli, unreadable_root, run)
    assert result.exit_code == 2, result.output
    assert listing(run) == before
    assert (run / "notes" / "plan.txt").read_text() == "try lr 0.1" and (run / "README").read_text() == "my runs"


def test_a_stop_before_the_first_epoch_ends_keeps_its_checkpoint_and_what_goes_with_it(tiny_config, tmp_path):
    run = tmp_path / "stopped"
    with pytest.raises(Preempted):
        fit(tiny_config("data.batch_size=2", run_dir=run), faults=Faults(sigterm_at_step=1))
    assert {"config.yaml", "last.pt", "tb"} <= set(listing(run))


def test_a_refused_resume_leaves_the_run_it_meant_to_continue(tiny_config, tmp_path):
    run = tmp_path / "done"
    fit(tiny_config("train.epochs=1", run_dir=run))
    before = {name: (run / name).read_bytes() for name in listing(run) if (run / name).is_file()}
    with pytest.raises(CheckpointError, match="resuming would change the experiment"):
        fit(tiny_config("train.epochs=2", "optim.lr=0.2", run_dir=run), resume="auto")
    assert {name: (run / name).read_bytes() for name in listing(run) if (run / name).is_file()} == before


def test_a_status_file_inside_the_run_directory_is_all_that_a_failed_start_leaves(cli, unreadable_root, tmp_path):
    import json

    run = tmp_path / "run"
    result = train(cli, unreadable_root, run, "--status-file", run / "status.json")
    assert result.exit_code == 2, result.output
    assert listing(run) == ["status.json"]
    status = json.loads((run / "status.json").read_text())
    assert status["exit_code"] == 2 and "cannot read image" in status["error"]
