"""Weights relative to the cross-entropy: the resolved weight makes the term's gradient the asked multiple of the CE's."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import featkd
from featkd.calibration import RelativeToCE, calibrate_weights
from featkd.models import create_model


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = create_model("wrn10_2", num_classes=10, in_channels=1).eval()
    student = create_model("wrn10_1", num_classes=10, in_channels=1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return teacher, student, x, y


def _grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))


def test_the_resolved_weight_gives_the_asked_gradient_ratio():
    teacher, student, x, y = _pair()
    terms = [featkd.Term("group2", loss="at", weight=RelativeToCE(0.5), name="at"),
             featkd.Term("group3", loss="nst", weight=RelativeToCE(2.0), name="nst")]
    distiller = featkd.Distiller(teacher, student, terms=terms, kd={"loss": "kd", "weight": RelativeToCE(1.0), "T": 4})
    distiller.setup(x[:2])
    resolved = calibrate_weights(distiller, x, y)
    assert set(resolved) == {"kd", "at", "nst"} and all(w > 0 for w in resolved.values())
    # independently: the weighted losses of a training forward against a plain cross-entropy on its logits
    distiller.train()
    logits, losses = distiller(x, y)
    params = [p for p in student.parameters() if p.requires_grad]
    ce = _grad_norm(F.cross_entropy(logits, y), params)
    for key, ratio in (("at", 0.5), ("nst", 2.0), ("kd", 1.0)):
        assert _grad_norm(losses[key], params) / ce == pytest.approx(ratio, rel=1e-4)


def test_calibration_leaves_the_run_as_it_was():
    teacher, student, x, y = _pair()
    reference = copy.deepcopy(student)
    distiller = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="at", weight=RelativeToCE(1.0))])
    distiller.setup(x[:2])
    rng = torch.get_rng_state()
    weight = calibrate_weights(distiller, x, y)["at:group3"]
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), b in zip(student.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # BN running statistics included
    # a calibrated run trains exactly as the same run given the absolute weight
    other = featkd.Distiller(teacher, reference, terms=[featkd.Term("group3", loss="at", weight=weight)]).setup(x[:2])
    for d in (distiller, other):
        d.train()
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            d(x, y)[1]["total"].backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), reference.parameters()))


def test_an_unresolved_relative_weight_refuses_to_train():
    teacher, student, x, y = _pair()
    distiller = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="at", weight=RelativeToCE(1.0))])
    distiller.setup(x[:2])
    with pytest.raises(RuntimeError, match="relative to the cross-entropy.*calibrate_weights"):
        distiller(x, y)
    with pytest.raises(ValueError, match="positive"):
        RelativeToCE(-1.0)
    with pytest.raises(ValueError, match="needs a batch with labels"):
        calibrate_weights(distiller, x, torch.full_like(y, -1))


@pytest.mark.slow
def test_featkd_distill_records_the_resolved_weight_and_resume_uses_it(tmp_path):
    import yaml

    from featkd.cli import main

    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "t"), "model.name=wrn10_2",
                 "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32", "data.batch_size=16"]) == 0
    args = ["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(tmp_path / "s"),
            f"teacher.checkpoint={tmp_path / 't' / 'last.pt'}", "student.name=wrn10_1", "data.name=synthetic",
            "data.limit=64", "data.test_limit=32", "data.batch_size=16", "epochs=1", "schedule.name=constant",
            "terms=[{teacher: group3, loss: at, weight: {relative_to_ce: 0.5}}]", "kd=null"]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    weight = saved["terms"][0]["weight"]
    assert weight["relative_to_ce"] == 0.5 and weight["resolved"] > 0
    assert main(["distill", "--run-dir", str(tmp_path / "s"), "--resume", "epochs=2"]) == 0
    assert yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())["terms"][0]["weight"] == weight
