"""Training: build a run from a config, then run it, saving what an exact resume needs.

trainer.py        fit(): resume, open the run directory, then train, validate and end each epoch
build.py          build_run(): loaders, model, EMA, optimizer, schedule and runtime from a config
checkpointer.py   when to save, what each process adds to a save, resuming, best/epoch copies
validator.py      an epoch's validation of the model and its EMA
epoch.py          one training epoch: micro-steps and optimizer steps, the epoch's sums
step_guard.py     the non-finite loss guard and EMA update, decided on the device without waiting
prefetch.py       the next batch's copy to the device while this one computes
optim.py          optimizers (no weight decay on norms and biases), LR schedules, EMA
run_state.py      what a checkpoint holds for a resume, and what it refuses to resume
rescale.py        resuming on another number of processes: the batch, the LR and the per-process sums
batchnorm_sync.py BatchNorm statistics of every process saved and restored
finetune.py       fine-tuning: a new head, frozen layers
finished_run.py   a run that already reached its last epoch, recognised before anything is built
run_dir.py        the run directory: opened by rank 0, and taken back when a run fails before its first checkpoint
run_status.py     the exit status and last line of a stopped, preempted or failed run
tracking.py       metrics.jsonl, TensorBoard scalars and figures
epoch_figures.py  the progress line's figures, pooled over processes at log steps
"""
