"""Any backbone, any layout (issue #11): torchvision ResNet-18/50, MobileNetV3, EfficientNet-B0, ConvNeXt-T,
Swin-T and ViT-B/16, and timm's ViT, DeiT, Swin and ConvNeXt, as teacher or student in both directions.

The references are computed by hand from the models' own forwards: channels-last maps permuted with
``permute(0, 3, 1, 2)``, tokens put on their grid one position at a time, prefix tokens sliced off.
Models are built with random weights at 64x64 (ViTs with ``image_size`` / ``img_size`` 64), batch 2.
"""

import pytest
import torch
torchvision = pytest.importorskip("torchvision")  # the oldest-torch run has none
from torch import nn

import featkd
from featkd import functional as KF
from featkd.layer_info import describe_features
from featkd.terms import FeatureAdapter
from test_layouts import tokens_to_map_by_loops

timm = pytest.importorskip("timm")
SIZE = 64


def tv(name, seed=0, **options):
    torch.manual_seed(seed)
    if name == "vit_b_16":
        options.setdefault("image_size", SIZE)
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **options)


def small_vit(seed=0):
    """torchvision's VisionTransformer (the class vit_b_16 builds), two narrow layers: a cheaper ViT."""
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


def tm(name, seed=0):
    torch.manual_seed(seed)
    options = {"img_size": SIZE} if "vit" in name or "deit" in name else {}
    if "swin" in name:
        options.update(img_size=SIZE, window_size=2)
    return timm.create_model(name, pretrained=False, num_classes=10, **options)


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


def captured(model, layers, x):
    with torch.no_grad(), featkd.capture(model, layers) as feats:
        model.eval()(x)
    return dict(feats)


# ----------------------------------------------------------------------------- layouts the models state

