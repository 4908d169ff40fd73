"""A teacher that expects another input normalisation than the student: the Distiller converts the batch.

The reference is the raw image normalised the teacher's way, (img - mean_t) / std_t, per channel."""

import pytest
import torch
from torch import nn

import featkd
from featkd import runs
from featkd.config import from_dict
from featkd.data.datasets import DatasetInfo

STUDENT = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
TEACHER = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InputRecorder(nn.Module):
    """A tiny classifier that keeps the last batch it was given."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(self.conv(x).mean((2, 3)))


def normalised(images, normalization):
    mean, std = normalization
    out = torch.empty_like(images)
    for c in range(images.shape[1]):
        out[:, c] = (images[:, c] - mean[c]) / std[c]
    return out


def test_the_teacher_sees_the_images_normalised_its_way():
    images = torch.rand(4, 3, 8, 8)
    teacher, student = InputRecorder(), InputRecorder()
    distiller = featkd.Distiller(teacher, student, terms=[featkd.Term("conv")], kd="kd",
                                 student_normalization=STUDENT, teacher_normalization=TEACHER)
    distiller.setup(normalised(images, STUDENT))(normalised(images, STUDENT))
    torch.testing.assert_close(student.seen, normalised(images, STUDENT))
    torch.testing.assert_close(teacher.seen, normalised(images, TEACHER))


def test_the_normalisation_a_timm_model_records():
    timm = pytest.importorskip("timm")
    teacher = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    recorded = (tuple(teacher.pretrained_cfg["mean"]), tuple(teacher.pretrained_cfg["std"]))
    assert featkd.models.input_normalization(teacher) == recorded
    seen = []
    teacher.stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    distiller = featkd.Distiller(teacher, InputRecorder(), kd="kd", student_normalization=STUDENT,
                                 teacher_normalization="pretrained_cfg")
    images = torch.rand(2, 3, 32, 32)
    distiller.setup(normalised(images, STUDENT))(normalised(images, STUDENT))
    torch.testing.assert_close(seen[-1], normalised(images, recorded))


def test_equal_normalisations_leave_the_batch_as_it_is_and_half_given_is_refused():
    teacher = InputRecorder()
    distiller = featkd.Distiller(teacher, InputRecorder(), kd="kd", student_normalization=STUDENT,
                                 teacher_normalization=[list(STUDENT[0]), list(STUDENT[1])])
    x = torch.randn(2, 3, 8, 8)
    distiller.setup(x)(x)
    assert distiller.input_normalizations is None and torch.equal(teacher.seen, x)
    with pytest.raises(ValueError, match="teacher_normalization is given but student_normalization is not"):
        featkd.Distiller(InputRecorder(), InputRecorder(), kd="kd", teacher_normalization=TEACHER)
    with pytest.raises(ValueError, match="the teacher \\(InputRecorder\\) records no mean/std"):
        featkd.Distiller(InputRecorder(), InputRecorder(), kd="kd", student_normalization=STUDENT,
                         teacher_normalization="pretrained_cfg")
    odd = featkd.Distiller(InputRecorder(1), InputRecorder(1), kd="kd", student_normalization=STUDENT,
                           teacher_normalization=TEACHER)
    with pytest.raises(ValueError, match="do not fit a batch of shape \\(2, 1, 8, 8\\)"):
        odd.setup(torch.randn(2, 1, 8, 8))


NAN = float("nan")


# Issue #19 §2: a NaN or zero std was accepted, and the divergence it caused was blamed on the lr
@pytest.mark.parametrize("normalization", [((0.5,), (0.0,)), ((0.5,), (NAN,)), ((NAN,), (0.3,)),
                                           ((0.5,), (float("inf"),)), ((0.5, 0.5), (0.3,))])
def test_a_normalisation_that_is_not_finite_with_std_above_0_is_refused(normalization):
    with pytest.raises(ValueError) as error:
        featkd.Distiller(InputRecorder(), InputRecorder(), kd="kd", student_normalization=STUDENT,
                         teacher_normalization=normalization)
    mean, std = normalization
    assert str(error.value) == (f"teacher_normalization: mean {mean} and std {std} need one value per channel, "
                                "finite means and finite stds > 0")


@pytest.mark.parametrize("override, message", [
    ("teacher.normalization={mean: [0.5], std: [0]}", "config key 'teacher.normalization.std.0' must be a finite "
                                                       "number > 0, got 0.0"),
    ("teacher.normalization={mean: [0.5], std: [.nan]}", "config key 'teacher.normalization.std.0' must be a finite "
                                                         "number > 0, got nan"),
    ("teacher.normalization={mean: [.inf], std: [0.3]}", "config key 'teacher.normalization.mean.0' must be a finite "
                                                         "number, got inf"),
])
def test_a_configs_teacher_normalisation_is_checked(override, message):
    from featkd.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(None, ["teacher.checkpoint=t.pt", override])
    assert str(error.value) == message


def test_featkd_distill_converts_for_a_teacher_trained_on_other_data():
    info = DatasetInfo("imagefolder", 10, 3, 32, STUDENT[0], STUDENT[1])
    cfg = from_dict({"teacher": {"checkpoint": "t.pt"}, "student": {"name": "wrn10_1"}})
    record = {"dataset": {"mean": list(TEACHER[0]), "std": list(TEACHER[1])}}
    assert runs.input_normalizations(cfg, record, info) == {"student_normalization": STUDENT,
                                                            "teacher_normalization": TEACHER}
    same = {"dataset": {"mean": list(STUDENT[0]), "std": list(STUDENT[1])}}
    assert runs.input_normalizations(cfg, same, info) == {}
    given = from_dict({"teacher": {"checkpoint": "t.pt", "normalization": {"mean": [0.1, 0.2, 0.3],
                                                                          "std": [1, 1, 1]}}})
    assert runs.input_normalizations(given, same, info)["teacher_normalization"] == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


def test_a_sweep_converts_once_for_every_member_and_refuses_members_that_disagree():
    from featkd import sweep

    teacher, x = InputRecorder(), torch.randn(4, 3, 8, 8)

    def member(name, normalization):
        distiller = featkd.Distiller(teacher, InputRecorder(), terms=[featkd.Term("conv")], kd="kd",
                                     student_normalization=STUDENT, teacher_normalization=normalization).setup(x)
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
        return sweep.make_member(name, distiller, optimizer, shared=shared)

    shared = sweep.SharedTeacherOutputs()
    method = sweep.SweepMethod(teacher, [member("a", TEACHER), member("b", TEACHER)], shared)
    method.train_step(x, torch.randint(0, 10, (4,)), 0)
    torch.testing.assert_close(teacher.seen, normalised(normalised_inverse(x, STUDENT), TEACHER))
    with pytest.raises(ValueError, match="members convert the batch for the teacher differently"):
        sweep.SweepMethod(teacher, [member("c", TEACHER), member("d", STUDENT)], shared)


def normalised_inverse(x, normalization):
    """The images a batch normalised with ``normalization`` came from."""
    mean, std = normalization
    return torch.stack([x[:, c] * std[c] + mean[c] for c in range(x.shape[1])], 1)
