"""A checkpoint taken to another kind of device resumes with that device's optimizer settings (train.device
is a harmless change on resume): torch's load_state_dict would copy the saving run's along with the state."""

import pytest
import torch

from helpers import TINY_RUN, load_ckpt, metric_rows, run_ckpt
from mbv2train.train import optim
from mbv2train.train.trainer import fit

# What build_optimizer asks for where the optimizers keep all their state on the device (a GPU)
ON_DEVICE_OPTIONS = {"sgd": {"fused": True}, "adamw": {"fused": True}, "rmsprop": {"capturable": True}}
DEVICE_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def device_options(state):
    return [{key: group.get(key) for key in DEVICE_OPTIONS} for group in state["optimizer"]["param_groups"]]


def as_written_on_a_gpu(path, name):
    """The checkpoint at ``path`` as a GPU run of the same experiment writes it (loaded onto the CPU)."""
    state = load_ckpt(path)
    for group in state["optimizer"]["param_groups"]:
        group.update(ON_DEVICE_OPTIONS[name])
    state["config"]["train"]["device"] = "cuda"
    gpu_path = path.with_name("from_a_gpu.pt")
    torch.save(state, gpu_path)
    return gpu_path


@pytest.mark.parametrize("name", ["rmsprop", "adamw", "sgd"])
def test_a_gpu_checkpoint_resumed_on_the_cpu_ends_like_the_uninterrupted_cpu_run(cli, tiny_config, image_root,
                                                                                 tmp_path, name):
    settings = ["train.epochs=2", f"optim.name={name}", "train.save_every_epochs=1"]
    fit(tiny_config(*settings, run_dir=tmp_path / "whole"))
    checkpoint = as_written_on_a_gpu(tmp_path / "whole" / "epoch_1.pt", name)
    args = ["train", "--data", image_root, "--output-dir", tmp_path / "resumed", "--resume", checkpoint]
    for item in [*TINY_RUN, *settings]:
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "resuming with a changed setting: train.device: 'cuda' -> 'auto'" in result.output
    whole, resumed = (run_ckpt(tmp_path / run) for run in ("whole", "resumed"))
    assert device_options(resumed) == device_options(whole)
    assert all(torch.equal(whole["model"][key], resumed["model"][key]) for key in whole["model"])
    rows = metric_rows(tmp_path / "whole")
    assert metric_rows(tmp_path / "resumed") == rows[1:]


def test_a_cpu_checkpoint_resumed_where_the_state_stays_on_the_device_takes_that_devices_options(
        tiny_config, tmp_path, monkeypatch):
    # No GPU here: the CPU stands in for one, with the fused AdamW build_optimizer picks on a GPU.
    settings = ["train.epochs=2", "optim.name=adamw", "train.save_every_epochs=1"]
    fit(tiny_config(*settings, run_dir=tmp_path / "cpu"))
    monkeypatch.setattr(optim, "STATE_ON_DEVICE", ("cpu",))
    fit(tiny_config(*settings, run_dir=tmp_path / "resumed"), resume=str(tmp_path / "cpu" / "epoch_1.pt"))
    resumed = run_ckpt(tmp_path / "resumed")
    assert {group["fused"] for group in resumed["optimizer"]["param_groups"]} == {True}
    assert [int(state["step"]) for state in resumed["optimizer"]["state"].values()] == (
        [resumed["global_step"]] * len(resumed["optimizer"]["state"]))
