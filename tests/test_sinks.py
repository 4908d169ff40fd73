"""Run logging: metrics files always, TensorBoard when installed (or skipped cleanly when not), one console line."""

import sys

import pytest
import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd.data import DeviceLoader, load_dataset
from featkd.engine import SupervisedMethod, fit
from featkd.checkpoint import TENSORBOARD_DIR
from featkd.engine.sinks import Console, MetricsFiles, TensorBoard, run_sinks

HISTORY = [
    {"epoch": 1, "step": 4, "train/ce": 2.0, "student/acc1": 10.0, "lr": 0.1, "epoch_time_s": 0.5},
    {"epoch": 2, "step": 8, "train/ce": 1.5, "student/acc1": 30.0, "lr": None, "epoch_time_s": 0.4},
    {"epoch": 3, "step": 12, "train/ce": 1.0, "student/acc1": 50.0, "lr": 0.01, "epoch_time_s": 0.3},
]


class FakeWriter:
    """Records what a SummaryWriter would be asked to do."""

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.flushes, self.closed = [], 0, False

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_tensorboard_sink_writes_each_new_row_once_at_its_epoch(tmp_path):
    sink = TensorBoard(tmp_path, FakeWriter)
    writer = sink.writer
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step is None
    sink.write(HISTORY[:1])
    sink.write(HISTORY[:3])
    sink.close()
    assert writer.scalars == [
        ("train/ce", 2.0, 1), ("student/acc1", 10.0, 1), ("lr", 0.1, 1), ("epoch_time_s", 0.5, 1),
        ("train/ce", 1.5, 2), ("student/acc1", 30.0, 2), ("epoch_time_s", 0.4, 2),  # lr None: no scalar
        ("train/ce", 1.0, 3), ("student/acc1", 50.0, 3), ("lr", 0.01, 3), ("epoch_time_s", 0.3, 3),
    ]
    assert writer.flushes == 2 and writer.closed


def test_tensorboard_sink_of_a_resumed_run_purges_what_the_checkpoint_lacks(tmp_path):
    sink = TensorBoard(tmp_path, FakeWriter, logged_epochs=2)
    assert sink.writer.purge_step == 3
    sink.write(HISTORY)
    assert {step for _, _, step in sink.writer.scalars} == {3}


def test_without_tensorboard_the_sink_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    lines = []
    sinks = run_sinks(tmp_path, lines.append)
    assert [type(s) for s in sinks] == [MetricsFiles, Console]
    for sink in sinks:
        sink.write(HISTORY[:2])
    assert ckpt.read_metrics(tmp_path) == HISTORY[:2]
    assert lines == ["epoch 2  train/ce 1.5  student/acc1 30  epoch_time_s 0.4"]
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def _tiny_fit(run_dir, epochs, resume=False):
    torch.manual_seed(0)
    ds = load_dataset("synthetic", size=64, image_size=8, num_classes=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, 3))
    method = SupervisedMethod(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return fit(method, DeviceLoader(ds, 32), DeviceLoader(ds, 64, shuffle=False, drop_last=False), run_dir, epochs,
               resume=resume, log=lambda _: None)


def test_fit_writes_tensorboard_curves_equal_to_the_metrics_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _tiny_fit(tmp_path / "run", 1)
    _tiny_fit(tmp_path / "run", 2, resume=True)
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    rows = ckpt.read_metrics(tmp_path / "run")
    for tag in ("train/ce", "model/acc1", "model/loss", "lr"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (row["epoch"], pytest.approx(row[tag], rel=1e-6)) for row in rows]
