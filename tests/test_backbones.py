"""Any backbone, any layout (issue #11): torchvision ResNet-18/50, MobileNetV3, EfficientNet-B0, ConvNeXt-T,
Swin-T and ViT-B/16, and timm's ViT, DeiT, Swin and ConvNeXt, as teacher or student in both directions.

The references are computed by hand from the models' own forwards: channels-last maps permuted with
``permute(0, 3, 1, 2)``, tokens put on their grid one position at a time, prefix tokens sliced off.
Models are built with random weights at 64x64 (ViTs with ``image_size`` / ``img_size`` 64), batch 2.
"""

import pytest
import torch
import torchvision

import featkd
from featkd.layer_info import describe_features

timm = pytest.importorskip("timm")
SIZE = 64


def tv(name, seed=0, **options):
    torch.manual_seed(seed)
    if name == "vit_b_16":
        options.setdefault("image_size", SIZE)
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **options)


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
