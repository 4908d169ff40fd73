"""Nothing is lost when a write fails, a run is interrupted, or two processes meet at one run directory;
a resumed run takes only the settings it honours. Faults are injected: a writer that raises ENOSPC,
Ctrl-C at an epoch's start, a lock holder killed with SIGKILL."""

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd import checkpoint as ckpt
from featkd.cli import main
from featkd.data import DeviceLoader
from featkd.locking import lock_path, run_lock

pytestmark = pytest.mark.slow

TRAIN = ["model.name=wrn10_1", "data.name=synthetic", "data.limit=64", "data.test_limit=32", "data.batch_size=32",
         "data.eval_batch_size=32", "schedule.name=multistep", "schedule.milestones=[1]"]


def train(run_dir, *extra):
    return main(["train", "--run-dir", str(run_dir), *TRAIN, *extra])


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "eval_time_s")} for row in rows]


def stderr_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of a three-epoch run that nothing stopped."""
    run_dir = tmp_path_factory.mktemp("safety") / "full"
    torch.set_num_threads(1)  # as the tests have it (conftest): the sums of a CPU kernel depend on its threads
    assert train(run_dir, "epochs=3") == 0
    return ckpt.read_metrics(run_dir)


def fail_writes(monkeypatch, name: str, attempt: int):
    """Make the ``attempt``-th write of a file called ``name`` fail as on a full disk (at its fsync)."""
    real_fsync, attempts = os.fsync, []

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):  # atomic_write's temporary
            attempts.append(fd)
            if len(attempts) == attempt:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ----------------------------------------------------------------------------- failed writes


def test_a_full_disk_loses_nothing_and_says_how_to_go_on(tmp_path, monkeypatch, capsys, uninterrupted):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as faults:
        fail_writes(faults, ckpt.LAST, attempt=2)
        assert train(run_dir, "epochs=3") == 1
    line = stderr_line(capsys)
    resume = f"featkd train --run-dir {run_dir} --resume"
    assert line == (f"featkd train: error: epoch 2 was not saved: could not write {run_dir / ckpt.LAST}: No space "
                    f"left on device (left as it was); {run_dir / ckpt.LAST} still holds epoch 1; resume with: {resume}")
    assert ckpt.load_checkpoint(run_dir / ckpt.LAST)["epoch"] == 1 and not list(run_dir.glob(".*.tmp"))

    assert main(resume.split()[1:]) == 0
    assert without_times(ckpt.read_metrics(run_dir)) == without_times(uninterrupted)
    assert main(["eval", "--run-dir", str(run_dir)]) == 0


def test_a_full_disk_in_the_first_epoch_leaves_a_directory_that_starts_again(tmp_path, monkeypatch, capsys,
                                                                              uninterrupted):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as faults:
        fail_writes(faults, ckpt.BEST, attempt=1)  # best.pt goes first: last.pt never names a lost best.pt
        assert train(run_dir, "epochs=3") == 1
    assert stderr_line(capsys) == (
        f"featkd train: error: epoch 1 was not saved: could not write {run_dir / ckpt.BEST}: No space left on device "
        "(not created); no epoch had finished, so nothing was saved; run the same command again")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(ckpt.RUN_START_FILES)
    assert train(run_dir, "epochs=3") == 0
    assert without_times(ckpt.read_metrics(run_dir)) == without_times(uninterrupted)


def test_a_run_stopped_in_its_first_epoch_with_tensorboard_starts_again(tmp_path):
    # the TensorBoard writer opens its event file when the run starts: no result to keep before last.pt
    run_dir = tmp_path / "run"
    for name in ckpt.RUN_START_FILES:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    (run_dir / ckpt.TENSORBOARD_DIR).mkdir()
    (run_dir / ckpt.TENSORBOARD_DIR / "events.out.tfevents.1.host.1.0").write_bytes(b"header")
    assert ckpt.prepare_run_dir(run_dir, resume=False) == run_dir
    (run_dir / ckpt.METRICS_JSONL).write_text("{}\n")
    with pytest.raises(ckpt.RunDirectoryExistsError):
        ckpt.prepare_run_dir(run_dir, resume=False)


def test_resume_restores_a_missing_best_pt_or_says_what_is_gone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, "epochs=1") == 0
    best = (run_dir / ckpt.BEST).read_bytes()
    (run_dir / ckpt.BEST).unlink()  # as a featkd that wrote last.pt first left it when best.pt failed to write
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"restored {run_dir / ckpt.BEST} from last.pt (both hold epoch 1)" in out
    assert (run_dir / ckpt.BEST).read_bytes() == best
    assert f"finished: {run_dir} (best.pt, last.pt, metrics.jsonl)" in out

    state = ckpt.load_checkpoint(run_dir / ckpt.LAST)
    state["epoch"] = 2  # last.pt moved on after the best epoch: best.pt cannot be rebuilt from it
    (run_dir / ckpt.BEST).unlink()
    note = ckpt.restore_best(run_dir, state)
    metric = state["best"]["metric"]
    assert note.startswith(f"warning: {run_dir / ckpt.BEST} (epoch 1, {metric} ")
    assert "cannot be rebuilt, last.pt holding epoch 2" in note and "(--which last)" in note
    assert not (run_dir / ckpt.BEST).exists()


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt_at_epoch(monkeypatch, epoch: int):
    real = DeviceLoader.set_epoch

    def set_epoch(self, e):
        if self.shuffle and e == epoch:
            raise KeyboardInterrupt
        real(self, e)

    monkeypatch.setattr(DeviceLoader, "set_epoch", set_epoch)


def test_ctrl_c_names_the_command_that_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys, uninterrupted):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as faults:
        interrupt_at_epoch(faults, 2)
        assert train(run_dir, "epochs=3") == 130
    resume = f"featkd train --run-dir {run_dir} --resume"
    assert stderr_line(capsys) == f"featkd train: interrupted; resume with: {resume}"
    assert not lock_path(run_dir).exists()
    assert main(resume.split()[1:]) == 0
    assert without_times(ckpt.read_metrics(run_dir)) == without_times(uninterrupted)


def test_ctrl_c_in_the_first_epoch_says_to_start_again(tmp_path, monkeypatch, capsys, uninterrupted):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as faults:
        interrupt_at_epoch(faults, 0)
        assert train(run_dir, "epochs=3") == 130
    assert stderr_line(capsys) == "featkd train: interrupted; run the same command again"
    assert train(run_dir, "epochs=3") == 0
    assert without_times(ckpt.read_metrics(run_dir)) == without_times(uninterrupted)


# ----------------------------------------------------------------------------- resumed settings


def test_resume_refuses_settings_it_would_ignore_and_honours_epochs(tmp_path, capsys, uninterrupted):
    run_dir = tmp_path / "run"
    assert train(run_dir, "epochs=2") == 0
    saved, last = (run_dir / ckpt.CONFIG_YAML).read_bytes(), (run_dir / ckpt.LAST).read_bytes()
    capsys.readouterr()
    resume = ["train", "--run-dir", str(run_dir), "--resume"]
    assert main([*resume, "epochs=3", "optim.lr=0.5"]) == 2
    assert "optim.lr cannot change halfway (only epochs, device can)" in stderr_line(capsys)
    assert (run_dir / ckpt.CONFIG_YAML).read_bytes() == saved and (run_dir / ckpt.LAST).read_bytes() == last

    assert main([*resume, "epochs=3"]) == 0
    assert "epochs changed from 2 to 3" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / ckpt.CONFIG_YAML).read_text())["epochs"] == 3
    assert without_times(ckpt.read_metrics(run_dir)) == without_times(uninterrupted)
    assert main([*resume, "epochs=2"]) == 2
    assert "epochs=2 is fewer than the 3 epochs" in stderr_line(capsys)


def test_resume_refuses_a_longer_cosine_schedule(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, "epochs=1", "schedule.name=cosine") == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"]) == 2
    assert "epochs cannot change from 1 to 2 on --resume under schedule.name=cosine" in stderr_line(capsys)


def test_a_resumed_sweep_keeps_the_overrides_it_started_with(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert train(teacher, "epochs=1", "model.name=wrn10_2") == 0
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(sweep), "--grid", "seed=0,1",
                 f"teacher.checkpoint={teacher / ckpt.BEST}", "student.name=wrn10_1", "epochs=1", *TRAIN[1:]]) == 0
    capsys.readouterr()
    assert main(["sweep", "--run-dir", str(sweep), "--resume", "optim.lr=0.5"]) == 2
    assert "optim.lr cannot change halfway" in stderr_line(capsys)
    assert main(["sweep", "--run-dir", str(sweep), "--resume", "epochs=2"]) == 0
    assert [row["epoch"] for row in ckpt.read_metrics(sweep)] == [1, 2]


# ----------------------------------------------------------------------------- one process per run directory


def hold_lock(run_dir: Path, subprocess_env) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until it is killed."""
    code = "import sys, time; from featkd.locking import run_lock\nwith run_lock(sys.argv[1]):\n" \
           "    print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=subprocess_env, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_process_cannot_train_in_a_live_run_directory(tmp_path, capsys, subprocess_env):
    run_dir = tmp_path / "run"
    assert train(run_dir, "epochs=1") == 0
    holder = hold_lock(run_dir, subprocess_env)
    try:
        capsys.readouterr()
        assert main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"]) == 2
        line = stderr_line(capsys)
        assert f"{run_dir} is in use: process {holder.pid} on {socket.gethostname()}" in line
        assert f"wait for it to finish, or, if that process is gone, delete {lock_path(run_dir)}" in line
        assert len(ckpt.read_metrics(run_dir)) == 1  # no epoch trained beside the live run
    finally:
        holder.kill()
        holder.wait()
    # killed with SIGKILL, the holder left its lock behind: it is stale, and the resume goes ahead
    assert holder.returncode == -signal.SIGKILL and lock_path(run_dir).exists()
    assert main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"]) == 0
    assert len(ckpt.read_metrics(run_dir)) == 2 and not lock_path(run_dir).exists()


def test_a_stale_lock_of_the_old_form_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = lock_path(tmp_path / "run")
    lock.write_text(gone.stdout.strip())  # what featkd's demo wrote before locks recorded the host
    with run_lock(tmp_path / "run"):
        assert yaml.safe_load(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    # as a user without write permission meets it (the tests may run as root, who writes anywhere)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == read_only:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert train(read_only / "run", "epochs=1") == 2
    line = stderr_line(capsys)
    assert line.startswith(f"featkd train: error: cannot write {read_only / 'run'} (Permission denied); give a "
                           "--run-dir (or --out) in a folder you can write"), line
