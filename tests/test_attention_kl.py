"""MiniLM's attention-distribution transfer: KL(teacher ‖ student) over (B, heads, L, L) probabilities, masked.

Checked against explicit loops over each sample's unpadded tokens (tests/_masked_reference.py).
"""

import numpy as np
import pytest
import torch

import _masked_reference as R
import featkd.functional as KF
from featkd.losses import BatchContext, build_feature_loss

LENGTHS = (5, 2, 4)


def unpadded(heads, seed, lengths=LENGTHS):
    """Per sample (heads, n, n) softmax probabilities of random scores."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, n, n, generator=g, dtype=torch.float64).softmax(-1) for n in lengths]


def pad(probs, mask, seed):
    """(B, heads, L, L) as a model given the attention mask returns them: each valid query row holds the
    sample's distribution at the valid keys and 0 at padded keys; padded query rows hold garbage."""
    g = torch.Generator().manual_seed(seed)
    batch, length = mask.shape
    out = torch.rand(batch, probs[0].shape[0], length, length, generator=g, dtype=torch.float64)
    for b, p in enumerate(probs):
        valid = mask[b].nonzero().flatten()
        out[b][:, valid] = 0.0
        out[b][:, valid.unsqueeze(1), valid] = p
    return out


def numpy_list(probs):
    return [p.numpy() for p in probs]


@pytest.mark.parametrize("heads,h_s,h_t", [("match", 3, 3), ("mean", 3, 3), ("mean", 2, 4)])
def test_masked_value_equals_the_loop_over_unpadded_samples(heads, h_s, h_t):
    ps, pt = unpadded(h_s, 1), unpadded(h_t, 2)
    mask = R.random_mask(LENGTHS, 9, 3)
    got = KF.attention_kl_loss(pad(ps, mask, 4), pad(pt, mask, 5), heads=heads, mask=mask).item()
    assert got == pytest.approx(R.attention_kl(numpy_list(ps), numpy_list(pt), heads), rel=1e-12)
    alone = np.mean([KF.attention_kl_loss(s[None], t[None], heads=heads).item() for s, t in zip(ps, pt)])
    assert got == pytest.approx(alone, rel=1e-12)


