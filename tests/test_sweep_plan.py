"""featkd.repro.sweep_plan: stored sweeps are reused, the rest are split only where a process would wait."""

import pytest
import yaml

from featkd.checkpoint import RunDirectoryExistsError
from featkd.repro.sweep_plan import SweepGroup, describe_plan, plan_sweeps, stored_seconds


def _store(run_dir, directory, seed, names, records=None, done=0):
    path = run_dir / directory
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"members": [f"{n}-s{seed}" for n in names]}))
    (path / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}}}\n' for e in range(1, done + 1)))
    for name, record in (records or {}).items():
        member = path / "members" / f"{name}-s{seed}"
        member.mkdir(parents=True)
        (member / "config.yaml").write_text(yaml.safe_dump(record))


def _shape(processes):
    return [[(s.directory, s.names) for s in sweeps] for sweeps in processes]


def _work(processes):
    return [sum(s.work for s in sweeps) for sweeps in processes]


def test_one_process_trains_one_sweep_per_seed_and_length(tmp_path):
    groups = [SweepGroup(0, 3, 30, "", ("student", "AT")), SweepGroup(0, 3, 60, "-tuned", ("AT-tuned",))]
    assert _shape(plan_sweeps(tmp_path, groups, 1)) == [[("seed3-30ep", ("student", "AT")),
                                                         ("seed3-60ep-tuned", ("AT-tuned",))]]


def test_a_long_sweep_is_split_so_that_no_process_waits(tmp_path):
    # the shape of a tuning's first rung: one seed, 18 candidates at 60 epochs and 20 at 30
    long = tuple(f"c{k}" for k in range(18))
    short = tuple(f"d{k}" for k in range(20))
    processes = plan_sweeps(tmp_path / "new", [SweepGroup(0, 100, 30, "", short), SweepGroup(0, 100, 60, "", long)], 2)
    assert _work(processes) == [840, 840]  # one sweep of 60 epochs x 18 students would take 1080
    assert _shape(processes) == [[("seed100-60ep", long[:14])],
                                 [("seed100-60ep-2", long[14:]), ("seed100-30ep", short)]]
    assert describe_plan(processes) == ("process 1: seed100-60ep (14 × 60 ep) = 840 student-epochs to train; process 2: "
                                        "seed100-60ep-2 (4 × 60 ep), seed100-30ep (20 × 30 ep) = 840 student-epochs to train")


def test_a_cap_on_the_work_of_a_sweep_splits_every_group_into_sweeps_under_it(tmp_path):
    long = tuple(f"c{k}" for k in range(18))
    short = tuple(f"d{k}" for k in range(20))
    groups = [SweepGroup(0, 100, 30, "", short), SweepGroup(0, 100, 60, "", long)]
    processes = plan_sweeps(tmp_path, groups, 2, max_work=300)
    sweeps = [s for ss in processes for s in ss]
    assert max(s.work for s in sweeps) == 300
    assert sorted(n for s in sweeps for n in s.names) == sorted(long + short)  # every student once
    assert _work(processes) == [840, 840]  # still balanced
    assert sorted(s.directory for s in sweeps if s.epochs == 60) == ["seed100-60ep", "seed100-60ep-2", "seed100-60ep-3",
                                                               "seed100-60ep-4"]
    # a student longer than the cap trains alone
    alone = plan_sweeps(tmp_path / "alone", [SweepGroup(0, 1, 60, "", ("a", "b"))], 1, max_work=50)
    assert _shape(alone) == [[("seed1-60ep", ("a",)), ("seed1-60ep-2", ("b",))]]


def test_whole_seeds_are_not_split_when_they_balance(tmp_path):
    names = ("student", "KD", "AT", "NST-poly", "NST-gaussian", "FitNet", "Gram")
    processes = plan_sweeps(tmp_path, [SweepGroup(s, s, 30, "", names) for s in range(6)], 2)
    assert _work(processes) == [630, 630]
    assert all(sweep.names == names for sweeps in processes for sweep in sweeps)


def test_a_stored_sweep_is_reused_and_the_other_students_train_beside_it(tmp_path):
    _store(tmp_path, "seed0-30ep", 0, ["student", "KD", "AT"], done=30)
    _store(tmp_path, "seed0-30ep-tuned", 0, ["AT-tuned"])  # another group: never mistaken for seed0-30ep-<k>
    lines = []
    processes = plan_sweeps(tmp_path, [SweepGroup(0, 0, 30, "", ("student", "KD", "AT", "Gram"))], 1, log=lines.append)
    assert _shape(processes) == [[("seed0-30ep", ("student", "KD", "AT")), ("seed0-30ep-2", ("Gram",))]]
    assert lines == []
    assert describe_plan(processes) == ("process 1: 1 finished sweep read back, seed0-30ep-2 (1 × 30 ep) "
                                        "= 30 student-epochs to train")


def test_a_stored_sweep_of_other_students_is_left_as_it_is_and_said(tmp_path):
    _store(tmp_path, "seed0-30ep", 0, ["student", "KD", "AT"])
    lines = []
    processes = plan_sweeps(tmp_path, [SweepGroup(0, 0, 30, "", ("student", "AT"))], 1, log=lines.append)
    assert _shape(processes) == [[("seed0-30ep-2", ("student", "AT"))]]
    assert lines == [f"not reused: {tmp_path / 'seed0-30ep'} trains ['student', 'KD', 'AT'], "
                     "not a part of ['student', 'AT']"]


def test_a_stored_student_trained_otherwise_is_refused(tmp_path):
    _store(tmp_path, "seed0-30ep", 0, ["student", "AT"], records={"AT": {"terms": [{"weight": 1000.0}], "kd": None}})
    group = SweepGroup(0, 0, 30, "", ("student", "AT"))
    plan_sweeps(tmp_path, [group], 1, training={"student": {}, "AT": {"terms": [{"weight": 1000.0}], "kd": None}})
    with pytest.raises(RunDirectoryExistsError, match="seed0-30ep holds AT trained with other terms than asked"):
        plan_sweeps(tmp_path, [group], 1, training={"student": {}, "AT": {"terms": [{"weight": 500.0}], "kd": None}})


def test_the_work_a_stored_sweep_has_left_is_what_counts(tmp_path):
    # an interrupted sweep (30 of 60 epochs done) and another seed's new students: the share is
    # (10 x 30 left + 10 x 60) / 2 = 450 student-epochs per process
    stored = tuple(f"a{k}" for k in range(10))
    new = tuple(f"b{k}" for k in range(10))
    _store(tmp_path, "seed0-60ep", 0, stored, done=30)
    processes = plan_sweeps(tmp_path, [SweepGroup(0, 0, 60, "", stored), SweepGroup(1, 1, 60, "", new)], 2)
    assert _shape(processes) == [[("seed0-60ep", stored), ("seed1-60ep-2", new[8:])], [("seed1-60ep", new[:8])]]
    assert _work(processes) == [420, 480]
    assert describe_plan(processes).startswith("process 1: seed0-60ep (10 × 60 ep, 30 done), seed1-60ep-2 (2 × 60 ep)")


def test_a_stored_sweeps_process_time_sums_its_epochs_over_every_invocation(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "epoch_time_s": 10.5}\n'
                                            '{"epoch": 2, "epoch_time_s": 12.0, "eval_time_s": 1.5}\n')
    assert stored_seconds(tmp_path) == 24.0
    assert stored_seconds(tmp_path / "not-started") == 0.0
