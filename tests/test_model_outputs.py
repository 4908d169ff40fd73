"""What a model returned, read in one place: logits in any output kind, per-token rows, the task loss."""

import collections
import dataclasses

import pytest
import torch
from torch import nn

import featkd
from featkd.model_outputs import TaskLoss, logits_of, model_loss, token_rows


@dataclasses.dataclass
class Output:  # a ModelOutput-like dataclass
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


Pair = collections.namedtuple("Pair", "logits aux_logits")  # torchvision's InceptionOutputs


def test_the_logits_are_found_in_every_kind_of_output():
    t = torch.randn(2, 3)
    for output in (t, {"logits": t, "hidden": t}, Output(t), Pair(t, -t), (t, -t)):
        assert logits_of(output) is t
    assert logits_of({"loss_classifier": t.sum(), "loss_box_reg": t.sum()}) is None  # a detector's losses
    with pytest.raises(TypeError, match="cannot find the logits in a model output of type str: a model returns a "
                                        "tensor, something with a 'logits' key or attribute"):
        logits_of("logits")


class Wrapped(nn.Module):
    """A classifier whose forward returns a dict, a dataclass or a tuple instead of the logits."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        logits = self.model(x)
        return {"logits": logits} if self.kind == "dict" else Output(logits) if self.kind == "dataclass" else (logits, x)


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple"])
def test_a_distiller_whose_models_return_other_outputs_gives_the_losses_of_plain_logits(kind):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])

    def models():
        torch.manual_seed(0)
        make = lambda c: nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),  # noqa
                                       nn.Flatten(), nn.Linear(c, 3))
        return make(8), make(4)

    def losses(teacher, student, prefix):
        terms = [featkd.Term(teacher=f"{prefix}1", student=f"{prefix}1", loss="at", name="at")]
        distiller = featkd.Distiller(teacher, student, terms, kd={"loss": "kd", "T": 2.0}).setup(x[:2])
        return {k: v.detach() for k, v in distiller(x, y)[1].items()}

    plain = losses(*models(), "")
    teacher, student = models()
    wrapped = losses(Wrapped(teacher, kind), Wrapped(student, kind), "model.")
    assert plain.keys() == wrapped.keys()
    for key in plain:
        torch.testing.assert_close(wrapped[key], plain[key])


def test_token_rows_keep_the_valid_tokens_in_order_and_label_the_rest_unlabelled():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    targets = torch.tensor([[2, -100, 1], [3, 0, 0]])
    rows, picked = token_rows(logits, mask, targets)
    expected = [logits[b, i] for b in range(2) for i in range(3) if mask[b, i]]  # an explicit loop
    torch.testing.assert_close(rows, torch.stack(expected))
    assert picked.tolist() == [2, -1, 3]
    assert token_rows(logits[:, 0], None, targets[:, 0])[0] is not None  # (B, V) logits pass as they are
    with pytest.raises(ValueError, match=r"token mask of shape \(2, 2\) for logits of shape \(2, 3, 4\)"):
        token_rows(logits, mask[:, :2])


def test_the_model_s_own_losses_summed_or_weighted():
    losses = {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(2.0)}
    assert model_loss(losses).item() == 3.5
    assert TaskLoss({"loss_a": 2.0, "loss_b": 0.5})(losses, None, None, None, None).item() == 4.0
    with pytest.raises(KeyError, match=r"task_loss weights \['loss_a'\] do not match the model's losses"):
        model_loss(losses, {"loss_a": 1.0})
    with pytest.raises(ValueError, match="task_loss='model' but the model returned no loss"):
        TaskLoss("model")(Output(torch.zeros(1)), None, None, None, None)
    with pytest.raises(ValueError, match="task_loss='ce' needs logits, but the student returned a dict of losses"):
        TaskLoss("ce")(losses, None, torch.zeros(2, dtype=torch.long), None, None)
