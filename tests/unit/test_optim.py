import io
import math

import pytest
import torch
from torch import nn

from helpers import REPO
from mbv2train.train import optim
from mbv2train.config import OptimConfig, ScheduleConfig, load_config
from mbv2train.model import MobileNetV2
from mbv2train.train.optim import build_optimizer, build_scheduler, lr_at, parameter_groups, scaled_lr

CONFIGS = REPO / "configs"
IMAGENET_IMAGES = 1_281_167


def by_name(groups):
    return {group["name"]: group for group in groups}


def save_and_load(obj):
    """Round trip through torch.save / torch.load(weights_only=True), as checkpoints do."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- parameter groups -------------------------------------------------------------------------------

def test_mobilenet_v2_splits_into_conv_and_linear_weights_batchnorm_and_classifier_bias():
    groups = by_name(parameter_groups(MobileNetV2(), OptimConfig()))
    # 52 convs (none with bias) + the classifier weight; 52 BatchNorms x (weight, bias); the classifier bias
    assert {name: len(group["params"]) for name, group in groups.items()} == {"decay": 53, "norm": 104, "bias": 1}


def test_parameter_groups_hold_every_trainable_parameter_exactly_once():
    model = MobileNetV2()
    grouped = [p for group in parameter_groups(model, OptimConfig()) for p in group["params"]]
    assert len(grouped) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}


def test_parameter_groups_carry_the_configured_weight_decays():
    cfg = OptimConfig(weight_decay=4e-5, norm_weight_decay=0.0, bias_weight_decay=1e-6)
    groups = by_name(parameter_groups(MobileNetV2(), cfg))
    assert groups["decay"]["weight_decay"] == pytest.approx(4e-5)
    assert groups["norm"]["weight_decay"] == 0.0
    assert groups["bias"]["weight_decay"] == pytest.approx(1e-6)


def test_norm_and_bias_weight_decay_default_to_weight_decay():
    groups = parameter_groups(MobileNetV2(), OptimConfig(weight_decay=3e-5))
    assert [group["weight_decay"] for group in groups] == pytest.approx([3e-5, 3e-5, 3e-5])


def test_group_norm_and_layer_norm_count_as_norm_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = by_name(parameter_groups(model, OptimConfig()))
    norms = (*model[1].parameters(), *model[3].parameters())
    assert {id(p) for p in groups["norm"]["params"]} == {id(p) for p in norms}
    assert {id(p) for p in groups["bias"]["params"]} == {id(model[0].bias), id(model[4].bias)}
    assert {id(p) for p in groups["decay"]["params"]} == {id(model[0].weight), id(model[4].weight)}


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    model = MobileNetV2()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    groups = parameter_groups(model, OptimConfig())
    assert [group["name"] for group in groups] == ["decay", "bias"]


def test_backbone_lr_scale_splits_the_groups_and_keeps_their_weight_decays():
    model = MobileNetV2(num_classes=5)
    cfg = OptimConfig(weight_decay=4e-5, norm_weight_decay=0.0, backbone_lr_scale=0.1)
    groups = parameter_groups(model, cfg)
    # the classifier's groups first: the lr the run logs is the first group's
    assert [(g["name"], len(g["params"]), g.get("lr_scale", 1.0)) for g in groups] == [
        ("decay", 1, 1.0), ("bias", 1, 1.0), ("backbone_decay", 52, 0.1), ("backbone_norm", 104, 0.1)]
    named = by_name(groups)
    assert {id(p) for g in ("decay", "bias") for p in named[g]["params"]} == \
           {id(p) for p in model.classifier.parameters()}
    assert {id(p) for g in ("backbone_decay", "backbone_norm") for p in named[g]["params"]} == \
           {id(p) for p in model.features.parameters()}
    assert named["backbone_norm"]["weight_decay"] == 0.0 and named["backbone_decay"]["weight_decay"] == 4e-5


@pytest.mark.parametrize("schedule", [
    ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.001),
    ScheduleConfig(name="step", warmup_epochs=0.5, gamma=0.5, step_epochs=1),
])
def test_the_backbone_lr_is_its_fraction_of_the_classifier_lr_at_every_step(schedule):
    model = MobileNetV2(num_classes=5, width_mult=0.25)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01, backbone_lr_scale=0.1), global_batch_size=32)
    scheduler = build_scheduler(optimizer, schedule, epochs=4, steps_per_epoch=5)
    for step in range(20):
        head_lr = lr_at(step, 5, 4, 0.01, schedule)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([head_lr] * 2 + [head_lr * 0.1] * 2)
        optimizer.step()
        scheduler.step()


def test_a_resumed_scheduler_keeps_the_backbone_on_its_scaled_curve():
    def build():
        model = MobileNetV2(num_classes=5, width_mult=0.25)
        optimizer = build_optimizer(model, OptimConfig(lr=0.01, backbone_lr_scale=0.1), global_batch_size=32)
        return optimizer, build_scheduler(optimizer, ScheduleConfig(name="cosine"), epochs=2, steps_per_epoch=5)

    optimizer, scheduler = build()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved = save_and_load({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    resumed_optimizer, resumed_scheduler = build()
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    for _ in range(4):
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed_scheduler)):
            opt.step()
            sched.step()
        assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_a_parameter_shared_by_two_layers_is_grouped_once():
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    groups = parameter_groups(nn.Sequential(first, second), OptimConfig())
    assert [(group["name"], len(group["params"])) for group in groups] == [("decay", 1)]


# --- learning-rate scaling and optimizers -----------------------------------------------------------

def test_scaled_lr_is_linear_in_the_global_batch():
    cfg = OptimConfig(lr=0.5, lr_reference_batch=1024)
    assert scaled_lr(cfg, 1024) == pytest.approx(0.5)
    assert scaled_lr(cfg, 256) == pytest.approx(0.125)
    assert scaled_lr(cfg, 4096) == pytest.approx(2.0)


def test_scaled_lr_without_a_reference_batch_is_the_configured_lr():
    assert scaled_lr(OptimConfig(lr=0.045, lr_reference_batch=None), 4096) == pytest.approx(0.045)


def test_sgd_gets_scaled_lr_momentum_and_nesterov():
    cfg = OptimConfig(name="sgd", lr=0.1, lr_reference_batch=256, momentum=0.8, nesterov=True)
    optimizer = build_optimizer(MobileNetV2(), cfg, global_batch_size=512)
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.2)
        assert (group["momentum"], group["nesterov"]) == (pytest.approx(0.8), True)


def test_rmsprop_gets_alpha_eps_and_momentum():
    cfg = OptimConfig(name="rmsprop", lr=0.045, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=4e-5)
    optimizer = build_optimizer(MobileNetV2(), cfg, global_batch_size=96)
    assert isinstance(optimizer, torch.optim.RMSprop)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.045)
        assert (group["alpha"], group["eps"], group["momentum"]) == pytest.approx((0.9, 0.0316, 0.9))
        assert not group["centered"]
    assert by_name(optimizer.param_groups)["decay"]["weight_decay"] == pytest.approx(4e-5)


def test_adamw_gets_betas_eps_and_decoupled_weight_decay():
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, norm_weight_decay=0.0)
    optimizer = build_optimizer(MobileNetV2(), cfg, global_batch_size=256)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = by_name(optimizer.param_groups)
    assert groups["decay"]["betas"] == pytest.approx((0.9, 0.95))
    assert groups["decay"]["eps"] == pytest.approx(1e-8)
    assert (groups["decay"]["weight_decay"], groups["norm"]["weight_decay"]) == pytest.approx((0.05, 0.0))


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adamw"])
def test_optimizer_state_survives_a_weights_only_round_trip(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    cfg = OptimConfig(name=name, eps=1e-3)
    optimizer = build_optimizer(model, cfg, global_batch_size=8)
    model(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()

    restored = build_optimizer(model, cfg, global_batch_size=8)
    restored.load_state_dict(save_and_load(optimizer.state_dict()))
    saved, loaded = optimizer.state_dict(), restored.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), key


# --- a checkpoint moved to another kind of device ---------------------------------------------------

# What build_optimizer asks for where the optimizers keep all their state on the device (a GPU)
ON_DEVICE_OPTIONS = {"sgd": {"fused": True}, "adamw": {"fused": True}, "rmsprop": {"capturable": True}}
DEVICE_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def stepped_state(name):
    """An optimizer's state dict after two steps, saved and loaded as a checkpoint is."""
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name=name), global_batch_size=8)
    for _ in range(2):
        model(torch.randn(8, 4)).square().sum().backward()
        optimizer.step()
    return save_and_load(optimizer.state_dict())


