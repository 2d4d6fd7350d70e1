"""fit(cfg): finds the checkpoint to resume, builds the run (build.py), and trains it: each epoch trains,
validates and ends (a save, a metrics row, the best so far); a stop signal saves and stops cleanly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mbv2train import checkpoint as ckpt
from mbv2train import cpu_threads, data
from mbv2train.devices import resolve_amp, resolve_device
from mbv2train.distributed import as_peer_failure, init_distributed, min_over_ranks, restart_count, shutdown_distributed
from mbv2train.faults import NO_FAULTS, Faults
from mbv2train.preemption import StopFlag
from mbv2train.progress import Progress, log, set_main_process
from mbv2train.config import Config
from mbv2train.train import finetune, rescale, run_state
from mbv2train.train.build import BuiltRun, build_run
from mbv2train.train.checkpointer import Checkpointer, SaveSchedule
from mbv2train.train.epoch import EpochHooks, EpochProgress, train_one_epoch
from mbv2train.train.finished_run import left_finished
from mbv2train.train.run_dir import open_run_dir, taken_back_unless_saved
from mbv2train.train.tracking import NullTracker, epoch_line
from mbv2train.train.validator import Validator
from mbv2train.words import plural


def fit(cfg: Config, resume: Optional[str] = None, allow_changes: Sequence[str] = (),
        faults: Faults = NO_FAULTS) -> dict[str, Any]:
    """Train according to ``cfg``; ``resume`` is None, "auto" (the newest valid checkpoint in the run dir,
    if any) or a path. ``allow_changes`` lists config keys a resume may change on purpose.

    Returns the last epoch's metrics row (empty when there was nothing left to train). A stop signal
    makes it save a checkpoint and raise ``Preempted``.
    """
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    dist = init_distributed(device.type, cfg.train.dist_timeout_s)
    was_main = set_main_process(dist.is_main)  # from here on only rank 0 prints
    stop = StopFlag(announce=dist.is_main).install()
    try:
        if restart_count() > 0:  # torchrun restarted the group after a process failed
            faults = NO_FAULTS  # injected faults belong to the first attempt, which the restart recovers from
        run_dir = Path(cfg.train.output_dir)
        with taken_back_unless_saved(run_dir, dist.is_main) as before_taking_back:
            state = run_state.prepare_resume(resume, run_dir, dist.is_main, restart_count())
            cfg, note = rescale.keep_global_batch(cfg, state, dist.world_size)
            if left_finished(state, cfg, resume, allow_changes, dist.world_size, dist.is_main):
                return {}
            if note is not None:
                log(note)
            cpu_threads.use(cfg.train.threads, cfg.data.workers_asked, run_state.recorded_threads(state), say=log)
            trainer = Trainer(build_run(cfg, state, device, amp_dtype, dist), stop, faults)
            before_taking_back.append(lambda: trainer.tracker.close())  # its writer thread writes into the run dir
            return trainer.train(state, allow_changes)
    except RuntimeError as exc:
        failure = as_peer_failure(exc, dist.rank, cfg.train.dist_timeout_s) if dist.enabled else None
        if failure is None:
            raise
        raise failure from None
    finally:
        stop.restore()
        shutdown_distributed()
        set_main_process(was_main)


@dataclass
class Position:
    """Where a run stands: completed epochs and optimizer steps, and the best epoch so far."""

    epoch: int = 0
    global_step: int = 0
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None


def state_saver(run: BuiltRun, position: Position, best_metric: str):
    """The run's checkpoint state at ``position`` (checkpointer.TrainingState). A function of the parts
    rather than of the trainer: the checkpointer's reference to it must not keep the trainer (and its
    loaders' worker processes) alive in a reference cycle, which only the garbage collector would free."""

    def training_state(epoch_progress: Optional[dict[str, Any]], epoch_position: int) -> dict[str, Any]:
        return run_state.training_state(
            model=run.model, ema=run.ema, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler,
            epoch=position.epoch, global_step=position.global_step, epoch_progress=epoch_progress,
            best_metric=best_metric, best_value=position.best_value, best_epoch=position.best_epoch,
            config=run.cfg.to_dict(), class_names=run.classes, world_size=run.dist.world_size,
            global_batch=run.global_batch, epoch_position=epoch_position)
    return training_state


