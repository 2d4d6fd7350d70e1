"""A steady-state training step never makes the host wait for the device; a non-finite step is undone on
the device, exactly, and reported at the next boundary."""

import io
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.optim import optimizer as torch_optimizer, rmsprop
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.weak import WeakIdKeyDictionary

from helpers import metric_rows, run_ckpt, torchrun, train_args
from mbv2train import devices
from mbv2train.train import optim, step_guard
from mbv2train.train.epoch import EpochHooks, EpochProgress, TrainSettings, train_one_epoch
from mbv2train.config import OptimConfig, ScheduleConfig
from mbv2train.errors import NonFiniteLoss
from mbv2train.faults import Faults
from mbv2train.model import MobileNetV2
from mbv2train.preemption import Preempted
from mbv2train.progress import Progress
from mbv2train.train.trainer import fit

# The Tensor methods that copy a value to the host: on a GPU each waits for all queued work.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# The torch functions that make a tensor on the host unless given another device
FACTORIES = ("empty", "zeros", "ones", "full", "tensor")
DEVICE = torch.device("cpu")  # the device here, named as the code names it (SyncCounter)
STEPS = 7  # optimizer steps in the tiny epochs below
STEADY = range(3, 6)  # the steps counted: not the first (warm-up) nor the last (the epoch's end reads the sums)


@pytest.fixture(autouse=True)
def device_path_on_the_cpu(monkeypatch):
    """Run the device path here: on the CPU the guard would otherwise read its flags on the host, where
    that costs nothing (step_guard.HOST_READ_DEVICES), and the optimizers would keep their step counts on
    the host (optim.STATE_ON_DEVICE); these tests are about the path a GPU takes. torch's capturable
    RMSprop (what a GPU gets) refuses CPU tensors only because it has no use there: allowed here."""
    monkeypatch.setattr(step_guard, "HOST_READ_DEVICES", ())
    monkeypatch.setattr(optim, "STATE_ON_DEVICE", (*optim.STATE_ON_DEVICE, "cpu"))
    capturable_devices = rmsprop._get_capturable_supported_devices
    monkeypatch.setattr(rmsprop, "_get_capturable_supported_devices",
                        lambda *args, **kwargs: [*capturable_devices(*args, **kwargs), "cpu"])