MODELS = {
    "tv:resnet18": (lambda: tv("resnet18"), {"layer1": ("NCHW", 0), "layer4": ("NCHW", 0)}),
    "tv:resnet50": (lambda: tv("resnet50"), {"layer3": ("NCHW", 0)}),
    "tv:mobilenet_v3_small": (lambda: tv("mobilenet_v3_small"), {"features.12": ("NCHW", 0)}),
    "tv:efficientnet_b0": (lambda: tv("efficientnet_b0"), {"features.8": ("NCHW", 0)}),
    "tv:convnext_tiny": (lambda: tv("convnext_tiny"), {
        "features.1": ("NCHW", 0), "features.1.0.block.2": ("NHWC", 0), "features.1.0.block.4": ("NHWC", 0),
        "features.1.0.block.6": ("NCHW", 0)}),
    "tv:swin_t": (lambda: tv("swin_t"), {
        "features.0.0": ("NCHW", 0), "features.0": ("NHWC", 0), "features.5": ("NHWC", 0), "norm": ("NHWC", 0),
        "permute": ("NCHW", 0)}),
    "tv:vit_b_16": (lambda: tv("vit_b_16"), {"conv_proj": ("NCHW", 0), "encoder.layers.encoder_layer_3": ("NLC", 1),
                                             "encoder": ("NLC", 1)}),
    "timm:vit_tiny": (lambda: tm("vit_tiny_patch16_224"), {"patch_embed": ("NLC", 0), "blocks.3": ("NLC", 1)}),
    "timm:deit_tiny_distilled": (lambda: tm("deit_tiny_distilled_patch16_224"), {"norm": ("NLC", 2)}),
    "timm:swin_tiny": (lambda: tm("swin_tiny_patch4_window7_224"), {"patch_embed": ("NHWC", 0),
                                                                     "layers.2": ("NHWC", 0)}),
    "timm:convnext_atto": (lambda: tm("convnext_atto"), {"stages.2": ("NCHW", 0)}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_layouts_of_every_family_are_those_the_model_states(name):
    build, expected = MODELS[name]
    model = build().eval()
    x, _ = batch(1)
    infos = {i.name: i for i in featkd.list_layers(model, x)}
    found = {layer: (infos[layer].layout, infos[layer].prefix_tokens) for layer in expected}
    assert found == expected
    for layer, (kind, _) in expected.items():  # the channel count is the size of the channel dimension
        shape = infos[layer].shape
        assert infos[layer].channels == (shape[1] if kind == "NCHW" else shape[-1])
    if name.startswith(("tv:swin", "tv:convnext", "tv:vit", "timm:vit", "timm:deit", "timm:swin")):
        described = describe_features(model, list(expected), x)
        assert all(f.known is not None and f.known.source == "model" for f in described.values())


# ----------------------------------------------------------------------------- the same loss, whatever the layout

LOSSES = [("at", {}), ("nst", {"kernel": "linear"}), ("nst", {"kernel": "poly"}),
          ("nst", {"kernel": "gaussian", "sigma2": 1.0}), ("gram", {"mode": "spatial"}), ("gram", {"mode": "channel"}),
          ("hint", {})]


def reference(loss, options, f_s, f_t):
    if loss == "at":
        return KF.at_loss(f_s, f_t)
    if loss == "nst":
        return KF.nst_loss(f_s, f_t, **options)
    if loss == "gram":
        return KF.gram_loss(f_s, f_t, **options)
    return (f_s - f_t).pow(2).mean()  # a hint between equal shapes has no regressor: MSE


def terms_for(teacher_layer, student_layer, losses=LOSSES):
    return [featkd.Term(teacher_layer, student_layer, loss=loss, options=dict(options), name=f"{loss}{i}")
            for i, (loss, options) in enumerate(losses)]


def test_swin_channels_last_maps_give_the_loss_of_the_permuted_maps():
    """The issue's silent misread: two Swin-T at features.5, (B, 4, 4, 384) read as channels-last."""
    teacher, student = tv("swin_t", 0).eval(), tv("swin_t", 1).eval()
    x, _ = batch()
    distiller = featkd.Distiller(teacher, student, terms=terms_for("features.5", "features.5")).setup(x)
    _, losses = distiller(x)
    with torch.no_grad():
        f_t, f_s = teacher.features[:6](x), student.features[:6](x)  # by hand: (B, H, W, C)
    assert f_t.shape == (2, 4, 4, 384)
    for i, (loss, options) in enumerate(LOSSES):
        expected = reference(loss, options, f_s.permute(0, 3, 1, 2), f_t.permute(0, 3, 1, 2))
        torch.testing.assert_close(losses[f"{loss}{i}"].detach(), expected, rtol=1e-5, atol=1e-7)
    misread = KF.at_loss(f_s, f_t)  # what featkd computed before: the maps taken as (B, C, H, W)
    assert abs(losses["at0"].item() - misread.item()) > 1e-2 * misread.item()


@pytest.mark.parametrize("teacher_is_cnn", [True, False], ids=["resnet->swin", "swin->resnet"])
def test_a_map_against_a_channels_last_map_in_both_directions(teacher_is_cnn):
    cnn, swin = tv("resnet18", 2).eval(), tv("swin_t", 3).eval()
    x, _ = batch()
    losses_ = [(loss, options) for loss, options in LOSSES if loss != "gram" or options["mode"] == "spatial"]
    losses_ = [(loss, options) for loss, options in losses_ if loss != "hint"]  # channels differ: a regressor
    pair = ("layer3", "features.5") if teacher_is_cnn else ("features.5", "layer3")
    teacher, student = (cnn, swin) if teacher_is_cnn else (swin, cnn)
    _, losses = featkd.Distiller(teacher, student, terms=terms_for(*pair, losses_)).setup(x)(x)
    with torch.no_grad():
        maps = {"layer3": cnn.layer3(cnn.layer2(cnn.layer1(cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(x))))))),
                "features.5": swin.features[:6](x).permute(0, 3, 1, 2)}
    for i, (loss, options) in enumerate(losses_):
        expected = reference(loss, options, maps[pair[1]], maps[pair[0]])
        torch.testing.assert_close(losses[f"{loss}{i}"].detach(), expected, rtol=1e-5, atol=1e-7)


def test_vit_tokens_against_a_resnet_map_and_prefix_tokens_left_out():
    teacher, student = small_vit(0).eval(), tv("resnet18", 1).eval()
    x, _ = batch()
    losses_ = [("at", {}), ("nst", {"kernel": "poly"}), ("gram", {"mode": "spatial"})]
    _, losses = featkd.Distiller(teacher, student, terms=terms_for("encoder", "layer3", losses_)).setup(x)(x)
    tokens = captured(teacher, ["encoder"], x)["encoder"]
    assert tokens.shape == (2, 1 + 4 * 4, 64)
    teacher_map = tokens_to_map_by_loops(tokens, 1, 4, 4)  # the class token left out
    student_map = captured(student, ["layer3"], x)["layer3"]
    for i, (loss, options) in enumerate(losses_):
        expected = reference(loss, options, student_map, teacher_map)
        torch.testing.assert_close(losses[f"{loss}{i}"].detach(), expected, rtol=1e-5, atol=1e-7)


