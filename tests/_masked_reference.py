"""Plain NumPy references for the masked token losses: explicit loops over each sample's unpadded tokens.

Every function takes lists of per-sample float64 arrays with only the valid tokens, (C, n_b) for
features and (heads, n_b, n_b) for attention probabilities, and returns the batch mean of the
per-sample loss. Nothing here calls featkd.
"""

import numpy as np
import torch

from _loss_reference import lower_median, mmd_sample, unit_rows


def nst(samples_s, samples_t, k):
    return float(np.mean([mmd_sample(unit_rows(s), unit_rows(t), k) for s, t in zip(samples_s, samples_t)]))


def batch_median_sq_dist(samples_s, samples_t):
    """The median heuristic over the batch: the lower median of every student-teacher channel pair's squared
    distance between unit rows, all samples together."""
    dists = []
    for s, t in zip(samples_s, samples_t):
        us, ut = unit_rows(s), unit_rows(t)
        for a in us:
            for b in ut:
                dists.append(np.sum((a - b) ** 2))
    return lower_median(dists)


def at_map(f, p):
    """(n,) channel mean of |f|^p at each token, l2-normalised."""
    a = np.array([np.mean(np.abs(f[:, j]) ** p) for j in range(f.shape[1])])
    return a / np.sqrt(np.sum(a * a))


def at(samples_s, samples_t, p=2, mode="official", q=2):
    losses = []
    for s, t in zip(samples_s, samples_t):
        diff = at_map(s, p) - at_map(t, p)
        if mode == "official":
            losses.append(np.mean(diff ** 2))
        else:
            losses.append(np.sum(np.abs(diff) ** q) ** (1.0 / q))
    return float(np.mean(losses))


def gram(samples_s, samples_t, mode="spatial", normalize=False):
    """spatial: sum over token pairs of (s_i·s_j / Cs - t_i·t_j / Ct)²; channel: sum over channel pairs of
    (s_c·s_d / n - t_c·t_d / n)²; with normalize each channel's tokens l2-normalised first."""
    losses = []
    for s, t in zip(samples_s, samples_t):
        if normalize:
            s, t = unit_rows(s), unit_rows(t)
        total = 0.0
        if mode == "spatial":
            n = s.shape[1]
            for i in range(n):
                for j in range(n):
                    total += (np.dot(s[:, i], s[:, j]) / s.shape[0] - np.dot(t[:, i], t[:, j]) / t.shape[0]) ** 2
        else:
            c, n = s.shape
            for a in range(c):
                for b in range(c):
                    total += (np.dot(s[a], s[b]) / n - np.dot(t[a], t[b]) / n) ** 2
        losses.append(total)
    return float(np.mean(losses))


def hint(samples_s, samples_t):
    """Mean over channels and valid tokens of the squared error, per sample."""
    return float(np.mean([np.mean((s - t) ** 2) for s, t in zip(samples_s, samples_t)]))


def cosine(samples_s, samples_t):
    losses = []
    for s, t in zip(samples_s, samples_t):
        per_token = [1.0 - np.dot(s[:, j], t[:, j]) / (np.linalg.norm(s[:, j]) * np.linalg.norm(t[:, j]))
                     for j in range(s.shape[1])]
        losses.append(np.mean(per_token))
    return float(np.mean(losses))


def _kl(p, q):
    """KL(p ‖ q) of two distributions given as vectors, 0·log 0 = 0."""
    return sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def attention_kl(samples_s, samples_t, heads="match"):
    """Per sample: mean over heads and query rows of KL(teacher row ‖ student row), each row renormalised
    over the sample's tokens; heads="mean" averages each side's rows over its heads first."""
    losses = []
    for s, t in zip(samples_s, samples_t):
        s = s / s.sum(-1, keepdims=True)
        t = t / t.sum(-1, keepdims=True)
        if heads == "mean":
            s, t = s.mean(0, keepdims=True), t.mean(0, keepdims=True)
        rows = [_kl(t[h, i], s[h, i]) for h in range(s.shape[0]) for i in range(s.shape[1])]
        losses.append(np.mean(rows))
    return float(np.mean(losses))


def random_mask(lengths, length, seed):
    """(B, length) bool test masks: each sample's valid tokens at sorted random positions (left, right or inner
    padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, torch.randperm(length, generator=g)[:n]] = True
    return mask
