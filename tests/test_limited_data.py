"""The limited-data table end to end on tiny synthetic data (its shape, not its values), and its plot."""

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from featkd import plots, provenance, repro, teachers
from featkd.repro import limited_data, limited_data_report
from featkd.checkpoint import RunDirectoryExistsError
from featkd.cli import main


def test_setup_refuses_bad_settings():
    with pytest.raises(ValueError, match="fraction"):
        limited_data.LimitedDataSetup(fraction=0.0, epochs=1)
    with pytest.raises(ValueError, match="'student'"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, methods=("KD",))
    with pytest.raises(ValueError, match="distinct"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, seeds=(0, 0))
    with pytest.raises(ValueError, match="evaluate_on"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, evaluate_on="train")
    with pytest.raises(ValueError, match="validation_size > 0"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, evaluate_on="validation", validation_size=0)


def test_an_unknown_method_is_refused_before_anything_is_read(tmp_path):
    setup = limited_data.LimitedDataSetup(fraction=0.1, epochs=1, methods=("student", "KDD"))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['KDD'\]"):
        limited_data.run_limited_data(tmp_path / "no-teacher.pt", setup, tmp_path / "runs")


def test_the_published_recipes_are_the_reference_codes_numbers():
    # FIELD-NOTES, "The reference protocols in detail": AT beta = 1e3 on each WRN group output; NST weight 50 on
    # the last map after its BN (WRN: `bn`); KD alpha = 0.9 with CE 0.1 at T = 4.
    recipes = limited_data.RECIPES
    assert [(t["teacher"], t["loss"], t["weight"]) for t in recipes["AT"].terms] == [
        ("group1", "at", 1000.0), ("group2", "at", 1000.0), ("group3", "at", 1000.0)]
    for kernel in ("linear", "poly", "gaussian"):
        (term,) = recipes[f"NST-{kernel}"].terms
        assert (term["teacher"], term["loss"], term["weight"], term["options"]) == ("bn", "nst", 50.0, {"kernel": kernel})
    kd = recipes["KD"].kd_config()
    assert (kd.loss, kd.weight, kd.options, recipes["KD"].ce_weight) == ("kd", 0.9, {"T": 4}, 0.1)
    assert recipes["student"].is_student_alone and all(spec.source for spec in recipes.values())


def test_recipe_changes_and_their_record():
    tuned = limited_data.RECIPES["NST-poly"].with_changes({"weight.relative_to_ce": 0.3, "options.c": 1.0,
                                                             "epochs": 60})
    record = tuned.record()
    (term,) = record["terms"]
    assert term["weight"] == {"relative_to_ce": 0.3, "resolved": None}
    assert term["options"] == {"kernel": "poly", "c": 1.0}
    assert record["changes"] == {"weight.relative_to_ce": 0.3, "options.c": 1.0, "epochs": 60}
    assert limited_data.RECIPES["NST-poly"].terms[0]["weight"] == 50.0  # the published recipe is unchanged
    kd = limited_data.RECIPES["KD"].with_changes({"kd.T": 2, "kd.weight": 0.5}).kd_config()
    assert (kd.weight, kd.options["T"]) == (0.5, 2)
    with pytest.raises(ValueError, match="cannot apply 'optim.lr'"):
        limited_data.RECIPES["AT"].with_changes({"optim.lr": 0.05})


def test_seeds_draw_different_subsets_outside_the_validation_set():
    data = repro.DataSpec("synthetic").load("train", None)
    validation, pool = limited_data.validation_split(data, 200)
    assert len(validation) == 200 and len(pool) == len(data) - 200
    subsets = [limited_data.seed_subset(pool, 60, seed) for seed in (0, 1)]
    images = [{bytes(img.numpy()) for img in s.images} for s in (validation, *subsets)]
    assert not images[0] & images[1] and not images[0] & images[2]  # no student sees a validation image
    assert images[1] != images[2]  # the seed varies the subset
    assert [int(c) for c in torch.bincount(subsets[0].labels)] == [6] * 10  # class-balanced


def test_teacher_with_another_hash_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"models": {}}, path)
    with pytest.raises(ValueError, match="sha256"):
        teachers.load_teacher(path, "cpu", sha256="0" * 64)


def _tiny_teacher(tmp_path):
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "teacher"),
                 "model.name=wrn10_2", "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32",
                 "data.batch_size=16"]) == 0
    return tmp_path / "teacher" / "last.pt"


