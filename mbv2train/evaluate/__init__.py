"""Evaluation: how good a trained model is, on a folder or on single images.

loop.py       one pass over a loader: loss, top-1, top-5, a confusion matrix (training's validation too)
evaluation.py `mbv2 eval`: a checkpoint, export or int8 file loaded with its preprocessing, then evaluated
report.py     eval's per-class table and resolution sweep, as lines and CSV
predict.py    `mbv2 predict`: the top classes of single images, through the same logits as eval
"""