class SyncCounter:
    """Counts, while ``active``, what would make the host wait for a GPU, wherever it comes from (our code
    or torch's), with the line that made each:

    - a call of SYNC_METHODS;
    - a copy to the host: ``.to("cpu")`` (or ``device="cpu"``), and ``copy_`` into a host tensor;
    - an optimizer step with state on the host, or on another device than its parameter: torch keeps
      ``step`` on the host unless the group is capturable or fused, and undoing a step on the device then
      copies the step's flag to the host (step_guard.Rollback).

    Here the CPU plays the device, so the host is told apart by how a tensor came to be: a torch factory
    given no device or the string "cpu", ``.cpu()`` and ``.to("cpu")`` make host tensors (a copy, as from
    a GPU), ``.to(device)`` of a host tensor makes a device one. A device named by a ``torch.device`` (as
    the code names the training device: ``tensor.device``, ``runtime.device``) is taken to be the device, so
    ``.to(torch.device("cpu"))`` goes unseen, as do copies by ``torch._foreach_copy_``.
    """

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        self.host = WeakIdKeyDictionary()  # the tensors that would live on the host
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.Tensor, "to", self._moving(torch.Tensor.to))
        monkeypatch.setattr(torch.Tensor, "copy_", self._copying(torch.Tensor.copy_))
        for name in FACTORIES:
            monkeypatch.setattr(torch, name, self._making(getattr(torch, name)))
        # (torch's public register_optimizer_step_pre_hook leaves nothing for monkeypatch to undo)
        monkeypatch.setitem(torch_optimizer._global_optimizer_pre_hooks, ("sync counter", id(self)),
                            self._checking_optimizer_state)

    def _count(self, what: str, frame) -> None:
        self.calls.append(f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def _on_host(self, tensor, result):
        """``result`` as a host tensor of its own (on the CPU, moving to the CPU returns the tensor itself)."""
        result = result.clone() if result is tensor else result
        self.host[result] = True
        return result

    def _counting(self, name, original):
        def counting(tensor, *args, **kwargs):
            if self.active and tensor not in self.host:  # reading the host's own memory waits for nothing
                self._count(name, sys._getframe(1))
            result = original(tensor, *args, **kwargs)
            return self._on_host(tensor, result) if name == "cpu" else result
        return counting

    def _moving(self, original):
        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
            result = original(tensor, *args, **kwargs)
            if names_the_host(target):
                if self.active and tensor not in self.host:
                    self._count("to cpu", sys._getframe(1))
                return self._on_host(tensor, result)
            if tensor in self.host:
                if target is not None:  # uploaded: a device tensor of its own
                    return result.clone() if result is tensor else result
                self.host[result] = True  # the same host tensor in another dtype
            return result
        return to

    def _copying(self, original):
        def copy_(tensor, source, *args, **kwargs):
            if self.active and tensor in self.host and source not in self.host:
                self._count("copy_ into a host tensor", sys._getframe(1))
            return original(tensor, source, *args, **kwargs)
        return copy_

    def _making(self, factory):
        def make(*args, **kwargs):
            made = factory(*args, **kwargs)
            if kwargs.get("device") is None or names_the_host(kwargs["device"]):
                self.host[made] = True
            return made
        return make

    def _checking_optimizer_state(self, optimizer, args, kwargs):
        if not self.active:
            return
        for group in optimizer.param_groups:
            state_on_device = group.get("capturable") or group.get("fused")
            for param in group["params"]:
                for name, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and ((name == "step" and not state_on_device) or value in self.host
                                                   or value.device != param.device):
                        self._count(f"optimizer state on the host ({name!r} of group {group.get('name')!r})",
                                    outside_torch(sys._getframe(1)))
                        return  # once per step


def names_the_host(device) -> bool:
    return isinstance(device, str) and torch.device(device).type == "cpu"


def outside_torch(frame):
    """The first frame from ``frame`` up that is not torch's own: where optimizer.step() was called."""
    while f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    return MobileNetV2(num_classes=3, width_mult=0.25).to(device).to(memory_format=torch.channels_last)


def tiny_batches(count, batch_size=4, size=16, pin=False):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 3, (batch_size,), generator=generator)
        batches.append((images.pin_memory() if pin else images, labels, ("",) * batch_size))
    return batches


