"""featkd.models: parameter counts against independent formulas and published values, shapes, metadata,
create_model for every kind of name, and its error messages."""

import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from featkd.models import (CifarResNet, FeatureInfo, WideResNet, create_model, default_distill_layers,
                           feature_info, list_models, pre_relu_layer)
from featkd.models.resnet_cifar import ZeroPadShortcut
from conftest import requires_torchvision


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def wrn_param_count(depth, k, num_classes=10, in_channels=3):
    """The AT code's parameter list, counted by hand: conv0, per block bn0/conv0/bn1/conv1 (+ a 1×1 convdim
    when the width changes), final bn, fc. Convolutions have no bias; a BN has a weight and a bias."""
    n = (depth - 4) // 6
    total = in_channels * 16 * 9
    ni = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * ni + ni * width * 9 + 2 * width + width * width * 9 + (ni * width if ni != width else 0)
            ni = width
    return total + 2 * ni + ni * num_classes + num_classes


def cifar_resnet_param_count(depth, num_classes=10, in_channels=3):
    """He et al. 2016 CIFAR ResNet with parameter-free option-A shortcuts, counted by hand."""
    n = (depth - 2) // 6
    total = in_channels * 16 * 9 + 2 * 16
    ci = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += ci * c * 9 + 2 * c + c * c * 9 + 2 * c
            ci = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth,k,published", [(16, 1, 0.175e6), (16, 2, 0.69e6), (40, 1, 0.56e6), (40, 2, 2.2e6)])
def test_wrn_parameter_counts_match_official_formula_and_paper(depth, k, published):
    model = create_model(f"wrn{depth}_{k}", num_classes=10)
    assert n_params(model) == wrn_param_count(depth, k)
    assert n_params(model) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name, option, message", [
    ("wrn16_1", "bn_inti", "model 'wrn16_1' has no option 'bn_inti'. Did you mean 'bn_init'? The options WideResNet "
                           "takes: dropout, bn_init"),
    ("resnet20", "shortcutt", "model 'resnet20' has no option 'shortcutt'. Did you mean 'shortcut'? The options "
                              "CifarResNet takes: shortcut"),
    ("nin", "widht", "model 'nin' has no option 'widht'. Did you mean 'width'? The options NIN takes: width, dropout"),
    ("mlp", "hiden", "model 'mlp' has no option 'hiden'. Did you mean 'hidden'? The options mlp takes: image_size, "
                     "hidden, dropout"),
    pytest.param("torchvision:resnet18", "zero_init_residul", "model 'torchvision:resnet18' has no option "
                 "'zero_init_residul'. Did you mean 'zero_init_residual'? The options ResNet takes: block",
                 marks=requires_torchvision),
])
def test_a_misspelled_model_option_is_named_with_the_options_the_model_takes(name, option, message):
    # issue #19 §2: a 20-38-line TypeError traceback before
    with pytest.raises(ValueError) as error:
        create_model(name, num_classes=10, in_channels=1, **{option: 1})
    assert str(error.value).startswith(message)


def test_a_type_error_inside_a_model_is_not_taken_for_an_option():
    with pytest.raises(TypeError):
        create_model("mlp", num_classes=10, in_channels=1, hidden=3)  # an int where a list of sizes belongs


def test_wrn_exact_known_counts():
    # Values printed by the official attention-transfer code for CIFAR-10 (and by this formula).
    assert wrn_param_count(16, 1) == 175066
    assert wrn_param_count(40, 2) == 2243546


@pytest.mark.parametrize("depth,published", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_parameter_counts(depth, published):
    model = create_model(f"resnet{depth}")
    assert n_params(model) == cifar_resnet_param_count(depth)
    assert n_params(model) == pytest.approx(published, rel=0.02)


def test_option_b_shortcut_adds_projections_only_where_shapes_change():
    a, b = CifarResNet(20, shortcut="A"), CifarResNet(20, shortcut="B")
    # two projections (16→32, 32→64): 1×1 conv + BN each
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_zero_pad_shortcut_values():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = ZeroPadShortcut(3, 7, 2)(x)
    assert out.shape == (2, 7, 3, 3)
    assert torch.equal(out[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 3:]) == 0


def test_nin_sizes_match_at_paper_pair():
    assert n_params(create_model("nin")) == pytest.approx(1.0e6, rel=0.05)       # NIN-wide ≈ 1M
    assert n_params(create_model("nin_thin")) == pytest.approx(0.2e6, rel=0.05)  # NIN-thin ≈ 0.2M


def test_in_channels_only_changes_the_stem():
    assert n_params(create_model("wrn16_1", in_channels=3)) - n_params(create_model("wrn16_1", in_channels=1)) \
        == 2 * 16 * 9


SMALL = ["wrn10_1", "wrn16_1", "wrn16_2", "wrn40_1", "resnet20", "nin", "nin_thin"]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 29, 37)])
def test_forward_shapes_and_feature_info_match_captured(name, shape):
    model = create_model(name, num_classes=7, in_channels=shape[0]).eval()
    info = feature_info(model)
    assert [f.name for f in info] == default_distill_layers(model)
    captured = {}
    handles = [model.get_submodule(f.name).register_forward_hook(
        lambda m, i, o, n=f.name: captured.__setitem__(n, o)) for f in info]
    out = model(torch.randn(2, *shape))
    for h in handles:
        h.remove()
    assert out.shape == (2, 7)
    for f in info:
        c, h, w = captured[f.name].shape[1:]
        assert (c, h, w) == (f.channels, math.ceil(shape[1] / f.reduction), math.ceil(shape[2] / f.reduction)), f


