"""The CLI end to end on a Fashion-MNIST subset: train a WRN teacher, distill with KD + AT + NST, evaluate."""

import json

import pytest
import torch
import yaml

from featkd import checkpoint as ckpt
from featkd.cli import main

pytestmark = pytest.mark.slow

SMALL = ["epochs=1", "data.limit=256", "data.test_limit=200", "data.batch_size=64", "data.eval_batch_size=200"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "teacher"
    assert main(["train", "--config", "fmnist_teacher_wrn16_2", "--run-dir", str(run_dir),
                 "model.name=wrn10_2", "schedule.name=constant", "optim.lr=0.05", *SMALL]) == 0
    return run_dir


def test_train_writes_a_rebuildable_teacher(teacher_run):
    rows = ckpt.read_metrics(teacher_run)
    assert len(rows) == 1 and rows[0]["step"] == 256 // 64
    state = ckpt.load_checkpoint(teacher_run / "best.pt")
    record = state["models"]["model"]
    assert (record["name"], record["num_classes"], record["in_channels"]) == ("wrn10_2", 10, 1)
    saved = yaml.safe_load((teacher_run / "config.yaml").read_text())
    assert saved["model"]["name"] == "wrn10_2" and saved["data"]["limit"] == 256 and saved["seed"] == 0


def test_distill_kd_at_nst_from_config_file_then_eval(teacher_run, tmp_path, capsys):
    config = tmp_path / "distill.yaml"
    config.write_text(f"""
teacher: {{checkpoint: {teacher_run / 'best.pt'}}}
student: {{name: wrn10_1}}
terms:
  - {{teacher: group2, student: group2, loss: at, weight: 1000}}
  - {{teacher: group3, student: group3, loss: at, weight: 1000}}
  - {{teacher: group3, student: group3, loss: nst, weight: 50, options: {{kernel: poly}}}}
kd: {{loss: kd, weight: 0.9, options: {{T: 4}}}}
ce_weight: 0.1
optim: {{lr: 0.05}}
schedule: {{name: constant}}
""")
    run_dir = tmp_path / "student"
    assert main(["distill", "--config", str(config), "--run-dir", str(run_dir), *SMALL]) == 0
    row = ckpt.read_metrics(run_dir)[0]
    for key in ("train/ce", "train/kd", "train/at:group2", "train/at:group3", "train/nst:group3", "train/total"):
        assert row[key] > 0, key
    parts = sum(v for k, v in row.items() if k.startswith("train/") and k != "train/total")
    assert row["train/total"] == pytest.approx(parts, rel=1e-6)
    assert {"student/acc1", "student/acc5", "student/loss", "lr", "epoch_time_s"} <= set(row)
    assert (run_dir / "best.pt").is_file() and (run_dir / "metrics.csv").is_file()
    capsys.readouterr()

    out = tmp_path / "scores.json"
    assert main(["eval", "--run-dir", str(run_dir), "--which", "last", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["student"]["acc1"] == pytest.approx(row["student/acc1"])
    assert scores["examples"] == 200 and scores["split"] == "test"

    # the run directory is never reused by accident
    before = (run_dir / "last.pt").read_bytes()
    assert main(["distill", "--config", str(config), "--run-dir", str(run_dir), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err and (run_dir / "last.pt").read_bytes() == before
    # resuming a finished run with more epochs continues it
    assert main(["distill", "--run-dir", str(run_dir), "--resume", "epochs=2"]) == 0
    assert [r["epoch"] for r in ckpt.read_metrics(run_dir)] == [1, 2]
    # eval reads the last epoch unless told otherwise: best.pt is selected on the test split
    (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--run-dir", str(run_dir), "--output", str(tmp_path / "last.json")]) == 0
    last_acc = ckpt.read_metrics(run_dir)[-1]["student/acc1"]
    assert json.loads((tmp_path / "last.json").read_text())["student"]["acc1"] == pytest.approx(last_acc)
    assert main(["eval", "--run-dir", str(run_dir), "--which", "best"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--config", "fmnist_teacher_wrn16_2", "optim.lrr=0.1"], "Did you mean 'optim.lr'"),
    (["--config", "fmnist_distill_kd_at_nst", "model.name=wrn10_1"], "does not use the config key 'teacher'"),
    ([], "needs the config key 'model'"),
    (["--config", "fmnist_teacher_wrn16_x"], "Did you mean: fmnist_teacher_wrn16_2"),
    (["--resume"], "cannot resume"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featkd train: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_transfer_set_options():
    from featkd.run_data import build_datasets
    from featkd.config import load_config
    from featkd.data import load_dataset

    cfg = load_config(None, ["data.name=synthetic", "data.options={size: 400}", "data.omit_classes=[3]",
                             "data.unlabeled_fraction=0.5", "data.extra_unlabeled={name: synthetic, limit: 50}"])
    train, test = build_datasets(cfg.data)
    full = load_dataset("synthetic", split="train", size=400)
    kept = int((full.labels != 3).sum())
    assert len(test) == 400 and len(train) == kept + 50
    own, extra = train.labels[:kept], train.labels[kept:]
    assert (extra == -1).all() and not (own == 3).any()
    assert int((own == -1).sum()) == round(0.5 * kept)
    labelled = own != -1
    assert torch.equal(own[labelled], full.labels[full.labels != 3][labelled])