class Trainer:
    """Trains a built run: its epochs, their validation, and the checkpoints (checkpointer.py).

    Nothing it owns refers back to it: freed as soon as fit returns, its loaders end their workers."""

    def __init__(self, run: BuiltRun, stop: StopFlag, faults: Faults):
        self.run, self.cfg, self.faults = run, run.cfg, faults
        self.run_dir = Path(run.cfg.train.output_dir)
        self.tracker = NullTracker()
        self.best_metric, self.position = run.cfg.best_metric(), Position()
        train = run.cfg.train
        self.checkpointer = Checkpointer(
            self.run_dir, SaveSchedule(train.checkpoint_every_steps, train.checkpoint_every_minutes,
                                       run.steps_per_epoch),
            run.dist, stop, faults, state_saver(run, self.position, self.best_metric),
            {"model": run.model, "ema": run.ema.module if run.ema is not None else None}, run.global_batch,
            train.save_every_epochs, train.keep_checkpoints)
        # Validation shards differ by up to one batch between processes (no padding, so every image
        # counts once); a stop check is a collective under torchrun, so validation asks only at the
        # batches every process has.
        stop_checks = min_over_ranks(len(run.loaders.val), run.device)
        self.validator = Validator(
            run.loaders.val, run.runtime, train.sync_bn, train.tb_per_class, stop_checks,
            self.checkpointer.stop_requested, faults, run.bad_val)

    def train(self, state: Optional[dict[str, Any]], allow_changes: Sequence[str]) -> dict[str, Any]:
        """Run the epochs, continuing ``state`` (run_state.prepare_resume) when it is not None."""
        run, cfg, position = self.run, self.cfg, self.position
        epoch_progress, allowed = self._resume(state, allow_changes)
        self.tracker = open_run_dir(self.run_dir, cfg, position.epoch, position.global_step, fresh=state is None,
                                    allowed=allowed, train_loader=run.loaders.train)
        training_model = finetune.TrainingModel(run.model, cfg.train.compile, run.dist, run.device,
                                                cfg.train.freeze_backbone_epochs, log)
        mix = data.build_mix_transform(cfg.data, cfg.model.num_classes)
        where = (f"resuming at epoch {position.epoch + 1}, step {epoch_progress.steps}/{run.steps_per_epoch}"
                 if state is not None else "starting")
        log(f"run dir {self.run_dir} | {run.device.type} x {run.dist.world_size} | {run.precision} | "
            f"{plural(len(run.classes), 'class')} | {plural(run.steps_per_epoch, 'step')}/epoch of "
            f"{plural(run.global_batch, 'image')} | {where}")

        row: dict[str, Any] = {}
        for epoch in range(position.epoch + 1, cfg.train.epochs + 1):
            row = self._train_epoch(training_model.for_epoch(epoch), epoch, epoch_progress, mix)
            val_started = time.perf_counter()
            validation = self.validator.validate(epoch, run.model, run.ema.module if run.ema is not None else None,
                                                 self._per_class_figures)
            if validation is None:  # stopped mid-validation: save the finished training part, redo the pass
                self.checkpointer.save_and_stop(epoch_progress, position.global_step)
            row.update(validation, val_time_s=time.perf_counter() - val_started)
            self._end_epoch(epoch, row)
            epoch_progress = EpochProgress.from_state(None, run.device)
        self.tracker.close()
        log(f"done: best {self.best_metric} {position.best_value:.4f}; checkpoints in {self.run_dir} "
            f"(evaluate with: mbv2 eval --ckpt {self.run_dir / ckpt.BEST})")
        return row

    def _resume(self, state: Optional[dict[str, Any]], allow_changes: Sequence[str]
                ) -> tuple[EpochProgress, list[str]]:
        """Put back what ``state`` holds; returns the running epoch's progress and the allowed changes."""
        run = self.run
        if state is None:
            return self.checkpointer.resume(None, run.device), []
        allowed, harmless = run_state.check_resumable(state, self.cfg.to_dict(), run.classes, run.dist.world_size,
                                                      allow_changes)
        for line in harmless:
            log(f"warning: resuming with a changed setting: {line}")
        for line in allowed:
            log(f"warning: resuming with an allowed change: {line}")
        run_state.restore(state, model=run.model, ema=run.ema, optimizer=run.optimizer, scheduler=run.scheduler,
                          scaler=run.scaler)
        position = self.position  # in place: the checkpointer's state_saver reads this one
        position.epoch, position.global_step = state["epoch"], state["global_step"]
        position.best_value, position.best_epoch = state["best_value"], state.get("best_epoch")
        epoch_progress = self.checkpointer.resume(state, run.device)
        if run.dist.is_main:  # rank 0 writes the run directory
            for line in run_state.restore_derived_copies(state, self.run_dir, self.cfg.train.save_every_epochs,
                                                         self.cfg.train.keep_checkpoints):
                log(f"warning: {line}")
        return epoch_progress, allowed

    def _train_epoch(self, model, epoch: int, epoch_progress: EpochProgress, mix) -> dict[str, Any]:
        """The epoch's training steps (the rest of them, on a resume); returns the start of its row."""
        run, train = self.run, self.cfg.train
        self.checkpointer.restore_batchnorm()
        # the steps done so far took this many samples of the epoch's global order, on any number of processes
        run.loaders.train_sampler.set_epoch(epoch, start=epoch_progress.steps * run.global_batch)
        if run.bad_train is not None:
            run.bad_train.start_epoch()
        bar = Progress(run.steps_per_epoch * train.accum_steps, f"epoch {epoch}/{train.epochs}",
                       train.log_every_steps, start=epoch_progress.steps * train.accum_steps)
        hooks = EpochHooks(log_step=lambda step, values: self.tracker.scalars(step, values, prefix="step"),
                           after_step=self._after_step, bad_images=run.bad_train, faults=self.faults)
        metrics, self.position.global_step = train_one_epoch(
            model, run.loaders.train, run.optimizer, run.scheduler, run.scaler, run.runtime, run.settings, epoch,
            self.position.global_step, run.steps_per_epoch, epoch_progress, ema=run.ema, mix=mix, bar=bar, hooks=hooks)
        self.checkpointer.end_of_steps()
        bar.close()
        return {"epoch": epoch, "step": self.position.global_step, "world_size": run.dist.world_size,
                "global_batch": run.global_batch, **metrics}

    def _after_step(self, global_step: int, epoch_progress: EpochProgress) -> None:
        self.position.global_step = global_step  # what a save holds
        self.checkpointer.after_step(global_step, epoch_progress)

    def _per_class_figures(self, prefix: str, confusion) -> None:
        self.tracker.per_class(prefix, confusion, self.run.classes, self.position.global_step)

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch's save, metrics row and best so far; a stop signal stops here, before the next epoch."""
        position = self.position
        is_best = position.best_value is None or row[self.best_metric] > position.best_value
        if is_best:
            position.best_value, position.best_epoch = row[self.best_metric], epoch
        position.epoch = epoch
        self.tracker.epoch(row, position.global_step)  # rank 0's; the others' tracker is a NullTracker
        self.checkpointer.save_epoch_end(epoch, is_best)
        log(epoch_line(row, self.best_metric, position.best_value))
        if self.checkpointer.stop_requested() and epoch < self.cfg.train.epochs:
            raise self.checkpointer.preempted(position.global_step)
