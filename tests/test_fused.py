"""featkd.fused: members trained as one batched computation equal their separate runs to float tolerance."""

import json

import pytest
import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd import sweep
from featkd.distiller import Distiller, Term
from featkd.engine import DistillMethod, SupervisedMethod, build_optimizer, build_scheduler, fit, seed_everything
from featkd.fused import RANDOM_OPS, FusedSweepMethod, StackedStudents
from featkd.models import create_model
from test_sweep import _loaders, _teacher, cli_distill_config, data  # noqa: F401 (data: the fixture of both modules)

EPOCHS = 2
# (name, recipe, seed, lr, grad_clip): terms with and without parameters (FitNets' regressor), KD, a student
# alone, another learning rate and a clipped gradient, so that every per-member part is exercised. The rates
# are small because at 0.05 this tiny problem amplifies any 1e-6 change of the weights to 1e-2 within six steps
# (a separate run perturbed by 1e-6 does the same), which would hide a real difference behind chaos.
MEMBERS = [
    ("at+kd", dict(terms=[Term(g, loss="at", weight=1e3) for g in ("group1", "group2", "group3")],
                   kd={"loss": "kd", "weight": 0.9, "T": 4}, ce_weight=0.1), 0, 0.01, None),
    ("nst-poly", dict(terms=[Term("group3", loss="nst", weight=50, options={"kernel": "poly"})]), 1, 0.02, None),
    ("fitnet", dict(terms=[Term("group2", loss="hint", weight=1.0)]), 2, 0.01, 0.5),
    ("student", None, 3, 0.01, None),
]


def _method(teacher, recipe, seed, lr, grad_clip, x, **student_options):
    """The member's Method as a separate run builds it (seeded, set up, its own optimiser and schedule)."""
    seed_everything(seed)
    student = create_model("wrn10_1", num_classes=4, in_channels=1, **student_options).to(x.device)
    if recipe is None:
        optimizer = build_optimizer(student.parameters(), lr=lr)
        scheduler = build_scheduler(optimizer, epochs=EPOCHS, milestones=[1])
        return SupervisedMethod(student, optimizer, scheduler, grad_clip=grad_clip, name="student")
    distiller = Distiller(teacher, student, **recipe).setup(x[:2])
    optimizer = build_optimizer(distiller.trainable_parameters(), lr=lr)
    scheduler = build_scheduler(optimizer, epochs=EPOCHS, milestones=[1])
    return DistillMethod(distiller, optimizer, scheduler, grad_clip=grad_clip, steps_per_epoch=3)


def _fused(teacher, x, members=MEMBERS, compile=False, **student_options):
    shared = sweep.SharedTeacherOutputs()
    built = []
    for name, recipe, seed, lr, clip in members:
        method = _method(teacher, recipe, seed, lr, clip, x, **student_options)
        if recipe is None:
            built.append(sweep.Member(name, method, {}, ckpt.rng_state()))
        else:
            built.append(sweep.make_member(name, method.distiller, method.optimizer, method.scheduler, shared=shared,
                                           grad_clip=clip, steps_per_epoch=3))
    return FusedSweepMethod(teacher, built, shared, compile=compile)


def test_stacked_students_give_each_students_own_outputs_and_features():
    """The batched forward against each student run by itself (an independent computation), rows in order."""
    students = []
    for seed in range(3):
        seed_everything(seed)
        students.append(create_model("wrn10_1", num_classes=4, in_channels=1).eval())
    x = torch.randn(5, 1, 28, 28)
    expected = []
    for student in students:
        with torch.no_grad(), __import__("featkd").capture(student, ["group2"]) as feats:
            logits = student(x)
            expected.append((logits, feats["group2"]))
    stacked = StackedStudents(students, ["group2"])
    stacked.train(False)
    with torch.no_grad():
        logits, features = stacked(x)
    assert logits.shape == (3, 5, 4) and features["group2"].shape[:2] == (3, 5)
    for k, (want_logits, want_features) in enumerate(expected):
        torch.testing.assert_close(logits[k], want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features["group2"][k], want_features, rtol=1e-5, atol=1e-5)
    # the students' own tensors are views of the stacks: writing one writes the other
    with torch.no_grad():
        students[1].fc.weight.add_(1.0)
    torch.testing.assert_close(stacked.params["fc.weight"][1], students[1].fc.weight)
    stacked.check_bound()


