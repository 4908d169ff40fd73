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

    # NST reads the conv output '2' (before its ReLU, where the official NST code puts it too), not the
    # ReLU output '3'. Measured with torch 2.14.1: on '3' some student channels die during these 8 steps
    # (live channel norms down to 1.6e-3 against a median of 1.8), and the poly-NST gradient through a
    # channel's l2 normalisation scales with 1/|f_c|. Summation-order differences of 1e-7 then grow to
    # ~1e-3 in train/nst:3 — as much between one process at 1 and at 2 threads (9.5e-4) as between DDP and
    # one process (9.9e-4), with NST's value itself within 5e-7 of float64 at every step. On '2' all three
    # agree to 1e-6, so the 1e-4 tolerance below checks DDP rather than that amplification.
    distill = ["distill", f"teacher.checkpoint={teacher / 'last.pt'}", f"student.name={MODEL}",
               "terms=[{teacher: '1', loss: at, weight: 100}, {teacher: '2', loss: nst, weight: 10}]",
               "kd={loss: kd, weight: 1.0, options: {T: 4}}", *COMMON]
    assert main([*distill, "--run-dir", str(tmp_path / "student")]) == 0
    torchrun([*distill, "--run-dir", str(tmp_path / "student_ddp")], subprocess_env, tmp_path)
    single, ddp = ckpt.read_metrics(tmp_path / "student"), ckpt.read_metrics(tmp_path / "student_ddp")
    assert ddp[-1]["train/at:1"] > 0 and ddp[-1]["train/nst:2"] > 0  # hooks captured through the DDP wrapper
    assert_close_rows(ddp, single)