@pytest.mark.parametrize("heads,h_s,h_t", [("match", 3, 3), ("mean", 2, 4)])
def test_padding_to_any_length_gives_the_same_value_and_gradient(heads, h_s, h_t):
    ps, pt = unpadded(h_s, 1), unpadded(h_t, 2)
    values, grads = [], []
    for length, seed in ((7, 10), (12, 20)):
        mask = R.random_mask(LENGTHS, length, seed)
        p_s = pad(ps, mask, seed + 1).requires_grad_(True)
        value = KF.attention_kl_loss(p_s, pad(pt, mask, seed + 2), heads=heads, mask=mask)
        value.backward()
        pairs = mask[:, None, :, None] & mask[:, None, None, :]
        assert (p_s.grad[~pairs.expand_as(p_s)] == 0).all(), "padded rows and columns get no gradient"
        values.append(value.item())
        grads.append(torch.cat([p_s.grad[b][:, m][:, :, m].flatten() for b, m in enumerate(mask)]))
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_probabilities_computed_without_the_mask_are_renormalised_over_the_valid_keys():
    # A model run without its attention mask spreads probability onto padded keys; the masked loss
    # keeps the valid keys and renormalises, which is the softmax over the valid keys' own scores.
    g = torch.Generator().manual_seed(0)
    mask = R.random_mask(LENGTHS, 8, 1)
    scores_s, scores_t = (torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = KF.attention_kl_loss(scores_s.softmax(-1), scores_t.softmax(-1), mask=mask).item()
    valid = [m.nonzero().flatten() for m in mask]
    ps = [scores_s[b][:, v.unsqueeze(1), v].softmax(-1).numpy() for b, v in enumerate(valid)]
    pt = [scores_t[b][:, v.unsqueeze(1), v].softmax(-1).numpy() for b, v in enumerate(valid)]
    assert got == pytest.approx(R.attention_kl(ps, pt), rel=1e-12)


@pytest.mark.parametrize("heads,h_s,h_t", [("match", 2, 2), ("mean", 2, 3)])
def test_gradcheck_with_a_mask(heads, h_s, h_t):
    mask = R.random_mask((3, 2), 4, 6)
    p_s = pad(unpadded(h_s, 1, (3, 2)), mask, 7).requires_grad_(True)
    p_t = pad(unpadded(h_t, 2, (3, 2)), mask, 8)
    assert torch.autograd.gradcheck(lambda p: KF.attention_kl_loss(p, p_t, heads=heads, mask=mask), (p_s,))


@pytest.mark.parametrize("heads,h_s,h_t", [("match", 3, 3), ("mean", 2, 4)])
def test_an_all_valid_mask_equals_no_mask(heads, h_s, h_t):
    p_s = torch.randn(2, h_s, 6, 6, dtype=torch.float64).softmax(-1).requires_grad_(True)
    p_t = torch.randn(2, h_t, 6, 6, dtype=torch.float64).softmax(-1)
    masked = KF.attention_kl_loss(p_s, p_t, heads=heads, mask=torch.ones(2, 6, dtype=torch.long))
    plain = KF.attention_kl_loss(p_s, p_t, heads=heads)
    assert masked.item() == pytest.approx(plain.item(), rel=1e-12)
    assert plain.item() == pytest.approx(R.attention_kl(numpy_list(p_s.detach()), numpy_list(p_t), heads), rel=1e-12)


def test_zero_teacher_probabilities_contribute_nothing_causal_masks():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    scores_s, scores_t = torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    p_s = scores_s.masked_fill(~causal, float("-inf")).softmax(-1).requires_grad_(True)
    p_t = scores_t.masked_fill(~causal, float("-inf")).softmax(-1)
    value = KF.attention_kl_loss(p_s, p_t)
    value.backward()
    assert torch.isfinite(p_s.grad).all() and (p_s.grad[..., ~causal] == 0).all()
    assert value.item() == pytest.approx(R.attention_kl(numpy_list(p_s.detach()), numpy_list(p_t)), rel=1e-12)


def test_shapes_and_masks_are_checked_in_one_line():
    p = torch.rand(2, 3, 4, 4)
    cases = [
        ((p, torch.rand(2, 4, 4, 4)), {}, "heads='match' pairs the heads one to one, but the student has 3 and the "
                                          "teacher 4; heads='mean'"),
        ((p, torch.rand(2, 3, 5, 5)), {}, "one batch and one sequence length L"),
        ((p, torch.rand(2, 3, 4)), {}, r"\(B, heads, L, L\) attention probabilities"),
        ((p, p), {"mask": torch.ones(2, 5)}, r"expected \(B, N\) = \(2, 4\)"),
        ((p, p), {"heads": "avg"}, "unknown attention heads mode 'avg'"),
    ]
    for args, options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            KF.attention_kl_loss(*args, **options)
        assert "\n" not in str(error.value)


def test_the_module_takes_the_mask_from_the_batch_context():
    mask = R.random_mask(LENGTHS, 7, 3)
    p_s, p_t = pad(unpadded(2, 1), mask, 4), pad(unpadded(4, 2), mask, 5)
    loss = build_feature_loss("attention_kl", tuple(p_s.shape), tuple(p_t.shape), heads="mean")
    assert loss(p_s, p_t, BatchContext(attention_mask=mask)).item() == pytest.approx(
        KF.attention_kl_loss(p_s, p_t, heads="mean", mask=mask).item(), rel=1e-15)
    assert loss(p_s, p_t, BatchContext()).item() == KF.attention_kl_loss(p_s, p_t, heads="mean").item()
    with pytest.raises(ValueError, match="heads='match' pairs the heads one to one"):
        build_feature_loss("attention_kl", tuple(p_s.shape), tuple(p_t.shape))
