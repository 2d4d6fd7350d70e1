"""Resuming on another number of processes: the global batch, the LR curve and the epoch's samples carry on."""

import pytest
import torch

from mbv2train.config import load_config
from mbv2train.train.epoch import EpochProgress
from mbv2train.errors import CheckpointError
from mbv2train.train.rescale import keep_global_batch, split_rank_parts


def saved(world_size: int, batch_size: int, accum_steps: int = 1) -> dict:
    cfg = load_config(None, [f"data.batch_size={batch_size}", f"train.accum_steps={accum_steps}"])
    return {"config": cfg.to_dict(), "world_size": world_size, "global_batch": batch_size * world_size * accum_steps}


@pytest.mark.parametrize("now_batch, now_accum, world_size, expected", [
    (4, 1, 1, (4, 2)),  # 2 -> 1: the process batch stays, accumulation doubles
    (4, 1, 4, (2, 1)),  # 2 -> 4: no accumulation to halve, so the process batch halves
    (4, 2, 4, (1, 2)),  # 4 x 4 processes is over 8 already: the accumulation stays, the process batch shrinks
    (2, 2, 1, (2, 4)),  # the batch the command line asks for now is kept when it can be
    (4, 1, 8, (1, 1)),
])
def test_a_resume_on_another_number_of_processes_keeps_the_global_batch(now_batch, now_accum, world_size, expected):
    cfg = load_config(None, [f"data.batch_size={now_batch}", f"train.accum_steps={now_accum}"])
    rescaled, note = keep_global_batch(cfg, saved(world_size=2, batch_size=4), world_size)
    assert (rescaled.data.batch_size, rescaled.train.accum_steps) == expected
    assert rescaled.data.batch_size * world_size * rescaled.train.accum_steps == 8
    assert "global batch 8 kept" in note and "no longer bit-identical" in note and "BatchNorm" in note


def test_the_same_number_of_processes_changes_nothing():
    cfg = load_config(None, ["data.batch_size=4"])
    assert keep_global_batch(cfg, saved(world_size=2, batch_size=4), 2) == (cfg, None)


def test_a_global_batch_the_processes_do_not_divide_is_one_clear_error():
    cfg = load_config(None, ["data.batch_size=4"])
    with pytest.raises(CheckpointError, match=r"^cannot resume the global batch of 8 on 3 processes: 3 does not "
                                              r"divide it; process counts that do: 1, 2, 4, 8$"):
        keep_global_batch(cfg, saved(world_size=2, batch_size=4), 3)


def test_the_epoch_sums_of_the_old_processes_go_to_the_first_new_one():
    parts = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(split_rank_parts(parts, 2), parts)
    assert torch.equal(split_rank_parts(parts, 1), torch.tensor([[4.0, 6.0]]))
    assert torch.equal(split_rank_parts(parts, 3), torch.tensor([[4.0, 6.0], [0.0, 0.0], [0.0, 0.0]]))


def epoch_totals(progresses: list[EpochProgress]) -> tuple[float, int, int, int]:
    """(loss, correct, images seen, bad images) of an epoch: its processes' parts added up, as its end does."""
    return (sum(p.loss_sum.item() for p in progresses), sum(int(p.correct) for p in progresses),
            sum(p.seen for p in progresses), sum(p.bad_images for p in progresses))


def resumed_on(state: dict, processes: int) -> list[EpochProgress]:
    return [EpochProgress.from_state(state, torch.device("cpu"), rank, processes) for rank in range(processes)]


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_a_one_process_epoch_resumed_on_any_number_of_processes_counts_each_image_once(processes):
    done = EpochProgress(steps=3, loss_sum=torch.tensor(13.5), correct=torch.tensor(5), seen=12, lr=0.1,
                         bad_images=2, nonfinite_skips=1)
    resumed = resumed_on(done.state(), processes)
    assert epoch_totals(resumed) == (13.5, 5, 12, 2)
    # what every process must agree on is not split
    assert all((p.steps, p.lr, p.nonfinite_skips) == (3, 0.1, 1) for p in resumed)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_a_checkpoint_older_than_per_process_parts_counts_its_sums_once(processes):
    old = {"steps": 3, "loss_sum": torch.tensor(13.5), "correct": torch.tensor(5), "seen": 12, "lr": 0.1,
           "bad_images": 2, "nonfinite_skips": 0, "scaler_skips": 0}
    assert epoch_totals(resumed_on(old, processes)) == (13.5, 5, 12, 2)


@pytest.mark.parametrize("saved_processes, processes", [(2, 1), (2, 2), (2, 3), (3, 2), (4, 2)])
def test_an_epoch_of_several_processes_resumed_on_any_number_counts_each_image_once(saved_processes, processes):
    # what a save under torchrun holds: each process's (loss, correct, seen, bad images), rank 0's sums
    parts = torch.tensor([[1.5 + rank, 2.0 + rank, 6.0, float(rank % 2)] for rank in range(saved_processes)],
                         dtype=torch.float64)
    state = {"steps": 3, "loss_sum": torch.tensor(1.5), "correct": torch.tensor(2), "seen": 6, "lr": 0.1,
             "bad_images": 0, "nonfinite_skips": 0, "scaler_skips": 0, "rank_parts": parts}
    loss, correct, seen, bad = parts.sum(dim=0).tolist()
    assert epoch_totals(resumed_on(state, processes)) == (loss, int(correct), int(seen), int(bad))


# ------------------------------------------------------------------------ end to end, through sample_probe.py




















