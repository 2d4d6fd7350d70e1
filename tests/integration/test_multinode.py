"""Many nodes: two torchrun "nodes" of 2 processes each, meeting through the c10d rendezvous, train exactly
as 4 processes on one node."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import TINY_RUN
from mbv2train.train.tracking import read_metrics, without_timing


def train_args(image_root, run) -> list[str]:
    args = ["-m", "mbv2train", "train", "--data", str(image_root), "--output-dir", str(run)]
    for item in [*TINY_RUN, "data.batch_size=2", "train.ema=true"]:
        args += ["--set", item]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_exactly_as_four_processes_on_one_node(image_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    one_node = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "4",
                               *train_args(image_root, tmp_path / "one_node")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                               *train_args(image_root, tmp_path / "two_nodes")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    # one writer over both nodes: global rank 0
    assert sum(stdout.count("epoch 2 | train_loss") for stdout, _ in outputs) == 1

    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("one_node", "two_nodes"))
    assert a["world_size"] == b["world_size"] == 4
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    rows = [[without_timing(r) for r in read_metrics(tmp_path / name / "metrics.jsonl")]
            for name in ("one_node", "two_nodes")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[0]] == [1, 2]
    assert all(r["world_size"] == 4 and r["global_batch"] == 8 for r in rows[1])
