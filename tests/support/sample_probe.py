"""`mbv2 train`, alone or under torchrun, recording what each process trains on: OUT_DIR/samples_rank{R}.jsonl
holds one line per training micro-batch with its (epoch, index) pairs, in order, OUT_DIR/sums_rank{R}.jsonl
one line per training micro-batch with its loss summed over its images, its correct predictions and its
image count, and on rank 0 OUT_DIR/lr.jsonl one line per optimizer step with the learning rate it used.
Used by test_rescale.py:

    python tests/sample_probe.py OUT_DIR train ARGS...
    torchrun --nproc_per_node 2 tests/sample_probe.py OUT_DIR train ARGS...
"""

import collections
import json
import os
import sys
from pathlib import Path

from mbv2train import devices
from mbv2train.train import checkpointer, step_guard
from mbv2train.cli import app
from mbv2train.data.loaders import SeededDataset


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    samples = open(out / f"samples_rank{rank}.jsonl", "a", encoding="utf-8")
    loaded = collections.deque()  # training items loaded and not yet trained on, oldest first

    load_item = SeededDataset.__getitem__

    def recording_getitem(self, key):
        item = load_item(self, key)
        if self.split == "train":
            loaded.append(list(key))
        return item

    prepare = devices.Runtime.prepare

    def recording_prepare(self, images, labels):
        # a training micro-batch is on its way into the forward pass (validation loads nothing recorded)
        if loaded:
            samples.write(json.dumps([loaded.popleft() for _ in range(len(labels))]) + "\n")
            samples.flush()
        return prepare(self, images, labels)

    add = step_guard.StepGuard.add
    sums = open(out / f"sums_rank{rank}.jsonl", "a", encoding="utf-8")

    def recording_add(self, loss, logits, labels, count_correct):
        # what this micro-batch adds to the epoch's sums, read here on its own (a wait the probe can afford)
        sums.write(json.dumps({"loss_sum": loss.detach().float().item() * len(labels),
                               "correct": int((logits.detach().argmax(1) == labels).sum()),
                               "images": len(labels)}) + "\n")
        sums.flush()
        add(self, loss, logits, labels, count_correct)

    after_step = checkpointer.Checkpointer.after_step

    def recording_after_step(self, global_step, epoch_progress):
        if rank == 0:
            with open(out / "lr.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": global_step, "lr": epoch_progress.lr}) + "\n")
        after_step(self, global_step, epoch_progress)

    SeededDataset.__getitem__ = recording_getitem
    devices.Runtime.prepare = recording_prepare
    step_guard.StepGuard.add = recording_add
    checkpointer.Checkpointer.after_step = recording_after_step
    app(args)


if __name__ == "__main__":
    main()
