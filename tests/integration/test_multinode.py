"""Many nodes: two torchrun "nodes" of 2 processes each, meeting through the c10d rendezvous, train exactly
as 4 processes on one node."""

import socket
import subprocess
import sys

import pytest
import torch

from helpers import child_env, metric_rows, run_ckpt, torchrun_command, train_args


def program(image_root, run) -> list[str]:
    """torchrun's program and its arguments: `-m mbv2train train ...`, batches of 2 with EMA."""
    return ["-m", "mbv2train", *train_args(image_root, run, "data.batch_size=2", "train.ema=true")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_exactly_as_four_processes_on_one_node(image_root, tmp_path):
    env = child_env()
    one_node = subprocess.run(torchrun_command(*program(image_root, tmp_path / "one_node"), nproc=4),
                              env=env, capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                               "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                               *program(image_root, tmp_path / "two_nodes")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    # one writer over both nodes: global rank 0
    assert sum(stdout.count("epoch 2 | train_loss") for stdout, _ in outputs) == 1

    a, b = (run_ckpt(tmp_path / name) for name in ("one_node", "two_nodes"))
    assert a["world_size"] == b["world_size"] == 4
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    rows = [metric_rows(tmp_path / name)
            for name in ("one_node", "two_nodes")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[0]] == [1, 2]
    assert all(r["world_size"] == 4 and r["global_batch"] == 8 for r in rows[1])
