import pytest
import yaml

from featkd.config import (CONFIG_DIR, Config, ConfigError, WarmupConfig, apply_overrides, from_dict, load_config,
                           to_dict)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, """
epochs: 3
model: {name: wrn16_2}
terms:
  - {teacher: group3, student: group3, loss: nst, weight: 50, options: {kernel: poly}}
  - {teacher: [group1, group2], loss: fsp, weight: {value: 10, epochs: 2}}
kd: {loss: kd, weight: 16, options: {T: 4}}
""")
    cfg = load_config(path, ["optim.lr=1e-3", "schedule.milestones=[2, 3]", "terms.0.weight=25", "data.limit=100",
                             "amp=bf16", "data.extra_unlabeled.name=synthetic"])
    assert cfg.epochs == 3 and cfg.model.name == "wrn16_2"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.milestones == [2, 3]
    assert cfg.terms[0].weight == 25.0 and cfg.terms[0].options == {"kernel": "poly"}
    assert cfg.terms[1].teacher == ["group1", "group2"] and cfg.terms[1].student is None
    assert cfg.terms[1].weight == WarmupConfig(value=10.0, epochs=2.0)
    assert cfg.kd.options == {"T": 4} and cfg.amp == "bf16" and cfg.data.limit == 100
    assert cfg.data.extra_unlabeled.name == "synthetic" and cfg.data.extra_unlabeled.limit is None
    # the resolved config round-trips through YAML
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    assert load_config(path, ["kd=null"]).kd is None


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'. Did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'. Did you mean 'epochs'"):
        from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match=r"'terms.0.wieght'. Did you mean 'terms.0.weight'"):
        from_dict({"terms": [{"teacher": "group3", "wieght": 3}]})
    with pytest.raises(ConfigError, match=r"'terms.0.weight.valeu'. Did you mean 'terms.0.weight.value'"):
        from_dict({"terms": [{"teacher": "group3", "weight": {"valeu": 3}}]})


@pytest.mark.parametrize("override, message", [
    ("epochs=ten", r"'epochs' expects int, got str 'ten'"),
    ("epochs=2.5", r"'epochs' expects int, got float"),
    ("optim.lr=fast", r"'optim.lr' expects float"),
    ("channels_last=1", r"'channels_last' expects bool, got int"),
    ("schedule.milestones=60", r"'schedule.milestones' expects a list of int"),
    ("schedule.milestones=[60, x]", r"'schedule.milestones.1' expects int"),
    ("data=3", r"'data' expects a mapping \(DataConfig\)"),
])
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="'terms.3'.*2 items"):
        apply_overrides({"terms": [{}, {}]}, ["terms.3.weight=1"])


def test_overrides_do_not_touch_the_input():
    data = {"optim": {"lr": 0.1}}
    assert apply_overrides(data, ["optim.lr=0.2", "data.batch_size=64"]) == {
        "optim": {"lr": 0.2}, "data": {"batch_size": 64}}
    assert data == {"optim": {"lr": 0.1}}


def test_defaults_are_the_papers_cifar_schedule():
    cfg = Config()
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.data.batch_size) == (
        200, 0.1, 0.9, 5e-4, 128)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == ("multistep", [60, 120, 160], 0.2)


def test_shipped_configs_parse_and_can_be_named_without_path():
    shipped = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        load_config(path)
    assert load_config(shipped[0].stem) == load_config(shipped[0])
    with pytest.raises(FileNotFoundError, match="Did you mean"):
        load_config(shipped[0].stem[:-1] + "x")


def test_one_resolver_finds_the_engine_and_the_strategy_configs():
    from featkd.config import STRATEGY_CONFIG_DIR, resolve_config_path

    assert resolve_config_path("dml") == STRATEGY_CONFIG_DIR / "dml.yaml"
    assert resolve_config_path("fmnist_teacher_wrn16_2") == CONFIG_DIR / "fmnist_teacher_wrn16_2.yaml"
    with pytest.raises(FileNotFoundError, match="Did you mean: born_again"):
        resolve_config_path("born_agian")


