"""Reading a tiny run of every kind: `featkd eval --run-dir` reproduces the accuracies it logged, `featkd show`
prints its recipe, provenance and final metrics."""

import json

import pytest
import torch

from featkd import checkpoint as ckpt
from featkd import repro
from featkd.cli import main
from featkd.repro import limited_data

DATA = ["data.name=synthetic", "data.options={size: 64, image_size: 16}", "data.test_limit=32", "data.batch_size=32",
        "data.eval_batch_size=64", "epochs=1", "schedule.name=constant"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each kind, sharing one teacher."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(root / "teacher"),
                 "model.name=resnet8", *DATA]) == 0
    teacher = f"teacher.checkpoint={root / 'teacher' / 'last.pt'}"
    distill = ["--config", "fmnist_distill_kd_at_nst", "student.name=resnet8", teacher, *DATA,
               "terms=[{teacher: layer3, loss: at, weight: 1000}]"]
    assert main(["distill", "--run-dir", str(root / "distill"), *distill]) == 0
    assert main(["sweep", "--run-dir", str(root / "sweep"), *distill, "--grid", "seed=0,1"]) == 0
    assert main(["dml", "--config", "dml", "--run-dir", str(root / "dml"), *DATA,
                 "dml.peers=[{name: resnet8}, {name: resnet8}]"]) == 0
    assert main(["born-again", "--config", "born_again", "--run-dir", str(root / "ban"), *DATA,
                 "model.name=resnet8", "born_again.generations=2"]) == 0
    assert main(["born-again", "--config", "born_again", "--run-dir", str(root / "ban_given"), *DATA,
                 "model.name=resnet8", "born_again.generations=1",
                 f"born_again.teacher_checkpoint={root / 'teacher' / 'last.pt'}"]) == 0
    assert main(["adversarial", "--config", "adversarial", "--run-dir", str(root / "adv"), *DATA,
                 "student.name=resnet8", teacher]) == 0
    return root


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A repro limited-data table (student and KD, one seed) on the default synthetic data."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("limited")
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(root / "teacher"),
                 "model.name=wrn10_1", "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32",
                 "data.batch_size=16"]) == 0
    setup = limited_data.LimitedDataSetup(fraction=0.01, epochs=1, seeds=(0,), methods=("student", "KD"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200)
    limited_data.run_limited_data(root / "teacher" / "last.pt", setup, root / "runs",
                                  data=repro.DataSpec("synthetic"), device="cpu", log=lambda _: None)
    return root / "runs" / setup.name(repro.DataSpec("synthetic")) / "seed0-1ep"  # one sweep per seed


def evaluate(run_dir, tmp_path, *extra):
    out = tmp_path / f"scores-{len(list(tmp_path.iterdir()))}.json"
    assert main(["eval", "--run-dir", str(run_dir), "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def assert_logged(scores, run_dir, names):
    """Each model in ``names`` (the eval key and the metrics prefix) scores what the run logged."""
    row = ckpt.read_metrics(run_dir)[-1]
    for key, logged in names.items():
        assert scores[key]["acc1"] == pytest.approx(row[f"{logged}/acc1"]), key
        assert scores[key]["loss"] == pytest.approx(row[f"{logged}/loss"], rel=1e-5), key


@pytest.mark.parametrize("kind, models", [
    ("teacher", {"model": "model"}),
    ("distill", {"student": "student"}),
    ("sweep", {"seed=0": "seed=0", "seed=1": "seed=1"}),
    ("dml", {"peer0": "peer0", "peer1": "peer1", "ensemble": "ensemble"}),  # 'unknown config key dml' before
    ("adv", {"student": "student"}),
])
def test_eval_reads_a_run_of_every_kind(runs, tmp_path, kind, models):
    scores = evaluate(runs / kind, tmp_path)
    assert set(scores) == {"checkpoint", "epoch", "split", "dataset", "examples", *models}
    assert scores["examples"] == 32
    assert_logged(scores, runs / kind, models)


def test_eval_reads_every_born_again_generation_and_its_ensembles(runs, tmp_path):
    scores = evaluate(runs / "ban", tmp_path)
    assert sorted(scores["checkpoints"]) == [str(runs / "ban" / f"gen{g}" / "last.pt") for g in range(3)]
    assert_logged(scores, runs / "ban" / "gen0", {"gen0/student": "student"})
    assert_logged(scores, runs / "ban" / "gen1", {"gen1/student": "student", "gen1/ensemble_all": "ensemble_all"})
    assert_logged(scores, runs / "ban" / "gen2", {"gen2/student": "student", "gen2/ensemble_all": "ensemble_all",
                                                  "gen2/bane": "bane"})
    one = evaluate(runs / "ban" / "gen2", tmp_path)  # 'unknown config key born_again' before
    assert one["bane"] == scores["gen2/bane"]


def test_eval_rebuilds_an_ensemble_with_a_given_generation_zero(runs, tmp_path):
    # generation 0 is the teacher checkpoint, not a generation directory: its record comes from that checkpoint
    scores = evaluate(runs / "ban_given", tmp_path)
    assert scores["checkpoint"] == str(runs / "ban_given" / "gen1" / "last.pt")
    assert_logged(scores, runs / "ban_given" / "gen1", {"gen1/student": "student", "gen1/ensemble_all": "ensemble_all"})


def test_a_sweep_member_names_the_checkpoint_that_holds_it(runs, tmp_path, capsys):
    member = runs / "sweep" / "members" / "seed=1"
    assert main(["eval", "--run-dir", str(member)]) == 2
    error = capsys.readouterr().err.strip()
    command = f"featkd eval --run-dir {runs / 'sweep'} --model seed=1"
    assert "\n" not in error and str(runs / "sweep" / "last.pt") in error and error.endswith(command)
    scores = evaluate(runs / "sweep", tmp_path, "--model", "seed=1")  # the command it names works
    assert set(scores) - {"checkpoint", "epoch", "split", "dataset", "examples"} == {"seed=1"}
    assert_logged(scores, member, {"seed=1": "student"})  # the member's own metrics name it the student


def test_eval_reads_a_repro_table_run_and_names_its_members_checkpoint(limited, tmp_path, capsys):
    # the repro config records no data section: the dataset is the one the students' records name
    scores = evaluate(limited, tmp_path, "data.test_limit=40")
    assert scores["dataset"] == "synthetic" and scores["examples"] == 40
    assert_logged(scores, limited, {"student-s0": "student-s0", "KD-s0": "KD-s0"})
    assert main(["eval", "--run-dir", str(limited / "members" / "KD-s0")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"featkd eval --run-dir {limited} --model KD-s0")
    shown = show(limited / "members" / "KD-s0", capsys)
    assert shown[0] == f"run {limited / 'members' / 'KD-s0'}: a member of the sweep {limited}"
    recipe = set(section(shown, "recipe (config.yaml)"))
    assert {"method KD", "experiment limited-data", "seed 0", "data_seed 0", "ce_weight 0.1"} <= recipe, recipe


def test_eval_reads_the_omitted_class_runs(tmp_path):
    budget = repro.OmittedBudget("tiny", 1, 1, (0,), teacher_hidden=(16,), student_hidden=(8,), batch_size=32,
                                 train_limit=300, test_limit=100, heldout=100)
    repro.run_omitted_class(budget, repro.DataSpec("synthetic"), tmp_path / "runs", log=lambda line: None)
    teacher = tmp_path / "runs" / "teachers" / "mlp16-synthetic-omitted-tiny"
    assert_logged(evaluate(teacher, tmp_path, "data.test_limit=100"), teacher, {"teacher": "teacher"})
    students = tmp_path / "runs" / "omitted-class" / "synthetic-tiny-omitted"
    assert_logged(evaluate(students, tmp_path, "data.test_limit=100"), students, {"s0": "s0"})


def test_an_ensemble_saved_without_its_record_is_skipped_with_a_note(runs, tmp_path, capsys):
    state = ckpt.load_checkpoint(runs / "dml" / "last.pt")
    state["models"]["ensemble"] = {"state_dict": state["models"]["ensemble"]["state_dict"]}  # an older featkd's
    old = tmp_path / "old"
    old.mkdir()
    ckpt.save_checkpoint(old / "last.pt", {k: v for k, v in state.items() if k != "format"})
    assert main(["eval", "--run-dir", str(old)]) == 0
    captured = capsys.readouterr()
    assert "peer0:" in captured.out and "ensemble" not in captured.out
    assert "ensemble: not evaluated" in captured.err and "older featkd" in captured.err
    assert main(["eval", "--run-dir", str(old), "--model", "ensemble"]) == 2
    assert "the models it can rebuild: ['peer0', 'peer1']" in capsys.readouterr().err



def show(run_dir, capsys) -> list[str]:
    """``featkd show``'s lines, each with its runs of spaces squeezed to one (the column widths vary)."""
    capsys.readouterr()
    assert main(["show", str(run_dir)]) == 0
    return [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]


def section(lines, title) -> list[str]:
    start = lines.index(title) + 1
    return lines[start:lines.index("", start) if "" in lines[start:] else len(lines)]


def test_show_prints_a_distill_runs_recipe_provenance_and_final_metrics(runs, capsys):
    lines = show(runs / "distill", capsys)
    environment = json.loads((runs / "distill" / "environment.json").read_text())
    assert lines[0] == f"run {runs / 'distill'}: featkd distill"
    recipe = section(lines, "recipe (config.yaml)")
    assert recipe[:4] == [f"teacher {{checkpoint: {runs / 'teacher' / 'last.pt'}}}",
                          "student {name: resnet8, options: {}}",
                          "terms",
                          "- {teacher: layer3, loss: at, weight: 1000.0, adapter: auto, options: {}}"]
    assert "kd {loss: kd, weight: 0.9, options: {T: 4}}" in recipe and "ce_weight 0.1" in recipe
    assert any(line.startswith("optim {name: sgd, lr: 0.1,") for line in recipe)
    assert any(line.startswith("data {name: synthetic,") for line in recipe)
    provenance = section(lines, "provenance (environment.json)")
    assert f"featkd_commit {environment['featkd_commit']}" in provenance
    assert f"featkd {environment['featkd']}" in provenance and f"cpu {environment['cpu']}" in provenance
    final = ckpt.read_metrics(runs / "distill")[-1]
    assert section(lines, "final metrics (metrics.jsonl, last line)") == [
        f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}" for key, value in final.items()]


def test_show_prints_a_dml_runs_peers_and_ensemble(runs, capsys):
    lines = show(runs / "dml", capsys)
    assert lines[0] == f"run {runs / 'dml'}: featkd dml"
    recipe = section(lines, "recipe (config.yaml)")
    dml = recipe[recipe.index("dml") + 1:]
    assert dml[:4] == ["peers", "- {name: resnet8, options: {}}", "- {name: resnet8, options: {}}", "mode pairwise"]
    ensemble = ckpt.read_metrics(runs / "dml")[-1]["ensemble/acc1"]
    assert f"ensemble/acc1 {ensemble:.6g}" in section(lines, "final metrics (metrics.jsonl, last line)")


def test_show_prints_a_sweep_its_members_and_born_again_generations(runs, capsys):
    lines = show(runs / "sweep", capsys)
    assert section(lines, "sweep grid (one member per combination)") == ["seed [0, 1]"]
    base = section(lines, "recipe (the base config, every member's but for the grid)")
    assert base[2:4] == ["terms", "- {teacher: layer3, loss: at, weight: 1000}"]  # as given, not yet resolved
    member = show(runs / "sweep" / "members" / "seed=1", capsys)
    assert member[:2] == [f"run {runs / 'sweep' / 'members' / 'seed=1'}: a member of the sweep {runs / 'sweep'}",
                          f"its model is in {runs / 'sweep'}'s checkpoint: featkd eval --run-dir {runs / 'sweep'} "
                          "--model seed=1"]
    assert "seed 1" in section(member, "recipe (config.yaml)")
    ban = show(runs / "ban", capsys)
    assert ban[0] == f"run {runs / 'ban'}: featkd born-again (3 generations: gen0, gen1, gen2)"
    for g in range(3):
        final = ckpt.read_metrics(runs / "ban" / f"gen{g}")[-1]
        shown = section(ban, f"final metrics of gen{g} ({runs / 'ban' / f'gen{g}' / 'metrics.jsonl'}, last line)")
        assert f"student/acc1 {final['student/acc1']:.6g}" in shown
    assert any(line.startswith("bane/acc1 ") for line in section(ban, f"final metrics of gen2 "
                                                                 f"({runs / 'ban' / 'gen2' / 'metrics.jsonl'}, last line)"))


def test_show_of_a_directory_that_is_no_run_says_so_in_one_line(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has no config.yaml" in error
