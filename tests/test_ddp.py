"""DistributedDataParallel on CPU (gloo, 2 processes via torchrun) matches a single process with the same global batch."""

import subprocess
import sys

import pytest
from torch import nn

from featkd import checkpoint as ckpt
from featkd.cli import main

pytestmark = pytest.mark.slow

# No batch norm and no augmentation: the 2-process gradient (mean of two half-batch means) is then the
# single-process gradient up to float summation order, so the metrics must agree closely.
COMMON = ["epochs=2", "data.limit=256", "data.test_limit=200", "data.batch_size=64", "data.eval_batch_size=50",
          "data.augment=false", "schedule.name=constant", "optim.lr=0.05"]
MODEL = "tests.test_ddp:tiny_cnn"


def tiny_cnn(num_classes=10, in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def torchrun(args, env, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "featkd.cli", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_close_rows(a, b):
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            if not key.endswith("_time_s"):
                assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-5), key


def test_ddp_train_and_distill_match_single_process(tmp_path, subprocess_env):
    teacher = tmp_path / "teacher"
    assert main(["train", "--run-dir", str(teacher), f"model.name={MODEL}", *COMMON]) == 0
    torchrun(["train", "--run-dir", str(tmp_path / "teacher_ddp"), f"model.name={MODEL}", *COMMON],
             subprocess_env, tmp_path)
    assert_close_rows(ckpt.read_metrics(tmp_path / "teacher_ddp"), ckpt.read_metrics(teacher))
    assert sorted(p.name for p in (tmp_path / "teacher_ddp").iterdir()) == sorted(p.name for p in teacher.iterdir())

    distill = ["distill", f"teacher.checkpoint={teacher / 'last.pt'}", f"student.name={MODEL}",
               "terms=[{teacher: '1', loss: at, weight: 100}, {teacher: '3', loss: nst, weight: 10}]",
               "kd={loss: kd, weight: 1.0, options: {T: 4}}", *COMMON]
    assert main([*distill, "--run-dir", str(tmp_path / "student")]) == 0
    torchrun([*distill, "--run-dir", str(tmp_path / "student_ddp")], subprocess_env, tmp_path)
    single, ddp = ckpt.read_metrics(tmp_path / "student"), ckpt.read_metrics(tmp_path / "student_ddp")
    assert ddp[-1]["train/at:1"] > 0 and ddp[-1]["train/nst:3"] > 0  # hooks captured through the DDP wrapper
    assert_close_rows(ddp, single)
