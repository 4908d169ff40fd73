"""A distillation run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from featkd import checkpoint as ckpt
from featkd.cli import main

pytestmark = pytest.mark.slow

DATA = ["data.limit=256", "data.test_limit=100", "data.batch_size=64", "data.eval_batch_size=100"]


def distill_args(tmp_path, teacher):
    config = tmp_path / "distill.yaml"
    # hint (FitNets) builds a regressor for 128 -> 64 channels: loss parameters must be restored too;
    # student dropout draws from the global RNG every step: RNG states must be restored too.
    config.write_text(f"""
epochs: 4
teacher: {{checkpoint: {teacher}}}
student: {{name: wrn10_1, options: {{dropout: 0.2}}}}
terms:
  - {{teacher: group2, loss: at, weight: 1000}}
  - {{teacher: group3, loss: nst, weight: 50}}
  - {{teacher: group3, loss: hint, weight: 1}}
kd: {{loss: kd, weight: 0.9, options: {{T: 4}}}}
schedule: {{name: multistep, milestones: [2], gamma: 0.2}}
optim: {{lr: 0.05}}
""")
    return ["distill", "--config", str(config), *DATA]


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "eval_time_s")} for row in rows]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, subprocess_env):
    teacher = tmp_path / "teacher"
    assert main(["train", "--run-dir", str(teacher), "model.name=wrn10_2", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    args = distill_args(tmp_path, teacher / "best.pt")

    assert main([*args, "--run-dir", str(tmp_path / "full")]) == 0
    full = ckpt.read_metrics(tmp_path / "full")
    assert len(full) == 4

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featkd.cli", *args, "--run-dir", str(killed)],
                            env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / ckpt.METRICS_JSONL).is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = len(ckpt.read_metrics(killed))
    assert 1 <= done < 4, "the kill should land part-way through the run"

    assert main(["distill", "--run-dir", str(killed), "--resume"]) == 0
    resumed = ckpt.read_metrics(killed)
    assert without_times(resumed) == without_times(full)
    a = ckpt.load_checkpoint(tmp_path / "full" / "last.pt")["method"]["distiller"]
    b = ckpt.load_checkpoint(killed / "last.pt")["method"]["distiller"]
    assert a.keys() == b.keys() and any("term_losses" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
