"""Born-Again Networks: the objective against SciPy, generations, BANE, resume, and the CLI."""

import json
import subprocess

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr, softmax

from featkd import checkpoint as ckpt
from featkd.config import load_config
from featkd.data import DeviceLoader, load_dataset
from featkd.distiller import Distiller
from featkd.engine import DistillMethod, SupervisedMethod, evaluate
from featkd.models import create_model
from featkd.strategies.born_again import generation_ensembles, train_generations
from featkd.models.ensemble import ProbabilityAverage


def _net():
    return create_model("resnet8", num_classes=10, in_channels=1)


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_generation_objective_is_kl_from_the_previous_generation(ce_weight):
    from featkd.runs import build_distiller

    shipped = {k: v for k, v in _shipped().items() if k != "born_again"}
    assert shipped["ce_weight"] == 0.0  # BAN's basic form: the teacher's output is the only target
    cfg = load_config(None, [f"ce_weight={ce_weight}"], base=shipped)
    teacher, student = _net(), _net()
    distiller = build_distiller(cfg, teacher, student)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    distiller.setup(x[:2])
    distiller.train()
    logits, losses = distiller(x, y)
    with torch.no_grad():
        z_t = teacher(x).double().numpy()
    z_s = logits.detach().double().numpy()
    kl = rel_entr(softmax(z_t, axis=1), softmax(z_s, axis=1)).sum(1).mean()  # BAN: teacher output as target, T = 1
    ce = -log_softmax(z_s, axis=1)[np.arange(6), y.numpy()].mean()
    assert losses["total"].item() == pytest.approx(kl + ce_weight * ce, rel=1e-5)


def _shipped():
    import yaml

    from featkd.config import STRATEGY_CONFIG_DIR

    return yaml.safe_load((STRATEGY_CONFIG_DIR / "born_again.yaml").read_text())


def test_generation_ensembles():
    models = [_net().eval() for _ in range(3)]
    assert generation_ensembles(models[:1]) == {}
    assert list(generation_ensembles(models[:2])) == ["ensemble_all"]
    ensembles = generation_ensembles(models)
    x = torch.randn(4, 1, 16, 16)
    expected_bane = (models[1](x).softmax(1) + models[2](x).softmax(1)) / 2
    torch.testing.assert_close(ensembles["bane"](x).exp(), expected_bane)
    assert isinstance(ensembles["ensemble_all"], ProbabilityAverage) and len(ensembles["ensemble_all"].members) == 3


@pytest.fixture(scope="module")
def loaders():
    train = load_dataset("synthetic", split="train", size=384, image_size=16, noise=0.5)
    test = load_dataset("synthetic", split="test", size=256, image_size=16, noise=0.5)
    return DeviceLoader(train, 64, seed=0), DeviceLoader(test, 128, shuffle=False, drop_last=False)


class Recorder:
    """make_method for train_generations that records which teacher each generation got."""

    def __init__(self, loaders):
        self.calls, self.example = [], next(iter(loaders[1]))[0][:2]

    def __call__(self, g, student, teacher):
        self.calls.append((g, student, teacher))
        if teacher is None:
            opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
            return SupervisedMethod(student, opt, name="student")
        distiller = Distiller(teacher, student, kd={"loss": "kd", "weight": 1.0, "T": 1.0}, ce_weight=0.0).setup(
            self.example)
        return DistillMethod(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9))


