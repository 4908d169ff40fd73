"""environment.json ties a run's numbers to the code, libraries and hardware that made them."""

import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch

import featkd
from featkd import checkpoint as ckpt
from featkd import provenance
from featkd.repro import hardware as repro_hardware
from conftest import requires_torchvision

PACKAGE = Path(featkd.__file__).resolve().parent
IN_GIT_CHECKOUT = shutil.which("git") is not None and subprocess.run(
    ["git", "ls-files", "--error-unmatch", "featkd/__init__.py"], cwd=PACKAGE.parent, capture_output=True).returncode == 0


@requires_torchvision
def test_a_new_run_records_the_code_libraries_and_hardware(tmp_path):
    ckpt.write_run_info(tmp_path, {"seed": 0})
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["featkd"] == featkd.__version__ == metadata.version("featkd")
    assert env["torch"] == torch.__version__
    assert env["torchvision"] == metadata.version("torchvision")
    for name in ("timm", "transformers"):
        assert env[name] == provenance.library_version(name)
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["torch_threads"] == torch.get_num_threads() >= 1
    assert env["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert env["deterministic_kernels"] is torch.are_deterministic_algorithms_enabled()
    if IN_GIT_CHECKOUT:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE.parent, capture_output=True, text=True)
        assert re.fullmatch(r"[0-9a-f]{40}", env["featkd_commit"])
        assert env["featkd_commit"] == head.stdout.strip()
        assert isinstance(env["featkd_dirty"], bool)
    else:
        assert env["featkd_commit"] is None and env["featkd_dirty"] is None


