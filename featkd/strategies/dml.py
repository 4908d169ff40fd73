"""Deep Mutual Learning (Zhang, Xiang, Hospedales and Lu, CVPR 2018).

K >= 2 peer networks are trained together from scratch. Peer k minimises its own
cross-entropy plus a mimicry term towards the others' current predictions:

* ``mode="pairwise"`` (the paper's Eq. 10):  L_k = CE_k + 1/(K-1) * sum_{l != k} KL(p_l || p_k)
* ``mode="ensemble"`` (the paper's DML_e):   L_k = CE_k + KL(p_avg || p_k),  p_avg = mean_{l != k} p_l

The peers are updated one after the other within a step, as in the paper's Algorithm 1:
predictions of all peers are computed, peer 1 is updated, its prediction is recomputed,
peer 2 is updated against the already-updated peer 1, and so on. Optional feature terms
(AT, NST, ... from ``featkd.losses``) pull peer k's captured features towards every other
peer's detached features at the same layers, through the adapters and losses a Distiller
builds for a :class:`featkd.Term` (so peers of different widths get an adapter where the loss needs one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from featkd.batches import IMAGES, BatchFormat
from featkd.config import ModelConfig
from featkd.engine import MethodBase, Precision
from featkd.functional import cross_entropy, dml_kl_loss, kd_loss
from featkd.hooks import FeatureExtractor
from featkd.layer_info import describe_features
from featkd.layer_specs import resolve_layers
from featkd.losses import BatchContext
from featkd.model_outputs import logits_of, token_rows
from featkd.models.ensemble import ProbabilityAverage
from featkd.strategies.registry import Strategy, register
from featkd.terms import Term, build_term_pairs, call_loss, view, with_mask

MODES = ("pairwise", "ensemble")


def mutual_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], mode: str = "pairwise",
                temperature: float = 1.0) -> torch.Tensor:
    """DML's mimicry term for one peer: how far ``logits`` is from the other peers' predictions.

    ``peer_logits`` are the other peers' logits (targets: they are detached here). ``pairwise``
    averages featkd's ``dml_kl_loss`` = KL(p_l || p_k) over the peers (the ``sym_kl`` logit loss
    with ``one_sided=True``); ``ensemble`` takes ``kd_loss`` towards the averaged probabilities.
    Both are means over the batch times T^2; at T = 1 they are the paper's terms.
    """
    if mode not in MODES:
        raise ValueError(f"unknown DML mode {mode!r}; expected one of {MODES}.")
    if len(peer_logits) < 1:
        raise ValueError("mutual_loss needs the logits of at least one other peer, got none.")
    if mode == "pairwise":
        return sum(dml_kl_loss(logits, p, T=temperature) for p in peer_logits) / len(peer_logits)
    # log of the averaged tempered probabilities stands in for the teacher's logits: softmax(log q / T) ...
    # would re-temper it, so average at temperature T and hand over log(q) * T, whose softmax at T is q.
    log_q = torch.stack([torch.log_softmax(p.detach() / temperature, dim=1) for p in peer_logits])
    log_avg = torch.logsumexp(log_q, dim=0) - math.log(len(peer_logits))
    return kd_loss(logits, log_avg * temperature, T=temperature)


@dataclass
class PeerTermConfig:
    """A feature-transfer term between DML peers, as the ``dml.terms`` config gives it: ``loss`` (a
    :func:`featkd.losses.build_feature_loss` name with ``options``) at ``layers``.

    ``layers`` are capture specs (globs allowed) naming the same layers in every peer. Each layer and
    each pair of peers becomes a :class:`featkd.Term` from peer k's feature (with gradient) to peer l's
    (detached), built as the Distiller builds its terms (adapters included); the term's value is the
    sum over the layers, averaged over the other peers l, times ``weight``. (A Distiller's terms are
    :class:`featkd.Term`; their config form is :class:`featkd.config.TermConfig`.)
    """

    loss: str = "at"
    layers: list[str] = field(default_factory=list)
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@contextlib.contextmanager
def preserved_norm_statistics(model: nn.Module):
    """Run an extra forward without moving the batch-norm running statistics.

    DML recomputes an updated peer's prediction on the same batch; in training mode that
    forward would update the running mean/var a second time for the same batch.
    """
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])


class DeepMutualLearning(MethodBase):
    """A ``featkd.engine`` Method training K peers with mutual learning.

    ``peers`` and ``optimizers`` are parallel sequences; ``schedulers`` (optional) are stepped
    in ``on_epoch_end``. ``ce_weight`` and ``mimicry_weight`` scale the two parts of L_k (1 and 1
    in the paper). ``terms`` are feature-transfer terms between peers; they need
    ``example_input`` (one batch, for a dry-run forward that gives the feature shapes).
    ``precision`` (featkd.engine.Precision) gives autocast and gradient scaling. ``batch_format``
    (:class:`featkd.BatchFormat`) says how the peers are called on a batch and where its token mask is: with
    per-token logits the cross-entropy and the mimicry run over the valid tokens, and the feature terms
    leave padding out.
    """

    def __init__(self, peers: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 schedulers: Sequence | None = None, mode: str = "pairwise", temperature: float = 1.0,
                 ce_weight: float = 1.0, mimicry_weight: float = 1.0, terms: Sequence[PeerTermConfig] = (),
                 example_input=None, precision: Precision | None = None, batch_format: BatchFormat = IMAGES):
        if len(peers) < 2:
            raise ValueError(f"Deep Mutual Learning needs at least 2 peers, got {len(peers)}.")
        if len(optimizers) != len(peers):
            raise ValueError(f"got {len(peers)} peers but {len(optimizers)} optimizers; give one optimizer per peer.")
        if schedulers is not None and len(schedulers) != len(peers):
            raise ValueError(f"got {len(peers)} peers but {len(schedulers)} schedulers; give one per peer or none.")
        if mode not in MODES:
            raise ValueError(f"unknown DML mode {mode!r}; expected one of {MODES}.")
        # fit logs the first peer's learning rate
        super().__init__(optimizers[0], schedulers if schedulers is not None else [], precision)
        self.peers = list(peers)
        self.optimizers = list(optimizers)
        self.mode, self.temperature = mode, temperature
        self.batch_format = batch_format
        self.ce_weight, self.mimicry_weight = ce_weight, mimicry_weight
        for term in terms:
            if not term.layers:
                raise ValueError(f"DML feature term {term.loss!r} names no layers; give layers=[...] "
                                 "(e.g. ['layer1', 'layer2', 'layer3']; 'featkd layers <model>' lists them).")
        self.terms = [PeerTermConfig(t.loss, resolve_layers(self.peers[0], t.layers), t.weight, t.options)
                      for t in terms]
        losses = [t.loss for t in self.terms]
        # the key of each term in the logged losses: its loss name, numbered when a loss is used twice
        self.term_keys = [t.loss if losses.count(t.loss) == 1 else f"{t.loss}:{i}" for i, t in enumerate(self.terms)]
        self.layers = list(dict.fromkeys(layer for term in self.terms for layer in term.layers))
        # pairs[(k, l, term index, layer)] -> (adapter, loss) from peer k (the learner) to peer l (the target),
        # built as the Distiller builds a Term's pairs; term_modules holds them in a fixed order for checkpoints
        self.pairs: dict[tuple[int, int, int, str], nn.ModuleList] = {}
        self.term_modules = nn.ModuleList()
        self.pair_layouts: dict[tuple[int, int, int, str], tuple] = {}  # each side's layout, resolved at the dry run
        if self.terms:
            if example_input is None:
                raise ValueError("DML feature terms need example_input (one batch) to learn the feature shapes.")
            self._build_term_pairs(example_input)
        self.extractors = [FeatureExtractor(p, self.layers) for p in self.peers] if self.layers else []
        self.ensemble = ProbabilityAverage(self.peers)

    def _build_term_pairs(self, example_input) -> None:
        model_input = self.batch_format.model_input(example_input)
        features = [describe_features(peer, self.layers, model_input) for peer in self.peers]
        device = next(self.peers[0].parameters()).device
        for k in range(len(self.peers)):
            learned = []  # adapters and loss parameters (e.g. a FitNets regressor) learn with peer k
            for l in range(len(self.peers)):
                if l == k:
                    continue
                for i, term in enumerate(self.terms):
                    for layer in term.layers:
                        between = Term(layer, loss=term.loss, options=term.options,
                                       name=f"{self.term_keys[i]}:{layer} from peer{k} to peer{l}")
                        built = build_term_pairs(between, features[k], features[l], device)
                        pair = self.pairs[(k, l, i, layer)] = nn.ModuleList([built.adapters[0], built.losses[0]])
                        self.pair_layouts[(k, l, i, layer)] = (built.student_layouts[0], built.teacher_layouts[0])
                        self.term_modules.append(pair)
                        learned += list(pair.parameters())
            if learned:
                self.optimizers[k].add_param_group({"params": learned})

    def _forward(self, k: int, x):
        """Peer k's logits and captured features on batch ``x``."""
        with self.precision.autocast():
            if self.extractors:
                output, features = self.batch_format.call(self.extractors[k], x)
            else:
                output, features = self.batch_format.call(self.peers[k], x), {}
        return logits_of(output), features

    def _pair_loss(self, k: int, l: int, i: int, layer: str, feats, target_feats, context, mask) -> torch.Tensor:
        """Term ``i``'s loss at ``layer`` from peer k's feature (adapted) to peer l's; ``mask``: the batch's token mask."""
        adapter, loss = self.pairs[(k, l, i, layer)]
        own, target = self.pair_layouts[(k, l, i, layer)]
        return call_loss(loss, adapter(view(feats[layer], own)), view(target_feats[layer], target),
                         with_mask(context, mask, own))

    def train_step(self, x, y: torch.Tensor, step: int, indices=None) -> dict[str, float]:
        """One DML step (Algorithm 1): update peers 0..K-1 in order, each against the current others."""
        for peer in self.peers:
            peer.train()
        mask = self.batch_format.mask_of(x)
        # Every peer's prediction with its graph; a peer l > k is not updated before its own turn,
        # so its graph stays valid until then.
        outputs = [self._forward(k, x) for k in range(len(self.peers))]
        targets = [(logits.detach(), {n: f.detach() for n, f in feats.items()}) for logits, feats in outputs]
        metrics: dict[str, float] = {}
        context = BatchContext(y, step)
        for k, (logits, feats) in enumerate(outputs):
            others = [l for l in range(len(self.peers)) if l != k]
            with self.precision.autocast():
                rows, y_rows = token_rows(logits, mask, y)  # per token: the valid ones only
                ce = cross_entropy(rows, y_rows)
                mimicry = mutual_loss(rows.float(), [token_rows(targets[l][0], mask)[0].float() for l in others],
                                      self.mode, self.temperature)
                loss = self.ce_weight * ce + self.mimicry_weight * mimicry
                metrics[f"peer{k}/ce"] = ce.item()
                metrics[f"peer{k}/mimicry"] = mimicry.item()
                for i, term in enumerate(self.terms):
                    term_value = sum(self._pair_loss(k, l, i, layer, feats, targets[l][1], context, mask)
                                     for l in others for layer in term.layers) / len(others)
                    loss = loss + term.weight * term_value
                    metrics[f"peer{k}/{self.term_keys[i]}"] = term_value.item()
            metrics[f"peer{k}/total"] = loss.item()
            self.precision.backward_step(loss, self.optimizers[k])
            if k < len(self.peers) - 1:
                # the peers after k learn from k's updated prediction (Algorithm 1)
                with torch.no_grad(), preserved_norm_statistics(self.peers[k]):
                    new_logits, new_feats = self._forward(k, x)
                targets[k] = (new_logits, new_feats)
        return metrics

    def eval_models(self) -> dict[str, nn.Module]:
        """Every peer by name, and the peers' ensemble (averaged softmax)."""
        models = {f"peer{k}": peer for k, peer in enumerate(self.peers)}
        models["ensemble"] = self.ensemble
        return models

    def state_parts(self) -> dict:
        return {"peers": self.peers, "optimizers": self.optimizers, "schedulers": self.schedulers,
                "precision": self.precision, "term_losses": self.term_modules}


