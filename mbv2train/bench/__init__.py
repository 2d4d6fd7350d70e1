"""`mbv2 bench`: where a training run's time goes, measured on this machine.

data.py    the training loader alone, side by side with torchvision's reference pipeline (`bench data`)
model.py   synthetic training and inference steps per precision and memory format (`bench model`)
train.py   real training steps end to end, and how much of their time waits for data (`bench train`)
verdict.py what `bench train` concludes from its figures (data-bound, compute-bound, oversubscribed)
common.py  clocks, devices, tables

Each returns a dict of plain values (what `--json` prints); progress goes to stderr.
"""
