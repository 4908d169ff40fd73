"""``featkd dml``: Deep Mutual Learning of K peers (see featkd.strategies.dml)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from featkd.config import ModelConfig
from featkd.engine import Precision, fit, resolve_device, seed_everything
from featkd.strategies.dml import DeepMutualLearning, PeerTerm
from featkd.strategies.runner import (add_run_arguments, build_loaders, build_model, build_optimization,
                                      load_strategy_config, model_info)


@dataclass
class DMLConfig:
    """The ``dml:`` section: the peers (one model config each), the mimicry form and peer feature terms."""

    peers: list[ModelConfig] = field(default_factory=lambda: [ModelConfig(), ModelConfig()])
    mode: str = "pairwise"
    temperature: float = 1.0
    ce_weight: float = 1.0
    mimicry_weight: float = 1.0
    terms: list[PeerTerm] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "dml")


def run(args: argparse.Namespace) -> int:
    cfg, dml, resolved = load_strategy_config(args, "dml", DMLConfig)
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    peers = [build_model(peer, info, device) for peer in dml.peers]
    optimization = [build_optimization(peer.parameters(), cfg) for peer in peers]
    example = next(iter(test_loader))[0][:2] if dml.terms else None
    method = DeepMutualLearning(peers, [o for o, _ in optimization], [s for _, s in optimization], mode=dml.mode,
                                temperature=dml.temperature, ce_weight=dml.ce_weight,
                                mimicry_weight=dml.mimicry_weight, terms=dml.terms, example_input=example,
                                precision=Precision(cfg.amp, device))
    fit(method, train_loader, test_loader, args.run_dir, cfg.epochs, resume=args.resume, config=resolved,
        model_info={f"peer{k}": model_info(peer, info) for k, peer in enumerate(dml.peers)}, device=device,
        channels_last=cfg.channels_last)
    return 0
