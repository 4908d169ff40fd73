"""The limited-data table end to end on tiny synthetic data (its shape, not its values), and its plot."""

import json

import pytest
import torch

from featkd import plots, repro, teachers
from featkd.repro import limited_data
from featkd.cli import main


def test_setup_refuses_bad_settings():
    with pytest.raises(ValueError, match="fraction"):
        limited_data.LimitedDataSetup(fraction=0.0, epochs=1)
    with pytest.raises(ValueError, match="unknown method"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, methods=("student", "KDD"))
    with pytest.raises(ValueError, match="'student'"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, methods=("KD",))
    with pytest.raises(ValueError, match="distinct"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, seeds=(0, 0))


def test_teacher_with_another_hash_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"models": {}}, path)
    with pytest.raises(ValueError, match="sha256"):
        teachers.load_teacher(path, "cpu", sha256="0" * 64)


@pytest.mark.slow
def test_tiny_table_end_to_end_and_datasize_plot(tmp_path):
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "teacher"),
                 "model.name=wrn10_2", "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32",
                 "data.batch_size=16"]) == 0
    results = []
    for fraction in (0.01, 0.02):
        setup = limited_data.LimitedDataSetup(fraction=fraction, epochs=1, seeds=(0, 1), batch_size=8, test_limit=40,
                                              student="wrn10_1")
        result = limited_data.run_limited_data(tmp_path / "teacher" / "last.pt", setup, tmp_path / "runs",
                                               data=repro.DataSpec("synthetic"), device="cpu")
        assert list(result.accuracies) == list(limited_data.RECIPES)
        assert all(len(v) == 2 for v in result.accuracies.values())
        assert result.train_examples == round(fraction * 2000)
        report = tmp_path / "runs" / f"limited-data-{fraction:g}-synthetic.md"
        text = report.read_text()
        assert text.count("\n| ") == 2 + len(limited_data.RECIPES) and "paired" in text and "torch" in text
        stored = json.loads(report.with_suffix(".json").read_text())
        assert stored["accuracies"] == result.accuracies
        results.append(report.with_suffix(".json"))
    fig = plots.data_size_curve(limited_data.load_results(results))
    assert {line.get_gid() for line in fig.axes[0].lines} >= {f"curve:{m}" for m in limited_data.RECIPES}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1%\n1 ep", "2%\n1 ep"]
    assert main(["plot", "datasize", *map(str, results), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_held_out_run_never_reads_the_test_split(tmp_path, monkeypatch):
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "teacher"),
                 "model.name=wrn10_2", "epochs=1", "data.name=synthetic", "data.limit=64", "data.test_limit=32",
                 "data.batch_size=16"]) == 0
    splits = []
    load = repro.DataSpec.load
    monkeypatch.setattr(repro.DataSpec, "load", lambda self, split, limit, **kw: splits.append(split) or
                        load(self, split, limit, **kw))
    with pytest.raises(ValueError, match="not both"):
        limited_data.LimitedDataSetup(fraction=0.1, epochs=1, holdout=10, test_limit=10)
    setup = limited_data.LimitedDataSetup(fraction=0.01, epochs=1, seeds=(0, 1), methods=("student", "KD"),
                                          batch_size=8, student="wrn10_1", holdout=60)
    lines = []
    result = limited_data.run_limited_data(tmp_path / "teacher" / "last.pt", setup, tmp_path / "runs",
                                           data=repro.DataSpec("synthetic"), device="cpu", log=lines.append)
    assert splits == ["train"]
    assert any("on 60 held-out training images" in line for line in lines)
    text = (tmp_path / "runs" / "limited-data-0.01-synthetic-holdout60.md").read_text()
    assert "held-out accuracy %" in text and "test split" not in text
    # a held-out accuracy of 60 images is a multiple of 100/60
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
                                          student="wrn10_1")
    with pytest.raises(ValueError, match="recorded 101.00%"):
        limited_data.run_limited_data(path, setup, tmp_path / "runs", data=repro.DataSpec("synthetic"),
                                      device="cpu", shipped=recorded)
    assert not (tmp_path / "runs").exists()
