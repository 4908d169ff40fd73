"""featkd demo: the README's main job, end to end in its tiny mode (synthetic data, seconds)."""

import json
import subprocess
import sys

import pytest

from featkd.commands.demo import DEMO_METHODS, choose_run_dir


@pytest.mark.slow
def test_demo_tiny_end_to_end_and_reuse(tmp_path, subprocess_env):
    command = [sys.executable, "-m", "featkd.cli", "demo", "--tiny", "--run-dir", str(tmp_path / "demo")]
    first = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [*DEMO_METHODS, "teacher"]
    assert "paired mean ± 95% CI" in rows[0] and "wall time" in first.stdout and "synthetic" in first.stdout
    for suffix in (".png", ".pdf"):
        assert (tmp_path / "demo" / f"paired_deltas{suffix}").stat().st_size > 1000
    # the per-seed accuracies printed are those in the sweep's metrics, and Δ is their paired mean
    # (one sweep per seed: the seed draws the subset and the batches)
    last = {}
    for seed in (0, 1):
        metrics = tmp_path / "demo" / "limited-data-0.03-synthetic" / f"seed{seed}-1ep" / "metrics.jsonl"
        last.update(json.loads(metrics.read_text().splitlines()[-1]))
    at_row = next(r for r in rows if r.startswith("| AT |")).split("|")
    assert at_row[5].strip() == f"{last['AT-s0/acc1']:.2f}, {last['AT-s1/acc1']:.2f}"
    delta = (last["AT-s0/acc1"] - last["student-s0/acc1"] + last["AT-s1/acc1"] - last["student-s1/acc1"]) / 2
    assert at_row[3].strip().startswith(f"{delta:+.2f}")
    assert at_row[4].strip() == "too few seeds"  # --tiny runs 2 seeds: no verdict
    # a second run with the same settings reuses everything and prints the same table
    second = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "reusing finished parts" in second.stdout
    assert [line for line in second.stdout.splitlines() if line.startswith("| ")] == rows
    assert not (tmp_path / "demo-2").exists()


def test_choose_run_dir_never_reuses_other_settings(tmp_path):
    assert choose_run_dir(tmp_path / "demo", {"a": 1}) == (tmp_path / "demo", False)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"a": 1}))
    assert choose_run_dir(tmp_path / "demo", {"a": 1}) == (tmp_path / "demo", True)
    assert choose_run_dir(tmp_path / "demo", {"a": 2}) == (tmp_path / "demo-2", False)
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "demo.json").write_text("{not json")  # a corrupt stamp: left alone, never reused
    assert choose_run_dir(tmp_path / "demo", {"a": 2}) == (tmp_path / "demo-3", False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.txt").write_text("someone's results")
    assert choose_run_dir(tmp_path / "other", {"a": 1}) == (tmp_path / "other-2", False)


@pytest.mark.slow
def test_demo_shows_tuned_settings_next_to_the_published_ones(tmp_path, subprocess_env):
    import yaml

    choice = tmp_path / "chosen.yaml"
    choice.write_text(yaml.safe_dump({
        "provenance": {"command": "featkd tune (a hand-written test choice)", "date": "2026-12-03", "report": "r.md"},
        "chosen": {"student": {"changes": {"epochs": 2}}, "KD": {"changes": {"epochs": 2, "kd.T": 2}},
                   "AT": {"changes": {"epochs": 1, "weight.relative_to_ce": 0.5}}}}))
    command = [sys.executable, "-m", "featkd.cli", "demo", "--tiny", "--run-dir", str(tmp_path / "demo"),
               "--tuned", str(choice)]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "AT-tuned: {'epochs': 1, 'weight.relative_to_ce': 0.5}; published: official AT code" in done.stdout
    tables = done.stdout.split("### ")[1:]
    assert tables[0].startswith("published settings") and tables[1].startswith("tuned settings")
    rows = [line.split("|")[1].strip() for line in tables[1].splitlines() if line.startswith("| ")][1:]
    assert rows == ["student-tuned", "AT-tuned", "teacher"]  # KD is not a demo method: its choice is not shown
    assert (tmp_path / "demo" / "paired_deltas-tuned.png").stat().st_size > 1000
    member = tmp_path / "demo" / "limited-data-0.03-synthetic" / "seed1-1ep-tuned" / "members" / "AT-tuned-s1" / "config.yaml"
    recorded = yaml.safe_load(member.read_text())
    assert recorded["changes"] == {"epochs": 1, "weight.relative_to_ce": 0.5}
    assert set(recorded["resolved_weights"]) == {"at:group1", "at:group2", "at:group3"}


@pytest.mark.parametrize("argv", [["demo", "--tiny", "--epochs", "-1"], ["demo", "--jobs", "0"],
                                  ["repro", "limited-data", "--epochs", "0"], ["tune", "--jobs", "two"]])
def test_counts_are_refused_when_parsed_naming_the_option(argv, capsys):
    from featkd.cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 2
    option = argv[-2]
    assert f"argument {option}: '{argv[-1]}': expected a whole number of at least 1" in capsys.readouterr().err
