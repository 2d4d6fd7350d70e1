"""`mbv2 train` under torchrun, recording each process's BatchNorm running statistics: after optimizer
step 1 (step1_rank{R}.pt) and just before they are averaged over the processes at an epoch's end
(before_average_rank{R}.pt). Used by test_distributed_batchnorm.py:

    torchrun --nproc_per_node 2 tests/batchnorm_probe.py OUT_DIR train ARGS...
"""

import os
import sys
from pathlib import Path

import torch

from mbv2train.train import checkpointer, validator
from mbv2train.cli import app


def running_statistics(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".running_" in k}


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    average = validator.average_running_statistics

    def recording_average(model) -> None:
        torch.save(running_statistics(model), out / f"before_average_rank{rank}.pt")
        average(model)

    after_step = checkpointer.Checkpointer.after_step

    def recording_after_step(self, global_step, epoch_progress) -> None:
        if global_step == 1:
            torch.save(running_statistics(self.models["model"]), out / f"step1_rank{rank}.pt")
        after_step(self, global_step, epoch_progress)

    validator.average_running_statistics = recording_average
    checkpointer.Checkpointer.after_step = recording_after_step
    app(args)


if __name__ == "__main__":
    main()
