import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, rel_entr, softmax

import featkd.functional as KF
from featkd.losses import build_logit_loss


def logits(b=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * 3


def kl_reference(p_logits, q_logits, T):
    """T^2 · mean_b KL(softmax(p/T) || softmax(q/T)) via scipy.special.rel_entr."""
    p, q = softmax(p_logits / T, axis=1), softmax(q_logits / T, axis=1)
    return T * T * float(np.mean(np.sum(rel_entr(p, q), axis=1)))


def ce_reference(z, targets):
    labelled = [(i, t) for i, t in enumerate(targets) if t != -1]
    if not labelled:
        return 0.0
    lsm = log_softmax(z, axis=1)
    return float(np.mean([-lsm[i, t] for i, t in labelled]))


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_kd_matches_scipy(T):
    s, t = logits(seed=1), logits(seed=2)
    assert KF.kd_loss(s, t, T).item() == pytest.approx(kl_reference(t.numpy(), s.numpy(), T), rel=1e-12)


def test_kd_normalisations_of_the_toolkits_agree():
    s, t = logits(8, 10, 3), logits(8, 10, 4)
    T = 4.0
    log_ps, log_pt = torch.log_softmax(s / T, 1), torch.log_softmax(t / T, 1)
    pt = log_pt.exp()
    sum_form = torch.nn.functional.kl_div(log_ps, pt, reduction="sum") * T * T / s.shape[0]
    none_form = torch.nn.functional.kl_div(log_ps, pt, reduction="none").sum(1).mean() * T * T
    assert KF.kd_loss(s, t, T).item() == pytest.approx(sum_form.item(), rel=1e-12)
    assert KF.kd_loss(s, t, T).item() == pytest.approx(none_form.item(), rel=1e-12)


@pytest.mark.parametrize("targets", [[0, 1, 2, 3], [0, -1, 4, -1], [-1, -1, -1, -1]])
def test_kd_ce_weighted_average_ignores_unlabeled(targets):
    s, t = logits(seed=5), logits(seed=6)
    y = torch.tensor(targets)
    kd, ce = kl_reference(t.numpy(), s.numpy(), 4.0), ce_reference(s.numpy(), targets)
    got = KF.kd_ce_loss(s, t, y, T=4.0, alpha=0.9, beta=0.3)
    assert got.item() == pytest.approx((0.9 * kd + 0.3 * ce) / 1.2, rel=1e-12)
    assert KF.cross_entropy(s, y).item() == pytest.approx(ce, rel=1e-12, abs=1e-15)


def test_kd_ce_rejects_bad_weights():
    with pytest.raises(ValueError, match="alpha \\+ beta > 0"):
        KF.kd_ce_loss(logits(), logits(), torch.zeros(4, dtype=torch.long), alpha=0.0, beta=0.0)


def test_logit_mse_and_soft_ce_mse_end_points():
    s, t = logits(seed=7), logits(seed=8)
    mse = float(np.mean((s.numpy() - t.numpy()) ** 2))
    assert KF.logit_mse_loss(s, t).item() == pytest.approx(mse, rel=1e-12)
    T = 3.0
    p_t = softmax(t.numpy() / T, axis=1)
    soft_ce = T * T * float(np.mean(-np.sum(p_t * log_softmax(s.numpy() / T, axis=1), axis=1)))
    assert KF.soft_ce_mse_loss(s, t, T, lam=0.0).item() == pytest.approx(soft_ce, rel=1e-12)
    assert KF.soft_ce_mse_loss(s, t, T, lam=1.0).item() == pytest.approx(mse, rel=1e-12)
    assert KF.soft_ce_mse_loss(s, t, T, lam=0.25).item() == pytest.approx(0.75 * soft_ce + 0.25 * mse, rel=1e-12)
    # soft CE = KD + T^2 · H(p_t): same gradient, offset by the teacher's entropy
    entropy = T * T * float(np.mean(-np.sum(p_t * np.log(p_t), axis=1)))
    assert soft_ce == pytest.approx(KF.kd_loss(s, t, T).item() + entropy, rel=1e-12)
    with pytest.raises(ValueError, match="0 <= lam <= 1"):
        KF.soft_ce_mse_loss(s, t, T, lam=1.5)


def test_sym_kl_and_dml_term():
    a, b = logits(seed=9), logits(seed=10)
    want = kl_reference(a.numpy(), b.numpy(), 2.0) + kl_reference(b.numpy(), a.numpy(), 2.0)
    assert KF.sym_kl_loss(a, b, T=2.0).item() == pytest.approx(want, rel=1e-12)
    a.requires_grad_()
    b.requires_grad_()
    KF.dml_kl_loss(a, b).backward()
    assert b.grad is None and a.grad is not None
    assert KF.dml_kl_loss(a, b).item() == pytest.approx(kl_reference(b.detach().numpy(), a.detach().numpy(), 1.0))
    a.grad = None
    KF.sym_kl_loss(a, b).backward()
    assert a.grad is not None and b.grad is not None


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        KF.kd_loss(torch.randn(4, 5), torch.randn(4, 6))


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: KF.kd_loss(s, t, 4.0),
        lambda s, t: KF.kd_ce_loss(s, t, torch.tensor([1, -1, 0]), 2.0, 0.5, 0.5),
        lambda s, t: KF.logit_mse_loss(s, t),
        lambda s, t: KF.soft_ce_mse_loss(s, t, 2.0, 0.3),
        lambda s, t: KF.sym_kl_loss(s, t, 2.0),
        lambda s, t: KF.dml_kl_loss(s, t),
    ],
)
def test_gradcheck(fn):
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_bf16_autocast_computes_in_float32():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = KF.kd_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(KF.kd_loss(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), k=st.integers(2, 12), T=st.floats(0.5, 10), seed=st.integers(0, 2**16))
def test_property_kd_non_negative_zero_on_self(b, k, T, seed):
    s, t = logits(b, k, seed), logits(b, k, seed + 1)
    got = KF.kd_loss(s, t, T).item()
    assert got == pytest.approx(kl_reference(t.numpy(), s.numpy(), T), rel=1e-9, abs=1e-12)
    assert got >= 0
    assert abs(KF.kd_loss(s, s.clone(), T).item()) < 1e-12
    assert abs(KF.sym_kl_loss(s, s.clone(), T).item()) < 1e-12


@pytest.mark.parametrize("T", [0, -1, -4.0])
def test_non_positive_temperature_is_refused_by_function_and_module(T):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for fn in (KF.kd_loss, KF.soft_ce_mse_loss, KF.sym_kl_loss):
        with pytest.raises(ValueError, match="temperature T must be > 0"):
            fn(s, t, T)
    for name in ("kd", "kd_ce", "soft_ce_mse", "sym_kl"):
        with pytest.raises(ValueError, match="temperature T must be > 0"):
            build_logit_loss(name, T=T)


def test_empty_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="empty batch"):
        KF.kd_loss(torch.randn(0, 5), torch.randn(0, 5))