def parts_for(model, optimizer="sgd", amp=None, ema=True, steps=STEPS) -> SimpleNamespace:
    """What train_one_epoch needs besides the data, as the trainer builds it."""
    device = next(model.parameters()).device
    opt = optim.build_optimizer(model, OptimConfig(name=optimizer, lr=0.05), global_batch_size=4)
    averaged = None
    if ema:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True, device=device)
    return SimpleNamespace(
        model=model, device=device, optimizer=opt, ema=averaged,
        scheduler=optim.build_scheduler(opt, ScheduleConfig(warmup_epochs=0.5), epochs=1, steps_per_epoch=steps),
        scaler=torch.amp.GradScaler(device.type) if amp == torch.float16 else None,
        runtime=devices.Runtime.create(device, amp, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def run_epoch(parts, *, accum=1, skip=False, clip=1.0, faults=None, after_step=None, log_every=10**6,
              log_step=None, steps=STEPS):
    """One epoch of ``steps`` optimizer steps of train_one_epoch on in-memory batches, with every
    per-step policy on, logging every ``log_every`` steps (far away by default) and checkpointing never."""
    settings = TrainSettings(seed=0, label_smoothing=0.1, accum_steps=accum, grad_clip_norm=clip,
                                    log_every_steps=log_every, skip_nonfinite=skip, max_nonfinite_skips=3)
    hooks = EpochHooks(log_step=log_step or (lambda step, values: None), after_step=after_step,
                              faults=faults or Faults())
    bar = Progress(steps * accum, "test", log_every=10**6, enabled=True)
    batches = tiny_batches(steps * accum, pin=parts.device.type == "cuda")
    metrics, _ = train_one_epoch(parts.model, batches, parts.optimizer, parts.scheduler, parts.scaler,
                                        parts.runtime, settings, epoch=1, global_step=0, steps_per_epoch=steps,
                                        epoch_progress=EpochProgress.from_state(None, parts.device), ema=parts.ema,
                                        bar=bar, hooks=hooks)
    return metrics


# ------------------------------------------------------------------------------------ counting host syncs


def test_the_counter_counts_a_deliberate_item(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(2, device=DEVICE).sum().item()
    if torch.ones(1, device=DEVICE):
        pass
    counter.active = False
    assert [call.split(" at ")[0] for call in counter.calls] == ["item", "__bool__"]


@pytest.mark.parametrize("optimizer, settings", [
    ("sgd", {}),
    ("rmsprop", {"accum": 2, "skip": True}),
    ("sgd", {"faults": Faults(nan_loss_at_step=4), "skip": True}),  # a skipped step does not wait either
], ids=["sgd", "rmsprop-accum2-skip", "nan-step"])
def test_steady_state_steps_make_no_host_sync(monkeypatch, optimizer, settings):
    counter = SyncCounter(monkeypatch)

    def after_step(step, done):
        counter.active = step + 1 in STEADY  # from the end of the step before to the end of the last one

    metrics = run_epoch(parts_for(tiny_model(), optimizer), after_step=after_step, **settings)
    assert counter.calls == []
    assert metrics["nonfinite_skips"] == (1 if "faults" in settings else 0)  # read at the epoch's end


@pytest.mark.parametrize("plant, counted", [
    (lambda done: done.loss_sum.to("cpu"), "to cpu"),
    (lambda done: done.loss_sum.to(device="cpu", dtype=torch.float64), "to cpu"),
    (lambda done: torch.zeros(()).copy_(done.loss_sum), "copy_ into a host tensor"),
    (lambda done: torch.empty((), device="cpu").copy_(done.loss_sum), "copy_ into a host tensor"),
], ids=["to-cpu", "to-device-cpu", "copy-into-zeros", "copy-into-empty-on-cpu"])
def test_the_counter_counts_a_copy_to_the_host_planted_in_each_step(monkeypatch, plant, counted):
    counter = SyncCounter(monkeypatch)

    def after_step(step, done):
        counter.active = step + 1 in STEADY
        if counter.active:
            plant(done)  # done.loss_sum: the epoch's running loss, on the device

    run_epoch(parts_for(tiny_model()), after_step=after_step)
    assert [call.split(" at ")[0] for call in counter.calls] == [counted] * len(STEADY)
    assert all(call.endswith(f"{__file__}:{plant.__code__.co_firstlineno}") for call in counter.calls)


def steps_moved_to_the_host(optimizer):
    optim.materialize_state(optimizer)
    for state in optimizer.state.values():
        state["step"] = state["step"].cpu()


@pytest.mark.parametrize("optimizer, state_on_device, plant", [
    ("adamw", (), None),  # torch's defaults keep the step counts on the host
    ("rmsprop", (), None),
    ("adamw", ("cpu",), steps_moved_to_the_host),  # fused, its step counts then moved to the host
], ids=["adamw-defaults", "rmsprop-defaults", "fused-adamw-steps-moved"])
def test_the_counter_counts_optimizer_state_left_on_the_host(monkeypatch, optimizer, state_on_device, plant):
    counter = SyncCounter(monkeypatch)
    monkeypatch.setattr(optim, "STATE_ON_DEVICE", state_on_device)
    parts = parts_for(tiny_model(), optimizer)
    if plant is not None:
        plant(parts.optimizer)

    def after_step(step, done):
        counter.active = step + 1 in STEADY

    run_epoch(parts, after_step=after_step)
    counted = "optimizer state on the host ('step' of group 'decay')"
    assert [call.split(" at ")[0] for call in counter.calls] == [counted] * len(STEADY)
    assert all("step_guard.py" in call for call in counter.calls)  # where optimizer.step() is called


def saved_and_loaded(obj):
    """Through torch.save and torch.load(weights_only=True, map_location="cpu"), as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, map_location="cpu")


def resumed_from_a_host_checkpoint(monkeypatch, optimizer, device="cpu"):
    """Parts whose optimizer continues one that kept its step counts on the host (a CPU run's)."""
    with monkeypatch.context() as patched:
        patched.setattr(optim, "STATE_ON_DEVICE", ())
        host_run = parts_for(tiny_model(), optimizer)
    run_epoch(host_run, steps=2)
    parts = parts_for(tiny_model(device), optimizer)
    parts.optimizer.load_state_dict(saved_and_loaded(host_run.optimizer.state_dict()))
    assert [int(state["step"]) for state in parts.optimizer.state.values()] == [2] * len(parts.optimizer.state)
    return parts


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_steps_of_an_optimizer_resumed_from_a_host_checkpoint_make_no_host_sync(monkeypatch, optimizer):
    parts = resumed_from_a_host_checkpoint(monkeypatch, optimizer)
    counter = SyncCounter(monkeypatch)

    def after_step(step, done):
        counter.active = step + 1 in STEADY

    run_epoch(parts, after_step=after_step, skip=True)
    assert counter.calls == []


def test_a_log_step_inside_the_window_is_seen_by_the_counter(monkeypatch):
    # the same count with a log step in the window: the loss is read there, and the counter must see it
    counter = SyncCounter(monkeypatch)
    logged = []

    def after_step(step, done):
        counter.active = step + 1 in STEADY

    run_epoch(parts_for(tiny_model()), after_step=after_step, log_every=4,
              log_step=lambda step, values: logged.append(step))
    assert logged == [4] and any(call.startswith("item") for call in counter.calls)


@pytest.mark.slow  # loader worker processes
def test_trainer_steps_make_no_host_sync(tiny_config, monkeypatch):
    # The whole step as fit runs it, the trainer's stop and checkpoint checks included. Two loader
    # workers keep the images' transforms (which draw random numbers with .item()) out of this process.
    counter = SyncCounter(monkeypatch)

    class CountingFaults(Faults):
        def after_step(self, step, rank=0):
            super().after_step(step, rank)
            counter.active = step + 1 in STEADY

    fit(tiny_config("data.batch_size=2", "data.num_workers=2", "train.epochs=1", "train.ema=true",
                    "train.log_every_steps=1000", "train.grad_clip_norm=1.0"), faults=CountingFaults())
    assert counter.calls == []


@pytest.mark.slow  # loader worker processes
def test_trainer_steps_resumed_from_a_host_checkpoint_make_no_host_sync(tiny_config, monkeypatch):
    # A run whose optimizer kept its step counts on the host (torch's defaults, a CPU run's), stopped after
    # step 2 and resumed where the state stays on the device: `mbv2 train --resume` from a CPU to a GPU.
    settings = ("data.batch_size=2", "data.num_workers=2", "train.epochs=1", "train.ema=true",
                "train.log_every_steps=1000", "train.grad_clip_norm=1.0", "optim.name=adamw")
    with monkeypatch.context() as on_the_host, pytest.raises(Preempted):
        on_the_host.setattr(optim, "STATE_ON_DEVICE", ())
        fit(tiny_config(*settings), faults=Faults(sigterm_at_step=2))
    counter = SyncCounter(monkeypatch)

    class CountingFaults(Faults):
        def after_step(self, step, rank=0):
            super().after_step(step, rank)
            counter.active = step + 1 in STEADY

    fit(tiny_config(*settings), resume="auto", faults=CountingFaults())
    assert counter.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer, amp", [("sgd", torch.bfloat16), ("adamw", torch.bfloat16),
                                            ("rmsprop", torch.float16), ("sgd", None)])
def test_steady_state_steps_pass_cuda_sync_debug_mode(optimizer, amp):
    def after_step(step, done):
        torch.cuda.set_sync_debug_mode("error" if step + 1 in STEADY else 0)

    try:
        metrics = run_epoch(parts_for(tiny_model("cuda"), optimizer, amp=amp), accum=2, skip=True,
                            faults=Faults(nan_loss_at_step=4), after_step=after_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert metrics["nonfinite_skips"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_steps_of_an_optimizer_resumed_from_a_cpu_checkpoint_pass_cuda_sync_debug_mode(monkeypatch, optimizer):
    parts = resumed_from_a_host_checkpoint(monkeypatch, optimizer, device="cuda")
    assert {state["step"].device.type for state in parts.optimizer.state.values()} == {"cuda"}

    def after_step(step, done):
        torch.cuda.set_sync_debug_mode("error" if step + 1 in STEADY else 0)

    try:
        metrics = run_epoch(parts, skip=True, faults=Faults(nan_loss_at_step=4), after_step=after_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert metrics["nonfinite_skips"] == 1


# ------------------------------------------------------------------------------------ undoing a bad step


def snapshot(parts):
    """Copies of everything a step may change: weights, BatchNorm buffers, optimizer state, EMA."""
    return {"model": {k: v.clone() for k, v in parts.model.state_dict().items()},
            "optimizer": {(i, name): value.clone() for i, state in enumerate(parts.optimizer.state.values())
                          for name, value in state.items() if torch.is_tensor(value)},
            "ema": {k: v.clone() for k, v in parts.ema.state_dict().items()}}


def assert_identical(a, b):
    for part in a:
        assert a[part] and a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key}"


def snapshots_around(step, optimizer="sgd", **settings):
    """(everything after step - 1, everything after step, the epoch's metrics or the NonFiniteLoss)."""
    parts, states = parts_for(tiny_model(), optimizer), {}

    def after_step(done_step, done):
        states[done_step] = snapshot(parts)

    try:
        outcome = run_epoch(parts, after_step=after_step, **settings)
    except NonFiniteLoss as error:
        outcome = error
    return states[step - 1], states[step], outcome


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("accum", [1, 2])
def test_a_skipped_step_leaves_weights_buffers_optimizer_and_ema_bit_identical(optimizer, accum):
    faults = Faults(nan_loss_at_step=3, nan_loss_micro_batch=accum)  # with accum 2: the 2nd micro-batch only
    before, after, metrics = snapshots_around(3, optimizer, accum=accum, skip=True, faults=faults)
    assert_identical(before, after)
    assert metrics["nonfinite_skips"] == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_cpu_host_path_ends_bit_identical_to_the_device_path(monkeypatch, optimizer):
    faults = Faults(nan_loss_at_step=3)
    _, device_path, _ = snapshots_around(5, optimizer, skip=True, faults=faults)
    monkeypatch.setattr(step_guard, "HOST_READ_DEVICES", ("cpu",))
    counter = SyncCounter(monkeypatch)
    counter.active = True
    _, host_path, metrics = snapshots_around(5, optimizer, skip=True, faults=faults)
    counter.active = False
    assert any(call.startswith("__bool__") and "step_guard.py" in call for call in counter.calls)  # it ran
    assert_identical(device_path, host_path)
    assert metrics["nonfinite_skips"] == 1


def test_a_taken_step_changes_them():  # the other side of the test above: the snapshots can differ
    before, after, _ = snapshots_around(3)
    for part in before:
        assert any(not torch.equal(before[part][k], after[part][k]) for k in before[part]), part


@pytest.mark.parametrize("accum", [1, 2])
def test_raise_mode_also_undoes_the_step_and_names_it_at_the_boundary(accum):
    faults = Faults(nan_loss_at_step=3, nan_loss_micro_batch=accum)
    before, after, outcome = snapshots_around(3, accum=accum, skip=False, faults=faults)
    assert_identical(before, after)
    # no log step or checkpoint in this epoch: its end is the first look at the flags
    assert isinstance(outcome, NonFiniteLoss)
    assert str(outcome) == "non-finite loss at step 3 (epoch 1); the last checkpoint holds finite weights"


def test_rank_0s_progress_line_reads_the_flags_but_only_a_boundary_every_process_reaches_stops_the_run():
    # Under torchrun only rank 0 shows progress: a stop there would leave the other processes waiting for it.
    parts, steps = parts_for(tiny_model()), []
    settings = TrainSettings(seed=0, log_every_steps=4)
    hooks = EpochHooks(log_step=lambda step, values: None, faults=Faults(nan_loss_at_step=2),
                              after_step=lambda step, done: steps.append(step))
    bar = Progress(STEPS, "test", log_every=1, enabled=True)  # numbers after every step
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step 2 "):
        train_one_epoch(parts.model, tiny_batches(STEPS), parts.optimizer, parts.scheduler, None, parts.runtime,
                               settings, epoch=1, global_step=0, steps_per_epoch=STEPS,
                               epoch_progress=EpochProgress.from_state(None, parts.device), bar=bar,
                               hooks=hooks)
    assert steps == [1, 2, 3]  # step 4's log step stopped it, before its checkpoint hook


def test_a_skipped_first_step_leaves_the_weights_and_a_zero_momentum():
    parts = parts_for(tiny_model(), ema=False)
    initial = {k: v.clone() for k, v in parts.model.state_dict().items()}
    states = {}

    def after_step(step, done):
        if step == 1:
            states["model"] = {k: v.clone() for k, v in parts.model.state_dict().items()}
            states["momentum"] = [s["momentum_buffer"].clone() for s in parts.optimizer.state.values()]

    run_epoch(parts, skip=True, faults=Faults(nan_loss_at_step=1), after_step=after_step, steps=2)
    assert all(torch.equal(initial[k], states["model"][k]) for k in initial)
    assert states["momentum"] and not any(m.any() for m in states["momentum"])  # as before any step


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_materialized_state_steps_exactly_like_torchs_own_first_step(name):
    models = [tiny_model(), tiny_model()]
    optimizers = [optim.build_optimizer(m, OptimConfig(name=name, lr=0.01, nesterov=name == "sgd"), 4)
                  for m in models]
    optim.materialize_state(optimizers[1])
    assert optimizers[1].state and not optimizers[0].state
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in models)))  # no weight moved
    for _ in range(2):
        for model, optimizer in zip(models, optimizers):
            torch.manual_seed(2)
            torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 2])).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in models)))
    assert all(torch.isfinite(p).all() for p in models[0].parameters())  # NaN would not equal itself
    for a, b in zip(*(o.state_dict()["state"].values() for o in optimizers)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ fetching ahead


def test_a_loader_error_met_while_fetching_ahead_is_raised_at_the_batch_it_belongs_to():
    from mbv2train.train.prefetch import Prefetcher

    def loader():
        yield from tiny_batches(2)
        raise OSError("unreadable image")

    batches = Prefetcher(loader(), torch.device("cpu"))
    batches.take()
    batches.fetch()  # batch 2, during step 1
    batches.take()
    batches.fetch()  # batch 3 fails, during step 2: step 2 must still finish
    with pytest.raises(OSError, match="unreadable image"):
        batches.take()


# ------------------------------------------------------------------------------------ stop signals, torchrun


@pytest.mark.slow
def test_under_torchrun_a_stop_signal_stops_every_process_one_step_later_and_resumes_exactly(image_root, tmp_path):
    # Each process sends itself SIGTERM after step 4; they agree on it while step 5 computes, stop together
    # after step 5, and the resumed run ends where an uninterrupted one does.
    def run(path, *extra):
        return torchrun([*train_args(image_root, path, "data.batch_size=2", "train.epochs=1", "train.ema=true"),
                         *extra])

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = run(tmp_path / "run", "--fault", "sigterm_at_step=4")
    assert "stopped by SIGTERM at step 5" in stopped.stdout, stopped.stderr[-3000:]
    assert run_ckpt(tmp_path / "run")["global_step"] == 5
    resumed = run(tmp_path / "run", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (run_ckpt(tmp_path / name) for name in ("whole", "run"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    rows = [metric_rows(tmp_path / name) for name in ("whole", "run")]
    assert rows[0] == rows[1]
