"""Adversarial KD: the BCE/LSGAN and C+2 auxiliary objectives against NumPy, and the alternating updates."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from featkd.strategies.adversarial import (AdversarialKD, LogitDiscriminator, class_loss, discriminator_loss,
                                           generator_loss, source_loss)

C = 5


def _np_log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def _ref_source(out, real, objective):
    """Explicit per-sample loops: units C (fake) and C+1 (real)."""
    total = 0.0
    for row in out:
        fake_u, real_u = row[C], row[C + 1]
        if objective == "bce":
            score = real_u - fake_u  # a 2-way softmax is a sigmoid of the difference
            prob_real = 1 / (1 + np.exp(-score))
            total += -np.log(prob_real) if real else -np.log(1 - prob_real)
        else:
            t_fake, t_real = (0.0, 1.0) if real else (1.0, 0.0)
            total += 0.5 * ((fake_u - t_fake) ** 2 + (real_u - t_real) ** 2)
    return total / len(out)


def _ref_class(out, y):
    rows = [(_np_log_softmax(out[i : i + 1, :C])[0, y[i]]) for i in range(len(y)) if y[i] >= 0]
    return -np.mean(rows) if rows else 0.0


@pytest.mark.parametrize("objective", ["bce", "lsgan"])
@pytest.mark.parametrize("real", [True, False])
def test_source_loss_matches_loop(objective, real):
    out = 2 * torch.randn(7, C + 2, dtype=torch.float64)
    assert source_loss(out, real, C, objective).item() == pytest.approx(_ref_source(out.numpy(), real, objective))


def test_class_loss_uses_only_class_units_and_skips_unlabelled():
    out = torch.randn(6, C + 2, dtype=torch.float64)
    y = torch.tensor([0, 4, -1, 2, -1, 1])
    assert class_loss(out, y, C).item() == pytest.approx(_ref_class(out.numpy(), y.numpy()))
    shifted = out.clone()
    shifted[:, C:] += 100.0  # the source units play no part in the class loss
    assert class_loss(shifted, y, C).item() == pytest.approx(class_loss(out, y, C).item())
    assert class_loss(out, torch.full((6,), -1), C).item() == 0.0


@pytest.mark.parametrize("objective", ["bce", "lsgan"])
def test_discriminator_and_generator_objectives(objective):
    g = torch.Generator().manual_seed(3)
    d_real, d_fake = (torch.randn(8, C + 2, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, C, (8,), generator=g)
    r, f, yn = d_real.numpy(), d_fake.numpy(), y.numpy()
    expected_d = (_ref_source(r, True, objective) + _ref_source(f, False, objective)
                  + 0.5 * (_ref_class(r, yn) + _ref_class(f, yn)))
    assert discriminator_loss(d_real, d_fake, y, C, objective, class_weight=0.5).item() == pytest.approx(expected_d)
    expected_g = _ref_source(f, True, objective) + 0.5 * _ref_class(f, yn)
    assert generator_loss(d_fake, y, C, objective, class_weight=0.5).item() == pytest.approx(expected_g)


def test_lsgan_optimum_and_bce_gradient():
    # LSGAN: the discriminator's loss is 0 exactly at the one-hot targets
    real = torch.zeros(3, C + 2)
    real[:, C + 1] = 1
    fake = torch.zeros(3, C + 2)
    fake[:, C] = 1
    assert source_loss(real, True, C, "lsgan").item() == 0 and source_loss(fake, False, C, "lsgan").item() == 0
    # BCE: d/d(real unit) of -log sigmoid(real - fake) is -(1 - sigmoid(score)) / B
    out = torch.randn(4, C + 2, dtype=torch.float64, requires_grad=True)
    source_loss(out, True, C, "bce").backward()
    score = (out[:, C + 1] - out[:, C]).detach()
    torch.testing.assert_close(out.grad[:, C + 1], -(1 - torch.sigmoid(score)) / 4)
    torch.testing.assert_close(out.grad[:, :C], torch.zeros(4, C, dtype=torch.float64))


def test_bad_discriminator_output_is_reported():
    with pytest.raises(ValueError, match="C \\+ 2 = 7"):
        source_loss(torch.zeros(2, C + 1), True, C)
    with pytest.raises(ValueError, match="lsgan"):
        source_loss(torch.zeros(2, C + 2), True, C, "wgan")


def test_discriminator_shape_and_residual_blocks():
    d = LogitDiscriminator(C, width=16, blocks=3)
    assert d(torch.randn(4, C)).shape == (4, C + 2)
    assert len(d.blocks) == 3


def _method(objective="bce", ce_weight=0.0, lr=0.1):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    disc = LogitDiscriminator(C, width=16, blocks=1)
    return AdversarialKD(student, teacher, disc, torch.optim.SGD(student.parameters(), lr=lr),
                         torch.optim.SGD(disc.parameters(), lr=lr), objective=objective, ce_weight=ce_weight)


@pytest.mark.parametrize("objective", ["bce", "lsgan"])
def test_alternating_updates_match_explicit_steps(objective):
    method = _method(objective, ce_weight=0.5)
    student, teacher, disc = (copy.deepcopy(m) for m in (method.student, method.teacher, method.discriminator))
    teacher_before = copy.deepcopy(teacher.state_dict())
    x, y = torch.randn(8, 8), torch.randint(0, C, (8,))
    metrics = method.train_step(x, y, 0)

    # reference: 1) discriminator step on detached student logits; 2) student step against the new discriminator
    z_t, z_s = teacher(x).detach(), student(x)
    d_loss = discriminator_loss(disc(z_t), disc(z_s.detach()), y, C, objective)
    d_grads = torch.autograd.grad(d_loss, list(disc.parameters()))
    with torch.no_grad():
        for p, g in zip(disc.parameters(), d_grads):
            p -= 0.1 * g
    s_loss = (generator_loss(disc(z_s), y, C, objective) + sum((z_s[i] - z_t[i]).abs().sum() for i in range(8)) / 8
              + 0.5 * nn.functional.cross_entropy(z_s, y))
    s_grads = torch.autograd.grad(s_loss, list(student.parameters()))
    with torch.no_grad():
        for p, g in zip(student.parameters(), s_grads):
            p -= 0.1 * g

    for got, ref in ((method.discriminator, disc), (method.student, student)):
        for a, b in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b)
    for key, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key])
    assert metrics["disc"] == pytest.approx(d_loss.item(), rel=1e-5)
    assert metrics["total"] == pytest.approx(s_loss.item(), rel=1e-5)
    assert set(metrics) == {"disc", "adv", "l1", "ce", "total"}
    # the discriminator was fixed during the student's step: its gradients are still those of its own step
    for p, g in zip(method.discriminator.parameters(), d_grads):
        torch.testing.assert_close(p.grad, g)


def test_state_dict_round_trip():
    a, b = _method(), _method()
    x, y = torch.randn(8, 8), torch.randint(0, C, (8,))
    a.train_step(x, y, 0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.train_step(x, y, 1)
    b.train_step(x, y, 1)
    for m in ("student", "discriminator"):
        for pa, pb in zip(getattr(a, m).parameters(), getattr(b, m).parameters()):
            torch.testing.assert_close(pa, pb)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["bce", "lsgan"])
def test_short_run_on_synthetic_data_improves_the_student(objective):
    from featkd.data import DeviceLoader, load_dataset
    from featkd.engine import evaluate
    from featkd.models import create_model

    train = load_dataset("synthetic", split="train", size=512, image_size=16, noise=0.5)
    test_loader = DeviceLoader(load_dataset("synthetic", split="test", size=256, image_size=16, noise=0.5), 128,
                               shuffle=False, drop_last=False)
    loader = DeviceLoader(train, 64, seed=0)
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):  # a teacher that knows the task
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(teacher(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    student = create_model("resnet8", num_classes=10, in_channels=1)
    disc = LogitDiscriminator(10, width=32, blocks=1)
    method = AdversarialKD(student, teacher, disc, torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9),
                           torch.optim.Adam(disc.parameters(), lr=1e-3), objective=objective)
    at_init = evaluate(student, test_loader)["acc1"]
    for epoch in range(5):
        loader.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            method.train_step(x, y, step)
    after = evaluate(student, test_loader)["acc1"]
    assert after > at_init + 20, (at_init, after)


@pytest.mark.slow
def test_cli_trains_against_a_teacher_checkpoint(tmp_path, subprocess_env, python_exe):
    import json
    import subprocess

    from featkd.checkpoint import model_record
    from featkd.data import DeviceLoader, load_dataset
    from featkd.engine import SupervisedMethod, fit
    from featkd.models import create_model

    # a constant schedule, so that --resume epochs=2 can extend the run (a cosine one keeps its length)
    data = ["data.name=synthetic", "data.options={size: 64, image_size: 16}", "data.batch_size=32",
            "data.eval_batch_size=64", "epochs=1", "schedule.name=constant"]
    ds = load_dataset("synthetic", size=64, image_size=16)
    teacher = create_model("resnet8", num_classes=10, in_channels=1)  # a 'featkd train' checkpoint, in-process
    fit(SupervisedMethod(teacher, torch.optim.SGD(teacher.parameters(), lr=0.05)), DeviceLoader(ds, 32),
        DeviceLoader(ds, 64, shuffle=False, drop_last=False), tmp_path / "teacher", 1,
        model_info={"model": model_record("resnet8", {}, ds.info)}, log=lambda _: None)
    run = tmp_path / "adv"
    done = subprocess.run([python_exe, "-m", "featkd.cli", "adversarial", "--config", "adversarial", "--run-dir",
                           str(run), "student.name=resnet8", f"teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}",
                           "adversarial.objective=lsgan", *data], env=subprocess_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/disc", "train/adv", "train/l1", "train/ce", "train/total", "student/acc1"} <= set(row)
    again = subprocess.run([python_exe, "-m", "featkd.cli", "adversarial", "--run-dir", str(run), "--resume",
                            "epochs=2"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
