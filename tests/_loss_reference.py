"""Plain NumPy references for the loss tests: explicit loops over samples and channel pairs."""

import numpy as np


def unit_rows(f):
    """(C, N) rows l2-normalised; zero rows stay zero."""
    out = np.zeros_like(f)
    for i, row in enumerate(f):
        norm = np.sqrt(np.sum(row * row))
        if norm > 0:
            out[i] = row / norm
    return out


def k_linear(x, y):
    return float(np.dot(x, y))


def make_poly(degree=2, c=0.0):
    return lambda x, y: float((np.dot(x, y) + c) ** degree)


def make_gaussian(sigma2s):
    sigma2s = sigma2s if isinstance(sigma2s, (list, tuple)) else [sigma2s]
    return lambda x, y: float(sum(np.exp(-np.sum((x - y) ** 2) / (2 * s)) for s in sigma2s))


def mmd_sample(X, Y, k):
    """Biased squared MMD of two samples (rows) with kernel k, by explicit loops."""
    kxx = np.mean([[k(a, b) for b in X] for a in X])
    kyy = np.mean([[k(a, b) for b in Y] for a in Y])
    kxy = np.mean([[k(a, b) for b in Y] for a in X])
    return kxx + kyy - 2 * kxy


def nst_reference(fs, ft, k):
    """fs (B, Cs, N), ft (B, Ct, N) NumPy float64 -> batch mean of the per-sample MMD."""
    return float(np.mean([mmd_sample(unit_rows(fs[b]), unit_rows(ft[b]), k) for b in range(fs.shape[0])]))


def lower_median(values):
    v = np.sort(np.asarray(values).ravel())
    return float(v[(v.size - 1) // 2])
