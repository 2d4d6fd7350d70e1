import pytest
import torch
import torchvision
from torch import nn

from mbv2train.config import ModelConfig
from mbv2train.model import InvertedResidual, MobileNetV2, build_model, make_divisible

GRID_WIDTHS = [0.35, 0.5, 0.75, 1.0, 1.3, 1.4]


def blocks(model):
    return [m for m in model.features if isinstance(m, InvertedResidual)]


def test_width_1_has_the_published_parameter_count():
    assert sum(p.numel() for p in MobileNetV2().parameters()) == 3_504_872


@pytest.mark.parametrize("width", GRID_WIDTHS)
def test_torchvision_weights_load_strictly_and_give_identical_outputs(width):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(width_mult=width, num_classes=10).eval()
    # Non-trivial BatchNorm statistics, so that a misplaced BN would change the output.
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = MobileNetV2(num_classes=10, width_mult=width).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("width", GRID_WIDTHS)
def test_state_dict_keys_and_shapes_equal_torchvisions(width):
    ours = MobileNetV2(width_mult=width).state_dict()
    reference = torchvision.models.mobilenet_v2(width_mult=width).state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_stages_follow_table_2_of_the_paper():
    model = MobileNetV2()
    assert model.features[0][0].out_channels == 32 and model.features[0][0].stride == (2, 2)
    expected = []  # (out_channels, stride) for each block, expanded from (t, c, n, s)
    for _t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        expected += [(c, s)] + [(c, 1)] * (n - 1)
    assert [(b.out_channels, b.stride) for b in blocks(model)] == expected
    assert model.features[-1][0].out_channels == 1280
    assert isinstance(model.classifier[0], nn.Dropout) and isinstance(model.classifier[1], nn.Linear)


def test_projection_is_linear_and_other_convs_use_relu6():
    for block in blocks(MobileNetV2()):
        layers = list(block.conv)
        assert isinstance(layers[-2], nn.Conv2d) and layers[-2].kernel_size == (1, 1)
        assert isinstance(layers[-1], nn.BatchNorm2d)  # nothing after the projection's BN
        for unit in layers[:-2]:  # expansion and depthwise: conv, BN, ReLU6
            assert [type(m) for m in unit] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]


def test_first_block_has_no_expansion_and_the_others_expand_six_times():
    first, *rest = blocks(MobileNetV2())
    depthwise = first.conv[0][0]
    assert depthwise.groups == depthwise.in_channels == 32  # depthwise straight on the stem's output
    for block in rest:
        expand, depthwise = block.conv[0][0], block.conv[1][0]
        assert expand.kernel_size == (1, 1)
        assert expand.out_channels == 6 * expand.in_channels
        assert depthwise.groups == depthwise.in_channels


def test_shortcut_only_when_stride_1_and_channels_match():
    model = MobileNetV2()
    with_shortcut = [i for i, b in enumerate(blocks(model)) if b.use_res_connect]
    assert with_shortcut == [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]


def test_shortcut_adds_the_input():
    block = InvertedResidual(24, 24, stride=1, expand_ratio=6).eval()
    nn.init.zeros_(block.conv[-1].weight)  # the residual branch now outputs BN bias = 0
    x = torch.randn(1, 24, 8, 8)
    assert torch.equal(block(x), x)


def test_make_divisible_rounds_to_multiples_of_8_keeping_90_percent():
    for value in [3.2, 8, 11.2, 16.8, 18, 22.4, 44.8, 100, 1280 * 1.4, 320 * 0.35]:
        rounded = make_divisible(value, 8)
        assert rounded % 8 == 0
        assert rounded >= 0.9 * value
        assert rounded >= 8
    assert make_divisible(32, 8) == 32
    assert make_divisible(11.2, 8) == 16  # 8 would lose more than 10%
    assert make_divisible(18, 8) == 24  # 16 is under 90% of 18


@pytest.mark.parametrize("width, last", [(0.35, 1280), (0.5, 1280), (1.0, 1280), (1.4, 1792)])
def test_last_conv_keeps_1280_channels_below_width_1(width, last):
    assert MobileNetV2(width_mult=width).last_channel == last


def test_weight_init():
    torch.manual_seed(0)
    model = MobileNetV2()
    conv = model.features[18][0]  # 1x1, 320 -> 1280: fan_out = 1280
    assert conv.weight.std().item() == pytest.approx((2 / 1280) ** 0.5, rel=0.05)
    head = model.classifier[1]
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(head.bias) == 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_build_model_follows_the_config():
    model = build_model(ModelConfig(width_mult=0.5, dropout=0.3, num_classes=7))
    assert model.classifier[0].p == 0.3
    assert model.classifier[1].out_features == 7
    assert model.features[0][0].out_channels == 16
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        MobileNetV2(num_classes=0)
    with pytest.raises(ValueError):
        MobileNetV2(width_mult=0)
