"""featkd.sweep: sharing one teacher forward among N students changes no number."""

import pytest

from featkd import sweep
from featkd.data import DeviceLoader, load_dataset
from featkd.distiller import Distiller, Term
from featkd.engine import DistillMethod, build_optimizer, build_scheduler, fit, seed_everything
from featkd.models import create_model
from featkd.plots import load_run

EPOCHS = 2


@pytest.fixture(scope="module")
def data():
    train = load_dataset("synthetic", split="train", size=48, image_size=28, in_channels=1, num_classes=4)
    test = load_dataset("synthetic", split="test", size=32, image_size=28, in_channels=1, num_classes=4)
    return train, test


def _loaders(data):
    train, test = data
    return (DeviceLoader(train, 16, shuffle=True, augment=True, seed=7),
            DeviceLoader(test, 16, shuffle=False, drop_last=False))


def _teacher():
    seed_everything(123)
    return create_model("wrn10_2", num_classes=4, in_channels=1)


SPECS = {
    # dropout in the students: each member must keep its own random stream
    "at+kd": dict(terms=[Term(g, loss="at", weight=1e3) for g in ("group1", "group2", "group3")],
                  kd={"loss": "kd", "weight": 0.9, "T": 4}, ce_weight=0.1),
    "nst-poly": dict(terms=[Term("group3", loss="nst", weight=50, options={"kernel": "poly"})]),
}


def _build(teacher, spec, seed, x):
    seed_everything(seed)
    student = create_model("wrn10_1", num_classes=4, in_channels=1, dropout=0.2)
    distiller = Distiller(teacher, student, **spec).setup(x[:2])
    optimizer = build_optimizer(distiller.trainable_parameters(), lr=0.05)
    return distiller, optimizer, build_scheduler(optimizer, epochs=EPOCHS, milestones=[1])


def test_sweep_member_equals_separate_run(data, tmp_path):
    teacher = _teacher()
    train_loader, test_loader = _loaders(data)
    x = next(iter(test_loader))[0]
    runs = [("at+kd", 0), ("nst-poly", 1), ("at+kd", 1)]

    separate = {}
    for name, seed in runs:
        distiller, optimizer, scheduler = _build(teacher, SPECS[name], seed, x)
        history = fit(DistillMethod(distiller, optimizer, scheduler), train_loader, test_loader,
                      tmp_path / f"{name}-{seed}", EPOCHS, log=lambda *_: None)
        distiller.remove_hooks()
        separate[f"{name}-s{seed}"] = history

    shared = sweep.SharedTeacherOutputs()
    members = []
    for name, seed in runs:
        distiller, optimizer, scheduler = _build(teacher, SPECS[name], seed, x)
        members.append(sweep.make_member(f"{name}-s{seed}", distiller, optimizer, scheduler, shared=shared,
                                         config={"method": name, "seed": seed}))
    method = sweep.SweepMethod(teacher, members, shared)
    assert method.teacher_layers == ["group1", "group2", "group3"]
    history = fit(method, train_loader, test_loader, tmp_path / "sweep", EPOCHS, log=lambda *_: None)
    method.close()
    paths = sweep.write_member_runs(tmp_path / "sweep", members, history)

    for member, path in zip(members, paths):
        ours = sweep.member_history(history, member.name)
        theirs = separate[member.name]
        keys = [k for k in theirs[0] if k.startswith(("train/", "student/"))]
        assert {k for k in ours[0] if k.startswith(("train/", "student/"))} == set(keys)
        for row_ours, row_theirs in zip(ours, theirs):
            for key in keys:
                assert row_ours[key] == pytest.approx(row_theirs[key], rel=1e-6, abs=1e-7), (member.name, key)
        # the per-member run directory reads back like any run
        run = load_run(path)
        assert run.config == member.config
        # a member ran where and when its sweep did (a resumed sweep's earlier environments included)
        assert (path / "environment.json").read_text() == (tmp_path / "sweep" / "environment.json").read_text()
        assert [r["student/acc1"] for r in run.metrics] == [r["student/acc1"] for r in theirs]
    # the members really differ from each other (no accidental sharing of students)
    finals = [separate[m.name][-1]["train/total"] for m in members]
    assert len(set(finals)) == len(finals)


def test_member_outside_sweep_step_is_an_error(data):
    teacher = _teacher()
    x = next(iter(_loaders(data)[1]))[0]
    shared = sweep.SharedTeacherOutputs()
    member = sweep.make_member("m", *_build(teacher, SPECS["nst-poly"], 0, x), shared=shared)
    with pytest.raises(RuntimeError, match="outside SweepMethod.train_step"):
        member.distiller(x, None)


def test_sweep_rejects_bad_members(data):
    teacher, other = _teacher(), _teacher()
    x = next(iter(_loaders(data)[1]))[0]
    shared = sweep.SharedTeacherOutputs()
    a = sweep.make_member("a", *_build(teacher, SPECS["nst-poly"], 0, x), shared=shared)
    b = sweep.make_member("a", *_build(teacher, SPECS["nst-poly"], 1, x), shared=shared)
    c = sweep.make_member("c", *_build(other, SPECS["nst-poly"], 1, x), shared=shared)
    with pytest.raises(ValueError, match="unique; repeated: \\['a'\\]"):
        sweep.SweepMethod(teacher, [a, b], shared)
    with pytest.raises(ValueError, match="another teacher"):
        sweep.SweepMethod(teacher, [a, c], shared)


