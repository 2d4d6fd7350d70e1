"""Progress and log: rank-aware output, and a figures callback that cannot break the bar."""

import io
from contextlib import redirect_stdout

import pytest
import torch

from mbv2train import progress as progress_module
from mbv2train.errors import NonFiniteLoss
from mbv2train.progress import Progress, log, set_main_process
from mbv2train.train.epoch import EpochProgress
from mbv2train.train.epoch_figures import ProgressFigures


def test_only_the_main_process_prints():
    out = io.StringIO()
    with redirect_stdout(out):
        was = set_main_process(False)
        try:
            log("from rank 1")
            Progress(total=2, desc="x", log_every=1).update(lambda: {"loss": "1"})
        finally:
            set_main_process(was)
        log("from rank 0")
    assert out.getvalue() == "from rank 0\n"


def test_an_exception_from_the_figures_callback_comes_out_only_after_the_step_is_counted():
    def failing():
        raise NonFiniteLoss("non-finite loss at step 1")

    out = io.StringIO()
    with redirect_stdout(out):
        bar = Progress(total=3, desc="epoch 1/1", log_every=1)
        with pytest.raises(NonFiniteLoss):
            bar.update(failing)
        bar.update(lambda: {"loss": "0.5"})
        bar.close()
    assert bar.count == 2
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["1/3", "2/3"]


class FailedGuard:
    """A StepGuard whose flags hold a breach of train.nonfinite (raise mode), as read by a boundary."""

    images_taken = 0

    def read(self, progress):
        pass

    def settle(self, progress):
        raise NonFiniteLoss("non-finite loss at step 2 (epoch 1); the last checkpoint holds finite weights")


def test_the_epoch_s_figures_callback_never_raises_even_when_the_flags_would():
    epoch_progress = EpochProgress(steps=2, loss_sum=torch.tensor(2.0), correct=torch.tensor(3), seen=4, lr=0.1)
    epoch_progress.guard = FailedGuard()
    figures = ProgressFigures(epoch_progress, epoch_progress.guard, True, 0.0, processes=1)
    assert figures.fields() == {}  # nothing read yet: it reads only what refresh() brought to the host
    figures.refresh()
    assert figures.fields()["loss"] == "0.5000" and figures.fields()["top1"] == "0.750"
    with pytest.raises(NonFiniteLoss):
        epoch_progress.settle()  # where every process looks, the breach is raised
    assert figures.fields()["loss"] == "0.5000"
    assert progress_module.is_main_process()
