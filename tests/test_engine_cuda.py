"""GPU paths of the loop: bf16/fp16 autocast, channels_last and a compiled student (skipped without CUDA)."""

import pytest
import torch

import featkd
from featkd import checkpoint as ckpt
from featkd.data import DeviceLoader, load_dataset
from featkd.engine import DistillMethod, Precision, build_optimizer, build_scheduler, fit
from featkd.models import create_model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_distill_on_gpu_with_autocast_channels_last_and_compile(tmp_path, amp):
    device = torch.device("cuda")
    opts = dict(name="synthetic", size=512, num_classes=10, image_size=28)
    train = DeviceLoader(load_dataset(split="train", **opts), 128, augment=True, device=device)
    test = DeviceLoader(load_dataset(split="test", **opts), 256, shuffle=False, drop_last=False, device=device)
    torch.manual_seed(0)
    teacher = create_model("wrn16_2", 10, 1).to(device, memory_format=torch.channels_last)
    student = create_model("wrn16_1", 10, 1).to(device, memory_format=torch.channels_last)
    distiller = featkd.Distiller(teacher, student, terms=[featkd.Term("group2", loss="at", weight=1000),
                                                          featkd.Term("group3", loss="nst", weight=50)],
                                 kd={"loss": "kd", "weight": 0.9, "T": 4}, ce_weight=0.1, compile=True)
    distiller.setup(next(iter(train))[0][:2].contiguous(memory_format=torch.channels_last))
    optimizer = build_optimizer(distiller.trainable_parameters(), lr=0.05)
    precision = Precision(amp, device)
    method = DistillMethod(distiller, optimizer, build_scheduler(optimizer, "cosine", epochs=2),
                           precision=precision, steps_per_epoch=len(train))
    history = fit(method, train, test, tmp_path / "run", 2, device=device, channels_last=True, log=lambda s: None)
    assert all(v == v and abs(v) < float("inf") for row in history for v in row.values() if isinstance(v, float))
    assert history[-1]["train/total"] < history[0]["train/total"]
    assert precision.scaler.is_enabled() == (amp == "fp16")
    assert ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_deterministic_kernels_make_a_cuda_rerun_equal(tmp_path, capsys):
    """With deterministic=true the same seed gives the same numbers twice on CUDA, and no reproducibility note is
    printed; by default the run says that reruns may differ (on an H200 five one-epoch runs of one seed scored
    35.8-83.7%)."""
    import json

    from test_sweep import cli_distill_config

    from featkd.cli import main

    distill_cfg = cli_distill_config(tmp_path)
    capsys.readouterr()  # the teacher's run, on its default kernels
    rows = []
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for run in ("a", "b"):
            assert main(["distill", "--config", str(distill_cfg), "--run-dir", str(tmp_path / run),
                         "device=cuda", "deterministic=true"]) == 0
            assert "not run-to-run deterministic" not in capsys.readouterr().err
            rows.append([{k: v for k, v in json.loads(line).items() if not k.endswith("_time_s")}
                         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    finally:  # the switch is the process's: leave the other tests the kernels they had
        torch.use_deterministic_algorithms(was)
    assert rows[0] == rows[1]
    assert main(["distill", "--config", str(distill_cfg), "--run-dir", str(tmp_path / "default"), "device=cuda"]) == 0
    assert "start it with deterministic=true" in capsys.readouterr().err


def test_paper_protocols_on_cuda_run_on_deterministic_kernels(monkeypatch):
    """`featkd repro`, `tune` and `demo` resolve their device through protocol_device: on CUDA it switches the
    process to deterministic kernels (what makes the reruns above equal), and the runs' records say so."""
    from featkd import provenance
    from featkd.repro.protocols import protocol_device

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        assert protocol_device("cuda").type == "cuda"
        assert torch.are_deterministic_algorithms_enabled()
        assert provenance.environment_info()["deterministic_kernels"] is True
        assert provenance.hardware("cuda").endswith(", deterministic kernels")
    finally:
        torch.use_deterministic_algorithms(was)
