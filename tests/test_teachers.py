"""One way to take a teacher from a checkpoint (featkd.teachers), one label for unlabelled examples."""

import pytest
import torch

from featkd import checkpoint as ckpt
from featkd import data, functional, teachers
from featkd.data import load_dataset
from featkd.models import create_model


@pytest.fixture
def teacher_file(tmp_path):
    info = load_dataset("synthetic", size=16, image_size=16, num_classes=4).info
    model = create_model("resnet8", num_classes=4, in_channels=1)
    path = tmp_path / "teacher.pt"
    ckpt.save_checkpoint(path, {"epoch": 1, "models": {"model": {**ckpt.model_record("resnet8", {}, info),
                                                                 "state_dict": model.state_dict()}}})
    return path, model, info


def test_load_teacher_returns_the_model_frozen_in_eval_mode(teacher_file):
    path, model, info = teacher_file
    teacher, record = teachers.load_teacher(path, "cpu", info, sha256=teachers.file_sha256(path))
    assert not teacher.training and record["name"] == "resnet8"
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), model.state_dict().values()))


def test_load_teacher_refuses_other_classes_and_another_file(teacher_file, tmp_path):
    path, _, _ = teacher_file
    ten = load_dataset("synthetic", size=16, image_size=16, num_classes=10).info
    with pytest.raises(ValueError, match="trained for 4 classes of 1-channel images, but synthetic has 10 classes"):
        teachers.load_teacher(path, "cpu", ten)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")  # the hash is checked before the file is read as a checkpoint
    with pytest.raises(ValueError, match=f"sha256 {teachers.file_sha256(garbage)}, expected {'0' * 64}"):
        teachers.load_teacher(garbage, "cpu", sha256="0" * 64)


def test_the_label_the_data_marks_unlabelled_is_the_one_the_cross_entropy_skips():
    ds = load_dataset("synthetic", size=16, image_size=16)
    marked = data.mark_unlabeled(ds, 0.5, seed=0)
    kept = marked.labels != functional.UNLABELED
    assert kept.sum() == 8 and data.UNLABELED == functional.UNLABELED
    logits = torch.randn(16, ds.info.num_classes)
    torch.testing.assert_close(functional.cross_entropy(logits, marked.labels),
                               torch.nn.functional.cross_entropy(logits[kept], marked.labels[kept]))
