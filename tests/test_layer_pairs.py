"""`featkd pairs` / featkd.layer_pairs: (teacher layer, student layer) pairs matched by resolution stage."""

import pytest
import torch
torchvision = pytest.importorskip("torchvision")  # the oldest-torch run has none
import yaml

from featkd.cli import main
from featkd.config import load_config
from featkd.layer_pairs import pair_terms, propose_pairs
from featkd.runs import build_distiller


def printed(text):
    """(table rows as cell lists split on 2+ spaces, the YAML after the table)."""
    table, _, rest = text.partition("\n\n")
    lines = table.splitlines()[3:]  # title, header, rule
    return [[cell for cell in line.split("  ") if cell.strip()] for line in lines], rest


def test_resnet50_to_resnet18_pairs_the_four_stages(capsys):
    assert main(["pairs", "torchvision:resnet50", "torchvision:resnet18", "--input-size", "3x64x64"]) == 0
    rows, text = printed(capsys.readouterr().out)
    assert [[c.strip() for c in row] for row in rows] == [
        ["layer1", "1x256x16x16", "NCHW", "layer1", "1x64x16x16", "NCHW", "stride 4"],
        ["layer2", "1x512x8x8", "NCHW", "layer2", "1x128x8x8", "NCHW", "stride 8"],
        ["layer3", "1x1024x4x4", "NCHW", "layer3", "1x256x4x4", "NCHW", "stride 16"],
        ["layer4", "1x2048x2x2", "NCHW", "layer4", "1x512x2x2", "NCHW", "stride 32, last feature"]]
    config = yaml.safe_load(text)
    assert config == {"student": {"name": "torchvision:resnet18"}, "terms": [{
        "teacher": ["layer1", "layer2", "layer3", "layer4"], "student": ["layer1", "layer2", "layer3", "layer4"],
        "loss": "at", "weight": 1000.0}]}


def test_vit_to_resnet18_spreads_the_encoder_blocks_and_the_file_trains(capsys, tmp_path):
    out = tmp_path / "vit_resnet.yaml"
    assert main(["pairs", "torchvision:vit_b_16", "torchvision:resnet18", "--input-size", "3x64x64",
                 "--teacher-option", "image_size=64", "--loss", "nst", "--weight", "50", "--out", str(out)]) == 0
    rows, text = printed(capsys.readouterr().out)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8)]
    assert [(r[0].strip(), r[2].strip(), r[3].strip(), r[6].strip()) for r in rows] == [
        (blocks[0], "NLC+1 4x4", "layer1", "stride 4 <-> block 3 of 12"),
        (blocks[1], "NLC+1 4x4", "layer2", "stride 8 <-> block 6 of 12"),
        (blocks[2], "NLC+1 4x4", "layer3", "stride 16 <-> block 9 of 12"),
        ("encoder", "NLC+1 4x4", "layer4", "last feature")]
    assert f"wrote {out}" in text
    cfg = load_config(out)  # a featkd distill config: the student and the term
    assert cfg.student.name == "torchvision:resnet18"
    assert cfg.terms[0].teacher == [*blocks, "encoder"]
    assert cfg.terms[0].student == ["layer1", "layer2", "layer3", "layer4"]
    assert (cfg.terms[0].loss, cfg.terms[0].weight) == ("nst", 50.0)
    torch.manual_seed(0)
    teacher = torchvision.models.vit_b_16(num_classes=10, image_size=64)
    student = torchvision.models.resnet18(num_classes=10)
    distiller = build_distiller(cfg, teacher, student)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    _, losses = distiller.setup(x)(x, y)
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and student.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_resnet_to_swin_ends_at_the_final_norm():
    torch.manual_seed(0)
    teacher, student = torchvision.models.resnet18(), torchvision.models.swin_t()
    pairs = propose_pairs(teacher, student, torch.zeros(1, 3, 64, 64))
    assert [(p.teacher.name, p.student.name, p.student.layout) for p in pairs] == [
        ("layer1", "features.1", "NHWC"), ("layer2", "features.3", "NHWC"), ("layer3", "features.5", "NHWC"),
        ("layer4", "norm", "NHWC")]
    assert pair_terms(pairs, "gram", 2, {"mode": "spatial"}) == [{
        "teacher": ["layer1", "layer2", "layer3", "layer4"],
        "student": ["features.1", "features.3", "features.5", "norm"],
        "loss": "gram", "weight": 2.0, "options": {"mode": "spatial"}}]