def test_prefix_tokens_are_selectable():
    teacher, student = tm("deit_tiny_distilled_patch16_224", 0).eval(), tm("deit_tiny_distilled_patch16_224", 1).eval()
    x, _ = batch()
    terms = [featkd.Term("blocks.5", loss="at", name="patch"),
             featkd.Term("blocks.5", loss="at", name="prefix", layout={"kind": "NLC", "tokens": "prefix"}),
             featkd.Term("blocks.5", loss="at", name="all", layout={"kind": "tokens", "tokens": "all"})]
    _, losses = featkd.Distiller(teacher, student, terms=terms).setup(x)(x)
    t, s = captured(teacher, ["blocks.5"], x)["blocks.5"], captured(student, ["blocks.5"], x)["blocks.5"]
    assert t.shape == (2, 2 + 16, 192)  # class and distillation tokens in front
    torch.testing.assert_close(losses["patch"].detach(), KF.at_loss(tokens_to_map_by_loops(s, 2, 4, 4),
                                                                   tokens_to_map_by_loops(t, 2, 4, 4)))
    prefix_s, prefix_t = s[:, :2].transpose(1, 2), t[:, :2].transpose(1, 2)
    torch.testing.assert_close(losses["prefix"].detach(), KF.at_loss(prefix_s, prefix_t))
    torch.testing.assert_close(losses["all"].detach(), KF.at_loss(s.transpose(1, 2), t.transpose(1, 2)))


def test_class_token_against_a_pooled_student_map_through_the_automatic_adapter():
    teacher, student = small_vit(0), tv("resnet18", 1)
    x, y = batch()
    term = featkd.Term("encoder", "layer4", loss="hint", teacher_layout={"kind": "NLC", "tokens": "prefix"})
    distiller = featkd.Distiller(teacher, student, terms=[term]).setup(x)
    adapter = distiller.adapters[0][0]
    assert isinstance(adapter, FeatureAdapter) and adapter.resize == "mean"  # 2x2 map -> one position, 512 -> 64
    _, losses = distiller(x, y)
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and student.layer4[1].conv2.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- mixed pairs train

PAIRS = {  # teacher, student, [(teacher layer, student layer, loss, options)]
    "vit_b16->resnet18": (lambda: tv("vit_b_16", 0), lambda: tv("resnet18", 1), [
        ("encoder", "layer3", "at", {}), ("encoder.layers.encoder_layer_5", "layer2", "nst", {"kernel": "gaussian"}),
        ("encoder", "layer4", "hint", {})]),
    "resnet50->swin_t": (lambda: tv("resnet50", 0), lambda: tv("swin_t", 1), [
        ("layer2", "features.3", "at", {}), ("layer4", "norm", "nst", {"kernel": "poly"}),
        ("layer3", "features.5", "hint", {})]),
    "swin_t->mobilenet_v3": (lambda: tv("swin_t", 0), lambda: tv("mobilenet_v3_small", 1), [
        ("features.3", "features.3", "at", {}), ("norm", "features.12", "nst", {"kernel": "linear"})]),
    "convnext_tiny->timm_vit": (lambda: tv("convnext_tiny", 0), lambda: tm("vit_tiny_patch16_224", 1), [
        ("features.3", "blocks.5", "at", {}), ("features.7", "norm", "gram", {"mode": "spatial"}),
        ("features.5", "blocks.11", "hint", {})]),
    "timm_deit->efficientnet_b0": (lambda: tm("deit_tiny_distilled_patch16_224", 0), lambda: tv("efficientnet_b0", 1), [
        ("blocks.5", "features.3", "at", {}), ("norm", "features.8", "nst", {"kernel": "poly"})]),
    "timm_swin->timm_convnext": (lambda: tm("swin_tiny_patch4_window7_224", 0), lambda: tm("convnext_atto", 1), [
        ("layers.1", "stages.1", "at", {}), ("norm", "stages.3", "hint", {})]),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_a_training_step_of_a_mixed_pair_gives_finite_losses_and_student_gradients(pair):
    make_teacher, make_student, layers = PAIRS[pair]
    teacher, student = make_teacher(), make_student()
    terms = [featkd.Term(t, s, loss=loss, options=options, name=f"{loss}:{s}") for t, s, loss, options in layers]
    distiller = featkd.Distiller(teacher, student, terms=terms, kd={"loss": "kd", "T": 4})
    x, y = batch()
    distiller.setup(x)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    student.train()
    _, losses = distiller(x, y)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["total"].backward()
    for _, s, _, _ in layers:  # every term reaches the student's parameters behind its layer
        module = student.get_submodule(s)
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    adapters = [p for p in distiller.adapters.parameters()]
    assert all(p.grad is not None for p in adapters)
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()


# ----------------------------------------------------------------------------- refused, not guessed


class Doubler(nn.Module):  # a module featkd knows nothing about
    def forward(self, x):
        return 2 * x


def ambiguous_model():
    torch.manual_seed(0)  # (B, 8, 8, 8) for a 64x64 input: either way a plausible map
    return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), Doubler(), nn.Flatten(), nn.Linear(512, 10))


