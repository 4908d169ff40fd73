"""The token-loss modules read the batch's token mask from BatchContext.attention_mask."""

import numpy as np
import pytest
import torch

from featkd.layouts import Layout, mask_to_channels_first, to_channels_first
from featkd.losses import BatchContext, build_feature_loss

LENGTHS = (5, 2, 4)
# name -> (options, student channels, teacher channels)
MODULES = {
    "nst": ({"kernel": "poly"}, 4, 4),
    "nst-gaussian": ({"kernel": "gaussian", "sigma2": 1.0}, 4, 3),
    "at": ({}, 4, 3),
    "gram": ({"mode": "channel"}, 4, 4),
    "hint": ({}, 3, 5),  # a linear regressor from 3 to 5 channels, one token at a time
    "cosine": ({}, 4, 4),
}


def padded(channels, length, seed):
    """The same per-sample tokens (C, n) for any seed, at random valid positions of a garbage-filled (B, C, length)."""
    g = torch.Generator().manual_seed(channels)
    tokens = [torch.randn(channels, n, generator=g, dtype=torch.float64) for n in LENGTHS]
    g.manual_seed(seed)
    mask = torch.zeros(len(LENGTHS), length, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        mask[b, torch.randperm(length, generator=g)[:n]] = True
    out = 100.0 * torch.randn(len(LENGTHS), channels, length, generator=g, dtype=torch.float64)
    for b, t in enumerate(tokens):
        out[b][:, mask[b]] = t
    return tokens, out, mask


def build(name, length):
    options, cs, ct = MODULES[name]
    torch.manual_seed(0)  # the hint regressor's initial weights
    return build_feature_loss(name.split("-")[0], (3, cs, length), (3, ct, length), **options).double(), cs, ct


@pytest.mark.parametrize("name", MODULES)
def test_a_module_with_the_context_mask_gives_the_loss_of_the_unpadded_samples(name):
    values, grads = [], []
    for length, seed in ((7, 1), (11, 2)):
        loss, cs, ct = build(name, length)
        tokens_s, f_s, mask = padded(cs, length, seed)
        tokens_t, f_t, _ = padded(ct, length, seed)
        f_s.requires_grad_(True)
        value = loss(f_s, f_t, BatchContext(attention_mask=mask))
        value.backward()
        assert (f_s.grad.mT[~mask] == 0).all()
        values.append(value.item())
        grads.append(f_s.grad.mT[mask])
        alone = np.mean([loss(s[None], t[None]).item() for s, t in zip(tokens_s, tokens_t)])
        assert value.item() == pytest.approx(alone, rel=1e-12)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", MODULES)
def test_without_a_mask_a_module_gives_what_it_gave_before(name):
    loss, cs, ct = build(name, 6)
    f_s, f_t = torch.randn(3, cs, 6, dtype=torch.float64), torch.randn(3, ct, 6, dtype=torch.float64)
    plain = loss(f_s, f_t)
    assert loss(f_s, f_t, BatchContext(torch.zeros(3), 4)).item() == plain.item()
    assert loss(f_s, f_t, BatchContext(attention_mask=torch.ones(3, 6, dtype=torch.long))).item() == pytest.approx(
        plain.item(), rel=1e-12)


def test_a_mask_that_does_not_fit_the_view_names_the_mapping():
    loss, _, _ = build("nst", 6)
    with pytest.raises(ValueError, match=r"expected \(B, N\) = \(3, 6\).*mask_to_channels_first"):
        loss(torch.randn(3, 4, 6), torch.randn(3, 4, 6), BatchContext(attention_mask=torch.ones(3, 7)))


def test_hint_refuses_a_mask_with_a_regressor_that_mixes_positions():
    loss = build_feature_loss("hint", (2, 3, 6), (2, 5, 6), batch_norm=True)
    f_s, f_t = torch.randn(2, 3, 6), torch.randn(2, 5, 6)
    loss(f_s, f_t)  # fine without a mask
    with pytest.raises(ValueError, match="acts on each position alone .* has batch_norm=True, kernel_size=1"):
        loss(f_s, f_t, BatchContext(attention_mask=torch.ones(2, 6)))


def test_mask_to_channels_first_selects_the_tokens_the_layout_selects():
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0]])
    tokens = torch.randn(2, 7, 3)  # (B, L, C): one prefix token, then a 2x3 grid
    layouts = [Layout("NLC", prefix_tokens=1, grid=(2, 3)), Layout("NLC", prefix_tokens=1, tokens="all"),
               Layout("NLC", prefix_tokens=1, tokens="prefix"), "tokens"]
    for layout, want in zip(layouts, [mask[:, 1:], mask, mask[:, :1], mask]):
        view = to_channels_first(tokens, layout)
        got = mask_to_channels_first(mask, layout)
        assert torch.equal(got, want) and got.shape == (2, view[0, 0].numel())
    assert torch.equal(mask_to_channels_first(mask.view(2, 1, 7), "NHWC"), mask)
    assert torch.equal(mask_to_channels_first(mask, "NCL"), mask)
