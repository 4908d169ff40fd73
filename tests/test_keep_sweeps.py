"""Finished sweeps kept without their checkpoints are read back on another machine, never trained again."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd import repro
from featkd.checkpoint import RunDirectoryExistsError
from featkd.engine import SupervisedMethod
from featkd.repro import limited_data
from featkd.repro.cache import finished_history, fit_or_resume
from featkd.repro.sweep_plan import keep_finished_sweeps
from tests.test_limited_data import _tiny_teacher


def _rows(path, epochs):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "acc1": 50.0 + e}) + "\n" for e in epochs))


def test_a_finished_history_needs_every_epoch_in_order(tmp_path):
    _rows(tmp_path / "done", [1, 2, 3])
    _rows(tmp_path / "stopped", [1, 2])
    _rows(tmp_path / "odd", [1, 3, 2])
    assert [row["epoch"] for row in finished_history(tmp_path / "done", 3)] == [1, 2, 3]
    assert finished_history(tmp_path / "stopped", 3) is None
    assert finished_history(tmp_path / "odd", 3) is None
    assert finished_history(tmp_path / "absent", 3) is None
    (tmp_path / "done" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "acc1": 5\n')  # cut mid-row
    with pytest.raises(ValueError, match=r"done/metrics.jsonl line 2 is not a JSON row .*the file is damaged"):
        finished_history(tmp_path / "done", 3)


def test_a_caller_that_needs_the_models_never_gets_a_history_without_them(tmp_path):
    # a teacher's run: its model is used after fit_or_resume, so metrics alone must not pass for a finished run
    run_dir = tmp_path / "teacher"
    _rows(run_dir, [1, 2])
    (run_dir / "config.yaml").write_text("epochs: 2\n")
    model = torch.nn.Linear(2, 2)
    method = SupervisedMethod(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RunDirectoryExistsError, match="already exists"):
        fit_or_resume(method, [], None, run_dir, 2, log=lambda _: None)
    assert [row["epoch"] for row in fit_or_resume(method, [], None, run_dir, 2, log=lambda _: None,
                                                  results_only=True)] == [1, 2]


def test_only_finished_sweeps_are_kept_and_a_kept_file_is_never_overwritten(tmp_path):
    run_dir, kept = tmp_path / "runs", tmp_path / "kept"
    for name, epochs in (("seed0-2ep", [1, 2]), ("seed1-2ep", [1])):
        sweep = run_dir / "table" / name
        _rows(sweep, epochs)
        (sweep / "config.yaml").write_text(yaml.safe_dump({"epochs": 2, "members": [f"student-s{name[4]}"]}))
        (sweep / "last.pt").write_bytes(b"checkpoint")
        (sweep / ".metrics.jsonl.abc.tmp").write_text("a write's leftover")
        _rows(sweep / "members" / f"student-s{name[4]}", epochs)
        (sweep / "members" / f"student-s{name[4]}" / "config.yaml").write_text("method: student\n")
    done, unfinished = keep_finished_sweeps(run_dir, kept)
    assert done == [run_dir / "table" / "seed0-2ep"] and unfinished == [run_dir / "table" / "seed1-2ep"]
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "table/seed0-2ep/config.yaml", "table/seed0-2ep/members/student-s0/config.yaml",
        "table/seed0-2ep/members/student-s0/metrics.jsonl", "table/seed0-2ep/metrics.jsonl"]
    assert keep_finished_sweeps(run_dir, kept)[0] == done  # the same files again: nothing to do
    (kept / "table" / "seed0-2ep" / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(RunDirectoryExistsError, match="kept as it is"):
        keep_finished_sweeps(run_dir, kept)
    assert (kept / "table" / "seed0-2ep" / "config.yaml").read_text() == "epochs: 3\n"


@pytest.mark.slow
def test_kept_sweeps_copied_to_a_new_machine_are_read_back_not_trained(tmp_path, capsys):
    teacher = _tiny_teacher(tmp_path)
    setup = limited_data.LimitedDataSetup(fraction=0.02, epochs=2, seeds=(0,), methods=("student", "AT"),
                                          batch_size=8, test_limit=40, student="wrn10_1", validation_size=200,
                                          max_sweep_work=2)  # one student a sweep

    def run(root, log=lambda _: None):
        return limited_data.run_limited_data(teacher, setup, root, data=repro.DataSpec("synthetic"), device="cpu",
                                             log=log)

    first = run(tmp_path / "machine1")
    table = "limited-data-0.02-synthetic"
    assert sorted(p.name for p in (tmp_path / "machine1" / table).iterdir() if not p.name.startswith(".")) == \
        ["seed0-2ep", "seed0-2ep-2"]
    with pytest.raises(SystemExit) as status:
        _run_script([str(tmp_path / "machine1"), str(tmp_path / "kept")])
    assert status.value.code == 0
    assert "2 finished sweeps kept" in capsys.readouterr().out
    assert not list((tmp_path / "kept").rglob("*.pt"))

    shutil.copytree(tmp_path / "kept", tmp_path / "machine2")
    # a process killed while writing the members' records left one without its metrics
    member = f"{table}/seed0-2ep/members/student-s0/metrics.jsonl"
    (tmp_path / "machine2" / member).unlink()
    lines = []
    second = run(tmp_path / "machine2", lines.append)
    assert second.accuracies == first.accuracies
    assert (tmp_path / "machine2" / member).read_text() == (tmp_path / "machine1" / member).read_text()
    assert sum("from its metrics (kept without its checkpoints)" in line for line in lines) == 2
    assert not list((tmp_path / "machine2").rglob("*.pt"))  # nothing trained


def _run_script(argv):
    """paper_repro/keep_sweeps.py as its README runs it, with ``argv``."""
    script = str(Path(__file__).parents[1] / "paper_repro" / "keep_sweeps.py")
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
