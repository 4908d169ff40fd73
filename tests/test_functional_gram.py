import numpy as np
import pytest
import torch

import featkd.functional as KF
from _loss_reference import unit_rows


def spatial_gram_reference(fs, ft, normalize):
    out = []
    for b in range(fs.shape[0]):
        x, y = (unit_rows(fs[b]), unit_rows(ft[b])) if normalize else (fs[b], ft[b])
        n = x.shape[1]
        total = 0.0
        for i in range(n):
            for j in range(n):
                gs = sum(x[c, i] * x[c, j] for c in range(x.shape[0])) / x.shape[0]
                gt = sum(y[c, i] * y[c, j] for c in range(y.shape[0])) / y.shape[0]
                total += (gs - gt) ** 2
        out.append(total)
    return float(np.mean(out))


def channel_gram_reference(fs, ft):
    out = []
    for b in range(fs.shape[0]):
        gs, gt = fs[b] @ fs[b].T / fs.shape[2], ft[b] @ ft[b].T / ft.shape[2]
        out.append(np.sum((gs - gt) ** 2))
    return float(np.mean(out))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("route", ["auto", "spatial", "channels"])
def test_spatial_gram_matches_reference(normalize, route):
    f_s, f_t = torch.randn(2, 3, 3, 2, dtype=torch.float64), torch.randn(2, 5, 3, 2, dtype=torch.float64)
    want = spatial_gram_reference(f_s.flatten(2).numpy(), f_t.flatten(2).numpy(), normalize)
    got = KF.gram_loss(f_s, f_t, normalize=normalize, route=route)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_channel_gram_matches_reference_and_allows_different_sizes():
    f_s, f_t = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    want = channel_gram_reference(f_s.flatten(2).numpy(), f_t.flatten(2).numpy())
    assert KF.gram_loss(f_s, f_t, mode="channel").item() == pytest.approx(want, rel=1e-10)


def test_channel_gram_needs_equal_channels():
    with pytest.raises(ValueError, match=r"equal channel counts.*\(2, 3, 4, 4\) has 3.*\(2, 5, 4, 4\) has 5"):
        KF.gram_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), mode="channel")


def fsp_reference(f1, f2):
    b, c1, n = f1.shape
    c2 = f2.shape[1]
    g = np.zeros((b, c1, c2))
    for s in range(b):
        for i in range(c1):
            for j in range(c2):
                g[s, i, j] = np.sum(f1[s, i] * f2[s, j]) / n
    return g


def test_fsp_matches_reference():
    s1, s2 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    t1, t2 = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    g_s = fsp_reference(s1.flatten(2).numpy(), s2.flatten(2).numpy())
    g_t = fsp_reference(t1.flatten(2).numpy(), t2.flatten(2).numpy())
    assert KF.fsp_loss((s1, s2), (t1, t2)).item() == pytest.approx(np.mean((g_s - g_t) ** 2), rel=1e-12)


def test_fsp_pools_layers_of_different_sizes_by_option():
    s1, s2 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    t1, t2 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        KF.fsp_loss((s1, s2), (t1, t2))
    pool = lambda f: torch.nn.functional.adaptive_avg_pool2d(f, 4)  # noqa: E731
    want = KF.fsp_loss((pool(s1), s2), (pool(t1), t2))
    assert KF.fsp_loss((s1, s2), (t1, t2), resize="pool").item() == pytest.approx(want.item(), rel=1e-12)


def test_fsp_channel_mismatch_is_named():
    s = (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    t = (torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"FSP needs equal channel counts.*\(3, 5\).*\(3, 6\)"):
        KF.fsp_loss(s, t)


def test_hint_loss_is_mse_and_checks_shapes():
    f_s, f_t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert KF.hint_loss(f_s, f_t).item() == pytest.approx(np.mean((f_s.numpy() - f_t.numpy()) ** 2), rel=1e-12)
    with pytest.raises(ValueError, match=r"equal shapes.*\(2, 3, 4, 4\).*\(2, 5, 4, 4\).*HintLoss"):
        KF.hint_loss(f_s, torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: KF.gram_loss(s, t, route="spatial"),
        lambda s, t: KF.gram_loss(s, t, normalize=True, route="channels"),
        lambda s, t: KF.gram_loss(s, t[:, :3], mode="channel", normalize=True),
        lambda s, t: KF.fsp_loss((s, s * 2), (t[:, :3], t[:, 1:4])),
        lambda s, t: KF.hint_loss(s, t[:, :3]),
    ],
)
def test_gradcheck(fn):
    f_s = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: fn(s, f_t), (f_s,))
