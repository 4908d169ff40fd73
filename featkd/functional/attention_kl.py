"""Self-attention distribution transfer (MiniLM, Wang et al. 2020): KL(teacher ‖ student) per query row.

The inputs are attention probabilities (B, heads, L, L), indexed [sample, head, query, key], each
query row a distribution over the keys: what a Hugging Face model returns as ``attentions`` when
called with ``output_attentions=True`` (with the eager attention implementation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._masks import check_mask, masked_mean
from .shapes import check_choice, full_precision

HEAD_MODES = ("match", "mean")


def check_attention_shapes(student_shape, teacher_shape, heads: str) -> None:
    """A ValueError of one line unless the two shapes are (B, heads, L, L) attention maps the mode can compare."""
    check_choice("attention heads mode", heads, HEAD_MODES)
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != 4 or len(t) != 4 or s[2] != s[3] or t[2] != t[3]:
        raise ValueError(f"attention_kl compares (B, heads, L, L) attention probabilities, got student {s} and "
                         f"teacher {t}")
    if s[0] != t[0] or s[2] != t[2]:
        raise ValueError(f"attention_kl needs one batch and one sequence length L: student {s}, teacher {t}")
    if heads == "match" and s[1] != t[1]:
        raise ValueError(f"attention_kl heads='match' pairs the heads one to one, but the student has {s[1]} and "
                         f"the teacher {t[1]}; heads='mean' compares the head-averaged distributions")


def _valid_rows(p: Tensor, pairs: Tensor) -> Tensor:
    """p with padded queries and keys set to zero and each remaining row renormalised over its valid keys."""
    p = torch.where(pairs, p, 0.0)
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, 1.0)


@full_precision
def attention_kl_loss(p_s: Tensor, p_t: Tensor, *, heads: str = "match", mask: Tensor | None = None) -> Tensor:
    """MiniLM's attention transfer: KL(teacher ‖ student) between self-attention distributions.

    Per sample, the mean of KL(p_t[h, i, :] ‖ p_s[h, i, :]) over heads h and query rows i; then the
    batch mean. The teacher is a fixed target (detached).

    * ``heads="match"``: student head h against teacher head h (MiniLM; equal head counts).
      ``heads="mean"``: each side's distributions averaged over its heads first (still distributions),
      one KL per query row; the head counts may differ. Re-splitting heads to a common count
      (MiniLMv2) needs the queries and keys, not the probabilities, and is not offered here.
    * ``mask``: optional (B, L) token mask (True or 1 = valid token), the same for queries and keys.
      Padded query rows are left out (the mean over rows runs over the sample's valid tokens);
      padded key columns are dropped and each row renormalised over the valid keys. A Hugging
      Face model called with its attention mask gives padded keys zero probability already (the
      dtype's minimum added to their scores underflows in the softmax), so there the renormalisation
      divides by 1 up to rounding; for probabilities computed without the mask it gives exactly the
      softmax over the valid keys of the same scores. Padded entries get no gradient; with an all-valid
      mask the value is the unmasked one, the gradient differs from it by a constant per row (the
      renormalisation's), which the backward of the softmax that made the row removes.
    * An entry where the teacher's probability is 0 contributes 0 (0·log 0 = 0: causal masks); a
      student probability of 0 where the teacher's is positive makes the loss infinite.
    """
    check_attention_shapes(p_s.shape, p_t.shape, heads)
    q_t = p_t.detach()
    if mask is not None:
        batch, _, length, _ = p_s.shape
        mask = check_mask(mask, (batch, length), "attention_kl_loss").to(p_s.device)
        pairs = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(1)  # (B, 1, query, key)
        p_s, q_t = _valid_rows(p_s, pairs), _valid_rows(q_t, pairs)
    if heads == "mean":
        p_s, q_t = p_s.mean(1, keepdim=True), q_t.mean(1, keepdim=True)
    teacher_positive = q_t > 0
    log_ratio = torch.where(teacher_positive, q_t, 1.0).log() - torch.where(teacher_positive, p_s, 1.0).log()
    row_kl = (q_t * log_ratio).sum(-1).mean(1)  # (B, L): per query row, mean over heads
    return masked_mean(row_kl, mask).mean()
