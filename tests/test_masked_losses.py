"""Token masks in the feature losses: a padded batch gives the loss of its unpadded samples (float64).

Each case is checked against an explicit loop over the unpadded samples (tests/_masked_reference.py) and
against featkd's own loss of each sample alone; padding the same samples to two lengths, with garbage in
the padded positions and the valid tokens at different positions, gives the same value and gradient;
gradcheck runs with a mask; an all-valid mask gives the unmasked value.
"""

from functools import partial

import numpy as np
import pytest
import torch

import _masked_reference as R
import featkd.functional as KF
from _loss_reference import k_linear, make_gaussian, make_poly

LENGTHS = (5, 2, 4)


def nst(kernel, **options):
    return partial(KF.nst_loss, kernel=kernel, **options)


# name -> (loss(f_s, f_t, mask=...), reference(student samples, teacher samples), (student, teacher) channels)
CASES = {
    "nst-linear": (nst("linear"), lambda s, t: R.nst(s, t, k_linear), (4, 3)),
    "nst-poly2-paired-auto": (nst("poly"), lambda s, t: R.nst(s, t, make_poly()), (4, 4)),
    "nst-poly2-paired-spatial": (nst("poly", route="spatial"), lambda s, t: R.nst(s, t, make_poly()), (4, 4)),
    "nst-poly2-paired-channels": (nst("poly", route="channels"), lambda s, t: R.nst(s, t, make_poly()), (4, 4)),
    "nst-poly2-unpaired-spatial": (nst("poly", route="spatial"), lambda s, t: R.nst(s, t, make_poly()), (4, 3)),
    "nst-poly2-unpaired-channels": (nst("poly", route="channels"), lambda s, t: R.nst(s, t, make_poly()), (4, 3)),
    "nst-poly3-paired": (nst("poly", degree=3, c=1.0), lambda s, t: R.nst(s, t, make_poly(3, 1.0)), (4, 4)),
    "nst-poly3-unpaired": (nst("poly", degree=3, c=1.0), lambda s, t: R.nst(s, t, make_poly(3, 1.0)), (4, 3)),
    "nst-gaussian-paired": (nst("gaussian", sigma2=1.5), lambda s, t: R.nst(s, t, make_gaussian(1.5)), (4, 4)),
    "nst-gaussian-unpaired": (nst("gaussian", sigma2=[0.5, 2.0]),
                              lambda s, t: R.nst(s, t, make_gaussian([0.5, 2.0])), (4, 3)),
    "at-official-p2": (KF.at_loss, R.at, (4, 3)),
    "at-official-p3": (partial(KF.at_loss, p=3), partial(R.at, p=3), (4, 3)),
    "at-paper-q3": (partial(KF.at_loss, mode="paper", q=3), partial(R.at, mode="paper", q=3), (4, 3)),
    "gram-spatial": (KF.gram_loss, R.gram, (4, 3)),
    "gram-spatial-normalized-channels-route": (partial(KF.gram_loss, normalize=True, route="channels"),
                                               partial(R.gram, normalize=True), (4, 3)),
    "gram-channel": (partial(KF.gram_loss, mode="channel"), partial(R.gram, mode="channel"), (4, 4)),
    "gram-channel-normalized": (partial(KF.gram_loss, mode="channel", normalize=True),
                                partial(R.gram, mode="channel", normalize=True), (4, 4)),
    "hint": (KF.hint_loss, R.hint, (4, 4)),
    "cosine": (KF.cosine_loss, R.cosine, (4, 4)),
}


def samples(channels, seed, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, n, generator=g, dtype=torch.float64) for n in lengths]