def test_generations_learn_from_their_predecessor_and_improve(tmp_path, loaders):
    make = Recorder(loaders)
    summary = train_generations(_net, make, *loaders, tmp_path / "ban", generations=2, epochs=3, log=lambda _: None)
    assert [g for g, _, _ in make.calls] == [0, 1, 2]
    assert make.calls[0][2] is None
    assert make.calls[1][2] is make.calls[0][1] and make.calls[2][2] is make.calls[1][1]
    for g in range(3):
        rows = ckpt.read_metrics(tmp_path / "ban" / f"gen{g}")
        assert len(rows) == 3
    last = ckpt.read_metrics(tmp_path / "ban" / "gen2")[-1]
    assert {"student/acc1", "bane/acc1", "ensemble_all/acc1", "train/kd"} <= set(last)
    assert "bane/acc1" not in ckpt.read_metrics(tmp_path / "ban" / "gen1")[-1]
    assert json.loads((tmp_path / "ban" / "born_again.json").read_text()) == summary
    torch.manual_seed(1)
    at_init = evaluate(_net(), loaders[1])["acc1"]
    for row in summary:  # each generation beats an untrained network
        assert row["student/acc1"] > at_init + 10, (at_init, summary)


def test_resume_skips_completed_generations_and_continues_interrupted_ones(tmp_path, loaders):
    run = tmp_path / "ban"
    train_generations(_net, Recorder(loaders), *loaders, run, generations=1, epochs=1, log=lambda _: None)
    gen1 = ckpt.load_checkpoint(run / "gen1" / ckpt.LAST)["models"]["student"]["state_dict"]
    with pytest.raises(ckpt.RunDirectoryExistsError, match="--resume"):
        train_generations(_net, Recorder(loaders), *loaders, run, generations=1, epochs=1, log=lambda _: None)

    make = Recorder(loaders)
    train_generations(_net, make, *loaders, run, generations=2, epochs=1, resume=True, log=lambda _: None)
    assert [g for g, _, _ in make.calls] == [2]  # generations 0 and 1 were complete
    teacher = make.calls[0][2]
    for key, value in gen1.items():
        torch.testing.assert_close(teacher.state_dict()[key], value)

    make = Recorder(loaders)  # two epochs now: every generation has one to go and is resumed, not restarted
    train_generations(_net, make, *loaders, run, generations=2, epochs=2, resume=True, log=lambda _: None)
    assert [g for g, _, _ in make.calls] == [0, 1, 2]
    for g in range(3):
        assert [r["epoch"] for r in ckpt.read_metrics(run / f"gen{g}")] == [1, 2]


def test_given_generation_zero_is_not_trained(tmp_path, loaders):
    given = _net()
    make = Recorder(loaders)
    summary = train_generations(_net, make, *loaders, tmp_path / "ban", generations=1, epochs=1,
                                generation0=given, log=lambda _: None)
    assert [g for g, _, _ in make.calls] == [1] and make.calls[0][2] is given
    assert summary[0]["source"] == "given checkpoint" and not (tmp_path / "ban" / "gen0").exists()


@pytest.mark.slow
def test_cli_runs_generations_and_resumes(tmp_path, subprocess_env, python_exe):
    run = tmp_path / "ban"
    common = ["data.name=synthetic", "data.options={size: 64, image_size: 16}", "data.batch_size=32",
              "data.eval_batch_size=64",
              "model.name=resnet8", "epochs=1", "optim.lr=0.05"]
    cmd = [python_exe, "-m", "featkd.cli", "born-again", "--config", "born_again", "--run-dir", str(run)]
    done = subprocess.run(cmd + common + ["born_again.generations=1"], env=subprocess_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run / "gen1" / "metrics.jsonl").is_file() and "train/kd" in ckpt.read_metrics(run / "gen1")[-1]
    resume = [python_exe, "-m", "featkd.cli", "born-again", "--run-dir", str(run), "--resume"]
    again = subprocess.run(resume + ["born_again.generations=2"],
                           env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "generation 1: complete" in again.stdout and (run / "gen2" / "last.pt").is_file()


def test_a_weight_relative_to_the_cross_entropy_is_refused_before_anything_is_written(tmp_path, capsys):
    from featkd.cli import main

    status = main(["born-again", "--config", "born_again", "--run-dir", str(tmp_path / "ban"),
                   "data.name=synthetic", "epochs=1", "kd.weight={relative_to_ce: 1.0}"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "takes absolute weights, and kd.weight is relative to the cross-entropy; give a number" in err
    assert not (tmp_path / "ban").exists()