@pytest.mark.parametrize("name", ["wrn16_2", "resnet20", "nin_thin"])
def test_hooked_outputs_are_not_modified_in_place_later(name):
    """A hook that keeps a reference (no clone) must see the same values as one that clones."""
    model = create_model(name).train()
    kept, cloned = {}, {}

    def hook(module, inputs, output, name):
        kept[name], cloned[name] = output, output.detach().clone()

    for layer in default_distill_layers(model):
        model.get_submodule(layer).register_forward_hook(lambda m, i, o, n=layer: hook(m, i, o, n))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for layer in kept:
        assert torch.equal(kept[layer].detach(), cloned[layer]), layer


def test_wrn_module_names_are_the_at_layers():
    names = [n for n, _ in WideResNet(16, 1).named_children()]
    assert names[:4] == ["conv1", "group1", "group2", "group3"] and "bn" in names and names[-1] == "fc"
    assert len(WideResNet(40, 1).group2) == 6


def test_wrn_dropout_sits_between_convs_and_only_in_training():
    model = create_model("wrn16_1", dropout=0.3)
    assert isinstance(model.group1[0].dropout, nn.Dropout) and model.group1[0].dropout.p == 0.3
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout draws a new mask each call in training
    model.eval()
    assert torch.equal(model(x), model(x))
    without = create_model("wrn16_1")
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in without.modules())


def bn_parameters(model):
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return torch.cat([m.weight.detach() for m in norms]), torch.cat([m.bias.detach() for m in norms]), norms


def test_wrn_bn_init_uniform_is_the_official_torch_rand_and_ones_stays_the_default():
    from scipy import stats

    weights, biases, norms = bn_parameters(create_model("wrn16_1"))
    assert torch.equal(weights, torch.ones_like(weights)) and not biases.any()
    torch.manual_seed(1)  # a fixed draw; over seeds 0..39 the KS p-values below spread evenly over (0, 1)
    weights, biases, norms = bn_parameters(create_model("wrn40_2", bn_init="uniform"))
    # BN channels of WRN-40-2 by hand: per group 6 bn1 (the first on the group's input) and 6 bn2, then the final bn
    assert len(weights) == (16 + 5 * 32 + 6 * 32) + (32 + 5 * 64 + 6 * 64) + (64 + 5 * 128 + 6 * 128) + 128
    assert 0 <= weights.min() and weights.max() < 1 and not biases.any()
    # U[0, 1): mean 1/2, variance 1/12 (2704 draws: standard errors 0.006 and 0.0015), and the whole distribution
    assert abs(weights.mean().item() - 0.5) < 0.02 and abs(weights.var().item() - 1 / 12) < 0.005
    assert stats.kstest(weights.numpy(), "uniform").pvalue > 1e-3
    assert not torch.equal(norms[0].weight[:16], norms[1].weight[:16])  # every layer draws its own
    with pytest.raises(ValueError, match=r"bn_init must be one of \['ones', 'uniform'\], got 'rand'"):
        create_model("wrn16_1", bn_init="rand")


# The input of the last BN and the head after its ReLU, spelled out for each architecture.
PRE_RELU_PATHS = {
    "wrn16_1": (lambda m, x: m.group3(m.group2(m.group1(m.conv1(x)))),
                lambda m, f: m.fc(torch.relu(f).mean((2, 3)))),
    "nin_thin": (lambda m, x: m.block3[:4](m.block2(m.block1(x))), lambda m, f: m.classifier(torch.relu(f))),
}


