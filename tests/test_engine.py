import json
import math

import pytest
import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd.data import DeviceLoader, load_dataset
from featkd.engine import (DivergenceError, Precision, SupervisedMethod, build_optimizer, build_scheduler,
                           evaluate, fit, seed_everything)


def tiny_model(in_channels=1, num_classes=4):
    # Dropout makes every step draw from the global torch RNG, so exact resumes need its state restored.
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, num_classes),
    )


def loaders(num_classes=4, size=256, batch_size=32):
    opts = dict(name="synthetic", size=size, num_classes=num_classes, image_size=16, noise=1.0)
    train = DeviceLoader(load_dataset(split="train", **opts), batch_size, shuffle=True, augment=True, seed=3, pad=2)
    test = DeviceLoader(load_dataset(split="test", **opts), 64, shuffle=False, drop_last=False)
    return train, test


def supervised(seed=0, num_classes=4, epochs=3, lr=0.05):
    seed_everything(seed)
    model = tiny_model(num_classes=num_classes)
    opt = build_optimizer(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = build_scheduler(opt, "multistep", epochs=epochs, milestones=[2], gamma=0.1)
    return SupervisedMethod(model, opt, sched)


def strip_times(history):
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "eval_time_s")} for row in history]


def test_fit_trains_and_writes_run_files(tmp_path):
    train, test = loaders(num_classes=6)
    method = supervised(num_classes=6)
    history = fit(method, train, test, tmp_path / "run", epochs=3, config={"seed": 0, "note": "x"}, log=lambda s: None)
    assert len(history) == 3
    row = history[-1]
    assert set(row) == {"epoch", "step", "train/ce", "model/acc1", "model/acc5", "model/loss", "lr", "epoch_time_s", "eval_time_s"}
    assert row["epoch"] == 3 and row["step"] == 3 * len(train)
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.05, 0.005])
    assert history[0]["train/ce"] > history[-1]["train/ce"]
    assert row["model/acc1"] > 60  # 6 learnable classes: chance is 16.7%
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "metrics.csv",
                                              "config.yaml", "environment.json"}
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == history
    assert (run / "metrics.csv").read_text().splitlines()[0].split(",")[:3] == ["epoch", "step", "train/ce"]
    assert "note: x" in (run / "config.yaml").read_text()
    assert json.loads((run / "environment.json").read_text())["torch"] == torch.__version__
    state = ckpt.load_checkpoint(run / "last.pt")
    assert state["epoch"] == 3 and state["step"] == row["step"]
    best = max(history, key=lambda r: r["model/acc1"])
    assert ckpt.load_checkpoint(run / "best.pt")["epoch"] == best["epoch"]
    # the saved model reproduces the logged accuracy
    model = tiny_model(num_classes=6)
    model.load_state_dict(state["models"]["model"]["state_dict"])
    assert evaluate(model, test)["acc1"] == pytest.approx(row["model/acc1"])