@pytest.mark.parametrize("name", ["cifar10_teacher_wrn16_2", "cifar10_at_wrn16_1_from_wrn16_2"])
def test_cifar_configs_follow_the_official_at_code(name):
    cfg = load_config(name)
    assert (cfg.data.pad, cfg.data.pad_mode, cfg.data.flip, cfg.data.batch_size) == (4, "reflect", True, 128)
    assert not cfg.data.drop_last
    assert (cfg.model or cfg.student).options == {"bn_init": "uniform"}
    assert (cfg.epochs, cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == (200, "multistep",
                                                                                          [59, 119, 159], 0.2)
    assert cfg.schedule.restart_momentum_at_milestones and not cfg.optim.nesterov


def test_no_shipped_config_or_documented_command_loads_a_teachers_best_pt():
    # best.pt is the epoch with the best test accuracy: a teacher chosen that way selects on the test set.
    import re
    from pathlib import Path

    configs = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        assert "best.pt" not in path.read_text(), path  # values and the commands in the comments
    root = Path(__file__).resolve().parents[1]
    documented = [root / "README.md", *sorted((root / "paper_repro").rglob("*.md")),
                  *sorted((root / "featkd" / "commands").glob("*.py"))]
    teacher_best = re.compile(r"(teacher[._]checkpoint[=:]|--teacher)[\s{]*[^\s}]*best\.pt")
    assert teacher_best.search("x teacher.checkpoint=runs/t/best.pt") and teacher_best.search("--teacher a/best.pt")
    for path in documented:
        assert not teacher_best.search(path.read_text()), path


def test_term_layouts_by_name_or_in_full_reach_the_terms():
    from torch import nn

    from featkd import runs

    cfg = from_dict({"terms": [
        {"teacher": "features.5", "student": "layer3", "teacher_layout": "NHWC"},
        {"teacher": "blocks.11", "student": "layer4", "loss": "hint",
         "teacher_layout": {"kind": "tokens", "prefix_tokens": 2, "tokens": "prefix"}},
        {"teacher": "layer1", "layout": "channels_first"}]})
    assert cfg.terms[1].teacher_layout.prefix_tokens == 2 and cfg.terms[2].layout == "channels_first"
    def named_layers():  # modules under the names the terms use; no forward is run
        model = nn.Module()
        model.features = nn.Sequential(*(nn.Identity() for _ in range(6)))
        model.blocks = nn.Sequential(*(nn.Identity() for _ in range(12)))
        model.layer1, model.layer3, model.layer4 = nn.Identity(), nn.Identity(), nn.Identity()
        return model

    distiller = runs.build_distiller(cfg, named_layers(), named_layers())
    layouts = [term.layouts for term in distiller.terms]
    assert layouts[0] == {"student": None, "teacher": "NHWC"}
    assert layouts[1]["teacher"] == {"kind": "tokens", "prefix_tokens": 2, "grid": None, "tokens": "prefix"}
    assert layouts[2] == {"student": "channels_first", "teacher": "channels_first"}
    with pytest.raises(ConfigError, match=r"unknown config key 'terms.0.teacher_layout.prefix'. Did you mean "
                                          r"'terms.0.teacher_layout.prefix_tokens'"):
        from_dict({"terms": [{"teacher": "x", "teacher_layout": {"kind": "NLC", "prefix": 1}}]})


def test_changed_keys_reports_differing_leaves_and_treats_a_missing_key_as_none():
    from featkd.config import changed_keys

    old = {"epochs": 3, "terms": [{"weight": 1.0}], "teacher": {"checkpoint": "a.pt"}}
    new = {"epochs": 5, "terms": [{"weight": 1.0, "layout": None}], "teacher": {"checkpoint": "a.pt", "extra": 2}}
    assert changed_keys(old, new) == {"epochs": (3, 5), "teacher.extra": (None, 2)}


# Issue #19: each of these trained silently to a wrong result (a negative weight maximises its term, a negative
# clip norm flips the gradient, a negative gamma gives a negative lr, lr 0 trains nothing).
@pytest.mark.parametrize("override, message", [
    ("terms=[{teacher: group3, weight: -1000}]", "config key 'terms.0.weight' must be at least 0, got -1000.0"),
    ("terms=[{teacher: group3, weight: {value: -5, epochs: 2}}]",
     "config key 'terms.0.weight.value' must be at least 0, got -5.0"),
    ("terms=[{teacher: group3, weight: {value: 5, epochs: 0}}]",
     "config key 'terms.0.weight.epochs' must be > 0, got 0.0"),
    ("kd={weight: -1}", "config key 'kd.weight' must be at least 0, got -1.0"),
    ("ce_weight=-0.5", "config key 'ce_weight' must be at least 0, got -0.5"),
    ("grad_clip=-1", "config key 'grad_clip' must be > 0, got -1.0"),
    ("grad_clip=0", "config key 'grad_clip' must be > 0, got 0.0"),
    ("optim.lr=-0.1", "config key 'optim.lr' must be > 0, got -0.1"),
    ("optim.lr=0", "config key 'optim.lr' must be > 0, got 0.0"),
    ("optim.lr=.nan", "config key 'optim.lr' must be > 0, got nan"),
    ("optim.momentum=-0.5", "config key 'optim.momentum' must be in [0, 1), got -0.5"),
    ("optim.momentum=1", "config key 'optim.momentum' must be in [0, 1), got 1.0"),
    ("optim.weight_decay=-1e-4", "config key 'optim.weight_decay' must be at least 0, got -0.0001"),
    ("schedule.gamma=-1", "config key 'schedule.gamma' must be > 0, got -1.0"),
    ("schedule.gamma=0", "config key 'schedule.gamma' must be > 0, got 0.0"),
    ("schedule.warmup_epochs=-2", "config key 'schedule.warmup_epochs' must be at least 0, got -2"),
    ("schedule.min_factor=1.5", "config key 'schedule.min_factor' must be in [0, 1], got 1.5"),
    ("schedule.milestones=[3, 0]", "config key 'schedule.milestones.1' must be at least 1, got 0"),
    ("data.limit=0", "config key 'data.limit' must be at least 1, got 0"),
    ("data.test_limit=0", "config key 'data.test_limit' must be at least 1, got 0"),
    ("data.extra_unlabeled={name: synthetic, limit: 0}", "config key 'data.extra_unlabeled.limit' must be at least 1"),
])
def test_numbers_outside_their_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_edges_of_the_ranges_are_valid():
    cfg = load_config(None, ["terms=[{teacher: group3, weight: 0}]", "kd={weight: 0}", "ce_weight=0",
                             "optim.momentum=0", "optim.weight_decay=0", "schedule.min_factor=1", "grad_clip=1e-3"])
    assert (cfg.terms[0].weight, cfg.kd.weight, cfg.ce_weight, cfg.optim.momentum) == (0, 0, 0, 0)


@pytest.mark.parametrize("overrides, message", [
    (["epochs=10", "schedule.milestones=[5, 5]"], "'schedule.milestones' must be strictly increasing, got [5, 5]"),
    (["epochs=10", "schedule.milestones=[6, 3]"], "'schedule.milestones' must be strictly increasing, got [6, 3]"),
    (["epochs=10", "schedule.milestones=[3, 11]"], "'schedule.milestones' [3, 11] must lie inside the run (each <= "
                                                    "epochs=10)"),
    (["epochs=30"], "'schedule.milestones' [60, 120, 160] must lie inside the run"),
])
def test_a_runs_milestones_are_checked_against_each_other_and_the_epochs(overrides, message):
    from featkd.config import check_run_config

    with pytest.raises(ConfigError) as error:
        check_run_config(load_config(None, overrides))
    assert message in str(error.value)
    # the same milestones under a schedule that has none are no mistake; milestones up to the last epoch are fine
    check_run_config(load_config(None, [*overrides, "schedule.name=cosine"]))
    check_run_config(load_config(None, ["epochs=10", "schedule.milestones=[3, 10]"]))
