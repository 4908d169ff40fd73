"""Ensembles of networks: the averaged softmax that DML evaluates with its peers and BAN with its generations,
and that `featkd eval` rebuilds from a checkpoint (:func:`featkd.checkpoint.model_from_checkpoint`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from featkd.model_outputs import logits_of


class ProbabilityAverage(nn.Module):
    """The ensemble that averages its members' softmax outputs.

    ``forward`` returns the log of the averaged probabilities, so that it can stand where
    logits are expected: its argmax is the ensemble's prediction and cross-entropy on it is
    the ensemble's negative log-likelihood (softmax of a log-probability vector is that
    vector's probabilities). A member may return any output :func:`featkd.model_outputs.logits_of` reads (a
    ``ModelOutput``, a dict). The members are not copied: the ensemble follows their training.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ValueError("ProbabilityAverage needs at least one member network, got none.")
        self.members = nn.ModuleList(members)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # every member is called as the ensemble is (a Hugging Face model by keyword); the classes are the last
        # dimension of each member's logits, (B, classes) or per token (B, L, vocabulary)
        log_probs = torch.stack([torch.log_softmax(logits_of(m(*args, **kwargs)), dim=-1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
