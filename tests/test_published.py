"""The reference codes' settings are written once (featkd/configs/reference/published.yaml) and read everywhere."""

import ast
from pathlib import Path

import pytest
import yaml

from featkd import published
from featkd.config import ConfigError, load_config
from featkd.repro import limited_data, protocols

ROOT = Path(__file__).resolve().parents[1]


def test_the_published_settings_are_the_reference_codes_numbers():
    # official AT code: loss = CE + beta/2 * sum over groups of at_loss, beta = 1e3 (its at_loss is the mean); NST
    # code: 50 on the MMD; AT code's KD: (1 - alpha) CE + alpha T^2 KL, alpha 0.9, T 4; NST code's KD: CE + 16 KL at T 4
    assert published.term_weight("at") == 1000.0 and published.term_weight("nst") == 50.0
    assert published.logit_setting("kd_at") == ({"loss": "kd", "weight": 0.9, "options": {"T": 4}}, 0.1)
    assert published.distiller_kd("kd_nst") == ({"loss": "kd", "weight": 1.0, "T": 4}, 1.0)


def test_protocols_tables_configs_and_pairs_read_them():
    assert [t.weight for t in protocols.at_terms(["a", "b"], ["c", "d"])] == [1000.0, 1000.0]
    assert [t.weight for t in protocols.nst_terms("poly", "last")(["a"], ["b"])] == [50.0]
    assert (protocols.AT_KD, protocols.AT_KD_CE) == published.distiller_kd("kd_at")
    assert [t["weight"] for t in limited_data.RECIPES["AT"].terms] == [1000.0] * 3
    assert limited_data.RECIPES["NST-poly"].terms[0]["weight"] == 50.0
    assert (limited_data.RECIPES["KD"].kd, limited_data.RECIPES["KD"].ce_weight) == published.logit_setting("kd_at")
    cfg = load_config("fmnist_distill_kd_at_nst")
    assert [t.weight for t in cfg.terms] == [1000.0, 1000.0, 1000.0, 50.0]


def test_a_published_weight_for_a_loss_without_one_is_refused():
    with pytest.raises(ConfigError, match="'gram' has no published weight.*give the weight as a number"):
        load_config(None, ["terms=[{teacher: a, loss: gram, weight: published}]"])


def _weights_in_python(path):
    """The constants given to a weight or beta in a module's code (keyword arguments, defaults, dict entries)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg in ("weight", "beta"):
            found.append(node.value)
        elif isinstance(node, ast.Dict):
            found += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "weight"]
        elif isinstance(node, ast.arguments):
            names = [a.arg for a in node.posonlyargs + node.args]
            found += [d for a, d in zip(names[len(names) - len(node.defaults):], node.defaults) if a in ("weight", "beta")]
            found += [d for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None and a.arg in ("weight", "beta")]
    return [v.value for v in found if isinstance(v, ast.Constant)]


def _weights_in_yaml(data):
    if isinstance(data, dict):
        # a number written as a weight (a weight relative to the CE is a mapping, no published number)
        numbers = [v for k, v in data.items() if k in ("weight", "beta") and isinstance(v, (int, float))]
        return numbers + [w for v in data.values() for w in _weights_in_yaml(v)]
    if isinstance(data, list):
        return [w for v in data for w in _weights_in_yaml(v)]
    return []


def test_no_module_or_config_writes_a_published_weight_again(tmp_path):
    numbers = {published.term_weight("at"), published.term_weight("nst")}
    modules = sorted((ROOT / "featkd").rglob("*.py"))
    configs = [p for p in sorted((ROOT / "featkd" / "configs").rglob("*.yaml")) if p != published.PUBLISHED_PATH]
    assert len(modules) > 50 and len(configs) > 5
    for path in modules:
        assert not numbers & set(_weights_in_python(path)), path
    for path in configs:
        assert not numbers & set(_weights_in_yaml(yaml.safe_load(path.read_text()))), path
    # the checks see a copy where there is one
    copy = tmp_path / "copy.py"
    copy.write_text("def f(weight=1000.0, *, beta=1e3):\n    return g(weight=50, **{'weight': 50.0})\n")
    assert _weights_in_python(copy) == [1000.0, 1000.0, 50, 50.0]
    assert _weights_in_yaml({"a": [{"weight": 1000}]}) == [1000]


def test_a_table_row_finds_its_methods_published_gain():
    # the AT paper's Table 1 (WRN-16-1 <- WRN-16-2, CIFAR-10 error 8.77 -> 7.93) and RepDistiller's CIFAR-100 table
    assert published.gain("AT-tuned")[0] == pytest.approx(8.77 - 7.93)
    assert published.gain("NST-gaussian")[0] == pytest.approx(73.68 - 73.26)
    assert published.gain("KD")[0] == pytest.approx(74.92 - 73.26)
    assert published.gain("Gram") is None and published.gain("student") is None
