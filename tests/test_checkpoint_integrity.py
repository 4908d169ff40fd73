"""Issue #19: changed bytes inside a tensor of a checkpoint loaded as changed weights (torch.load does not check
the zip's CRCs), so a damaged last.pt resumed, a damaged teacher taught and featkd eval scored it with exit
status 0. Every checkpoint featkd writes now carries the sha256 of its contents, checked on every load."""

import shutil
import warnings

import pytest
import torch

from featkd import checkpoint as ckpt
from featkd import shipped
from featkd.cli import main
from featkd.models import create_model

DATA = ["data.name=synthetic", "data.limit=64", "data.test_limit=32", "data.batch_size=16", "data.eval_batch_size=32"]


def flip_tensor_bytes(path, tensor, count=16):
    """Invert ``count`` bytes in the middle of ``tensor``'s data where the file stores it, leaving every other
    byte (the zip's and the pickle's structure) as it was."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0, "the tensor's bytes should be stored once, uncompressed"
    middle = start + len(raw) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def model_state():
    torch.manual_seed(0)
    model = create_model("wrn10_1", num_classes=10, in_channels=1)
    return {"epoch": 1, "models": {"model": {"state_dict": model.state_dict()}}}, model.group3[0].conv2.weight


def test_changed_bytes_inside_a_tensor_are_refused_naming_the_file(tmp_path):
    state, weight = model_state()
    path = tmp_path / "model.pt"
    ckpt.save_checkpoint(path, state)
    assert torch.equal(ckpt.load_checkpoint(path)["models"]["model"]["state_dict"]["group3.0.conv2.weight"], weight)
    flip_tensor_bytes(path, weight)
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        ckpt.load_checkpoint(path)
    assert str(error.value) == (f"checkpoint '{path}' is damaged: its contents do not match the sha256 recorded when "
                                "it was written.")

    # the control: the same damage in a plain torch.save file loads without a word, with other weights
    plain = tmp_path / "plain.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, **state}, plain)
    flip_tensor_bytes(plain, weight)
    loaded = torch.load(plain, weights_only=False)["models"]["model"]["state_dict"]["group3.0.conv2.weight"]
    assert loaded.shape == weight.shape and not torch.equal(loaded, weight)


def test_a_checkpoint_written_before_checksums_loads_with_a_notice(tmp_path):
    state, weight = model_state()
    old = tmp_path / "old.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, **state}, old)  # what featkd wrote before it sealed checkpoints
    with pytest.warns(ckpt.UnverifiedCheckpointWarning) as notices:
        loaded = ckpt.load_checkpoint(old)
    assert torch.equal(loaded["models"]["model"]["state_dict"]["group3.0.conv2.weight"], weight)
    assert [str(n.message) for n in notices] == [f"checkpoint '{old}' was written before featkd recorded checksums: "
                                                 "its contents cannot be verified"]
    new = tmp_path / "new.pt"
    ckpt.save_checkpoint(new, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_checkpoint(new)


def test_the_shipped_teacher_is_sealed_and_the_earlier_one_loads_with_the_notice():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = ckpt.load_checkpoint(shipped.TEACHER.path)
    model, record = ckpt.model_from_checkpoint(state, torch.device("cpu"))
    assert record["name"] == "wrn16_2"
    with pytest.warns(ckpt.UnverifiedCheckpointWarning, match="fmnist_wrn16_2_3ep.pt"):
        ckpt.load_checkpoint(shipped.EARLIER_TEACHER_PATH)


def test_the_cli_says_so_in_one_line(tmp_path, subprocess_env, python_exe):
    import subprocess

    state, _ = model_state()
    state["models"]["model"].update(name="wrn10_1", num_classes=10, in_channels=1)
    old = tmp_path / "old.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "config": {"data": {"name": "synthetic", "test_limit": 20}},
                **state}, old)
    done = subprocess.run([python_exe, "-m", "featkd.cli", "eval", "--checkpoint", str(old)], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"featkd: warning: checkpoint '{old}' was written before featkd recorded checksums: its "
                           "contents cannot be verified\n")


def one_line(capsys, status, *fragments):
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.slow
def test_resume_teacher_and_eval_refuse_a_damaged_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "model.name=wrn10_1", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    last, best = run_dir / ckpt.LAST, run_dir / ckpt.BEST
    weight = ckpt.load_checkpoint(last)["models"]["model"]["state_dict"]["group3.0.conv2.weight"]
    teacher = tmp_path / "teacher.pt"
    shutil.copy(last, teacher)
    for path in (last, teacher):
        flip_tensor_bytes(path, weight)
    damaged = "is damaged: its contents do not match the sha256 recorded when it was written."
    capsys.readouterr()

    status = main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"])
    one_line(capsys, status, f"featkd train: error: checkpoint '{last}' {damaged}", f"{best} is intact (epoch 1)")
    assert len(ckpt.read_metrics(run_dir)) == 1
    status = main(["eval", "--run-dir", str(run_dir), "--which", "last"])
    one_line(capsys, status, f"featkd eval: error: checkpoint '{last}' {damaged}")
    status = main(["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(tmp_path / "student"),
                   f"teacher.checkpoint={teacher}", "student.name=wrn10_1", "epochs=1", *DATA])
    one_line(capsys, status, f"featkd distill: error: checkpoint '{teacher}' {damaged}")
    assert main(["eval", "--run-dir", str(run_dir), "--which", "best"]) == 0  # the intact one still works
