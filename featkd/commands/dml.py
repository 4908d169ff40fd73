"""``featkd dml``: Deep Mutual Learning of K peers (see :mod:`featkd.strategies.dml`).

    featkd dml --config dml --run-dir runs/dml epochs=10 dml.mode=ensemble
    featkd dml --run-dir runs/dml --resume
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from featkd import runs
from featkd.checkpoint import ensemble_record, model_record
from featkd.commands._common import add_run_arguments, finished, reports_user_errors
from featkd.config import ConfigError, ModelConfig
from featkd.strategies.dml import MODES, DeepMutualLearning, PeerTermConfig


@dataclass
class DMLConfig:
    """The ``dml:`` section: the peers (one model config each), the mimicry form and peer feature terms.

    ``mode``: ``pairwise`` (1/(K-1) sum of KL(p_l || p_k)) or ``ensemble`` (DML_e, KL(p_avg || p_k)).
    ``terms``: ``{loss, layers, weight, options}`` feature terms between every pair of peers.
    """

    peers: list[ModelConfig] = field(default_factory=lambda: [ModelConfig(), ModelConfig()])
    mode: str = "pairwise"
    temperature: float = 1.0
    ce_weight: float = 1.0
    mimicry_weight: float = 1.0
    terms: list[PeerTermConfig] = field(default_factory=list)


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import Precision

    cfg, dml, resolved = runs.load_strategy_config("dml", DMLConfig, args.config, args.run_dir, args.resume,
                                                   args.overrides)
    if dml.mode not in MODES:
        raise ConfigError(f"dml.mode must be one of {MODES}, got {dml.mode!r}")
    if len(dml.peers) < 2:
        raise ConfigError(f"dml.peers must list at least 2 models, got {len(dml.peers)}")
    with runs.start_run(cfg, "dml", dml.peers[0].name, args.run_dir, args.resume, resolved) as run:
        peers = [runs.build_model(p.name, p.options, run.info, run.device, cfg.channels_last) for p in dml.peers]
        optimization = [runs.build_optimization(cfg, peer.parameters()) for peer in peers]
        example = next(iter(run.train_loader))[0][:2] if dml.terms else None
        method = DeepMutualLearning(peers, [o for o, _ in optimization], [s for _, s in optimization], mode=dml.mode,
                                    temperature=dml.temperature, ce_weight=dml.ce_weight,
                                    mimicry_weight=dml.mimicry_weight, terms=dml.terms, example_input=example,
                                    precision=Precision(cfg.amp, run.device))
        records = {f"peer{k}": model_record(p.name, p.options, run.info) for k, p in enumerate(dml.peers)}
        records["ensemble"] = ensemble_record(list(records.values()))  # the peers' averaged softmax, in order
        history = runs.fit_run(run, method, records)
    return finished(run, history)
