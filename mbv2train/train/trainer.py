"""fit(cfg): builds everything, resumes, runs the epochs, evaluates, saves, logs, and stops cleanly on a
signal."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mbv2train import checkpoint as ckpt
from mbv2train import cpu_threads, data, devices, rng
from mbv2train.train import finetune, optim, rescale, run_state
from mbv2train.train.epoch import EpochHooks, EpochProgress, TrainSettings, train_one_epoch
from mbv2train.evaluate import loop
from mbv2train.model import pretrained
from mbv2train.train.batchnorm_sync import average_running_statistics, gather_running_statistics, restore_running_statistics, synchronize_batchnorm
from mbv2train.config import Config, with_num_classes
from mbv2train.devices import resolve_amp, resolve_device
from mbv2train.distributed import (DistInfo, StepVote, any_rank, as_peer_failure, broadcast_from_rank0,
                                    init_distributed, min_over_ranks, restart_count, shutdown_distributed)
from mbv2train.errors import ConfigError, DataError
from mbv2train.faults import NO_FAULTS, Faults
from mbv2train.train.finished_run import left_finished
from mbv2train.model import build_model
from mbv2train.preemption import Preempted, StopFlag
from mbv2train.progress import Progress, log
from mbv2train.train.run_dir import taken_back_unless_saved
# without_timing is imported from here by callers that compare runs
from mbv2train.train.tracking import NullTracker, Tracker, append_event, augmented_samples, epoch_line, truncate_metrics
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
    stop = StopFlag(announce=dist.is_main).install()
    try:
        if restart_count() > 0:  # torchrun restarted the group after a process failed
            faults = NO_FAULTS  # injected faults belong to the first attempt, which the restart recovers from
        with taken_back_unless_saved(Path(cfg.train.output_dir), dist.is_main) as before_taking_back:
            state = run_state.prepare_resume(resume, Path(cfg.train.output_dir), dist.is_main, restart_count())
            cfg, note = rescale.keep_global_batch(cfg, state, dist.world_size)
            if left_finished(state, cfg, resume, allow_changes, dist.world_size, dist.is_main):
                return {}
            if note is not None:
                log(note, dist.is_main)
            cpu_threads.use(cfg.train.threads, cfg.data.workers_asked, run_state.recorded_threads(state),
                            say=lambda line: log(line, dist.is_main))
            run = Run(cfg, device, amp_dtype, dist, stop, faults, state)
            before_taking_back.append(lambda: run.tracker.close())  # its writer thread writes into the run dir
            return run.train(state, allow_changes)
    except RuntimeError as exc:
        failure = as_peer_failure(exc, dist.rank, cfg.train.dist_timeout_s) if dist.enabled else None
        if failure is None:
            raise
        raise failure from None
    finally:
        stop.restore()
        shutdown_distributed()


class Run:
    """One training run: everything `mbv2 train` builds from a config (loaders, model, optimizer, EMA,
    runtime), then ``train`` runs its epochs. Building touches no run directory; ``train`` opens it.

    ``state`` is the checkpoint the run resumes from (None: a fresh run, which starts from model.pretrained's
    weights when set, unless ``pretrained_weights`` is False, as for benchmarks)."""

    def __init__(self, cfg: Config, device: torch.device, amp_dtype, dist: DistInfo, stop: StopFlag,
                 faults: Faults, state: Optional[dict[str, Any]] = None, pretrained_weights: bool = True):
        self.device, self.amp_dtype, self.dist, self.stop, self.faults = device, amp_dtype, dist, stop, faults
        self.say = dist.is_main
        self.run_dir = Path(cfg.train.output_dir)
        self.loaders = data.build_loaders(cfg.data, cfg.train.seed, dist.rank, dist.world_size, device.type)
        source = None
        if state is None and cfg.model.pretrained is not None and pretrained_weights:
            source = pretrained.read(cfg.model, show_progress=self.say)
        cfg = pretrained.resolve_config(cfg, source, state["config"] if state is not None else None)
        self.cfg = cfg = with_num_classes(cfg, len(self.loaders.classes))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(rng.derive_seed(cfg.train.seed, rng.INIT))
        self.model = build_model(cfg.model)
        if source is not None:  # before the EMA copies the model
            log(pretrained.load_into(self.model, source, self.loaders.classes).line(source), self.say)
        if cfg.train.sync_bn:  # before the EMA copies the model and the optimizer takes its parameters
            self.model = synchronize_batchnorm(self.model, device.type, dist.world_size,
                                               lambda message: log(message, self.say))
        self.model = self.model.to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = None
        if cfg.train.ema:
            # on the device, its count included: the engine updates it there (step_guard.EmaUpdate)
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                                     use_buffers=True, device=device)
        self.global_batch = cfg.data.batch_size * dist.world_size * cfg.train.accum_steps
        self.optimizer = optim.build_optimizer(self.model, cfg.optim, self.global_batch)
        self.steps_per_epoch = len(self.loaders.train) // cfg.train.accum_steps
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.loaders.train_dir}: too few images for one optimizer step of "
                            f"{cfg.data.batch_size} x {plural(cfg.train.accum_steps, 'accumulation step')}")
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.schedule, cfg.train.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.rt = devices.Runtime.create(device, amp_dtype, cfg.train.channels_last, cfg.data.mean, cfg.data.std)
        self.settings = TrainSettings(
            seed=cfg.train.seed, label_smoothing=cfg.train.label_smoothing, accum_steps=cfg.train.accum_steps,
            grad_clip_norm=cfg.train.grad_clip_norm, ema_every_steps=cfg.train.ema_every_steps,
            ema_decay=cfg.train.ema_decay,
            log_every_steps=cfg.train.log_every_steps, skip_nonfinite=cfg.train.nonfinite == "skip",
            max_nonfinite_skips=cfg.train.max_nonfinite_skips)
        self.bad_train = self.bad_val = None
        if cfg.data.bad_images == "skip":
            self.bad_train = data.BadImageLog(len(self.loaders.train.dataset), cfg.data.max_bad_fraction,
                                              "training", folder=self.loaders.train_dir, warn=self.say,
                                              processes=dist.world_size)
            self.bad_val = data.BadImageLog(len(self.loaders.val.dataset), cfg.data.max_bad_fraction,
                                            "validation", folder=self.loaders.val_dir, warn=self.say,
                                            processes=dist.world_size)
        # Validation shards differ by up to one batch between processes (no padding, so every image
        # counts once); a stop check is a collective under torchrun, so validation asks only at the
        # batches every process has.
        self.val_stop_checks = min_over_ranks(len(self.loaders.val), device)
        self.tracker = NullTracker()
        self.best_metric, self.best_value, self.best_epoch = cfg.best_metric(), None, None
        self.epoch, self.global_step = 0, 0  # completed epochs and optimizer steps
        # each process's BatchNorm statistics from a mid-epoch checkpoint, put back once DDP has wrapped
        # the model (wrapping hands rank 0's to every process)
        self.rank_batchnorm: Optional[dict[str, Any]] = None
        self.last_save = time.monotonic()
        # what every process must act on at the same step: a stop signal, and rank 0's clock for
        # train.checkpoint_every_minutes (clocks differ between processes: rank 0's decides for all)
        self.step_vote = StepVote()

    # ---------------------------------------------------------------------------------------- main loop

    def train(self, state: Optional[dict[str, Any]], allow_changes: Sequence[str]) -> dict[str, Any]:
        """Run the epochs, continuing ``state`` (run_state.prepare_resume) when it is not None."""
        cfg, say = self.cfg, self.say
        warn = lambda message: log(message, say)  # noqa: E731
        done = EpochProgress.from_state(None, self.device)
        allowed: list[str] = []
        if state is not None:
            allowed, harmless = run_state.check_resumable(state, cfg.to_dict(), self.loaders.classes,
                                                          self.dist.world_size, allow_changes)
            for line in harmless:
                warn(f"warning: resuming with a changed setting: {line}")
            for line in allowed:
                warn(f"warning: resuming with an allowed change: {line}")
            run_state.restore(state, model=self.model, ema=self.ema, optimizer=self.optimizer,
                              scheduler=self.scheduler, scaler=self.scaler)
            self.epoch, self.global_step = state["epoch"], state["global_step"]
            self.rank_batchnorm = state.get("rank_batchnorm")
            self.best_value, self.best_epoch = state["best_value"], state.get("best_epoch")
            done = EpochProgress.from_state(state.get("epoch_progress"), self.device, self.dist.rank,
                                                   self.dist.world_size)
            if say:
                for line in run_state.restore_derived_copies(state, self.run_dir, cfg.train.save_every_epochs,
                                                             cfg.train.keep_checkpoints):
                    warn(f"warning: {line}")
        self._open_run_dir(fresh=state is None, allowed=allowed)

        train_model = finetune.TrainingModel(self.model, cfg.train.compile, self.dist, self.device,
                                             cfg.train.freeze_backbone_epochs, warn)
        mix = data.build_mix_transform(cfg.data, cfg.model.num_classes)
        precision = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        where = (f"resuming at epoch {self.epoch + 1}, step {done.steps}/{self.steps_per_epoch}" if state is not None
                 else "starting")
        log(f"run dir {self.run_dir} | {self.device.type} x {self.dist.world_size} | {precision} | "
            f"{plural(len(self.loaders.classes), 'class')} | {plural(self.steps_per_epoch, 'step')}/epoch of "
            f"{plural(self.global_batch, 'image')} | {where}", say)

        row: dict[str, Any] = {}
        for epoch in range(self.epoch + 1, cfg.train.epochs + 1):
            row = self._one_epoch(train_model.for_epoch(epoch), epoch, done, mix)
            done = EpochProgress.from_state(None, self.device)
        self.tracker.close()
        log(f"done: best {self.best_metric} {self.best_value:.4f}; checkpoints in {self.run_dir} "
            f"(evaluate with: mbv2 eval --ckpt {self.run_dir / ckpt.BEST})", say)
        return row

    def _one_epoch(self, train_model, epoch: int, done: EpochProgress, mix) -> dict[str, Any]:
        cfg, loaders = self.cfg, self.loaders
        if self.rank_batchnorm is not None:
            for part, model in (("model", self.model), ("ema", self.ema.module if self.ema is not None else None)):
                if model is not None and self.rank_batchnorm.get(part) is not None:
                    restore_running_statistics(model, self.rank_batchnorm[part], self.dist.rank)
            self.rank_batchnorm = None
        # the steps done so far took this many samples of the epoch's global order, on any number of processes
        loaders.train_sampler.set_epoch(epoch, start=done.steps * self.global_batch)
        if self.bad_train is not None:
            self.bad_train.start_epoch()
        progress = Progress(self.steps_per_epoch * cfg.train.accum_steps, f"epoch {epoch}/{cfg.train.epochs}",
                            cfg.train.log_every_steps, enabled=self.say, start=done.steps * cfg.train.accum_steps)
        hooks = EpochHooks(
            log_step=lambda step, values: self.tracker.scalars(step, values, prefix="step"),
            after_step=lambda step, progress_: self._after_step(epoch, step, progress_),
            bad_images=self.bad_train, faults=self.faults)
        train_metrics, self.global_step = train_one_epoch(
            train_model, loaders.train, self.optimizer, self.scheduler, self.scaler, self.rt, self.settings,
            epoch, self.global_step, self.steps_per_epoch, done, ema=self.ema, mix=mix, progress=progress,
            hooks=hooks)
        self.step_vote.drain()  # the last step's vote: from here on, stop checks ask all processes at once
        progress.close()

        val_started = time.perf_counter()
        row = {"epoch": epoch, "step": self.global_step, "world_size": self.dist.world_size,
               "global_batch": self.global_batch, **train_metrics}
        evaluations = [("val_", self.model)] + ([("ema_val_", self.ema.module)] if self.ema is not None else [])
        # Each process's last forward pass left its own BatchNorm statistics (DDP hands rank 0's out only
        # at the next forward): evaluate and save their mean over the processes, which does not depend on
        # rank 0's shard alone (batchnorm_sync.py). With train.sync_bn they agree already; rank 0's copy
        # makes them agree to the last bit.
        for _, model in evaluations:
            if cfg.train.sync_bn:
                broadcast_from_rank0(list(model.buffers()))
            else:
                average_running_statistics(model)
        for prefix, model in evaluations:
            progress = Progress(len(loaders.val), f"{prefix.replace('_', ' ').strip()} {epoch}",
                                log_every=max(len(loaders.val), 1), enabled=self.say)
            self.faults.start_validation()
            metrics = loop.evaluate(model, loaders.val, self.rt, progress, self.bad_val, self._stop_requested,
                                      stop_check_batches=self.val_stop_checks,
                                      after_batch=self.faults.after_val_batch, per_class=cfg.train.tb_per_class)
            progress.close()
            if metrics is None:  # stopped mid-evaluation: save the finished training part, redo the pass
                self._save_and_stop(epoch, done)
            self.tracker.per_class(prefix, metrics.pop("confusion", None), loaders.classes, self.global_step)
            row.update({prefix + k: v for k, v in metrics.items()})
        row["val_time_s"] = time.perf_counter() - val_started

        is_best = self.best_value is None or row[self.best_metric] > self.best_value
        if is_best:
            self.best_value, self.best_epoch = row[self.best_metric], epoch
        self.epoch = epoch
        if self.say:
            self.tracker.epoch(row, self.global_step)
            # last.pt first: a kill before the copies is repaired on resume (restore_derived_copies)
            self._save(done=None)
            if is_best:
                self.faults.crash_at("before_best_copy")
                ckpt.copy_checkpoint(self.run_dir / ckpt.LAST, self.run_dir / ckpt.BEST)
            if cfg.train.save_every_epochs and epoch % cfg.train.save_every_epochs == 0:
                self.faults.crash_at("before_epoch_copy")
                ckpt.copy_checkpoint(self.run_dir / ckpt.LAST, self.run_dir / f"epoch_{epoch}.pt")
                ckpt.prune_epoch_copies(self.run_dir, cfg.train.keep_checkpoints)
            log(epoch_line(row, self.best_metric, self.best_value), self.say)
        if self._stop_requested() and epoch < cfg.train.epochs:
            raise Preempted(self._signum(), str(self.run_dir / ckpt.LAST), self.global_step)
        return row

    # ---------------------------------------------------------------------------------------- checkpoints

    def _after_step(self, epoch: int, global_step: int, done: EpochProgress) -> None:
        """After every optimizer step: save when a stop signal came or a step/minute interval is up.

        Nothing here waits for the device unless it saves. Under torchrun the processes learn of a signal
        or of rank 0's clock one step late (StepVote), and all act at that same step."""
        self.global_step = global_step
        stop, minutes_up = self.step_vote.collect(self._step_flags())
        if stop:
            self._save_and_stop(epoch, done)
        every_steps = self.cfg.train.checkpoint_every_steps
        due = (bool(every_steps) and self.global_step % every_steps == 0) or minutes_up
        if due and done.steps < self.steps_per_epoch:  # the epoch's end saves anyway
            self._save(done)
        self.step_vote.cast(self._step_flags())  # after the save: a save just made resets rank 0's clock

    def _step_flags(self) -> tuple[bool, bool]:
        """(a stop signal came, train.checkpoint_every_minutes is up on rank 0's clock)."""
        every_minutes = self.cfg.train.checkpoint_every_minutes
        minutes_up = bool(every_minutes) and self.say and time.monotonic() - self.last_save >= every_minutes * 60
        return bool(self.stop), minutes_up

    def _save_and_stop(self, epoch: int, done: EpochProgress) -> None:
        self._save(done)
        raise Preempted(self._signum(), str(self.run_dir / ckpt.LAST), self.global_step)

    def _signum(self) -> int:
        # another process may have received the signal and this one only agreed to stop
        return self.stop.signum or signal.SIGTERM

    def _save(self, done: Optional[EpochProgress]) -> None:
        """Save last.pt; ``done`` is the epoch's progress for a save inside an epoch, None at its end.

        Every process calls it: under torchrun a save inside an epoch gathers each process's part of the
        epoch's sums, so that each resumes with its own part and the epoch's totals come out exact."""
        self.last_save = time.monotonic()
        epoch_progress = done.state() if done is not None else None
        rank_batchnorm = None
        if done is not None and self.dist.enabled:
            # each process's own statistics: an uninterrupted run goes on with them (the epoch's end averages
            # them), so a resumed one must too
            rank_batchnorm = {"model": gather_running_statistics(self.model),
                              "ema": gather_running_statistics(self.ema.module) if self.ema is not None else None}
        if not self.say:
            return
        state = run_state.training_state(
            model=self.model, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, epoch=self.epoch, global_step=self.global_step, epoch_progress=epoch_progress,
            best_metric=self.best_metric, best_value=self.best_value, best_epoch=self.best_epoch,
            config=self.cfg.to_dict(),
            class_names=self.loaders.classes, world_size=self.dist.world_size, global_batch=self.global_batch,
            epoch_position=done.steps * self.global_batch if done is not None else 0)
        if rank_batchnorm is not None:
            state["rank_batchnorm"] = rank_batchnorm
        ckpt.save_checkpoint(state, self.run_dir / ckpt.LAST, keep_previous=self.run_dir / ckpt.PREVIOUS,
                             faults=self.faults)

    def _stop_requested(self) -> bool:
        """A stop signal, agreed on by all processes at once (a collective on the CPU, outside the steps)."""
        return any_rank(bool(self.stop))

    def _open_run_dir(self, fresh: bool, allowed: list[str]) -> None:
        if not self.say:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"train.output_dir: cannot create {self.run_dir}: {exc.strerror or exc}") from None
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
                                                  encoding="utf-8")
        # Rows and curves past the checkpoint belong to an attempt that died before saving: drop them.
        metrics = self.run_dir / "metrics.jsonl"
        truncate_metrics(metrics, self.epoch)
        if allowed:
            append_event(metrics, {"event": "allowed_change", "epoch": self.epoch, "step": self.global_step,
                                   "changes": allowed})
        self.tracker = Tracker(self.run_dir, purge_step=0 if fresh else self.global_step + 1)
        if fresh:
            self.tracker.hparams(self.cfg.to_dict())
            if self.cfg.train.tb_images:
                self.tracker.images(augmented_samples(self.loaders.train, self.cfg.train.tb_images))
