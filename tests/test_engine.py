import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd.data import DeviceLoader, load_dataset
from featkd.engine import (DivergenceError, LRFactor, Precision, SupervisedMethod, build_optimizer, build_scheduler,
                           decay_milestones, evaluate, fit, seed_everything)


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


def supervised(seed=0, num_classes=4, epochs=3, lr=0.05, milestones=(2,), restart=False):
    seed_everything(seed)
    model = tiny_model(num_classes=num_classes)
    opt = build_optimizer(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = build_scheduler(opt, "multistep", epochs=epochs, milestones=milestones, gamma=0.1,
                            restart_momentum_at_milestones=restart)
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

    def train_step(self, x, y, step, indices=None):
        if step == self.crash_at:
            raise Interrupt
        return super().train_step(x, y, step)


@pytest.mark.parametrize("restart", [False, True])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, restart):
    # Momentum restarts at the end of epochs 1 (before the checkpoint resumed from) and 3 (after it).
    epochs, schedule = 4, dict(milestones=(1, 3), restart=restart)
    train, test = loaders()
    full = fit(supervised(epochs=epochs, **schedule), train, test, tmp_path / "full", epochs, log=lambda s: None)

    m = supervised(epochs=epochs, **schedule)
    crashing = CrashingMethod(m.model, m.optimizer, m.scheduler, crash_at=2 * len(train) + 3)
    with pytest.raises(Interrupt):
        fit(crashing, train, test, tmp_path / "killed", epochs, log=lambda s: None)
    assert ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    # a fresh process would start from other RNG states and other weights
    torch.manual_seed(1234)
    resumed = fit(supervised(seed=99, epochs=epochs, **schedule), train, test, tmp_path / "killed", epochs, resume=True,
                  log=lambda s: None)
    assert strip_times(resumed) == strip_times(full)
    assert ckpt.read_metrics(tmp_path / "killed") == resumed
    a = ckpt.load_checkpoint(tmp_path / "full" / "last.pt")["method"]["model"]
    b = ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")["method"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class DivergingMethod(SupervisedMethod):
    def train_step(self, x, y, step, indices=None):
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


def official_at_lrs(epochs, epoch_step, lr=0.1, ratio=0.2):
    """The learning rate of each epoch in the official AT loop (cifar.py's on_start_epoch): before the
    1-indexed epoch ``e`` starts, ``if e in epoch_step`` the lr is multiplied by ``ratio``."""
    lrs = []
    for epoch in range(1, epochs + 1):
        if epoch in epoch_step:
            lr *= ratio
        lrs.append(lr)
    return lrs


def featkd_lrs(epochs, milestones, lr=0.1, gamma=0.2):
    factor = LRFactor("multistep", epochs, milestones, gamma)
    return [lr * factor(e) for e in range(epochs)]


def stage_lengths(lrs):
    return [len(list(run)) for _, run in itertools.groupby(lrs)]


def test_decay_milestones_are_the_official_at_loops_epochs():
    paper = (0.3, 0.6, 0.8)
    assert decay_milestones(200, paper) == [59, 119, 159]
    lrs = featkd_lrs(200, decay_milestones(200, paper))
    assert lrs == pytest.approx(official_at_lrs(200, [60, 120, 160]), rel=1e-12)
    assert stage_lengths(lrs) == [59, 60, 40, 41]
    # a shorter run is the official loop with epoch_step scaled: 30 epochs -> epochs 9, 18, 24
    assert featkd_lrs(30, decay_milestones(30, paper)) == pytest.approx(official_at_lrs(30, [9, 18, 24]), rel=1e-12)
    # very short runs: never two decays on one epoch (2 epochs once had [1, 1]: lr x0.04 at once)
    assert decay_milestones(2, paper) == [1] and featkd_lrs(2, [1]) == pytest.approx([0.1, 0.02])
    assert decay_milestones(4, paper) == [1, 2, 3] and decay_milestones(1, paper) == []
    for epochs in range(1, 301):
        milestones = decay_milestones(epochs, paper)
        assert milestones == sorted(set(milestones)) and all(1 <= m < epochs for m in milestones)
        assert len(milestones) == min(3, epochs - 1)
    with pytest.raises(ValueError, match=r"increasing and in \(0, 1\]"):
        decay_milestones(10, (0.6, 0.3))