def test_sweep_runs_its_teacher_with_the_members_teacher_bn(data):
    import copy

    import torch

    teacher = _teacher()
    reference = copy.deepcopy(teacher).train()  # training mode: BN with batch statistics
    x = next(iter(_loaders(data)[1]))[0]
    shared = sweep.SharedTeacherOutputs()
    spec = dict(SPECS["nst-poly"], teacher_bn="batch_stats")
    members = [sweep.make_member(f"m{seed}", *_build(teacher, spec, seed, x), shared=shared) for seed in (0, 1)]
    method = sweep.SweepMethod(teacher, members, shared)
    method.teacher_forward(x)
    with torch.no_grad():
        torch.testing.assert_close(shared.logits, reference(x))
    assert not teacher.training and not teacher.bn.training
    eval_member = sweep.make_member("e", *_build(teacher, SPECS["nst-poly"], 2, x), shared=shared)
    with pytest.raises(ValueError, match=r"teacher_bn \['batch_stats', 'eval'\].*same teacher_bn"):
        sweep.SweepMethod(teacher, [*members, eval_member], shared)
    method.close()


def test_expand_grid_and_names():
    grid = sweep.expand_grid({"terms.0.options.kernel": ["linear", "poly"], "seed": [0, 1]})
    assert grid == [{"terms.0.options.kernel": "linear", "seed": 0}, {"terms.0.options.kernel": "linear", "seed": 1},
                    {"terms.0.options.kernel": "poly", "seed": 0}, {"terms.0.options.kernel": "poly", "seed": 1}]
    assert sweep.member_name(grid[1]) == "kernel=linear,seed=1"
    assert sweep.member_name({"kd.T": "a/b c"}) == "T=a_b_c"
    assert sweep.member_name({"terms.0.weight": 1, "terms.1.weight": 2, "seed": 0}) == "terms.0.weight=1,terms.1.weight=2,seed=0"
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.expand_grid({"seed": []})


def cli_distill_config(tmp_path, **student_options):
    """A distill config (NST-poly + KD on synthetic data) against a teacher trained for it, as a file."""
    import yaml

    from featkd.cli import main

    data = {"name": "synthetic", "limit": 48, "test_limit": 32, "batch_size": 16, "eval_batch_size": 32,
            "options": {"num_classes": 4, "image_size": 28}}
    teacher_cfg = tmp_path / "teacher.yaml"
    teacher_cfg.write_text(yaml.safe_dump({"seed": 0, "epochs": 1, "model": {"name": "wrn10_1"}, "data": data,
                                           "schedule": {"name": "constant"}}))
    assert main(["train", "--config", str(teacher_cfg), "--run-dir", str(tmp_path / "teacher")]) == 0
    distill = {"seed": 0, "epochs": 2, "teacher": {"checkpoint": str(tmp_path / "teacher" / "last.pt")},
               "student": {"name": "wrn10_1", "options": student_options}, "data": data,
               "terms": [{"teacher": "group3", "loss": "nst", "weight": 50, "options": {"kernel": "poly"}}],
               "kd": {"loss": "kd", "weight": 0.9, "options": {"T": 4}}, "ce_weight": 0.1,
               "schedule": {"name": "multistep", "milestones": [1]}}
    distill_cfg = tmp_path / "distill.yaml"
    distill_cfg.write_text(yaml.safe_dump(distill))
    return distill_cfg


def test_sweep_cli_member_equals_featkd_distill(tmp_path, capsys):
    """`featkd sweep` member with the base seed == `featkd distill` with the same config, number for number."""
    import json

    from featkd.cli import main

    distill_cfg = cli_distill_config(tmp_path, dropout=0.1)
    assert main(["distill", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "single"),
                 "terms.0.options.kernel=gaussian"]) == 0
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "sweep"),
                 "--grid", "terms.0.options.kernel=linear,gaussian", "--grid", "seed=0,1"]) == 0
    out = capsys.readouterr().out
    assert "| kernel=gaussian,seed=1 |" in out
    members = sorted(p.name for p in (tmp_path / "sweep" / "members").iterdir())
    assert members == ["kernel=gaussian,seed=0", "kernel=gaussian,seed=1", "kernel=linear,seed=0", "kernel=linear,seed=1"]
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    member = load_run(tmp_path / "sweep" / "members" / "kernel=gaussian,seed=0")
    assert member.config["terms"][0]["options"]["kernel"] == "gaussian"
    assert len(member.metrics) == len(single) > 0
    for ours, theirs in zip(member.metrics, single):
        for key in ("train/ce", "train/kd", "train/nst:group3", "train/total", "student/acc1", "student/loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), key
    # data, epochs and teacher are shared by construction: a grid over them is refused
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "bad"), "--grid", "epochs=1,2"]) == 2
    assert "the grid changes 'epochs'" in capsys.readouterr().err
    # deterministic kernels are a switch of the whole process, which every member shares
    assert main(["sweep", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "bad"),
                 "--grid", "deterministic=false,true"]) == 2
    assert "the grid changes 'deterministic'" in capsys.readouterr().err