def test_existing_run_dir_is_never_overwritten(tmp_path):
    train, test = loaders()
    fit(supervised(), train, test, tmp_path, epochs=1, log=lambda s: None)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ckpt.RunDirectoryExistsError, match="--resume.*--run-dir"):
        fit(supervised(), train, test, tmp_path, epochs=1, log=lambda s: None)
    assert (tmp_path / "last.pt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit(supervised(), train, test, tmp_path / "new", epochs=1, resume=True, log=lambda s: None)


class Interrupt(Exception):
    pass


class CrashingMethod(SupervisedMethod):
    """Raises at a given step, as a kill in the middle of an epoch would."""

    def __init__(self, *args, crash_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def train_step(self, x, y, step):
        if step == self.crash_at:
            raise Interrupt
        return super().train_step(x, y, step)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    epochs = 4
    train, test = loaders()
    full = fit(supervised(epochs=epochs), train, test, tmp_path / "full", epochs, log=lambda s: None)

    m = supervised(epochs=epochs)
    crashing = CrashingMethod(m.model, m.optimizer, m.scheduler, crash_at=2 * len(train) + 3)
    with pytest.raises(Interrupt):
        fit(crashing, train, test, tmp_path / "killed", epochs, log=lambda s: None)
    assert ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    # a fresh process would start from other RNG states and other weights
    torch.manual_seed(1234)
    resumed = fit(supervised(seed=99, epochs=epochs), train, test, tmp_path / "killed", epochs, resume=True,
                  log=lambda s: None)
    assert strip_times(resumed) == strip_times(full)
    assert ckpt.read_metrics(tmp_path / "killed") == resumed
    a = ckpt.load_checkpoint(tmp_path / "full" / "last.pt")["method"]["model"]
    b = ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")["method"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class DivergingMethod(SupervisedMethod):
    def train_step(self, x, y, step):
        losses = super().train_step(x, y, step)
        if step >= 10:
            losses["at:group2"] = float("nan")
            losses["total"] = float("nan")
        return losses


def test_nan_guard_names_the_term_and_keeps_last_checkpoint(tmp_path):
    train, test = loaders()  # 8 steps per epoch: the NaN comes in epoch 2
    m = supervised()
    fit(m, train, test, tmp_path, epochs=1, log=lambda s: None)
    before = (tmp_path / "last.pt").read_bytes()
    diverging = DivergingMethod(m.model, m.optimizer, m.scheduler)
    with pytest.raises(DivergenceError, match=r"'at:group2' became nan at step 10 \(epoch 2\)"):
        fit(diverging, train, test, tmp_path, epochs=3, resume=True, log=lambda s: None)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert len(ckpt.read_metrics(tmp_path)) == 1


def test_paper_multistep_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = build_scheduler(opt, "multistep", epochs=200, milestones=[60, 120, 160], gamma=0.2)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1] * 60 + [0.02] * 60 + [0.004] * 40 + [0.0008] * 40
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = build_scheduler(opt, "cosine", epochs=10, warmup_epochs=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]
    expected = [cosine[0] * 0.5, cosine[1] * 1.0] + cosine[2:]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_bad_schedule_and_optimizer_names():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*'cosine'"):
        build_scheduler(opt, "cosin")
    with pytest.raises(ValueError, match="increasing"):
        build_scheduler(opt, "multistep", milestones=[120, 60])
    with pytest.raises(ValueError, match="unknown optimizer 'sdg'"):
        build_optimizer([nn.Parameter(torch.zeros(1))], "sdg")


def test_evaluate_matches_explicit_counting():
    torch.manual_seed(0)
    x = torch.randn(50, 1, 8, 8)
    y = torch.randint(0, 7, (50,))
    y[::9] = -1  # unlabelled samples are skipped
    model = tiny_model(num_classes=7).eval()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    got = evaluate(model, batches)
    with torch.no_grad():
        logits = model(x)
    top1 = top5 = 0
    losses = []
    for i in range(50):
        if y[i] < 0:
            continue
        order = sorted(range(7), key=lambda c: -logits[i, c].item())
        top1 += order[0] == y[i].item()
        top5 += y[i].item() in order[:5]
        losses.append(-torch.log_softmax(logits[i], 0)[y[i]].item())
    n = len(losses)
    assert got["acc1"] == pytest.approx(100 * top1 / n)
    assert got["acc5"] == pytest.approx(100 * top5 / n)
    assert got["loss"] == pytest.approx(sum(losses) / n, rel=1e-5)
    assert "acc5" not in evaluate(tiny_model(num_classes=5), [(x[:4], y[:4].clamp(min=0, max=4))])


def test_bf16_autocast_on_cpu_and_fp16_noop():
    lin = nn.Linear(4, 4)
    with Precision("bf16", "cpu").autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with Precision("fp16", "cpu").autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="amp"):
        Precision("fp8")


def test_seed_everything_repeats_initialisation():
    seed_everything(5)
    a = tiny_model().state_dict()
    seed_everything(5)
    b = tiny_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_checkpoint_follows_the_chosen_metric(tmp_path):
    train, test = loaders()
    history = fit(supervised(epochs=4, lr=0.2), train, test, tmp_path, epochs=4, best_metric="model/loss",
                  log=lambda s: None)
    best = min(history, key=lambda r: r["model/loss"])
    state = ckpt.load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == best["epoch"] and state["best"]["value"] == best["model/loss"]
    with pytest.raises(KeyError, match="best_metric 'model/acc9'"):
        fit(supervised(), train, test, tmp_path / "other", epochs=1, best_metric="model/acc9", log=lambda s: None)


def test_eval_every_evaluates_on_schedule_and_after_the_last_epoch(tmp_path):
    train, test = loaders()
    every = fit(supervised(epochs=3), train, test, tmp_path / "every", epochs=3, log=lambda s: None)
    sparse = fit(supervised(epochs=3), train, test, tmp_path / "sparse", epochs=3, eval_every=2, log=lambda s: None)
    assert ["model/acc1" in row for row in sparse] == [False, True, True]
    # evaluation does not touch training: the same losses and the same final accuracy
    assert [r["train/ce"] for r in sparse] == [r["train/ce"] for r in every]
    assert sparse[-1]["model/acc1"] == every[-1]["model/acc1"]
    assert ckpt.load_checkpoint(tmp_path / "sparse" / "best.pt")["epoch"] in (2, 3)
    with pytest.raises(ValueError, match="eval_every"):
        fit(supervised(), train, test, tmp_path / "bad", epochs=1, eval_every=0, log=lambda s: None)