def pad(samples_, mask, seed):
    """(B, C, length): the samples' tokens, in order, at the mask's valid positions; garbage elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = 100.0 * torch.randn(len(samples_), samples_[0].shape[0], mask.shape[1], generator=g, dtype=torch.float64)
    for b, s in enumerate(samples_):
        out[b][:, mask[b]] = s
    return out


def padded_case(name, length, seed, lengths=LENGTHS):
    loss, reference, (cs, ct) = CASES[name]
    ss, st = samples(cs, 1, lengths), samples(ct, 2, lengths)
    mask = R.random_mask(lengths, length, seed)
    return loss, reference, ss, st, pad(ss, mask, seed + 1), pad(st, mask, seed + 2), mask


@pytest.mark.parametrize("name", CASES)
def test_masked_value_equals_the_loop_over_unpadded_samples(name):
    loss, reference, ss, st, f_s, f_t, mask = padded_case(name, 9, seed=3)
    got = loss(f_s, f_t, mask=mask).item()
    assert got == pytest.approx(reference([s.numpy() for s in ss], [t.numpy() for t in st]), rel=1e-12, abs=1e-15)
    alone = np.mean([loss(s[None], t[None]).item() for s, t in zip(ss, st)])
    assert got == pytest.approx(alone, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", CASES)
def test_padding_to_any_length_gives_the_same_value_and_gradient(name):
    values, grads = [], []
    for length, seed in ((7, 10), (12, 20)):
        loss, _, _, _, f_s, f_t, mask = padded_case(name, length, seed)
        f_s.requires_grad_(True)
        value = loss(f_s, f_t, mask=mask)
        value.backward()
        assert (f_s.grad.mT[~mask] == 0).all(), "padded positions get no gradient"
        values.append(value.item())
        grads.append(f_s.grad.mT[mask])  # the valid tokens' gradients, sample by sample, in order
    assert values[0] == pytest.approx(values[1], rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_with_a_mask(name):
    loss, _, _, _, f_s, f_t, mask = padded_case(name, 5, seed=4, lengths=(3, 2))
    f_s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, f_t, mask=mask), (f_s,))


@pytest.mark.parametrize("name", CASES)
def test_an_all_valid_mask_equals_no_mask(name):
    loss, _, (cs, ct) = CASES[name]
    f_s = torch.randn(3, cs, 6, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, ct, 6, dtype=torch.float64)
    attention_mask = torch.ones(3, 6, dtype=torch.long)  # a Hugging Face attention mask: 0/1 integers
    (g_masked,) = torch.autograd.grad(masked := loss(f_s, f_t, mask=attention_mask), f_s)
    (g_plain,) = torch.autograd.grad(plain := loss(f_s, f_t), f_s)
    assert masked.item() == pytest.approx(plain.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(g_masked, g_plain, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", CASES)
def test_tokens_layout_and_maps_take_the_mask_over_their_positions(name):
    loss, _, _, _, f_s, f_t, mask = padded_case(name, 6, seed=5)
    want = loss(f_s, f_t, mask=mask).item()
    assert loss(f_s.mT, f_t.mT, mask=mask, layout="tokens").item() == pytest.approx(want, rel=1e-12)
    if not name.startswith("hint"):  # hint_loss takes equal shapes of any rank; its maps are the same arithmetic
        maps = loss(f_s.unflatten(2, (2, 3)), f_t.unflatten(2, (2, 3)), mask=mask.float()).item()
        assert maps == pytest.approx(want, rel=1e-12)


def test_nst_median_bandwidth_with_a_mask_is_the_batch_median_over_valid_tokens():
    ss, st = samples(4, 1), samples(4, 2)
    sigma2 = R.batch_median_sq_dist([s.numpy() for s in ss], [t.numpy() for t in st])
    want = R.nst([s.numpy() for s in ss], [t.numpy() for t in st], make_gaussian(sigma2))
    for length, seed in ((7, 10), (12, 20)):
        mask = R.random_mask(LENGTHS, length, seed)
        for f_t in (pad(st, mask, seed + 2), pad(samples(3, 2), mask, seed + 2)):  # paired and unpaired routes
            got = KF.nst_loss(pad(ss, mask, seed + 1), f_t, "gaussian", mask=mask).item()
            if f_t.shape[1] == 4:
                assert got == pytest.approx(want, rel=1e-12)
            else:
                st3 = [t.numpy() for t in samples(3, 2)]
                s3 = R.batch_median_sq_dist([s.numpy() for s in ss], st3)
                assert got == pytest.approx(R.nst([s.numpy() for s in ss], st3, make_gaussian(s3)), rel=1e-12)


LOSSES = {"nst": KF.nst_loss, "at": KF.at_loss, "gram": KF.gram_loss, "hint": KF.hint_loss,
          "cosine": KF.cosine_loss}


@pytest.mark.parametrize("name", LOSSES)
def test_a_bad_mask_is_refused_in_one_line(name):
    loss = LOSSES[name]
    f_s, f_t = torch.randn(3, 4, 9), torch.randn(3, 4, 9)
    bad = {
        r"token mask of shape \(3, 8\) for features of shape \(3, 4, 9\) \(channels first\): expected \(B, N\) = "
        r"\(3, 9\)": torch.ones(3, 8, dtype=torch.bool),
        r"bool or holds only 0 and 1, got dtype torch.float32 with other values \(e.g. 0.5\)":
            torch.full((3, 9), 0.5),
        r"no valid token in sample\(s\) \[1\]": torch.ones(3, 9).index_fill_(0, torch.tensor([1]), 0.0),
        r"must be a \(B, N\) = \(3, 9\) tensor, got list": [[1] * 9] * 3,
    }
    for message, mask in bad.items():
        with pytest.raises(ValueError, match=message) as error:
            loss(f_s, f_t, mask=mask)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["nst", "at", "gram"])
def test_a_mask_with_resized_maps_is_refused(name):
    with pytest.raises(ValueError, match="a token mask needs student and teacher at the same positions"):
        LOSSES[name](torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), mask=torch.ones(2, 4), resize="pool")


def test_the_masked_attention_map_is_each_unpadded_sample_s_map_at_its_valid_positions():
    ss = samples(4, 1)
    mask = R.random_mask(LENGTHS, 8, 2)
    maps = KF.attention_map(pad(ss, mask, 3), 3, mask=mask)
    assert (maps[~mask] == 0).all()
    for b, s in enumerate(ss):
        np.testing.assert_allclose(maps[b][mask[b]].numpy(), R.at_map(s.numpy(), 3), rtol=1e-12)