@pytest.mark.parametrize("name", sorted(PRE_RELU_PATHS))
def test_pre_relu_layer_is_the_last_map_after_its_bn_and_before_its_relu(name):
    import featkd

    model = create_model(name).eval()
    norm = model.get_submodule(pre_relu_layer(model))
    with torch.no_grad():  # statistics and affine parameters that make normalised and raw maps differ
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    with featkd.capture(model, [pre_relu_layer(model)]) as feats:
        logits = model(x)
    feature = feats[pre_relu_layer(model)]
    before_bn, head = PRE_RELU_PATHS[name]
    with torch.no_grad():
        raw = before_bn(model, x)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        expected = (raw - norm.running_mean[:, None, None]) * scale[:, None, None] + norm.bias[:, None, None]
        torch.testing.assert_close(feature, expected, rtol=1e-5, atol=1e-5)
        assert (feature < 0).any()  # the ReLU comes after it
        torch.testing.assert_close(head(model, feature), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no pre-ReLU feature layer known for CifarResNet"):
        pre_relu_layer(create_model("resnet20"))


def test_name_spellings():
    assert n_params(create_model("wrn-16-1")) == n_params(create_model("WRN-16-1")) == wrn_param_count(16, 1)
    assert n_params(create_model("wrn22_1")) == wrn_param_count(22, 1)  # any 6n+4 depth
    assert "wrn16_1" in list_models() and "resnet110" in list_models() and "nin_thin" in list_models()


def test_unknown_and_invalid_names_are_clear_errors():
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnt20")
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn15_1")
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("resnet21")
    with pytest.raises(ValueError, match="'A' .*'B'"):
        create_model("resnet20", shortcut="C")


@requires_torchvision
def test_torchvision_models_with_adapted_stem():
    model = create_model("torchvision:resnet18", num_classes=5, in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64 and model.conv1.stride == (2, 2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert default_distill_layers(model) == ["layer1", "layer2", "layer3", "layer4"]
    mobile = create_model("torchvision:mobilenet_v3_small", num_classes=4, in_channels=1)
    assert mobile.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="resnet18"):
        create_model("torchvision:resnet_18")


@requires_torchvision
def test_torchvision_feature_info_from_dry_forward_or_clear_error():
    model = create_model("torchvision:resnet18", num_classes=5)
    with pytest.raises(ValueError, match="featkd layers"):
        feature_info(model)
    info = feature_info(model, layers=["layer1", "layer3"], input_size=(3, 64, 64))
    assert info == [FeatureInfo("layer1", 64, 4), FeatureInfo("layer3", 256, 16)]
    assert model.training  # restored after the dry forward
    with pytest.raises(ValueError, match="layer1"):
        feature_info(model, layers=["layer_1"], input_size=(3, 64, 64))


def test_timm_models():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    info = feature_info(model)
    assert [f.name for f in info][-4:] == ["layer1", "layer2", "layer3", "layer4"]
    assert info[-1] == FeatureInfo("layer4", 512, 32)
    assert default_distill_layers(model) == ["layer1", "layer2", "layer3", "layer4"]
    convnext = create_model("timm:convnext_atto")  # no stem entry: all four stages
    assert default_distill_layers(convnext) == ["stages.0", "stages.1", "stages.2", "stages.3"]
    with pytest.raises(ValueError, match="resnet18"):
        create_model("timm:resnet_18")


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        create_model("timm:resnet18")


@requires_torchvision
def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def only_classes(num_classes, hidden=4):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))
        def with_channels(num_classes, in_channels):
            return nn.Conv2d(in_channels, num_classes, 1)
        def forwarding(**kwargs):  # like torchvision's factories: kwargs go on to a 3-channel model
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, kwargs.pop("num_classes")), **kwargs)
        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("my_nets:only_classes", num_classes=6, in_channels=1, hidden=8)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 6) and model[1].out_features == 8
    conv = create_model("my_nets:with_channels", num_classes=2, in_channels=5)
    assert conv.in_channels == 5 and conv.out_channels == 2
    # in_channels is not pushed through **kwargs (the model would reject it): the first conv is adapted
    net = create_model("my_nets:forwarding", num_classes=3, in_channels=1)
    assert net[0].in_channels == 1 and net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    vit = create_model("torchvision.models.vision_transformer:VisionTransformer", num_classes=4, in_channels=1,
                       image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)
    assert vit(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="only_classes"):
        create_model("my_nets:only_class")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_xyz'"):
        create_model("no_such_pkg_xyz:net")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        create_model("my_nets:not_a_model")


def test_models_register_their_names_next_to_their_definitions():
    from featkd.models import catalog

    assert catalog.find("WRN-16-2")[1] == ("depth", "width") and catalog.find("resnet8")[1] == ("depth",)
    assert isinstance(create_model("wrn-22-1", num_classes=3), WideResNet)  # a family member not listed
    assert {"wrn16_1", "resnet20", "nin", "nin_thin", "mlp"} <= set(list_models())

    @catalog.register_model("test_tiny_linear")
    def tiny(num_classes=10, in_channels=3):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    try:
        assert "test_tiny_linear" in list_models() and create_model("test_tiny_linear", num_classes=4)[1].out_features == 4
        with pytest.raises(ValueError, match="already registered"):
            catalog.register_model("test_tiny_linear", tiny)
    finally:
        catalog._NAMED.pop("test_tiny_linear")
