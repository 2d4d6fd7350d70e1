import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import REPO, SUPPORT, child_env, load_ckpt, torchrun_command, train_args

PROBE = SUPPORT / "batchnorm_probe.py"


def probe_run(image_root, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Two processes (gloo) train one epoch of 3 steps through batchnorm_probe.py, which writes each
    process's BatchNorm statistics into ``run``/probe."""
    probe = run / "probe"
    probe.mkdir(parents=True)
    args = train_args(image_root, run, "data.batch_size=4", "train.epochs=1", *overrides)
    env = child_env(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(torchrun_command(PROBE, probe, *args), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_with_sync_bn_both_processes_hold_the_same_batchnorm_statistics_after_a_step(image_root, tmp_path):
    probe_run(image_root, tmp_path / "run", "train.sync_bn=true")
    rank0, rank1 = (load_ckpt(tmp_path / "run" / "probe" / f"step1_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    # the step moved them away from their initial values (mean 0), by the same amount on both processes
    assert any(value.abs().sum() > 0 for key, value in rank0.items() if key.endswith("running_mean"))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)


@pytest.mark.slow
def test_without_sync_bn_the_saved_batchnorm_statistics_are_the_mean_over_processes(image_root, tmp_path):
    run = tmp_path / "run"
    probe_run(image_root, run)
    rank0, rank1 = (load_ckpt(run / "probe" / f"before_average_rank{r}.pt") for r in (0, 1))
    # each process's last batch left it its own statistics
    assert not all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    saved = load_ckpt(run / "last.pt")["model"]
    for key in rank0:
        mean = ((rank0[key].double() + rank1[key].double()) / 2).float()
        assert torch.equal(saved[key], mean), key


def _reduced_matches_full_batch(rank: int, port: int, full: torch.Tensor, results) -> None:
    import torch.distributed as dist

    from mbv2train.train.batchnorm_sync import ReducedBatchNorm2d

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layer = ReducedBatchNorm2d(3)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        half = full[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        out = layer(half)
        (out * torch.arange(out.numel()).view_as(out).float()).sum().backward()
        results[rank] = (out.detach(), half.grad, layer.running_mean.clone(), layer.running_var.clone(),
                         layer.weight.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduced_batchnorm_over_two_processes_equals_batchnorm_over_their_batches_together():
    import socket

    import torch.multiprocessing as mp

    full = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reduced_matches_full_batch, args=(port, full, results), nprocs=2, join=True)

    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = full.clone().requires_grad_()
    out = reference(x)
    weights = torch.cat([torch.arange(out[:4].numel()).view_as(out[:4]).float()] * 2)
    (out * weights).sum().backward()
    for rank in (0, 1):
        mine, grad, running_mean, running_var, weight_grad = results[rank]
        torch.testing.assert_close(mine, out.detach()[rank * 4:(rank + 1) * 4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, x.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(running_mean, reference.running_mean)
        torch.testing.assert_close(running_var, reference.running_var)
    # each process holds its own part of the parameters' gradient; DDP sums them
    torch.testing.assert_close(results[0][4] + results[1][4], reference.weight.grad, rtol=1e-4, atol=1e-4)


def test_sync_bn_with_one_process_changes_nothing_and_says_so():
    from mbv2train.train.batchnorm_sync import ReducedBatchNorm2d, synchronize_batchnorm
    from mbv2train.config import ModelConfig
    from mbv2train.model import build_model

    model, said = build_model(ModelConfig(width_mult=0.25, num_classes=3)), []
    assert synchronize_batchnorm(model, "cpu", 1, said.append) is model
    assert said == ["warning: train.sync_bn has no effect with one process"]
    assert not any(isinstance(m, ReducedBatchNorm2d) for m in model.modules())


def test_sync_bn_on_the_cpu_swaps_every_batchnorm_keeping_its_state_and_checkpoint_keys():
    from mbv2train.train.batchnorm_sync import ReducedBatchNorm2d, synchronize_batchnorm
    from mbv2train.config import ModelConfig
    from mbv2train.model import build_model

    model = build_model(ModelConfig(width_mult=0.25, num_classes=3))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batchnorms = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    synchronize_batchnorm(model, "cpu", 2, lambda line: None)
    assert batchnorms > 10 and sum(type(m) is ReducedBatchNorm2d for m in model.modules()) == batchnorms
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
