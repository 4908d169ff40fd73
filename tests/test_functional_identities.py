"""Known identities between the losses, as exact equalities in float64."""

import pytest
import torch

import featkd.functional as KF


@pytest.mark.parametrize("p", [1, 2, 3])
def test_at_is_linear_nst_on_the_attention_map(p):
    # AT's map a = mean_c |f|^p is l2-normalised per sample and compared by a mean over N positions.
    # Linear NST of a single channel normalises that channel and takes the squared distance (sum
    # over N) of the (one-element) channel means. Hence, exactly: N · AT = linear NST of the maps.
    f_s, f_t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 7, 5, 5, dtype=torch.float64)
    n = 25
    a_s = f_s.abs().pow(p).mean(1, keepdim=True)
    a_t = f_t.abs().pow(p).mean(1, keepdim=True)
    assert (n * KF.at_loss(f_s, f_t, p)).item() == pytest.approx(KF.nst_loss(a_s, a_t, "linear").item(), rel=1e-10)


def test_at_p1_on_relu_features_is_linear_nst_with_the_normalisation_moved_to_the_channel_mean():
    # The NST paper's claim, made exact: for non-negative features, AT with p=1 is linear-kernel NST
    # where the l2 normalisation is applied to the channel mean instead of to each channel.
    f_s = torch.relu(torch.randn(3, 4, 6, 6, dtype=torch.float64))
    f_t = torch.relu(torch.randn(3, 6, 6, 6, dtype=torch.float64))
    at = 36 * KF.at_loss(f_s, f_t, p=1)
    nst_of_means = KF.nst_loss(f_s.mean(1, keepdim=True), f_t.mean(1, keepdim=True), "linear")
    assert at.item() == pytest.approx(nst_of_means.item(), rel=1e-10)
    # With NST's own per-channel normalisation the two differ: the identity needs the moved normalisation.
    assert abs(KF.nst_loss(f_s, f_t, "linear").item() - at.item()) > 1e-3 * at.item()


def test_linear_nst_is_the_squared_distance_of_channel_means_of_unit_maps():
    f_s, f_t = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 5, 10, dtype=torch.float64)
    unit = lambda f: f / f.norm(dim=-1, keepdim=True)  # noqa: E731
    want = (unit(f_s).mean(1) - unit(f_t).mean(1)).square().sum(-1).mean()
    assert KF.nst_loss(f_s, f_t, "linear").item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("route", ["spatial", "channels"])
def test_nst_poly_is_the_spatial_gram_distance_of_unit_maps(route):
    # sum_ij (x_i.x_j)^2 = ||X X^T||_F^2 = ||X^T X||_F^2 and sum_ij (x_i.y_j)^2 = <X^T X, Y^T Y>_F, so the
    # poly (d=2, c=0) MMD with 1/C^2 means is ||X^T X / Cs - Y^T Y / Ct||_F^2 with constant exactly 1.
    f_s, f_t = torch.randn(3, 6, 4, 3, dtype=torch.float64), torch.randn(3, 2, 4, 3, dtype=torch.float64)
    nst = KF.nst_loss(f_s, f_t, "poly", degree=2, c=0.0, route=route)
    gram = KF.gram_loss(f_s, f_t, mode="spatial", normalize=True, route="spatial")
    x = torch.nn.functional.normalize(f_s.flatten(2), dim=-1)
    y = torch.nn.functional.normalize(f_t.flatten(2), dim=-1)
    explicit = (x.transpose(1, 2) @ x / 6 - y.transpose(1, 2) @ y / 2).square().sum((1, 2)).mean()
    assert nst.item() == pytest.approx(gram.item(), rel=1e-10)
    assert nst.item() == pytest.approx(explicit.item(), rel=1e-10)


def test_gaussian_on_unit_vectors_is_a_function_of_the_gram():
    # On unit vectors |x - y|^2 = 2 - 2 x.y, so k = exp((x.y - 1) / sigma2).
    f_s, f_t = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    x = torch.nn.functional.normalize(f_s, dim=-1)
    y = torch.nn.functional.normalize(f_t, dim=-1)
    k = lambda a, b: torch.exp((a @ b.transpose(1, 2) - 1) / 0.6).mean((1, 2))  # noqa: E731
    want = (k(x, x) + k(y, y) - 2 * k(x, y)).mean()
    assert KF.nst_loss(f_s, f_t, "gaussian", sigma2=0.6).item() == pytest.approx(want.item(), rel=1e-10)
