"""Similarity-preserving loss (Tung & Mori 2019) against explicit NumPy loops in float64, a gradcheck,
and the Distiller building it by name."""

import numpy as np
import pytest
import torch

import featkd
from featkd.losses import build_feature_loss
from featkd.functional import sp_loss
from featkd.models import create_model


def sp_reference(fs, ft):
    """Per the paper: G = Q Qᵀ, rows l2-normalised, ||G_s - G_t||_F^2 / B^2, by explicit loops."""
    def normalised_gram(f):
        q = f.reshape(f.shape[0], -1)
        b = q.shape[0]
        g = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                g[i, j] = sum(q[i, k] * q[j, k] for k in range(q.shape[1]))
        for i in range(b):
            norm = np.sqrt(sum(g[i, j] ** 2 for j in range(b)))
            g[i] /= norm
        return g

    gs, gt = normalised_gram(fs), normalised_gram(ft)
    b = fs.shape[0]
    return sum((gs[i, j] - gt[i, j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


@pytest.mark.parametrize("s_shape,t_shape", [((4, 3, 2, 2), (4, 5, 3, 3)), ((3, 6), (3, 2, 4)), ((5, 2, 3), (5, 2, 3))])
def test_sp_loss_matches_the_reference(s_shape, t_shape):
    f_s, f_t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    assert sp_loss(f_s, f_t).item() == pytest.approx(sp_reference(f_s.numpy(), f_t.numpy()), rel=1e-10)
    assert sp_loss(f_s, 3.0 * f_s).item() == pytest.approx(0.0, abs=1e-12)  # scale-free, per the row norm


def test_sp_gradcheck():
    f_s = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: sp_loss(s, f_t), (f_s,))


def test_sp_module_by_name_checks_the_batch_and_needs_no_adapter():
    module = build_feature_loss("sp", (4, 16, 7, 7), (4, 128, 14, 14))
    f_s, f_t = torch.randn(4, 16, 7, 7), torch.randn(4, 128, 14, 14)
    assert module(f_s, f_t).item() == pytest.approx(sp_loss(f_s, f_t).item())
    with pytest.raises(ValueError, match="batch size"):
        build_feature_loss("sp", (4, 16, 7, 7), (2, 16, 7, 7))

    torch.manual_seed(0)
    teacher, student = create_model("wrn16_2", 10, 1), create_model("wrn16_1", 10, 1)
    x = torch.randn(4, 1, 28, 28)
    d = featkd.Distiller(teacher, student, terms=[featkd.Term(["group2", "group3"], loss="sp", weight=3.0)])
    d.setup(x[:2])
    assert all(isinstance(a, torch.nn.Identity) for a in d.adapters[0])
    _, losses = d(x)
    d.remove_hooks()
    with torch.no_grad():
        feats = {}
        for name, model in (("s", student), ("t", teacher)):
            g2 = model.group2(model.group1(model.conv1(x)))
            feats[name] = (g2, model.group3(g2))
    expected = 3.0 * sum(sp_reference(s.double().numpy(), t.double().numpy())
                         for s, t in zip(feats["s"], feats["t"]))
    assert losses["sp:group2+group3"].item() == pytest.approx(expected, rel=1e-4)