@dataclass
class DMLConfig:
    """The ``dml:`` section: the peers (one model config each), the mimicry form and peer feature terms.

    ``mode``: ``pairwise`` (1/(K-1) sum of KL(p_l || p_k)) or ``ensemble`` (DML_e, KL(p_avg || p_k)).
    ``terms``: ``{loss, layers, weight, options}`` feature terms between every pair of peers.
    """

    peers: list[ModelConfig] = field(default_factory=lambda: [ModelConfig(), ModelConfig()])
    mode: str = field(default="pairwise", metadata={"choices": MODES})
    temperature: float = 1.0
    ce_weight: float = 1.0
    mimicry_weight: float = 1.0
    terms: list[PeerTermConfig] = field(default_factory=list)


def _check(cfg, dml: DMLConfig) -> None:
    from featkd.config import ConfigError

    if len(dml.peers) < 2:
        raise ConfigError(f"dml.peers must list at least 2 models, got {len(dml.peers)}")


def _train(run, cfg, dml: DMLConfig) -> list[dict]:
    """``featkd dml``: the peers built from the config and trained together in ``run``."""
    from featkd import runs
    from featkd.checkpoint import ensemble_record, model_record

    peers = [runs.build_model(p.name, p.options, run.info, run.device, cfg.channels_last) for p in dml.peers]
    optimization = [runs.build_optimization(cfg, peer.parameters()) for peer in peers]
    method = DeepMutualLearning(peers, [o for o, _ in optimization], [s for _, s in optimization], mode=dml.mode,
                                temperature=dml.temperature, ce_weight=dml.ce_weight,
                                mimicry_weight=dml.mimicry_weight, terms=dml.terms,
                                example_input=run.example() if dml.terms else None,
                                precision=Precision(cfg.amp, run.device), batch_format=run.batch_format)
    records = {f"peer{k}": model_record(p.name, p.options, run.info) for k, p in enumerate(dml.peers)}
    records["ensemble"] = ensemble_record(list(records.values()))  # the peers' averaged softmax, in order
    return runs.fit_run(run, method, records)


register(Strategy("dml", "dml", DMLConfig, _train, lambda cfg, dml: dml.peers[0].name, _check))
