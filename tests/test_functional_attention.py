import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featkd.functional as KF


def at_map_reference(f, p):
    """NumPy: channel mean of |f|^p per position, flattened, l2-normalised per sample."""
    b = f.shape[0]
    out = []
    for i in range(b):
        a = np.mean(np.abs(f[i]) ** p, axis=0).ravel()
        out.append(a / np.linalg.norm(a))
    return np.stack(out)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("cs,ct", [(4, 4), (3, 7)])
def test_official_mode_matches_reference(p, cs, ct):
    f_s, f_t = torch.randn(3, cs, 5, 4, dtype=torch.float64), torch.randn(3, ct, 5, 4, dtype=torch.float64)
    q_s, q_t = at_map_reference(f_s.numpy(), p), at_map_reference(f_t.numpy(), p)
    want = np.mean((q_s - q_t) ** 2)
    assert KF.at_loss(f_s, f_t, p).item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(KF.attention_map(f_s, p), torch.from_numpy(q_s))


@pytest.mark.parametrize("p,q", [(1, 2), (2, 2), (4, 2), (2, 1), (2, 3), (3, 1.5)])
def test_paper_mode_has_separate_map_and_norm_exponents(p, q):
    # The paper: maps sum_c |A_c|^p, loss ||Q_s/|Q_s|_2 - Q_t/|Q_t|_2||_q — two exponents, both 2 in its runs.
    f_s, f_t = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    q_s, q_t = at_map_reference(f_s.numpy(), p), at_map_reference(f_t.numpy(), p)
    want = np.mean([np.sum(np.abs(q_s[i] - q_t[i]) ** q) ** (1 / q) for i in range(3)])
    assert KF.at_loss(f_s, f_t, p, mode="paper", q=q).item() == pytest.approx(want, rel=1e-12)


def test_paper_mode_norm_is_2_whatever_the_map_exponent():
    f_s, f_t = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    q_s, q_t = at_map_reference(f_s.numpy(), 4), at_map_reference(f_t.numpy(), 4)
    want = np.mean([np.sqrt(np.sum((q_s[i] - q_t[i]) ** 2)) for i in range(2)])
    assert KF.at_loss(f_s, f_t, 4, mode="paper").item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("options,message", [({"p": 0}, "p must be > 0"), ({"p": -2}, "p must be > 0"),
                                             ({"mode": "paper", "q": 0.5}, "q must be >= 1")])
def test_invalid_exponents_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        KF.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), **options)


def test_official_code_expression_for_p2():
    # The authors' code: F.normalize(x.pow(2).mean(1).view(B, -1)); (at(s) - at(t)).pow(2).mean()
    f_s, f_t = torch.randn(4, 8, 6, 6), torch.randn(4, 16, 6, 6)
    at = lambda x: torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))  # noqa: E731
    assert KF.at_loss(f_s, f_t).item() == pytest.approx((at(f_s) - at(f_t)).pow(2).mean().item(), rel=1e-5)


def test_tokens_layout_and_resize():
    f_s, f_t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    pooled = torch.nn.functional.adaptive_avg_pool2d(f_s, 4)
    assert KF.at_loss(f_s, f_t, resize="pool").item() == pytest.approx(KF.at_loss(pooled, f_t).item(), rel=1e-12)
    tok = lambda f: f.flatten(2).transpose(1, 2)  # noqa: E731
    assert KF.at_loss(tok(pooled), tok(f_t), layout="tokens").item() == pytest.approx(
        KF.at_loss(pooled, f_t).item(), rel=1e-12)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        KF.at_loss(f_s, f_t)
    with pytest.raises(ValueError, match="unknown AT mode 'papr'.*'paper'"):
        KF.at_loss(pooled, f_t, mode="papr")


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 1.5])
def test_gradcheck(mode, p):
    f_s = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: KF.at_loss(s, f_t, p, mode=mode), (f_s,))
    assert torch.autograd.gradcheck(lambda s: KF.attention_map(s, p).sin().sum(), (f_s,))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_value_and_gradient_match_the_official_expression_below_the_normalise_floor(p):
    # The value and the hand-written backward follow F.normalize of the channel mean also where a
    # sample's map has norm below its eps (1e-12), there a plain division by eps (not scale-invariant,
    # so the channel sum needs the floor times C): sample 0 is scaled down into that range.
    f_s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    f_s[0] *= 1e-8 if p == 2 else 1e-14
    f_t = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    at = lambda x: torch.nn.functional.normalize(x.abs().pow(p).mean(1).flatten(1))  # noqa: E731
    s = f_s.clone().requires_grad_()
    want = (at(s) - at(f_t)).pow(2).mean()
    want.backward()
    mine = f_s.clone().requires_grad_()
    got = KF.at_loss(mine, f_t, p)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(mine.grad, s.grad, rtol=1e-10, atol=0)
    assert mine.grad[0].abs().max() > 0


@pytest.mark.parametrize("p", [1.5, 2, 3])
def test_second_derivatives_match_the_hand_written_first(p):
    f_s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda s: KF.at_loss(s, f_t, p), (f_s,))


def test_bf16_autocast_computes_in_float32():
    f_s, f_t = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = KF.at_loss(f_s.bfloat16(), f_t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(KF.at_loss(f_s.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), cs=st.integers(1, 5), ct=st.integers(1, 5), h=st.integers(1, 5), w=st.integers(1, 5),
       p=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_property_non_negative_zero_on_self_and_reference(b, cs, ct, h, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64)
    f_t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64)
    q_s, q_t = at_map_reference(f_s.numpy(), p), at_map_reference(f_t.numpy(), p)
    got = KF.at_loss(f_s, f_t, p).item()
    assert got == pytest.approx(np.mean((q_s - q_t) ** 2), rel=1e-10, abs=1e-15)
    assert got >= 0
    assert KF.at_loss(f_s, f_s.clone(), p).item() == 0.0