def device_options(optimizer):
    return [{key: group.get(key) for key in DEVICE_OPTIONS} for group in optimizer.param_groups]


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_state_saved_on_a_gpu_resumes_on_the_cpu_with_the_cpus_options(name):
    saved = stepped_state(name)
    for group in saved["param_groups"]:  # as a GPU run writes them
        group.update(ON_DEVICE_OPTIONS[name])
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name=name), global_batch_size=8)
    built = device_options(optimizer)
    optimizer.load_state_dict(saved)
    assert device_options(optimizer) == built
    assert not any(group.get(key) for group in built for key in ("fused", "capturable"))
    assert [group["lr"] for group in optimizer.param_groups] == [group["lr"] for group in saved["param_groups"]]
    model(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()  # capturable RMSprop refuses CPU tensors
    assert all(state["step"].device.type == "cpu" and int(state["step"]) == 3 for state in optimizer.state.values()
               if "step" in state)


@pytest.mark.parametrize("name, device", [("sgd", "cpu"), ("adamw", "cpu"), ("rmsprop", "meta")])
def test_state_saved_on_the_cpu_resumes_on_a_device_with_the_devices_options_and_step_counts_there(
        monkeypatch, name, device):
    # No GPU here: the CPU (fused kernels) or the meta device (capturable) stands in for one.
    saved = stepped_state(name)
    monkeypatch.setattr(optim, "STATE_ON_DEVICE", (device,))
    model = small_model().to(device)
    optimizer = build_optimizer(model, OptimConfig(name=name), global_batch_size=8)
    built = device_options(optimizer)
    optimizer.load_state_dict(saved)
    assert device_options(optimizer) == built
    assert all(group.get(key) for group in built for key in ON_DEVICE_OPTIONS[name])
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    assert all(step.device.type == device and step.dtype == torch.float32 for step in steps)
    assert len(steps) == (0 if name == "sgd" else len(list(model.parameters())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_state_saved_on_the_cpu_resumes_on_the_gpu_with_its_options_and_step_counts_there(name):
    saved = stepped_state(name)
    model = small_model().cuda()
    optimizer = build_optimizer(model, OptimConfig(name=name), global_batch_size=8)
    optimizer.load_state_dict(saved)
    assert all(group[key] for group in optimizer.param_groups for key in ON_DEVICE_OPTIONS[name])
    assert all(value.device.type == "cuda" for state in optimizer.state.values() for value in state.values())
    model(torch.randn(8, 4, device="cuda")).square().sum().backward()
    optimizer.step()


# --- learning-rate curves ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, processes", [(32, 8), (256, 1)])
def test_imagenet_recipe_starts_epoch_e_at_0_045_times_0_98_to_the_e(batch_size, processes):
    cfg = load_config(CONFIGS / "imagenet.yaml", [f"data.batch_size={batch_size}"])
    global_batch = batch_size * processes
    steps_per_epoch = IMAGENET_IMAGES // global_batch
    base_lr = scaled_lr(cfg.optim, global_batch)
    assert cfg.train.epochs == 300
    for epoch in (0, 1, 2, 10, 100, 150, 299):
        lr = lr_at(epoch * steps_per_epoch, steps_per_epoch, cfg.train.epochs, base_lr, cfg.schedule)
        assert lr == pytest.approx(0.045 * 0.98 ** epoch, rel=1e-9), epoch


def imagenet_v2_curve():
    """lr(t) for configs/imagenet-v2.yaml at global batch 1024, t in (fractional) epochs."""
    cfg = load_config(CONFIGS / "imagenet-v2.yaml")
    steps_per_epoch = 1250  # ~ImageNet at batch 1024, and a multiple of 2 so t = 2.5 is a whole step
    base_lr = scaled_lr(cfg.optim, 1024)
    assert (base_lr, cfg.train.epochs) == (pytest.approx(0.5), 600)

    def lr(t):
        return lr_at(round(t * steps_per_epoch), steps_per_epoch, cfg.train.epochs, base_lr, cfg.schedule)
    return lr


def test_imagenet_v2_recipe_warms_up_linearly_over_5_epochs_from_1_percent():
    lr = imagenet_v2_curve()
    for t in (0.0, 2.5, 5.0):
        assert lr(t) == pytest.approx(0.5 * (0.01 + 0.99 * t / 5)), t
    assert lr(0.0) == pytest.approx(0.005)
    assert lr(2.5) == pytest.approx(0.2525)


def test_imagenet_v2_recipe_follows_the_cosine_after_warmup():
    lr = imagenet_v2_curve()
    for t in (5.0, 100.0, 302.5, 500.0, 600.0):
        assert lr(t) == pytest.approx(0.25 * (1 + math.cos(math.pi * (t - 5) / 595)), abs=1e-12), t
    assert lr(5.0) == pytest.approx(0.5)
    assert lr(302.5) == pytest.approx(0.25)
    assert lr(600.0) == pytest.approx(0.0, abs=1e-12)


def test_exponential_decays_smoothly_within_an_epoch():
    cfg = ScheduleConfig(name="exponential", gamma=0.98)
    assert lr_at(5, 10, 300, 1.0, cfg) == pytest.approx(0.98 ** 0.5)


def test_step_schedule_multiplies_by_gamma_every_step_epochs_after_warmup():
    cfg = ScheduleConfig(name="step", gamma=0.1, step_epochs=30, warmup_epochs=2)
    values = [lr_at(round(t * 10), 10, 90, 1.0, cfg) for t in (2, 31.9, 32, 61.9, 62)]
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_constant_schedule_holds_base_lr_after_warmup():
    cfg = ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.5)
    values = [lr_at(step, 4, 10, 0.2, cfg) for step in (0, 2, 4, 39)]
    assert values == pytest.approx([0.1, 0.15, 0.2, 0.2])


def test_cosine_ends_at_min_lr_and_stays_there():
    cfg = ScheduleConfig(name="cosine", min_lr=1e-4)
    assert lr_at(100, 10, 10, 0.1, cfg) == pytest.approx(1e-4)
    assert lr_at(150, 10, 10, 0.1, cfg) == pytest.approx(1e-4)


# --- scheduler --------------------------------------------------------------------------------------

SHORT_RUN = dict(cfg=ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.1, min_lr=0.01),
                 epochs=6, steps_per_epoch=5)


def short_run_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimConfig(lr=0.2, lr_reference_batch=None), global_batch_size=8)
    return model, optimizer


