"""Under torchrun the progress line and the epoch line after it show one kind of figure: all processes'."""

import re

import pytest

from helpers import run_metrics, torchrun, train_args


def progress_figures(line: str) -> dict[str, str]:
    """{"loss": "2.4310", "top1": "0.312", ...} of a progress line "epoch 1/1 3/3 LABEL: loss 2.4310 ... (1s)"."""
    figures = line.split(": ", 1)[1].rsplit(" (", 1)[0].split()
    return dict(zip(figures[::2], figures[1::2]))


@pytest.mark.slow
def test_the_progress_line_under_torchrun_shows_all_processes_figures_and_says_so(image_root, tmp_path):
    run = tmp_path / "run"
    # 24 images, 2 processes of 4: 3 steps, each logged, the last of them the epoch's end
    result = torchrun(train_args(image_root, run, "data.batch_size=4", "train.epochs=1", "train.tb_images=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    progress = [line for line in lines if re.match(r"epoch 1/1 \d/3 ", line)]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], lines
    assert all(line.startswith(f"epoch 1/1 {n}/3 all 2 processes: loss ") for n, line in enumerate(progress, 1))

    # the line at the epoch's last step holds the epoch's figures, as the epoch line and metrics.jsonl do
    [row] = run_metrics(run)
    last = progress_figures(progress[-1])
    assert last["loss"] == f"{row['train_loss']:.4f}" and last["top1"] == f"{row['train_top1']:.3f}"
    [epoch_line] = [line for line in lines if line.startswith("epoch 1 | ")]
    assert f"train_loss {last['loss']} |" in epoch_line

    # validation's running top-1 is the one process's own, and says so
    [val_line] = [line for line in lines if line.startswith("val 1 ")]
    assert re.match(r"val 1 (\d)/\1 rank 0: top1 ", val_line), val_line
