"""A strategy is its module (Method, config section, Strategy) and a three-line command: the rest is shared."""

import argparse
from dataclasses import dataclass, field

import pytest

from featkd.commands._strategy import strategy_command
from featkd.strategies import STRATEGIES, Strategy, register


def test_the_shipped_strategies_are_registered_next_to_their_methods():
    assert {"dml", "adversarial", "born-again"} <= set(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert strategy.config.__module__ == strategy.train.__module__ == f"featkd.strategies.{name.replace('-', '_')}"


def test_a_choice_outside_the_section_s_choices_is_refused_before_anything_is_written(tmp_path, capsys):
    from featkd.cli import main

    code = main(["dml", "--config", "dml", "--run-dir", str(tmp_path / "run"), "dml.mode=ensamble"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("featkd dml: error: ")
    assert "config key 'dml.mode' must be one of 'pairwise', 'ensemble', got 'ensamble'. Did you mean 'ensemble'?" in err
    assert not (tmp_path / "run").exists()


@dataclass
class ToyConfig:
    epochs_seen: list = field(default_factory=list)
    scale: float = field(default=1.0, metadata={"above": 0})


def test_a_new_strategy_needs_only_its_strategy_and_a_command(tmp_path):
    from featkd import runs
    from featkd.engine import SupervisedMethod

    def train(run, cfg, toy):
        model = runs.build_model(cfg.model.name, cfg.model.options, run.info, run.device, False)
        optimizer, scheduler = runs.build_optimization(cfg, model.parameters())
        return runs.fit_run(run, SupervisedMethod(model, optimizer, scheduler), {})

    register(Strategy("toy-strategy", "toy", ToyConfig, train, lambda cfg, toy: cfg.model.name))
    try:
        add_arguments, run = strategy_command("toy-strategy")
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "run"),
                                  "model.name=mlp", "data.name=synthetic", "data.limit=32", "data.test_limit=16", "data.batch_size=16",
                                  "epochs=1", "toy.scale=2"])
        assert run(args) == 0
        assert "toy:\n  epochs_seen: []\n  scale: 2.0" in (tmp_path / "run" / "config.yaml").read_text()
        bad = parser.parse_args(["--config", "fmnist_teacher_wrn16_2", "--run-dir", str(tmp_path / "bad"), "toy.scale=0"])
        assert run(bad) == 2 and not (tmp_path / "bad").exists()
    finally:
        STRATEGIES.pop("toy-strategy")
    with pytest.raises(ValueError, match="already registered"):
        register(STRATEGIES["dml"])
