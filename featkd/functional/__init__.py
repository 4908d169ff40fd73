"""Every featkd loss as a pure function: ``loss(student, teacher, ...) -> scalar`` (batch mean).

Feature losses take (B, C, H, W) maps, (B, C, N) flattened maps or (B, N, C) tokens
(``layout="tokens"``), and the token losses an optional (B, N) ``mask`` of valid positions
(:mod:`featkd.functional._masks`); ``attention_kl_loss`` takes (B, heads, L, L) attention
probabilities; logit losses take (B, num_classes) logits. Loss weights are the caller's.
"""

from .attention import AT_MODES, at_loss, attention_map
from .attention_kl import HEAD_MODES, attention_kl_loss
from .gram import GRAM_MODES, fsp_loss, fsp_matrix, gram_loss
from .hint import cosine_loss, hint_loss
from .logits import (
    UNLABELED,
    cross_entropy,
    dml_kl_loss,
    kd_ce_loss,
    kd_loss,
    logit_mse_loss,
    soft_ce_mse_loss,
    sym_kl_loss,
)
from .nst import KERNELS, median_bandwidth, nst_loss, register_kernel, spatial_gram_distance
from .similarity import similarity_matrix, sp_loss

__all__ = [
    "AT_MODES",
    "GRAM_MODES",
    "HEAD_MODES",
    "KERNELS",
    "UNLABELED",
    "at_loss",
    "attention_kl_loss",
    "attention_map",
    "cosine_loss",
    "cross_entropy",
    "dml_kl_loss",
    "fsp_loss",
    "fsp_matrix",
    "gram_loss",
    "hint_loss",
    "kd_ce_loss",
    "kd_loss",
    "logit_mse_loss",
    "median_bandwidth",
    "nst_loss",
    "register_kernel",
    "similarity_matrix",
    "soft_ce_mse_loss",
    "sp_loss",
    "spatial_gram_distance",
    "sym_kl_loss",
]
