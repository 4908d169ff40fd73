"""Config handling shared by the ``featkd dml`` / ``born-again`` / ``adversarial`` commands.

A strategy's config is an ordinary featkd config (``featkd.config``: data, optim, schedule,
epochs, seed, ...) plus one section of its own (``dml:``, ``born_again:``, ``adversarial:``)
checked against a dataclass schema by the same machinery, so unknown keys get the same
suggestions, and the saved ``config.yaml`` holds both. Everything else (loaders, models,
optimisers, ``fit``) comes from the engine's command helpers in ``featkd.commands.train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from featkd import checkpoint as ckpt
from featkd import config as config_lib


def load_strategy_config(args: argparse.Namespace, section: str, schema: type) -> tuple[config_lib.Config, Any, dict]:
    """The engine config, this strategy's section (a ``schema`` instance) and the whole resolved config.

    As for the engine's commands: ``--config`` plus overrides, or with ``--resume`` the run's
    own ``config.yaml`` plus overrides.
    """
    command = section.replace("_", "-")
    if args.resume:
        if not args.run_dir:
            raise config_lib.ConfigError("--resume needs --run-dir (the run to continue)")
        if args.config:
            raise config_lib.ConfigError("with --resume the config is the run's own config.yaml; drop --config "
                                         "(overrides such as epochs=30 are still applied)")
        path = Path(args.run_dir) / ckpt.CONFIG_YAML
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} does not exist; is {args.run_dir!r} a run directory "
                                    f"of 'featkd {command}'?")
    elif args.config is None:
        shipped = ", ".join(sorted(p.stem for p in config_lib.STRATEGY_CONFIG_DIR.glob("*.yaml")))
        raise config_lib.ConfigError(f"featkd {command} needs --config (e.g. --config {section}; shipped: {shipped})")
    else:
        path = args.config
    data = config_lib.apply_overrides(config_lib.read_yaml(path), args.overrides)
    section_data = data.pop(section, None) or {}
    if not isinstance(section_data, dict):
        raise config_lib.ConfigError(f"config key {section!r} must be a mapping, got {section_data!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by torchrun
        raise config_lib.ConfigError(f"featkd {command} runs in one process; it does not support torchrun/DDP yet")
    cfg = config_lib.from_dict(data)
    # the engine's schema builder (private there), so that this section reports errors the same way
    strategy_cfg = config_lib.build_dataclass(schema, section_data, section)
    resolved = {**config_lib.to_dict(cfg), section: dataclasses.asdict(strategy_cfg)}
    return cfg, strategy_cfg, resolved