def test_an_ambiguous_layout_raises_with_the_choices_and_a_given_one_is_used():
    teacher, x = tv("resnet18"), batch()[0]
    distiller = featkd.Distiller(teacher, ambiguous_model(), terms=[featkd.Term("layer1", "1", loss="at")])
    with pytest.raises(ValueError, match=r"term 'at:1': student layer '1' gives a feature of shape \(2, 8, 8, 8\) "
                                         r"whose layout the model does not state .* NCHW \(8 channels on a 8x8 grid\) "
                                         r"or NHWC \(8 channels on a 8x8 grid\); set student_layout"):
        distiller.setup(x)
    student = ambiguous_model()
    term = featkd.Term("layer1", "1", loss="at", student_layout="NHWC")  # the adapter resizes 8x8 to 16x16
    _, losses = featkd.Distiller(teacher, student, terms=[term]).setup(x)(x)
    f_s = captured(student, ["1"], x)["1"]
    f_t = captured(teacher, ["layer1"], x)["layer1"]
    resized = torch.nn.functional.interpolate(f_s.permute(0, 3, 1, 2), size=f_t.shape[2:], mode="bilinear",
                                              align_corners=False)
    expected = KF.at_loss(resized, f_t)
    torch.testing.assert_close(losses["at:1"].detach(), expected)
    # a module of your own may state its layout, as torchvision's and timm's models do
    student[1].feature_layout = "NHWC"
    term = featkd.Term("layer1", "1", loss="at")
    _, losses = featkd.Distiller(teacher, student, terms=[term]).setup(x)(x)
    torch.testing.assert_close(losses["at:1"].detach(), expected)


def test_a_layout_of_the_wrong_rank_names_the_side():
    """The issue's second failure: layout='tokens' used to apply to the student map too."""
    teacher, student, x = small_vit(), tv("resnet18"), batch()[0]
    wrong = featkd.Distiller(teacher, student, terms=[featkd.Term("encoder", "layer3", layout="tokens")])
    with pytest.raises(ValueError, match=r"student layer 'layer3': layout 'NLC' expects \(B, N, C\).*set "
                                         r"student_layout"):
        wrong.setup(x)
    right = featkd.Distiller(teacher, student, terms=[featkd.Term("encoder", "layer3", teacher_layout="tokens")])
    _, losses = right.setup(x)(x)
    assert torch.isfinite(losses["at:layer3"])


# Issue #19: a token grid or prefix count given against what the ViT states trained on the wrong positions.
@pytest.mark.parametrize("layout, reads", [
    ("{kind: NLC, prefix_tokens: 1, grid: [2, 8]}", "as 192 channels on a 2x8 grid, 1 prefix token(s)"),
    ("{kind: NLC, prefix_tokens: 0}", "as 192 channels at 17 positions"),
    ("{kind: NLC, prefix_tokens: 2}", "as 192 channels at 15 positions, 2 prefix token(s)"),
])
def test_a_token_layout_in_a_config_that_contradicts_the_vit_is_refused(layout, reads):
    from featkd import runs
    from featkd.config import load_config
    from featkd.models import create_model

    teacher = create_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=3, img_size=SIZE, depth=1)
    student = tv("resnet18", 1)
    cfg = load_config(None, ["terms=[{teacher: blocks.0, student: layer3, loss: at}]",
                             f"terms.0.teacher_layout={layout}"])
    distiller = runs.build_distiller(cfg, teacher, student)
    with pytest.raises(ValueError) as error:
        distiller.setup(batch()[0])
    assert (f"term 'at:layer3': teacher layer 'blocks.0': teacher_layout {layout} given, which reads the shape "
            f"(2, 17, 192) {reads}, but the model states {{kind: NLC, prefix_tokens: 1}} (192 channels on a 4x4 grid, "
            "1 prefix token(s)); leave teacher_layout (and layout, which sets both sides) unset") in str(error.value)
    agreeing = load_config(None, ["terms=[{teacher: blocks.0, student: layer3, loss: at}]",
                                  "terms.0.teacher_layout={kind: NLC, prefix_tokens: 1, grid: [4, 4]}"])
    _, losses = runs.build_distiller(agreeing, teacher, student).setup(batch()[0])(*batch())
    assert torch.isfinite(losses["at:layer3"])
