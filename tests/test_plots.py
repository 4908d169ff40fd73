"""featkd.plots: each figure is written (PNG + PDF) and shows exactly the numbers it was given."""

import json

import numpy as np
import pytest
import torch
import yaml

from featkd import plots


def _fake_run(root, name, config, rows):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def runs(tmp_path):
    made = []
    for method, accs in {"kd": [80.0, 81.0], "nst-poly": [82.0, 84.0]}.items():
        for seed, acc in enumerate(accs):
            rows = [{"epoch": e + 1, "train/total": 2.0 / (e + 1), "train/kd": 1.0 / (e + 1),
                     "student/acc1": acc - (2 - e)} for e in range(3)]
            made.append(_fake_run(tmp_path, f"{method}-s{seed}", {"method": method, "seed": seed,
                                                                    "kd": {"T": 2.0 + seed}}, rows))
    return [plots.load_run(p) for p in made]


def _artist(ax, gid):
    found = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert found, f"no line with gid {gid!r}"
    return found[0]


def test_load_run_and_grouping(runs):
    assert plots.final_metric(runs[0], "student/acc1") == 80.0
    groups = plots.group_final(runs, "method", "student/acc1")
    assert groups == {"kd": [80.0, 81.0], "nst-poly": [82.0, 84.0]}
    assert plots.config_value(runs[1].config, "kd.T") == 3.0
    with pytest.raises(KeyError, match="has no metric 'student/acc5'.*student/acc1"):
        plots.final_metric(runs[0], "student/acc5")


def test_load_run_rejects_non_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plots.load_run(tmp_path)


def test_kernel_ablation_values_and_files(runs, tmp_path):
    groups = plots.group_final(runs, "method", "student/acc1")
    fig = plots.kernel_ablation(groups, student=[79.0, 78.0], teacher=90.0)
    ax = fig.axes[0]
    means = [c for c in ax.collections if c.get_gid() == "means"][0].get_offsets()
    np.testing.assert_allclose(means, [[0, 80.5], [1, 83.0]])
    np.testing.assert_allclose(_artist(ax, "seeds:nst-poly").get_ydata(), [82.0, 84.0])
    refs = {line.get_label().split()[0]: line.get_ydata()[0] for line in ax.get_lines() if line.get_label()[0] != "_"}
    assert refs == {"student": pytest.approx(78.5), "teacher": pytest.approx(90.0)}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["kd", "nst-poly"]
    # error bars: ±1 sample std (ddof=1) around the means
    segments = [c for c in ax.collections if hasattr(c, "get_segments")][0].get_segments()
    spans = sorted(abs(s[1][1] - s[0][1]) for s in segments)
    assert spans == pytest.approx(sorted([2 * np.std([80, 81], ddof=1), 2 * np.std([82, 84], ddof=1)]))
    paths = plots.save_figure(fig, tmp_path / "out" / "ablation")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(FileExistsError, match="not overwriting"):
        plots.save_figure(fig, tmp_path / "out" / "ablation")
    # a dot in the name is part of it (it once named "limited-data-0.png"), and a given .png names the same pair
    dotted = plots.save_figure(fig, tmp_path / "out" / "limited-data-0.01-tuned")
    assert [p.name for p in dotted] == ["limited-data-0.01-tuned.png", "limited-data-0.01-tuned.pdf"]
    assert plots.save_figure(fig, tmp_path / "out" / "ablation.png", overwrite=True) == paths


def test_sweep_plot_values(runs):
    by_t = plots.group_final(runs, "kd.T", "student/acc1")
    fig = plots.sweep_plot({"kd": {t: v for t, v in by_t.items()}}, xlabel="temperature T", logx=False)
    line = _artist(fig.axes[0], "series:kd")
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [2.0, 3.0])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [81.0, 82.5])
    assert fig.axes[0].get_xlabel() == "temperature T"


def test_training_curves_values(runs):
    curves = {r.name: {k: plots.metric_series(r, k) for k in ("train/total", "student/acc1")} for r in runs[:2]}
    fig = plots.training_curves(curves)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["train/total", "student/acc1"]
    line = _artist(fig.axes[1], f"{runs[1].name}|student/acc1")
    np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(line.get_ydata(), [79.0, 80.0, 81.0])
    assert fig.axes[1].get_ylabel() == "accuracy (%)"


def test_attention_maps_match_functional(tmp_path):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1))
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3, stride=2, padding=1))
    x = torch.randn(2, 1, 8, 8)
    t_maps = plots.attention_maps(teacher, x, ["0", "2"])
    s_maps = plots.attention_maps(student, x, ["0", "2"])
    feature = teacher[2](teacher[1](teacher[0](x))).detach().double().numpy()
    power = (feature ** 2).mean(1).reshape(2, -1)  # AT's map: channel mean of f², l2-normalised per image
    expected = (power / np.linalg.norm(power, axis=1, keepdims=True)).reshape(2, 4, 4)
    np.testing.assert_allclose(t_maps["2"], expected, rtol=1e-5, atol=1e-7)
    assert t_maps["0"].shape == (2, 8, 8)
    fig = plots.attention_grid(x[:, 0].numpy(), t_maps, s_maps)
    images = {im.get_gid(): im.get_array() for ax in fig.axes for im in ax.get_images()}
    np.testing.assert_allclose(images["student:2:1"], s_maps["2"][1])
    np.testing.assert_allclose(images["teacher:0:0"], t_maps["0"][0])
    assert len(images) == 2 * 5
    paths = plots.save_figure(fig, tmp_path / "attention")
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="pair them one to one"):
        plots.attention_grid(x[:, 0].numpy(), t_maps, {"0": s_maps["0"]})


def test_plot_cli_ablation_sweep_curves(runs, tmp_path, capsys):
    from featkd.cli import main

    run_dirs = [str(r.path) for r in runs]
    assert main(["plot", "ablation", *run_dirs, "--by", "method", "--out", str(tmp_path / "f" / "abl")]) == 0
    assert main(["plot", "sweep", *run_dirs, "--x", "kd.T", "--series", "method", "--out", str(tmp_path / "f" / "t")]) == 0
    assert main(["plot", "curves", *run_dirs[:2], "--out", str(tmp_path / "f" / "c")]) == 0
    written = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert written == ["abl.pdf", "abl.png", "c.pdf", "c.png", "t.pdf", "t.png"]
    assert "wrote" in capsys.readouterr().out


def test_plot_cli_attention_from_checkpoints(tmp_path):
    from featkd import checkpoint as ckpt
    from featkd.cli import main
    from featkd.models import create_model

    for role, name in (("teacher", "wrn10_2"), ("student", "wrn10_1")):
        model = create_model(name, num_classes=10, in_channels=1)
        ckpt.save_checkpoint(tmp_path / f"{role}.pt", {"models": {role: {"name": name, "num_classes": 10,
                                                                          "in_channels": 1,
                                                                          "state_dict": model.state_dict()}}})
    assert main(["plot", "attention", "--teacher", str(tmp_path / "teacher.pt"), "--student", str(tmp_path / "student.pt"),
                 "--data", "synthetic", "--count", "2", "--out", str(tmp_path / "att")]) == 0
    assert (tmp_path / "att.png").stat().st_size > 1000
