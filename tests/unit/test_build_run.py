"""build_run: a run built from a config alone, with no run directory and no process group."""

import torch
import torch.distributed as dist

from mbv2train.distributed import DistInfo
from mbv2train.train.build import build_run


def test_build_run_builds_everything_without_a_run_directory_or_a_process_group(tiny_config, tmp_path):
    run_dir = tmp_path / "never"
    run = build_run(tiny_config(run_dir=run_dir), None, torch.device("cpu"), None, DistInfo())
    assert not run_dir.exists()
    assert not (dist.is_available() and dist.is_initialized())
    assert run.classes == ["circle", "square", "triangle"] and run.cfg.model.num_classes == 3
    assert run.global_batch == run.cfg.data.batch_size * run.cfg.train.accum_steps
    assert run.steps_per_epoch == len(run.loaders.train) // run.cfg.train.accum_steps > 0
    assert run.precision == "float32" and run.scaler is None
    assert run.runtime.device == torch.device("cpu")
    assert run.settings.seed == run.cfg.train.seed
    assert [p for group in run.optimizer.param_groups for p in group["params"]]


def test_build_run_builds_the_same_model_every_time(tiny_config):
    first = build_run(tiny_config(), None, torch.device("cpu"), None, DistInfo()).model.state_dict()
    second = build_run(tiny_config(), None, torch.device("cpu"), None, DistInfo()).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