@pytest.mark.skipif(not IN_GIT_CHECKOUT, reason="featkd does not run from a git checkout")
def test_dirty_says_whether_the_package_differs_from_the_commit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "featkd").mkdir(parents=True)
    (repo / "featkd" / "__init__.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], cwd=repo, check=True)
    commit, dirty = provenance.git_state(repo / "featkd")
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty is False
    (repo / "notes.txt").write_text("outside the package: not featkd's code\n")
    assert provenance.git_state(repo / "featkd") == (commit, False)
    (repo / "featkd" / "__init__.py").write_text("x = 2\n")
    assert provenance.git_state(repo / "featkd") == (commit, True)


def test_no_git_checkout_or_no_git_records_null_and_never_fails(tmp_path, monkeypatch):
    (tmp_path / "featkd").mkdir()
    (tmp_path / "featkd" / "__init__.py").write_text("")
    assert provenance.git_state(tmp_path / "featkd") == (None, None)  # an installed copy, not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-dir"))  # no git on the PATH
    assert provenance.git_state(PACKAGE) == (None, None)
    monkeypatch.setattr(provenance, "_CODE", None)  # a process that starts without git
    ckpt.write_run_info(tmp_path / "run", None)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["featkd_commit"] is None and env["featkd_dirty"] is None
    assert provenance.library_version("no-such-featkd-library") is None


def test_reports_and_runs_name_the_same_cpu():
    assert repro_hardware is provenance.hardware
    assert provenance.hardware("cpu").startswith(f"CPU {provenance.cpu_model()},")


def test_a_report_names_the_device_its_run_used_not_the_machines_gpu(monkeypatch):
    # a run asked onto the CPU of a GPU machine was measured on the CPU: its report must not say "GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Test GPU {torch.device(device).index}")
    assert provenance.hardware("cpu", processes=2) == f"CPU {provenance.cpu_model()}, {os.cpu_count()} cores, " \
                                                      "2 processes × 1 torch thread"
    assert provenance.hardware("cuda:1").startswith("GPU Test GPU 1")
    assert provenance.hardware("meta") == "meta device"  # no CPU or GPU name to give


def test_a_resumed_run_keeps_the_environment_of_its_earlier_epochs(tmp_path, monkeypatch, capsys):
    # a run stopped in one session and resumed in another, at another commit: its numbers came from both
    from featkd.cli import main
    from featkd.engine import SupervisedMethod, build_optimizer, build_scheduler, fit, seed_everything
    from test_engine import loaders, tiny_model

    def method():
        seed_everything(0)
        model = tiny_model()
        optimizer = build_optimizer(model.parameters(), lr=0.05)
        return SupervisedMethod(model, optimizer, build_scheduler(optimizer, "constant", epochs=3))

    train, test = loaders()
    run = tmp_path / "run"
    fit(method(), train, test, run, epochs=1, config={"seed": 0}, log=lambda _: None)
    first = json.loads((run / "environment.json").read_text())
    assert first["from_epoch"] == 0 and "earlier" not in first
    real = provenance.environment_info
    monkeypatch.setattr(provenance, "environment_info", lambda: {**real(), "featkd_commit": "f" * 40, "featkd_dirty": False, "torch_threads": 7})
    fit(method(), train, test, run, epochs=2, config={"seed": 0}, resume=True, log=lambda _: None)
    fit(method(), train, test, run, epochs=3, config={"seed": 0}, resume=True, log=lambda _: None)
    env = json.loads((run / "environment.json").read_text())
    assert env["from_epoch"] == 2 and env["featkd_commit"] == "f" * 40
    assert [segment["from_epoch"] for segment in env["earlier"]] == [0, 1]
    assert env["earlier"][0] == first and env["earlier"][1]["torch_threads"] == 7

    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert (f"epochs 1-1 ran earlier: featkd {first['featkd']} at {first['featkd_commit'] or 'none'}") in out
    assert f"epochs 2-2 ran earlier: featkd {first['featkd']} at {'f' * 40}, torch {torch.__version__}" in out

    # a resume stopped before its epoch ended, then resumed again from the same epoch
    (run / "environment.json").write_text(json.dumps({**env, "earlier": [*env["earlier"], env]}))
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "epochs 3-2" not in out and "epochs 2-2 ran earlier" in out
    assert "  and 1 resume stopped before an epoch ended (nothing of it kept; environment.json lists them" in out

    (run / "environment.json").write_text("{not json")  # damaged: the resume says what it cannot tell
    fit(method(), train, test, run, epochs=4, config={"seed": 0}, resume=True, log=lambda _: None)
    env = json.loads((run / "environment.json").read_text())
    assert env["earlier"] == [{"not_recorded": "no readable environment.json when the run resumed after epoch 3"}]


def test_trained_with_names_every_commit_a_set_of_runs_trained_at(tmp_path):
    def run(name, environment):
        (tmp_path / name).mkdir()
        (tmp_path / name / "environment.json").write_text(json.dumps(environment))
        return tmp_path / name

    a, b = "a" * 40, "b" * 40
    runs = [run("one", {"featkd_commit": a, "featkd_dirty": False}),
            run("resumed", {"featkd_commit": b, "featkd_dirty": True, "from_epoch": 3,
                            "earlier": [{"featkd_commit": a, "featkd_dirty": False, "from_epoch": 0}]}),
            run("installed", {"featkd_commit": None, "featkd_dirty": None}), tmp_path / "no-environment",
            # resumed after epoch 3 at commit c, stopped before epoch 4 ended, resumed again at b: c trained nothing
            run("stopped", {"featkd_commit": b, "from_epoch": 3,
                            "earlier": [{"featkd_commit": a, "from_epoch": 0}, {"featkd_commit": "c" * 40, "from_epoch": 3}]})]
    assert provenance.trained_with(runs) == ["a" * 12, "b" * 12 + "+edits", "unknown", "b" * 12]
    assert provenance.trained_with(runs[:1]) == ["a" * 12]


def test_a_process_names_the_code_it_started_with_when_the_checkout_moves(monkeypatch):
    # a multi-hour tuning: a commit lands while it runs; its later runs still ran the code it had imported
    monkeypatch.setattr(provenance, "_CODE", None)
    states = iter([("a" * 40, False), ("b" * 40, True)])
    monkeypatch.setattr(provenance, "git_state", lambda package_dir=None: next(states))
    assert provenance.environment_info()["featkd_commit"] == "a" * 40
    assert provenance.environment_info()["featkd_commit"] == "a" * 40
    assert provenance.code_state() == ("a" * 40, False)


def test_a_path_inside_the_checkout_is_recorded_relative_to_it(monkeypatch, tmp_path):
    from featkd import shipped
    monkeypatch.setattr(provenance, "_CODE", ("a" * 40, False))  # featkd runs from a git checkout
    assert provenance.portable_path(shipped.TEACHER.path) == "paper_repro/teachers/fmnist_wrn16_2.pt"
    outside = tmp_path / "teacher.pt"
    assert provenance.portable_path(outside) == str(outside.resolve())
    monkeypatch.setattr(provenance, "_CODE", (None, None))  # an installed wheel: no checkout to be relative to
    assert provenance.portable_path(shipped.TEACHER.path) == str(shipped.TEACHER.path.resolve())