def test_fused_members_equal_their_separate_runs(data, tmp_path):
    teacher = _teacher()
    train_loader, test_loader = _loaders(data)
    x = next(iter(test_loader))[0]
    separate = {}
    for name, recipe, seed, lr, clip in MEMBERS:
        method = _method(teacher, recipe, seed, lr, clip, x)
        history = fit(method, train_loader, test_loader, tmp_path / name, EPOCHS, log=lambda *_: None)
        separate[name] = (history, next(iter(method.eval_models().values())).state_dict())

    method = _fused(teacher, x)
    history = fit(method, train_loader, test_loader, tmp_path / "fused", EPOCHS, log=lambda *_: None)
    method.close()
    for member in method.members:
        theirs, their_weights = separate[member.name]
        ours = sweep.member_history(history, member.name)
        losses = [k for k in theirs[0] if k.startswith("train/")]
        assert losses and {k for k in ours[0] if k.startswith("train/")} == set(losses), member.name
        for row_ours, row_theirs in zip(ours, theirs):
            for key in losses:
                assert row_ours[key] == pytest.approx(row_theirs[key], rel=1e-4, abs=1e-6), (member.name, key)
            model = next(k for k in row_theirs if k.endswith("/acc1"))
            assert abs(row_ours["student/acc1"] - row_theirs[model]) <= 100 / 32 + 1e-9  # at most one image flips
        own = member.student.state_dict()
        assert set(own) == set(their_weights)
        for key, value in their_weights.items():  # parameters and BN statistics alike, ‖ours − theirs‖ / ‖theirs‖
            error = (own[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-12)
            assert error < 1e-4, (member.name, key, error.item())  # float32 rounding stays under 1e-5 here


@pytest.mark.parametrize("device,compile", [
    ("cpu", False),
    ("cpu", {"backend": "eager"}),  # the compiled path's tracing, without a C++ compiler
    pytest.param("cuda", False, marks=pytest.mark.cuda),
    pytest.param("cuda", {"mode": "reduce-overhead"}, marks=pytest.mark.cuda),  # CUDA graphs
])
def test_each_member_gets_its_own_gradient_from_one_batched_backward(data, device, compile, monkeypatch):
    """After one step, member k's gradients equal those of its own backward (each member's loss reads row k
    alone), to float32 rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # tf32 convolutions would round to 1e-3
    teacher = _teacher().to(device)
    x, y = (t.to(device) for t in next(iter(_loaders(data)[0])))
    separate = [_method(teacher, recipe, seed, lr, clip, x) for _, recipe, seed, lr, clip in MEMBERS]
    for method in separate:
        method.train_step(x, y, 0)
    fused = _fused(teacher, x, compile=compile)
    fused.train_step(x, y, 0)
    for method, member in zip(separate, fused.members):
        theirs = dict(next(iter(method.eval_models().values())).named_parameters())
        for name, param in member.student.named_parameters():
            assert param.grad is not None and param.grad.data_ptr() != theirs[name].grad.data_ptr()
            error = (param.grad.double() - theirs[name].grad.double()).norm() / theirs[name].grad.double().norm()
            assert error < 1e-5, (member.name, name, error.item())


def test_a_resumed_fused_sweep_equals_an_uninterrupted_one(data, tmp_path):
    teacher = _teacher()
    train_loader, test_loader = _loaders(data)
    x = next(iter(test_loader))[0]
    whole = _fused(teacher, x)
    history = fit(whole, train_loader, test_loader, tmp_path / "whole", EPOCHS, log=lambda *_: None)
    first = _fused(teacher, x)
    fit(first, train_loader, test_loader, tmp_path / "parts", 1, log=lambda *_: None)
    resumed = _fused(teacher, x)
    resumed_history = fit(resumed, train_loader, test_loader, tmp_path / "parts", EPOCHS, resume=True,
                          log=lambda *_: None)
    resumed.students.check_bound()
    for ours, theirs in zip(resumed_history, history, strict=True):
        assert {k: v for k, v in ours.items() if not k.endswith("_s")} == {k: v for k, v in theirs.items()
                                                                           if not k.endswith("_s")}
    for ours, theirs in zip(resumed.members, whole.members):
        for key, value in theirs.student.state_dict().items():
            assert torch.equal(ours.student.state_dict()[key], value), key


def test_fusing_refuses_what_one_batched_forward_cannot_run(data):
    teacher = _teacher()
    x = next(iter(_loaders(data)[1]))[0]
    seed_everything(0)
    narrow, wide = create_model("wrn10_1", 4, 1), create_model("wrn10_2", 4, 1)
    with pytest.raises(ValueError, match=r"student 1 differs from student 0: parameter 'group1.0.conv1.weight' of shape \[32, 16, 3, 3\], "
                       r"float32 on cpu where student 0 has parameter 'group1.0.conv1.weight' of shape \[16, 16, 3, 3\]"):
        StackedStudents([narrow, wide])
    # a setting that is no tensor would be run as student 0's for every member
    seed_everything(0)
    eps_differs = create_model("wrn10_1", 4, 1)
    eps_differs.bn.eps = 1e-3
    with pytest.raises(ValueError, match=r"student 1 differs from student 0: '\(bn\): BatchNorm2d\(64, eps=0.001"):
        StackedStudents([narrow, eps_differs])
    with pytest.raises(ValueError, match="featkd sweep without --fused") as error:
        _fused(teacher, x, MEMBERS[:2], dropout=0.3)
    assert str(error.value) == RANDOM_OPS

    class FunctionalDropout(nn.Module):  # random numbers no module declares: refused at the first step
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(nn.functional.dropout(x, 0.5, self.training))

    stacked = StackedStudents([FunctionalDropout(), FunctionalDropout()])
    with pytest.raises(ValueError, match="featkd sweep without --fused"):
        stacked(torch.randn(3, 4))
    # a member's outputs exist only inside the fused step
    member = _fused(teacher, x, MEMBERS[:2]).members[0]
    with pytest.raises(RuntimeError, match="ran outside"):
        member.distiller(x, torch.zeros(len(x), dtype=torch.long))


def test_a_moved_student_is_no_longer_fused_and_says_so():
    students = [nn.Linear(3, 2), nn.Linear(3, 2)]
    stacked = StackedStudents(students)
    students[0].weight.data = students[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="student 0's 'weight' is no longer a view of its stack"):
        stacked.check_bound()


def test_sweep_cli_fused_members_equal_the_unfused_sweeps(tmp_path, capsys):
    import yaml

    from featkd.cli import main

    distill_cfg = cli_distill_config(tmp_path)
    grid = ["--grid", "terms.0.options.kernel=linear,gaussian", "--grid", "seed=0,1"]
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "plain"), *grid]) == 0
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "fused"), "--fused", *grid]) == 0
    assert "fused sweep of 4 members" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())["fused"] is True
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    fused = [json.loads(line) for line in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in plain[0] if k.startswith("train/")]
    assert len(keys) == 4 * 4  # ce, kd, nst:group3, total of each member
    for ours, theirs in zip(fused, plain):
        for key in keys:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    # a student that draws random numbers is refused in one line, before anything is written
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "dropout"), "--fused", *grid,
                 "student.options.dropout=0.1"]) == 2
    assert "draws some (dropout)" in capsys.readouterr().err and not (tmp_path / "dropout").exists()
    # a resumed sweep keeps its way of training
    assert main(["sweep", "--run-dir", str(tmp_path / "plain"), "--resume", "--fused"]) == 2
    assert "was trained unfused" in capsys.readouterr().err
