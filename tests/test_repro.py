"""featkd.repro: tables, the omitted-class bias correction, budgets, and a tiny end-to-end protocol run."""

import dataclasses
import os

import pytest
import torch

from featkd import repro


def test_results_table_deltas_against_the_student_of_the_same_pair():
    cells = [
        repro.Cell("A", "student", [10.0, 12.0], 8.77),
        repro.Cell("A", "AT", [9.0, 9.5], 7.93),
        repro.Cell("A", "KD", [11.5, 11.0], None),
        repro.Cell("B", "student", [20.0, 20.0], None),
        repro.Cell("B", "AT", [19.0, 18.0], 5.0),
        repro.Cell("B", "F-ActT", [], None),
    ]
    table = repro.results_table(cells, ours_dataset="Fashion-MNIST")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines()[2:]}
    assert rows[("A", "AT")] == ["9.25 ± 0.35", "9.25", "2", "-1.75", "7.93", "-0.84"]
    assert rows[("A", "KD")] == ["11.25 ± 0.35", "11.25", "2", "+0.25", "—", "—"]
    assert rows[("A", "student")][3] == "—"
    assert rows[("B", "AT")][3:] == ["-1.50", "5.00", "—"]  # no published student for B: no published delta
    assert rows[("B", "F-ActT")][:3] == ["not run", "—", "0"]
    assert "(Fashion-MNIST)" in table.splitlines()[0] and "(CIFAR-10)" in table.splitlines()[0]