@pytest.mark.slow
def test_tiny_table_end_to_end_and_datasize_plot(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    results = []
    for fraction in (0.01, 0.02):
        setup = limited_data.LimitedDataSetup(fraction=fraction, epochs=1, seeds=(0, 1), batch_size=8, test_limit=40,
                                              student="wrn10_1", validation_size=200)
        result = limited_data.run_limited_data(teacher, setup, tmp_path / "runs", data=repro.DataSpec("synthetic"),
                                               device="cpu")
        assert list(result.accuracies) == list(limited_data.RECIPES)
        assert all(len(v) == 2 for v in result.accuracies.values())
        assert result.train_examples == round(fraction * 2000)
        report = tmp_path / "runs" / f"limited-data-{fraction:g}-synthetic.md"
        text = report.read_text()
        assert text.count("\n| ") == 2 + len(limited_data.RECIPES) and "paired" in text and "torch" in text
        assert "1000·at(group1)" in text and "the batch order, the augmentation" in text
        # the published gains set against what these seeds detect, under the table
        assert limited_data_report.PUBLISHED_GAINS_NOTE in text and "\n- AT: +0.84 (AT paper, Table 1" in text
        stored = json.loads(report.with_suffix(".json").read_text())
        assert stored["accuracies"] == result.accuracies
        # the code that trained the students, from their sweeps' environment.json
        code = provenance.trained_with([tmp_path / "runs" / f"limited-data-{fraction:g}-synthetic" / "seed0-1ep"])
        assert stored["trained_with"] == code and len(code) == 1
        assert f"\n- code: the students trained at featkd {code[0]} (each sweep's environment.json" in text
        assert stored["environment"]["torch"] == torch.__version__
        assert stored["sweep_seconds"] > 0 and "\n- process time: " in text
        results.append(report.with_suffix(".json"))
    # one sweep per seed; each member's config holds its recipe in full and the data seed
    sweep_dirs = sorted(p.name for p in (tmp_path / "runs" / "limited-data-0.02-synthetic").iterdir())
    assert sweep_dirs == ["seed0-1ep", "seed1-1ep"]
    member = yaml.safe_load((tmp_path / "runs" / "limited-data-0.02-synthetic" / "seed1-1ep" / "members" /
                             "AT-s1" / "config.yaml").read_text())
    assert member["data_seed"] == member["seed"] == 1 and member["recipe"] == "AT"
    # the teacher by where it lies and by what it is: a run directory moved with its teacher is still reused
    assert member["teacher"] == str(teacher.resolve()) and member["teacher_sha256"] == teachers.file_sha256(teacher)
    assert [t["weight"] for t in member["terms"]] == [1000.0] * 3
    fig = plots.data_size_curve(limited_data.load_results(results))
    assert {line.get_gid() for line in fig.axes[0].lines} >= {f"curve:{m}" for m in limited_data.RECIPES}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1%\n1 ep", "2%\n1 ep"]
    assert main(["plot", "datasize", *map(str, results), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert main(["plot", "deltas", str(results[0]), "--out", str(tmp_path / "deltas-0.01")]) == 0
    assert (tmp_path / "deltas-0.01.png").stat().st_size > 1000 and (tmp_path / "deltas-0.01.pdf").is_file()
    assert main(["plot", "deltas", str(results[0]), "--table", "tuned", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t.png").exists()


@pytest.mark.slow
def test_a_validation_run_never_reads_the_test_split(tmp_path, monkeypatch):
    teacher = _tiny_teacher(tmp_path)
    splits = []
    load = repro.DataSpec.load
    monkeypatch.setattr(repro.DataSpec, "load", lambda self, split, limit, **kw: splits.append(split) or
                        load(self, split, limit, **kw))
    with pytest.raises(ValueError, match="not both"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, evaluate_on="validation", test_limit=10)
    setup = limited_data.LimitedDataSetup(fraction=0.01, epochs=1, seeds=(0, 1), methods=("student", "KD"),
                                          batch_size=8, student="wrn10_1", validation_size=60, evaluate_on="validation")
    lines = []
    result = limited_data.run_limited_data(teacher, setup, tmp_path / "runs", data=repro.DataSpec("synthetic"),
                                           device="cpu", log=lines.append)
    assert splits == ["train"]
    assert any("on 60 validation images" in line for line in lines)
    text = (tmp_path / "runs" / "limited-data-0.01-synthetic-validation.md").read_text()
    assert "validation accuracy %" in text and "test split" not in text
    # an accuracy on 60 images is a multiple of 100/60
    assert all(abs(a * 0.6 - round(a * 0.6)) < 1e-6 for v in result.accuracies.values() for a in v)


def test_exported_teacher_keeps_the_model_and_drops_the_training_state(tmp_path):
    from featkd import checkpoint as ckpt
    from featkd import shipped

    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "t"),
                 "model.name=wrn10_1", "epochs=1", "data.name=synthetic", "data.limit=32", "data.test_limit=16",
                 "data.batch_size=16"]) == 0
    last = ckpt.load_checkpoint(tmp_path / "t" / "last.pt")
    out = shipped.export_teacher(tmp_path / "t" / "last.pt", tmp_path / "teacher.pt")
    exported = ckpt.load_checkpoint(out)
    assert "method" not in exported and "rng" not in exported and exported["epoch"] == last["epoch"] == 1
    weights, kept = last["models"]["model"]["state_dict"], exported["models"]["model"]["state_dict"]
    assert weights.keys() == kept.keys() and all(torch.equal(weights[k], kept[k]) for k in weights)
    model, record = teachers.load_teacher(out, "cpu", sha256=teachers.file_sha256(out))
    assert record["name"] == "wrn10_1" and not model.training
    with pytest.raises(FileExistsError, match="not overwriting"):
        shipped.export_teacher(tmp_path / "t" / "last.pt", out)


def test_the_shipped_teacher_file_has_the_recorded_hash():
    from featkd import shipped

    assert teachers.file_sha256(shipped.TEACHER.path) == shipped.TEACHER.sha256


def test_a_shipped_teacher_with_another_accuracy_is_refused_before_any_student_trains(tmp_path):
    from featkd.shipped import ShippedTeacher

    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "t"),
                 "model.name=wrn10_1", "epochs=1", "data.name=synthetic", "data.limit=32", "data.test_limit=16",
                 "data.batch_size=16"]) == 0
    path = tmp_path / "t" / "last.pt"
    recorded = ShippedTeacher(path, teachers.file_sha256(path), test_acc=101.0, config="x", overrides=())
    setup = limited_data.LimitedDataSetup(fraction=0.01, epochs=1, seeds=(0, 1), batch_size=8, test_limit=40,
                                          student="wrn10_1", validation_size=200)
    with pytest.raises(ValueError, match="recorded 101.00%"):
        limited_data.run_limited_data(path, setup, tmp_path / "runs", data=repro.DataSpec("synthetic"),
                                      device="cpu", shipped=recorded)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rerun_is_bit_exact_at_a_fixed_thread_count(tmp_path):
    # issue #17: the README promises identical numbers for the same command, machine and thread count
    teacher = _tiny_teacher(tmp_path)
    setup = limited_data.LimitedDataSetup(fraction=0.02, epochs=2, seeds=(0, 1), methods=("student", "AT", "NST-poly"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200)
    runs = [limited_data.run_limited_data(teacher, setup, tmp_path / f"run{k}", data=repro.DataSpec("synthetic"),
                                          device="cpu", log=lambda _: None) for k in (0, 1)]
    assert runs[0].accuracies == runs[1].accuracies
    for seed in (0, 1):
        metrics = [(tmp_path / f"run{k}" / "limited-data-0.02-synthetic" / f"seed{seed}-2ep" / "metrics.jsonl")
                   .read_text().splitlines() for k in (0, 1)]
        strip = [[{k: v for k, v in json.loads(line).items() if "time" not in k} for line in m] for m in metrics]
        assert strip[0] == strip[1]  # every loss of every epoch, to the last digit


def test_tuned_only_trains_the_tuned_recipes_and_the_student_alone():
    chosen = {m: limited_data.RECIPES[m].with_changes({"epochs": 60}) for m in ("student", "KD", "AT")}
    recipes, methods = limited_data.with_tuned(("student", "KD", "AT", "Gram"), chosen, tuned_only=True)
    assert methods == ("student", "student-tuned", "KD-tuned", "AT-tuned")  # Gram was not tuned
    assert recipes["AT-tuned"].changes == {"epochs": 60} and recipes["AT"] == limited_data.RECIPES["AT"]
    assert limited_data.with_tuned(("student", "KD"), chosen)[1] == ("student", "KD", "student-tuned", "KD-tuned")


def test_tuned_only_without_a_choice_is_refused(capsys):
    assert main(["repro", "limited-data", "--tuned-only"]) == 2
    assert "--tuned-only needs --tuned FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_adding_tuned_recipes_reuses_the_published_students(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    setup = limited_data.LimitedDataSetup(fraction=0.02, epochs=1, seeds=(0,), methods=("student", "AT"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200)
    run = lambda setup, recipes=None, log=lambda _: None: limited_data.run_limited_data(  # noqa: E731
        teacher, setup, tmp_path / "runs", data=repro.DataSpec("synthetic"), device="cpu", recipes=recipes, log=log)
    published = run(setup)
    # the tuning kept the student's training (not trained twice) and halved AT's weights
    chosen = {"student": limited_data.RECIPES["student"].with_changes({"epochs": 1}),
              "AT": limited_data.RECIPES["AT"].with_changes({"epochs": 1, "weight.scale": 0.5})}
    recipes, methods = limited_data.with_tuned(setup.methods, chosen)
    lines = []
    both = run(dataclasses.replace(setup, methods=methods), recipes, lines.append)
    table = tmp_path / "runs" / "limited-data-0.02-synthetic"
    assert sorted(p.name for p in table.iterdir()) == ["seed0-1ep", "seed0-1ep-tuned"]
    assert sorted(p.name for p in (table / "seed0-1ep-tuned" / "members").iterdir()) == ["AT-tuned-s0"]
    assert f"reusing finished run {table / 'seed0-1ep'}" in lines
    assert {m: both.accuracies[m] for m in setup.methods} == published.accuracies
    assert both.accuracies["student-tuned"] == published.accuracies["student"]
    assert "student-tuned (1 epochs): cross-entropy — tuned: {'epochs': 1} (trains as student" in both.markdown


@pytest.mark.slow
def test_sweeps_in_parallel_processes_equal_one_process_at_one_thread(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    setup = limited_data.LimitedDataSetup(fraction=0.02, epochs=1, seeds=(0, 1), methods=("student", "AT", "KD"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200)
    chosen = {"student": limited_data.RECIPES["student"].with_changes({"epochs": 2})}
    recipes, methods = limited_data.with_tuned(setup.methods, chosen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = limited_data.run_limited_data(teacher, dataclasses.replace(setup, methods=methods), tmp_path / "one",
                                              data=repro.DataSpec("synthetic"), device="cpu", recipes=recipes,
                                              log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    # four sweeps (2 seeds x the published and the tuned lengths) over 2 processes
    parallel = limited_data.run_limited_data(teacher, dataclasses.replace(setup, methods=methods, jobs=2),
                                             tmp_path / "two", data=repro.DataSpec("synthetic"), device="cpu",
                                             recipes=recipes, log=lambda _: None)
    assert parallel.accuracies == alone.accuracies
    assert "2 processes × 1 torch thread" in parallel.markdown
    for sweep in ("seed1-1ep", "seed1-2ep-tuned"):
        metrics = [(tmp_path / k / "limited-data-0.02-synthetic" / sweep / "metrics.jsonl").read_text().splitlines()
                   for k in ("one", "two")]
        strip = [[{k: v for k, v in json.loads(line).items() if "time" not in k} for line in m] for m in metrics]
        assert strip[0] == strip[1]


def test_a_tuned_recipe_left_as_published_is_not_trained_twice():
    at = limited_data.RECIPES["AT"]
    assert at.with_changes({"epochs": 20}).trains_as(at, 20) and not at.with_changes({"epochs": 30}).trains_as(at, 20)
    assert not at.with_changes({"weight.scale": 0.5}).trains_as(at, 20)
    assert not limited_data.RECIPES["NST-poly"].trains_as(limited_data.RECIPES["NST-gaussian"], 20)


@pytest.mark.slow
def test_students_split_over_sweeps_or_added_later_equal_one_sweep(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    setup = limited_data.LimitedDataSetup(fraction=0.02, epochs=1, seeds=(0,), methods=("student", "AT", "KD", "NST-poly"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200)

    def run(name, setup, recipes=None, log=lambda _: None):
        return limited_data.run_limited_data(teacher, setup, tmp_path / name, data=repro.DataSpec("synthetic"),
                                             device="cpu", recipes=recipes, log=log)

    def sweeps(name):
        table = tmp_path / name / "limited-data-0.02-synthetic"
        return {p.name: sorted(m.name for m in (p / "members").iterdir()) for p in sorted(table.iterdir())}

    def member_metrics(name, sweep, member):
        path = tmp_path / name / "limited-data-0.02-synthetic" / sweep / "members" / member / "metrics.jsonl"
        return [{k: v for k, v in json.loads(line).items() if "time" not in k} for line in path.read_text().splitlines()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run("one", setup)
        run("added", dataclasses.replace(setup, methods=("student", "AT")))
        lines = []
        added = run("added", setup, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    split = run("split", dataclasses.replace(setup, jobs=2))  # 4 students of one seed: 2 per process

    assert sweeps("one") == {"seed0-1ep": ["AT-s0", "KD-s0", "NST-poly-s0", "student-s0"]}
    assert sweeps("split") == {"seed0-1ep": ["AT-s0", "student-s0"], "seed0-1ep-2": ["KD-s0", "NST-poly-s0"]}
    assert sweeps("added") == {"seed0-1ep": ["AT-s0", "student-s0"], "seed0-1ep-2": ["KD-s0", "NST-poly-s0"]}
    assert any(line.startswith("reusing finished run") and line.endswith("seed0-1ep") for line in lines)
    assert split.accuracies == one.accuracies and added.accuracies == one.accuracies
    for member, sweep in [("student-s0", "seed0-1ep"), ("NST-poly-s0", "seed0-1ep-2")]:
        assert member_metrics("split", sweep, member) == member_metrics("one", "seed0-1ep", member)

    # a stored student is never taken for one trained otherwise under the same name
    halved = {**limited_data.RECIPES, "AT": limited_data.RECIPES["AT"].with_changes({"weight.scale": 0.5})}
    with pytest.raises(RunDirectoryExistsError, match="holds AT trained with other terms than asked"):
        run("added", setup, recipes=halved)
    # nor is an interrupted sweep resumed with other settings (its members' configs are written at its end)
    shutil.rmtree(tmp_path / "added" / "limited-data-0.02-synthetic" / "seed0-1ep" / "members")
    with pytest.raises(RunDirectoryExistsError, match=r"seed0-1ep holds a run made with other settings \({'recipes'"):
        run("added", setup, recipes=halved)


def test_a_setting_recorded_since_a_later_version_is_compared_only_where_it_is_stored(tmp_path):
    from featkd.repro.cache import check_cached_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"epochs": 30}))  # a sweep stored before "recipes"
    asked = {"epochs": 30, "recipes": {"AT": {"ce_weight": 1.0}}}
    check_cached_config(tmp_path, asked, recorded_since=("recipes",))
    with pytest.raises(RunDirectoryExistsError, match="other settings"):
        check_cached_config(tmp_path, asked)  # any other key a stored run lacks: made another way
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"epochs": 30, "recipes": {"AT": {"ce_weight": 0.5}}}))
    with pytest.raises(RunDirectoryExistsError, match="'recipes'"):
        check_cached_config(tmp_path, asked, recorded_since=("recipes",))


def test_a_teacher_is_the_same_file_wherever_it_lies(tmp_path, monkeypatch):
    from featkd import provenance
    from featkd.repro.cache import check_cached_config

    monkeypatch.setattr(provenance, "_CODE", ("a" * 40, False))  # featkd runs from a git checkout
    files, since = {"teacher": "teacher_sha256"}, ("teacher_sha256",)
    shipped = "paper_repro/teachers/fmnist_wrn16_2.pt"
    asked = {"epochs": 30, "teacher": shipped, "teacher_sha256": "f" * 64}

    def stored(**config):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"epochs": 30, **config}))

    # kept sweeps made before the hash was recorded, in a checkout at /work/main: the same file of the checkout
    stored(teacher="/work/main/" + shipped)
    check_cached_config(tmp_path, asked, recorded_since=since, files=files)
    with pytest.raises(RunDirectoryExistsError, match="'teacher'"):  # without the rule: another setting
        check_cached_config(tmp_path, asked, recorded_since=since)
    for other in ("/work/main/paper_repro/teachers/fmnist_wrn16_2_3ep.pt", "/elsewhere/teacher.pt"):
        stored(teacher=other)
        with pytest.raises(RunDirectoryExistsError, match="'teacher'"):
            check_cached_config(tmp_path, asked, recorded_since=since, files=files)
    # with the hash recorded, the hash decides: a moved file is the same, another file at the same path is not
    stored(teacher="/old/place/teacher.pt", teacher_sha256="f" * 64)
    check_cached_config(tmp_path, asked, recorded_since=since, files=files)
    stored(teacher=shipped, teacher_sha256="e" * 64)
    with pytest.raises(RunDirectoryExistsError, match="'teacher_sha256'"):
        check_cached_config(tmp_path, asked, recorded_since=since, files=files)
    # a teacher outside the checkout, recorded as given by an older run: the same file once resolved
    outside = tmp_path / "t" / "last.pt"
    stored(teacher=str(outside))
    check_cached_config(tmp_path, {**asked, "teacher": str(outside.resolve())}, recorded_since=since, files=files)


def test_the_code_line_explains_edits_only_when_a_run_had_them():
    clean = limited_data_report.effort_lines(["a" * 12], 0.0)
    assert clean == [f"- code: the students trained at featkd {'a' * 12} (each sweep's environment.json, "
                     "every resume included)"]
    edited = limited_data_report.effort_lines(["a" * 12, "b" * 12 + "+edits"], 60.0)
    assert edited[0].endswith("every resume included; +edits: uncommitted edits)") and "1.0 min" in edited[1]
