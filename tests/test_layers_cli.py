"""`featkd layers`: the table of hookable layers, through main() and as a subprocess."""

import subprocess

import pytest

from featkd.cli import main
from conftest import requires_torchvision


def rows(text):
    """name -> cells of the printed table (header and rule skipped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("name "))
    return {line.split()[0]: line.split() for line in lines[start + 2:]}


@requires_torchvision
def test_resnet18_table(capsys):
    assert main(["layers", "torchvision:resnet18", "--input-size", "3x64x64", "--depth", "1"]) == 0
    table = rows(capsys.readouterr().out)
    assert list(table) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    # name, type, shape, layout, channels, stride, calls
    assert table["layer3"] == ["layer3", "Sequential", "1x256x4x4", "NCHW", "256", "16", "1"]
    assert table["fc"] == ["fc", "Linear", "1x10", "NC", "10", "-", "1"]


@requires_torchvision
def test_filter_and_shared_module_calls(capsys):
    assert main(["layers", "torchvision:resnet18", "--input-size", "3x32x32", "--filter", "layer1.*.relu"]) == 0
    table = rows(capsys.readouterr().out)
    assert list(table) == ["layer1.0.relu", "layer1.1.relu"]
    assert table["layer1.0.relu"][-1] == "2"  # BasicBlock calls its ReLU twice


TINY_VIT = """
import torchvision


def tiny_vit(num_classes=10):
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes)
"""


@requires_torchvision
def test_vit_tokens_through_a_factory_name(capsys, tmp_path, monkeypatch):
    (tmp_path / "my_vits.py").write_text(TINY_VIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["layers", "my_vits:tiny_vit", "--input-size", "3x32x32", "--filter", "encoder.layers.*"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert list(table) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    # 16 patches of 8x8 and a class token, channels last
    assert table["encoder.layers.encoder_layer_1"][:6] == [
        "encoder.layers.encoder_layer_1", "EncoderBlock", "1x17x32", "NLC", "32", "8"]
    assert "(+1 prefix token)" in out


@requires_torchvision
def test_errors_are_clear(capsys):
    assert main(["layers", "torchvision:resnet19", "--input-size", "3x32x32"]) == 2
    assert "resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["layers", "torchvision:resnet18", "--input-size", "3by32"])
    assert "expected channels x height x width such as 3x224x224" in capsys.readouterr().err
    assert main(["layers", "torchvision:resnet18", "--input-size", "3x32x32", "--filter", "nope*"]) == 1


def test_subprocess(subprocess_env, python_exe):
    result = subprocess.run(
        [python_exe, "-m", "featkd.cli", "layers", "wrn16_1", "--input-size", "1x28x28", "--depth", "1"],
        env=subprocess_env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrn16_1:" in result.stdout and "conv1" in result.stdout


def test_timm_model(capsys):
    pytest.importorskip("timm")
    assert main(["layers", "timm:resnet10t", "--input-size", "3x32x32", "--depth", "1"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["layer4"][2:6] == ["1x512x1x1", "NCHW", "512", "32"]
    assert table["global_pool"][2:4] == ["1x512", "NC"]


@requires_torchvision
def test_channels_last_maps_are_shown_as_such(capsys):
    assert main(["layers", "torchvision:swin_t", "--input-size", "3x64x64", "--filter", "features.*"]) == 0
    table = rows(capsys.readouterr().out)
    # (B, H, W, C): 384 channels on a 4x4 grid, stride 16
    assert table["features.5"] == ["features.5", "Sequential", "1x4x4x384", "NHWC", "384", "16", "1"]
    assert table["features.0"][3] == "NHWC"


AMBIGUOUS = """
from torch import nn


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def ambiguous(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), Doubler(), nn.Flatten(), nn.Linear(512, num_classes))
"""


def test_a_layout_neither_stated_nor_readable_is_marked(capsys, tmp_path, monkeypatch):
    (tmp_path / "my_ambiguous.py").write_text(AMBIGUOUS)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["layers", "my_ambiguous:ambiguous", "--input-size", "3x64x64"]) == 0
    out = capsys.readouterr().out
    table = rows(out.split("\n\n")[0])
    assert table["0"][3] == "NCHW"  # a Conv2d says so
    assert table["1"][2:6] == ["1x8x8x8", "?", "-", "-"]  # (1, 8, 8, 8) reads either way
    assert "?: neither the model nor the shape says which dimension holds the channels" in out


@requires_torchvision
def test_a_size_the_model_cannot_take_is_one_line_whose_hint_runs(capsys):
    # issue #19 §2: a 32-line AssertionError traceback before
    assert main(["layers", "torchvision:vit_b_16", "--input-size", "3x64x64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "(Wrong image height! Expected 224 but got 64!)" in err
    hint = err.split("the model's own size option: featkd ")[1].split()
    assert main([*hint, "--depth", "1"]) == 0
    assert "encoder" in capsys.readouterr().out