def test_choose_bias_shift_maximises_heldout_accuracy():
    # The class-2 examples lose by 1.5: a shift in (1.5, 2) fixes them; from 2 on, the two class-0
    # examples (margin 2) flip to class 2.
    labels = torch.tensor([2, 2, 2, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [1.0, 0.0, -0.5],
                           [2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    choice = repro.choose_bias_shift(logits, labels, cls=2, candidates=[0.0, 1.0, 1.75, 2.5])
    assert choice.shift == 1.75 and choice.heldout_accuracy == pytest.approx(100.0)
    assert dict(choice.curve) == pytest.approx({0.0: 50.0, 1.0: 50.0, 1.75: 100.0, 2.5: 400 / 6})
    # ties go to the smallest shift
    assert repro.choose_bias_shift(logits[3:], labels[3:], cls=2, candidates=[1.0, 0.0]).shift == 0.0


def test_apply_bias_shift_equals_shifted_logits():
    torch.manual_seed(0)
    from featkd.models import create_model

    model = create_model("mlp", num_classes=5, in_channels=1, image_size=4, hidden=(6,))
    x = torch.randn(7, 1, 4, 4)
    before = model(x).detach()
    head = repro.apply_bias_shift(model, 3, 2.5)
    assert head is model[-1]
    torch.testing.assert_close(model(x).detach(), repro.shift_logit(before, 3, 2.5))
    with pytest.raises(ValueError, match="no final nn.Linear"):
        repro.apply_bias_shift(torch.nn.Conv2d(1, 1, 1), 0, 1.0)


def test_class_errors_counts():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    e = repro.class_errors(logits, labels, cls=1)
    assert (e.total_errors, e.total, e.class_errors, e.class_total) == (2, 4, 1, 2)
    assert e.class_accuracy == 50.0


def test_split_heldout_is_balanced_disjoint_and_complete():
    from featkd.data import load_dataset

    ds = load_dataset("synthetic", split="train", size=200, num_classes=4)
    rest, held = repro.split_heldout(ds, 40, seed=3)
    assert len(rest) + len(held) == 200
    assert torch.bincount(held.labels, minlength=4).tolist() == [10, 10, 10, 10]
    rows = {tuple(img.flatten()[:20].tolist()) for img in held.images}
    assert not any(tuple(img.flatten()[:20].tolist()) in rows for img in rest.images)


def test_budget_milestones_are_the_official_loops_scaled_and_reported():
    # featkd milestone m = "decay after m epochs"; the official loop decays at the start of epochs 60/120/160
    assert repro.Budget("full", 200, 200, (0,)).milestones(200) == [59, 119, 159]
    assert repro.Budget("short", 30, 30, (0,)).milestones(30) == [8, 17, 23]
    assert repro.Budget("cpu", 2, 3, (0,)).milestones(2) == [1]
    described = repro.AT_TABLE1.budgets["full"].describe()
    assert "lr ×0.2 at the start of epochs 60/120/160: stages of 59/60/40/41" in described
    for part in ("momentum 0.9 (restarted at each decay)", "batch 128 (the last, smaller one kept)",
                 "pad-4 reflection crop + flip", "WRN BN weights ~ U[0, 1)"):
        assert part in described


def test_protocol_schedules_restart_momentum_at_each_decay():
    optimizer, scheduler = repro.paper_schedule([torch.nn.Parameter(torch.zeros(1))], 200)
    assert scheduler.restart_momentum_at_milestones and scheduler.lr_lambdas[0].milestones == [59, 119, 159]
    assert repro.AT_TABLE1.budgets["full"].milestones(200) == [59, 119, 159]


def test_protocol_definitions_hold_the_published_cells():
    pairs = {p.label: p.published for p in repro.AT_TABLE1.pairs}
    assert pairs["WRN-16-1 ← WRN-16-2"] == {"student": 8.77, "AT": 7.93, "teacher": 6.31}
    assert pairs["WRN-16-2 ← WRN-40-2"]["KD"] == 6.08
    at = {r.name: r for r in repro.AT_TABLE1.recipes}
    kwargs = at["AT+KD"].distill(["group1", "group2", "group3"], ["group1", "group2", "group3"])
    assert [t.weight for t in kwargs["terms"]] == [1e3] * 3 and kwargs["kd"]["T"] == 4
    assert kwargs["kd"]["weight"] == 0.9 and kwargs["ce_weight"] == pytest.approx(0.1)
    nst = {r.name: r for r in repro.NST_KERNELS.recipes}
    last = nst["NST-gaussian@last"].distill(["a", "b", "c"], ["x", "y", "z"])["terms"]
    assert [(t.teacher, t.student, t.weight, t.options) for t in last] == [("z", "c", 50.0, {"kernel": "gaussian"})]
    assert len(nst["NST-poly@all+KD"].distill(["a", "b", "c"], ["x", "y", "z"])["terms"]) == 3
    assert repro.AT_TABLE1.recipes[0].distill is None  # the student alone: cross-entropy only


def test_nst_protocol_transfers_the_official_codes_pre_relu_map():
    from featkd.models import create_model

    nst = {r.name: r for r in repro.NST_KERNELS.recipes}
    for teacher, student, last in (("wrn16_2", "wrn16_1", "bn"), ("nin", "nin_thin", "block3.4")):
        t, s = create_model(teacher), create_model(student)
        recipe = nst["NST-poly@last+KD"]
        kwargs = recipe.distill(recipe.layers(s), recipe.layers(t))
        assert [(x.teacher, x.student, x.weight, x.options) for x in kwargs["terms"]] == [(last, last, 50.0,
                                                                                         {"kernel": "poly"})]
        assert kwargs["kd"] == {"loss": "kd", "weight": 1.0, "T": 4} and kwargs["ce_weight"] == 1.0
        assert "teacher_bn" not in kwargs  # the teacher's running statistics (batch statistics: an option)
        everywhere = nst["NST-linear@all"]
        assert [x.student for x in everywhere.distill(everywhere.layers(s), everywhere.layers(t))["terms"]] == [
            *s.default_distill_layers[:2], last]
    at = {r.name: r for r in repro.AT_TABLE1.recipes}["AT"]
    assert at.layers(create_model("wrn16_1")) == ["group1", "group2", "group3"]  # AT stays on the group outputs


def test_compact_summary_keeps_accuracies():
    line = "epoch 2  train/a-s0/ce 1.2  a-s0/acc1 55.5  a-s0/loss 1.1  b-s1/acc1 60  lr 0.1  epoch_time_s 3.5"
    assert repro.compact_summary(line) == "epoch 2  a-s0/acc1 55.5  b-s1/acc1 60  epoch_time_s 3.5"
    assert repro.compact_summary("reusing x") == "reusing x"


@pytest.mark.slow
def test_tiny_protocol_run_reuses_teacher_and_never_overwrites(tmp_path):
    protocol = dataclasses.replace(
        repro.AT_TABLE1, pairs=(repro.Pair("wrn10_1", "wrn10_2", {"student": 8.77, "AT": 7.93}),),
        recipes=tuple(r for r in repro.AT_TABLE1.recipes if r.name in ("student", "AT")))
    # 33 examples in batches of 16: the last batch holds one example, which every member and BN layer must take
    budget = repro.Budget("tiny", 1, 1, (0,), batch_size=16, train_limit=33, test_limit=16)
    data = repro.DataSpec("synthetic")
    logs = []
    first = repro.run_protocol(protocol, budget, data, tmp_path, command="test", log=logs.append)
    assert "| WRN-10-1 ← WRN-10-2 | AT |" in first.markdown and "dataset (ours): synthetic (not CIFAR-10" in first.markdown
    acc = first.accuracies["WRN-10-1 ← WRN-10-2"]
    assert set(acc) == {"student", "AT"} and all(len(v) == 1 for v in acc.values())
    sweep_dir = tmp_path / "at-table1" / "wrn10_1-from-wrn10_2-synthetic-tiny"
    assert (sweep_dir / "members" / "AT-s0" / "metrics.jsonl").is_file()
    from featkd.checkpoint import load_checkpoint

    # the reference code's WRN initialisation, recorded with the weights so that they are rebuilt the same way
    teacher_state = load_checkpoint(tmp_path / "teachers" / "wrn10_2-synthetic-tiny" / "last.pt")
    student_state = load_checkpoint(sweep_dir / "last.pt")
    assert teacher_state["models"]["teacher"]["options"] == {"bn_init": "uniform"}
    assert student_state["models"]["AT-s0"]["options"] == {"bn_init": "uniform"}
    assert teacher_state["step"] == student_state["step"] == 3  # 16 + 16 + the last batch of 1
    assert teacher_state["config"]["training"] == {"pad": 4, "pad_mode": "reflect", "drop_last": False,
                                                   "milestones": [], "restart_momentum_at_milestones": True}
    # a second call reuses the finished teacher and sweep, gives the same numbers, keeps the first report
    logs.clear()
    second = repro.run_protocol(protocol, budget, data, tmp_path, command="test", log=logs.append)
    assert second.accuracies == first.accuracies and second.teachers == first.teachers
    assert sum("reusing finished run" in line for line in logs) == 2
    assert (tmp_path / "at-table1-tiny-synthetic.md").is_file() and (tmp_path / "at-table1-tiny-synthetic-2.md").is_file()
    # a cached run made with other settings is left alone, with a clear error
    from featkd.checkpoint import RunDirectoryExistsError

    with pytest.raises(RunDirectoryExistsError, match="other settings.*choose another --run-dir"):
        repro.run_protocol(protocol, dataclasses.replace(budget, train_limit=48), data, tmp_path, log=logs.append)


@pytest.mark.slow
def test_tiny_nst_protocol_run_distills_at_the_pre_relu_map(tmp_path):
    from featkd.checkpoint import read_metrics

    protocol = dataclasses.replace(repro.NST_KERNELS, pairs=(repro.Pair("wrn10_1", "wrn10_2"),),
                                   recipes=tuple(r for r in repro.NST_KERNELS.recipes if r.name == "NST-poly@last+KD"))
    budget = repro.Budget("tiny", 1, 1, (0,), batch_size=16, train_limit=33, test_limit=16)
    repro.run_protocol(protocol, budget, repro.DataSpec("synthetic"), tmp_path, command="test", log=lambda line: None)
    member = read_metrics(tmp_path / "nst-kernels" / "wrn10_1-from-wrn10_2-synthetic-tiny" / "members" /
                          "NST-poly@last+KD-s0")
    assert {"train/nst-poly:bn", "train/kd", "train/ce"} <= set(member[0])


def test_cli_rejects_unknown_protocol_and_method(capsys):
    from featkd.cli import main

    assert main(["repro", "at-tabel1"]) == 2
    assert "Did you mean: at-table1" in capsys.readouterr().err
    assert main(["repro", "at-table1", "--methods", "ATT"]) == 2
    assert "unknown method(s) ['ATT']" in capsys.readouterr().err


def test_a_run_in_progress_is_not_trained_twice(tmp_path):
    from featkd.checkpoint import RunDirectoryExistsError

    run_dir = tmp_path / "teachers" / "t"
    (tmp_path / "teachers").mkdir()
    holder = str(os.getpid())  # a lock of the old form (a bare PID) held by a live process: this one
    (tmp_path / "teachers" / ".t.lock").write_text(holder)
    with pytest.raises(RunDirectoryExistsError, match=f"is in use: process {holder} "):
        repro.fit_or_resume(None, None, None, run_dir, 1, log=print)
    assert (tmp_path / "teachers" / ".t.lock").read_text() == holder  # someone else's lock is left alone


def test_protocol_training_data_is_the_official_augmentation():
    from featkd.data import load_dataset

    ds = load_dataset("synthetic", size=100)
    loader = repro.protocol_train_loader(ds, repro.CPU_BUDGET, "cpu")
    assert (loader.augment, loader.pad, loader.pad_mode, loader.flip) == (True, 4, "reflect", True)
    # every example once an epoch: the batch of 64 and the last one of 36 (the official loader keeps it)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        labels = [y for _, y in loader]
        assert [len(y) for y in labels] == [64, 36]
        assert sorted(loader.epoch_plan().indices.tolist()) == list(range(100))
        assert torch.equal(torch.cat(labels).sort().values, ds.labels.sort().values)


@pytest.mark.slow
def test_omitted_class_run_decays_the_lr_once_in_two_epochs(tmp_path):
    from featkd.checkpoint import read_metrics

    budget = repro.OmittedBudget("tiny", 2, 2, (0,), teacher_hidden=(16,), student_hidden=(8,), batch_size=32,
                                 train_limit=300, test_limit=100, heldout=100)
    repro.run_omitted_class(budget, repro.DataSpec("synthetic"), tmp_path, log=lambda line: None)
    runs = [tmp_path / "teachers" / "mlp16-synthetic-omitted-tiny",
            tmp_path / "omitted-class" / "synthetic-tiny-full", tmp_path / "omitted-class" / "synthetic-tiny-omitted"]
    for run in runs:  # lr 0.05 then ×0.2 once (two coinciding milestones once gave ×0.04)
        assert [row["lr"] for row in read_metrics(run)] == pytest.approx([0.05, 0.01]), run


def test_a_cached_run_made_before_a_setting_existed_is_not_reused(tmp_path):
    from featkd.checkpoint import RunDirectoryExistsError

    (tmp_path / "config.yaml").write_text("model: wrn16_2\nepochs: 4\n")
    repro.check_cached_config(tmp_path, {"model": "wrn16_2", "epochs": 4})  # the same settings: reused
    with pytest.raises(RunDirectoryExistsError, match=r"'training': \(None, \{'pad_mode': 'reflect'\}\)"):
        repro.check_cached_config(tmp_path, {"model": "wrn16_2", "epochs": 4, "training": {"pad_mode": "reflect"}})
