"""featkd tune: equal budgets, successive halving over seeds, a rule fixed in code, and the test split never read."""

import pytest
import yaml

from featkd import repro
from featkd.cli import main
from featkd.repro import limited_data, tuning

SPACE = {"candidates": 3, "rung_seeds": [1, 2], "seeds": [100, 101], "sample_seed": 0, "epochs": [1, 2],
         "methods": {"student": {}, "KD": {"kd.T": [2, 4]}, "AT": {"weight.relative_to_ce": [0.1, 1.0]}}}


def test_every_method_gets_the_same_number_of_candidates_and_the_published_one_first():
    space = tuning.TuningSpace({"student": {}, "AT": {"weight.relative_to_ce": [0.1, 0.3, 1.0, 3.0]},
                                "KD": {"kd.T": [1, 2, 4, 8], "kd.weight": [0.5, 0.9]}}, (30, 60), 4, (1, 2), (0, 1))
    at = tuning.candidates(space, "AT", limited_data.RECIPES["AT"])
    kd = tuning.candidates(space, "KD", limited_data.RECIPES["KD"])
    student = tuning.candidates(space, "student", limited_data.RECIPES["student"])
    assert len(at) == len(kd) == 4 and len(student) == 2  # the student's grid is only the two lengths
    assert at[0].changes == {"epochs": 30} and at[0].terms == limited_data.RECIPES["AT"].terms
    assert [c.name for c in at] == ["AT.c0", "AT.c1", "AT.c2", "AT.c3"]
    assert len({tuple(sorted(c.changes.items())) for c in kd}) == 4  # drawn without repetition
    assert tuning.candidates(space, "AT", limited_data.RECIPES["AT"]) == at  # fixed by sample_seed


def test_the_rule_and_the_halving():
    assert tuning.select({"a": [80.0, 81.0], "b": [81.0, 80.0], "c": [79.0, 90.0]}) == "c"
    assert tuning.select({"a": [80.0], "b": [80.0]}) == "a"  # a tie goes to the first listed
    assert tuning.survivors({"a": [1.0], "b": [3.0], "c": [2.0]}) == ["b", "c"]
    assert tuning.survivors({"a": [1.0], "b": [3.0], "c": [2.0], "d": [0.0]}) == ["b", "c"]


def test_bad_spaces_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="rung_seeds must increase"):
        tuning.TuningSpace({"student": {}}, (1,), 2, (2, 1), (0, 1))
    with pytest.raises(ValueError, match="needs 3 distinct seeds"):
        tuning.TuningSpace({"student": {}}, (1,), 2, (1, 3), (0, 1))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "candidate": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['candidate'\]"):
        tuning.TuningSpace.load(path=path)


@pytest.mark.slow
def test_tune_end_to_end_never_reads_the_test_split(tmp_path, monkeypatch):
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "teacher"),
                 "model.name=wrn10_2", "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32",
                 "data.batch_size=16"]) == 0
    splits = []
    load = repro.DataSpec.load
    monkeypatch.setattr(repro.DataSpec, "load", lambda self, split, limit, **kw: splits.append(split) or
                        load(self, split, limit, **kw))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "chosen.yaml"
    args = ["tune", "--fraction", "0.02", "--space", str(space), "--teacher", str(tmp_path / "teacher" / "last.pt"),
            "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--validation-size", "100", "--data", "synthetic",
            "--student", "wrn10_1", "--batch-size", "8", "--device", "cpu"]
    assert main(args) == 0
    assert set(splits) == {"train"}  # the test split is never read
    report = (tmp_path / "runs" / "tune-limited-data-0.02-synthetic-validation.md").read_text()
    for name in ("student.c0", "student.c1", "KD.c0", "KD.c2", "AT.c0", "AT.c2"):
        assert f"| {name}" in report
    assert report.count("**chosen**") == 3 and "never read" in report
    chosen, provenance = tuning.read_choice(out)
    assert set(chosen) == {"student", "KD", "AT"} and provenance["teacher_sha256"]
    assert provenance["teacher"] == str((tmp_path / "teacher" / "last.pt").resolve())  # outside the checkout
    assert provenance["report"] == str(tmp_path / "chosen-report.md")  # beside the choice, committed with it
    assert (tmp_path / "chosen-report.md").read_text() == report
    assert provenance["command"].startswith("featkd tune --fraction 0.02")
    assert provenance["sweep_seconds"] > 0 and "\n- process time: " in report
    assert provenance["trained_with"] and f"- code: the candidates trained at featkd {provenance['trained_with'][0]}" in report
    # successive halving: 3 candidates on seed 100, the better 2 on seed 101 too
    import json

    scores = json.loads((tmp_path / "runs" / "tune-limited-data-0.02-synthetic-validation.json").read_text())["scores"]
    for method in ("KD", "AT"):
        assert sorted(len(v) for v in scores[method].values()) == [1, 2, 2]
    assert main(args) == 2  # the choice is never overwritten


def test_every_length_gets_the_same_share_of_candidates():
    # the patient tuning of 2026-12-03 drew from the joint grid: NST got one 60-epoch candidate, FitNet four
    space = tuning.TuningSpace({"student": {}, "AT": {"weight.relative_to_ce": [0.03, 0.1, 0.3, 1.0, 3.0]},
                                "NST-gaussian": {"weight.relative_to_ce": [0.1, 1.0], "options.sigma2": [None, 2.0]}},
                               (30, 60), 6, (1, 2), (0, 1))
    for method in ("AT", "NST-gaussian"):
        drawn = tuning.candidates(space, method, limited_data.RECIPES[method])
        assert [c.changes["epochs"] for c in drawn] == [30, 30, 30, 60, 60, 60]
        assert drawn[0].changes == {"epochs": 30} and len({tuple(sorted(c.changes.items())) for c in drawn}) == 6
    student = tuning.candidates(space, "student", limited_data.RECIPES["student"])
    assert [c.changes for c in student] == [{"epochs": 30}, {"epochs": 60}]
    one_length = tuning.TuningSpace({"student": {}, "AT": {"weight.relative_to_ce": [0.03, 0.1, 0.3, 1.0, 3.0]}},
                                    (30,), 6, (1, 2), (0, 1))
    assert [c.changes.get("weight.relative_to_ce") for c in tuning.candidates(one_length, "AT",
                                                                              limited_data.RECIPES["AT"])] == \
        [None, 0.03, 0.1, 0.3, 1.0, 3.0]