def train_steps(model, optimizer, scheduler, steps):
    """Run ``steps`` optimizer steps; return the lr of every group at each step."""
    used = []
    for _ in range(steps):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    return used


def test_scheduler_gives_lr_at_for_every_step():
    model, optimizer = short_run_parts()
    scheduler = build_scheduler(optimizer, **SHORT_RUN)
    total = SHORT_RUN["epochs"] * SHORT_RUN["steps_per_epoch"]
    used = train_steps(model, optimizer, scheduler, total)
    expected = [lr_at(step, SHORT_RUN["steps_per_epoch"], SHORT_RUN["epochs"], 0.2, SHORT_RUN["cfg"])
                for step in range(total)]
    assert [lrs[0] for lrs in used] == pytest.approx(expected)
    assert all(len(set(lrs)) == 1 for lrs in used)  # every parameter group on the same curve


@pytest.mark.parametrize("optimizer_state_first", [False, True])
def test_scheduler_rebuilt_mid_run_continues_with_the_same_lrs(optimizer_state_first):
    total = SHORT_RUN["epochs"] * SHORT_RUN["steps_per_epoch"]
    middle = 8  # inside the warmup, so a resume at the wrong lr would show

    model, optimizer = short_run_parts()
    uninterrupted = train_steps(model, optimizer, build_scheduler(optimizer, **SHORT_RUN), total)

    model, optimizer = short_run_parts()
    scheduler = build_scheduler(optimizer, **SHORT_RUN)
    first_part = train_steps(model, optimizer, scheduler, middle)
    checkpoint = save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict()})

    # A fresh process: new model, optimizer and scheduler, state loaded in either order.
    model, optimizer = short_run_parts()
    model.load_state_dict(checkpoint["model"])
    if optimizer_state_first:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler = build_scheduler(optimizer, **SHORT_RUN)
    else:
        scheduler = build_scheduler(optimizer, **SHORT_RUN)
        optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    second_part = train_steps(model, optimizer, scheduler, total - middle)

    assert first_part + second_part == uninterrupted


@pytest.mark.parametrize("name, expected", [("rmsprop", 0.0316), ("adamw", 1e-8)])
def test_unset_eps_takes_each_optimizers_own_default(name, expected):
    optimizer = build_optimizer(MobileNetV2(num_classes=10), OptimConfig(name=name), global_batch_size=32)
    assert optimizer.param_groups[0]["eps"] == pytest.approx(expected)