def test_momentum_restart_equals_a_new_sgd_at_each_decay():
    """Against the official loop: a new torch.optim.SGD (no momentum yet) at the start of epochs 2 and 4."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(3, (8,))) for _ in range(3)]
    initial = nn.Linear(5, 3).double()

    def sgd_epoch(model, optimizer):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    def official():
        model = copy.deepcopy(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for epoch in range(1, 6):
            if epoch in (2, 4):
                lr = optimizer.param_groups[0]["lr"] * 0.2
                optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            sgd_epoch(model, optimizer)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def featkd(restart):
        model = copy.deepcopy(initial)
        optimizer = build_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        scheduler = build_scheduler(optimizer, "multistep", epochs=5, milestones=[1, 3], gamma=0.2,
                                    restart_momentum_at_milestones=restart)
        for _ in range(5):
            sgd_epoch(model, optimizer)
            scheduler.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = official()
    torch.testing.assert_close(featkd(restart=True), reference, rtol=1e-12, atol=1e-14)
    assert (featkd(restart=False) - reference).abs().max() > 1e-4  # keeping the momentum is another trajectory
    with pytest.raises(ValueError, match="needs the 'multistep' schedule"):
        build_scheduler(torch.optim.SGD(initial.parameters(), lr=0.1), "cosine", restart_momentum_at_milestones=True)


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
    # issue #19: through the API too, a negative gamma (a negative lr) and repeated milestones
    with pytest.raises(ValueError, match=r"^schedule gamma must be > 0, got -1$"):
        build_scheduler(opt, "multistep", milestones=[1], gamma=-1)
    with pytest.raises(ValueError, match=r"strictly increasing, got \[2, 2\]"):
        build_scheduler(opt, "multistep", milestones=[2, 2])
    with pytest.raises(ValueError, match=r"min_factor in \[0, 1\], got 0 and 1.5"):
        build_scheduler(opt, "cosine", min_factor=1.5)
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


def test_bf16_autocast_on_cpu_and_fp16_refused_there():
    lin = nn.Linear(4, 4)
    with Precision("bf16", "cpu").autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    # issue #19 §2: fp16 on the CPU ran in fp32 while config.yaml recorded fp16
    with pytest.raises(ValueError, match=r"^amp=fp16 needs a CUDA device, and this run is on the cpu: set amp=bf16 or "
                                         r"amp=null there$"):
        Precision("fp16", "cpu")
    with pytest.raises(ValueError, match="amp"):
        Precision("fp8")


def test_a_batch_or_label_the_model_cannot_take_is_one_line_through_the_supervised_step():
    # issue #19 §2: torch's own errors came through unexplained
    model = tiny_model(num_classes=5)
    method = SupervisedMethod(model, build_optimizer(model.parameters(), lr=0.1))
    x = torch.randn(4, 1, 16, 16)
    with pytest.raises(ValueError, match=r"^the batch is torch.uint8 \(4, 1, 16, 16\), but models take float images"):
        method.train_step(x.to(torch.uint8), torch.tensor([0, 1, 2, 3]), 0)
    with pytest.raises(ValueError, match=r"^labels must be class indices 0..4 for the model's 5 outputs \(or -1 for "
                                         r"unlabelled\), got 7"):
        method.train_step(x, torch.tensor([0, 1, 7, -1]), 0)
    assert set(method.train_step(x, torch.tensor([0, 1, 4, -1]), 0)) == {"ce"}
    clipping = SupervisedMethod(model, build_optimizer(model.parameters(), lr=0.1), grad_clip=-1.0)
    with pytest.raises(ValueError, match=r"^grad_clip must be > 0 \(a gradient-norm bound\), got -1.0$"):
        clipping.train_step(x, torch.tensor([0, 1, 2, 3]), 0)


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


def test_fit_without_a_run_directory_trains_and_writes_nothing(tmp_path, monkeypatch):
    # issue #21: fit always needed a run directory
    from featkd.data import DeviceLoader, load_dataset
    from featkd.engine import SupervisedMethod, build_optimizer, fit
    from featkd.models import create_model

    monkeypatch.chdir(tmp_path)
    data = load_dataset("synthetic", split="train", limit=32)
    loader = DeviceLoader(data, 16, shuffle=True, augment=False)
    model = create_model("wrn10_1", num_classes=10, in_channels=1)
    history = fit(SupervisedMethod(model, build_optimizer(model.parameters(), lr=0.1)), loader, loader, None, 2,
                  log=lambda _: None)
    assert [row["epoch"] for row in history] == [1, 2] and "model/acc1" in history[-1]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="resume=True needs the run_dir"):
        fit(SupervisedMethod(model, build_optimizer(model.parameters(), lr=0.1)), loader, loader, None, 1,
            resume=True)


def test_a_train_step_without_indices_is_refused_before_training(tmp_path):
    class OldStyle(SupervisedMethod):
        def train_step(self, x, y, step):
            return super().train_step(x, y, step)

    m = supervised(epochs=1)
    train, test = loaders()
    with pytest.raises(TypeError, match=r"OldStyle.train_step\(x, y, step\) must take the samples' indices too: "
                                        r"def train_step\(self, x, y, step, indices=None\)"):
        fit(OldStyle(m.model, m.optimizer, m.scheduler), train, test, tmp_path / "run", 1, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_only_a_cuda_run_without_deterministic_kernels_is_told_reruns_may_differ():
    from featkd.runs import nondeterminism_note

    assert nondeterminism_note(torch.device("cpu"), deterministic=False) is None
    assert nondeterminism_note(torch.device("cuda", 0), deterministic=True) is None
    note = nondeterminism_note(torch.device("cuda", 0), deterministic=False)
    assert "deterministic=true" in note and "\n" not in note


def test_a_paper_protocol_on_the_cpu_leaves_torch_kernels_as_they_are():
    from featkd.repro.protocols import protocol_device

    was = torch.are_deterministic_algorithms_enabled()
    assert protocol_device("cpu") == torch.device("cpu")
    assert torch.are_deterministic_algorithms_enabled() is was