def test_two_single_resolution_models_pair_every_student_block_uniformly():
    timm = pytest.importorskip("timm")
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    student = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=6, num_classes=10)
    pairs = propose_pairs(teacher, student, torch.zeros(1, 3, 32, 32))
    # TinyBERT's uniform mapping: student block m of 6 with teacher block 2m of 12 (1-based), the last at the norms
    assert [(p.teacher.name, p.student.name) for p in pairs] == [
        ("blocks.1", "blocks.0"), ("blocks.3", "blocks.1"), ("blocks.5", "blocks.2"), ("blocks.7", "blocks.3"),
        ("blocks.9", "blocks.4"), ("norm", "norm")]
    assert [p.student.prefix_tokens for p in pairs] == [2] * 6


def test_text_transformers_pair_their_blocks_as_tinybert_does(capsys):
    pytest.importorskip("transformers")
    options = ["num_hidden_layers={layers}", "hidden_size={width}", "num_attention_heads=2", "intermediate_size=64",
               "vocab_size=50"]
    teacher = [f"--teacher-option={o.format(layers=6, width=48)}" for o in options]
    student = [f"--student-option={o.format(layers=3, width=32)}" for o in options]
    assert main(["pairs", "hf:bert", "hf:bert", "--input-size", "16", "--loss", "nst", *teacher, *student]) == 0
    out = capsys.readouterr().out
    assert "hf:bert -> hf:bert, input input_ids 1x16" in out
    # block m of 3 with block 2m of 6; hidden widths 32 and 48 differ, which NST compares as they are
    assert "teacher: [bert.encoder.layer.1, bert.encoder.layer.3, bert.encoder.layer.5]" in out
    assert "student: [bert.encoder.layer.0, bert.encoder.layer.1, bert.encoder.layer.2]" in out
    assert "block 2 of 6 <-> 1 of 3" in out and "NLC" in out


def test_mistakes_are_one_line(capsys):
    assert main(["pairs", "torchvision:resnet18", "torchvision:resnet18", "--loss", "ats"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown feature loss 'ats'. Did you mean 'at'?" in err
    assert main(["pairs", "torchvision:resnet18", "torchvision:vit_b_16", "--input-size", "3x64x64"]) == 2
    err = capsys.readouterr().err
    # the student failed: the message names it and the student's option, a hint that runs
    assert err.count("\n") == 1 and "the student torchvision:vit_b_16 failed" in err
    assert "Wrong image height! Expected 224 but got 64" in err and "(--student-option image_size=64)" in err
    assert main(["pairs", "torchvision:resnet18", "torchvision:vit_b_16", "--input-size", "3x64x64",
                 "--student-option", "image_size=64"]) == 0
    capsys.readouterr()
    # issue #19 §2: a misspelled option was a 20-line traceback
    assert main(["pairs", "torchvision:vit_b_16", "torchvision:resnet18", "--input-size", "3x64x64",
                 "--teacher-option", "image_sise=64"]) == 2
    err = capsys.readouterr().err
    assert err == ("featkd pairs: error: model 'torchvision:vit_b_16' has no option 'image_sise'. Did you mean "
                   "'image_size'? The options VisionTransformer takes: image_size, patch_size, num_layers, num_heads, "
                   "hidden_dim, mlp_dim, dropout, attention_dropout, representation_size, norm_layer, "
                   "conv_stem_configs\n")



def test_an_existing_out_file_is_left_alone(capsys, tmp_path):
    out = tmp_path / "mine.yaml"
    out.write_text("my own config\n")
    assert main(["pairs", "torchvision:resnet18", "torchvision:resnet18", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} already exists" in err
    assert out.read_text() == "my own config\n"
