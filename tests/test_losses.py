import pytest
import torch

import featkd.functional as KF
from featkd.losses import (
    build_feature_loss,
    build_logit_loss,
    feature_loss_class,
    feature_loss_names,
    logit_loss_names,
    register_feature_loss,
    registry,
)
from featkd.losses.hint import HintLoss
from featkd.terms import Term

S, T = (2, 4, 8, 8), (2, 6, 8, 8)


@pytest.mark.parametrize(
    "name,options,functional",
    [
        ("nst", {}, lambda s, t: KF.nst_loss(s, t)),
        ("nst", {"kernel": "gaussian", "sigma2": [0.5, 2.0]}, lambda s, t: KF.nst_loss(s, t, "gaussian", sigma2=[0.5, 2.0])),
        ("nst", {"kernel": "linear"}, lambda s, t: KF.nst_loss(s, t, "linear")),
        ("at", {"p": 1, "mode": "paper"}, lambda s, t: KF.at_loss(s, t, 1, mode="paper")),
        ("gram", {"normalize": True}, lambda s, t: KF.gram_loss(s, t, normalize=True)),
    ],
)
def test_feature_modules_compute_their_functional(name, options, functional):
    f_s, f_t = torch.randn(S), torch.randn(T)
    module = build_feature_loss(name, S, T, **options)
    assert module(f_s, f_t).item() == pytest.approx(functional(f_s, f_t).item(), rel=1e-6)


def test_fsp_module_takes_pairs():
    s = (torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))
    t = (torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))
    module = build_feature_loss("fsp", [x.shape for x in s], [x.shape for x in t], resize="pool")
    assert module(s, t).item() == pytest.approx(KF.fsp_loss(s, t, resize="pool").item(), rel=1e-6)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        build_feature_loss("fsp", [x.shape for x in s], [x.shape for x in t])
    with pytest.raises(ValueError, match=r"channels \[4, 6\].*channels \[4, 7\]"):
        build_feature_loss("fsp", [(2, 4, 8, 8), (2, 6, 8, 8)], [(2, 4, 8, 8), (2, 7, 8, 8)])
    with pytest.raises(ValueError, match="pair of layer shapes"):
        build_feature_loss("fsp", S, T)


def test_shape_errors_at_build_time_name_the_shapes():
    # a loss module compares features at one grid; resizing is the Term adapter's (one way to do it)
    for loss in ("nst", "at", "hint"):
        with pytest.raises(ValueError, match=rf"{loss} compares features at the same positions: student \(2, 4, 8, 8\) "
                                             r"vs teacher \(2, 6, 4, 4\).*adapter: auto"):
            build_feature_loss(loss, S, (2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"equal channel counts.*\(2, 4, 8, 8\).*\(2, 6, 8, 8\)"):
        build_feature_loss("gram", S, T, mode="channel")
    for loss in ("nst", "at", "hint"):  # a shape without positions is no feature map
        with pytest.raises(ValueError, match=r"student feature of shape \(2, 4\): expected \(B, C, H, W\)"):
            build_feature_loss(loss, (2, 4), (2, 4))
    for loss in ("nst", "at", "gram", "hint", "cosine"):
        with pytest.raises(ValueError, match="option 'resize'|option 'layout'"):
            build_feature_loss(loss, S, S, resize="pool", layout="tokens")
    f_s = torch.randn(S)
    f_same_c = torch.randn(2, 4, 4, 4)
    gram = build_feature_loss("gram", S, (2, 4, 4, 4), mode="channel")
    g_s = f_s.flatten(2) @ f_s.flatten(2).transpose(1, 2) / 64
    g_t = f_same_c.flatten(2) @ f_same_c.flatten(2).transpose(1, 2) / 16
    assert gram(f_s, f_same_c).item() == pytest.approx((g_s - g_t).square().sum((1, 2)).mean().item(), rel=1e-5)


def test_unknown_names_and_options_suggest_close_matches():
    with pytest.raises(ValueError, match="unknown feature loss 'nts'. Did you mean 'nst'"):
        build_feature_loss("nts", S, T)
    with pytest.raises(ValueError, match="unknown logit loss 'kd_c'. Did you mean 'kd_ce'"):
        build_logit_loss("kd_c")
    with pytest.raises(ValueError, match="option 'mdoe'. Did you mean 'mode'"):
        build_feature_loss("at", S, T, mdoe="official")
    with pytest.raises(ValueError, match="option 'sigma'. Did you mean 'sigma2'"):
        build_feature_loss("nst", S, T, kernel="gaussian", sigma=1.0)
    with pytest.raises(ValueError, match="unknown NST kernel 'poli'. Did you mean 'poly'"):
        build_feature_loss("nst", S, T, kernel="poli")
    with pytest.raises(ValueError, match="option 'alpa'. Did you mean 'alpha'"):
        build_logit_loss("kd_ce", alpa=0.9)


def test_registries_hold_the_documented_names_with_their_capabilities():
    names = ("at", "attention_kl", "cosine", "fsp", "gram", "hint", "nst")
    assert set(names) <= set(feature_loss_names())  # the README's losses, at least
    assert logit_loss_names() == ["kd", "kd_ce", "logit_mse", "soft_ce_mse", "sym_kl"]
    capabilities = {name: (cls.multi_layer, cls.needs_shapes, cls.uses_context)
                    for name in names for cls in [feature_loss_class(name)]}
    # the token losses take the batch's context for its token mask
    assert capabilities == {"at": (False, False, True), "attention_kl": (False, False, True),
                            "cosine": (False, False, True), "fsp": (True, False, False),
                            "gram": (False, False, True), "hint": (False, True, True), "nst": (False, False, True)}


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made in a test stay in the test."""
    monkeypatch.setattr(registry, "_FEATURE_LOSSES", dict(registry._FEATURE_LOSSES))


def test_a_registered_loss_is_built_by_name_with_its_capabilities(own_registry):
    @register_feature_loss("pair_sum", multi_layer=True)
    class PairSum(torch.nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, f_s, f_t):
            return self.scale * sum((a.mean() - b.mean()) ** 2 for a, b in zip(f_s, f_t))

    assert "pair_sum" in feature_loss_names()
    module = build_feature_loss("pair_sum", (S, S), (T, T), scale=2.0)
    assert isinstance(module, PairSum) and module.scale == 2.0
    assert Term(["a", "b"], loss="pair_sum").multi_layer and not Term(["a", "b"], loss="at").multi_layer
    with pytest.raises(ValueError, match="option 'scal'. Did you mean 'scale'"):
        build_feature_loss("pair_sum", (S, S), (T, T), scal=2.0)
    with pytest.raises(ValueError, match="'at' is registered already, by ATLoss"):
        register_feature_loss("at")(PairSum)


@pytest.mark.parametrize(
    "name,options,functional",
    [
        ("kd", {"T": 2.0}, lambda s, t, y: KF.kd_loss(s, t, 2.0)),
        ("kd_ce", {"alpha": 0.5, "beta": 1.0}, lambda s, t, y: KF.kd_ce_loss(s, t, y, 4.0, 0.5, 1.0)),
        ("logit_mse", {}, lambda s, t, y: KF.logit_mse_loss(s, t)),
        ("soft_ce_mse", {"lam": 0.3}, lambda s, t, y: KF.soft_ce_mse_loss(s, t, 4.0, 0.3)),
        ("sym_kl", {}, lambda s, t, y: KF.sym_kl_loss(s, t)),
        ("sym_kl", {"one_sided": True, "T": 3.0}, lambda s, t, y: KF.dml_kl_loss(s, t, 3.0)),
    ],
)
def test_logit_modules_compute_their_functional(name, options, functional):
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.tensor([1, -1, 3, 9, -1, 0])
    module = build_logit_loss(name, **options)
    assert module(s, t, y).item() == pytest.approx(functional(s, t, y).item(), rel=1e-6)


def test_kd_ce_without_targets_is_a_clear_error():
    with pytest.raises(ValueError, match="kd_ce needs targets"):
        build_logit_loss("kd_ce")(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize(
    "s_shape,t_shape,options,expect_params",
    [
        ((2, 4, 8, 8), (2, 4, 8, 8), {}, False),
        ((2, 4, 8, 8), (2, 6, 8, 8), {"kernel_size": 3, "batch_norm": True}, True),
        ((2, 9, 4), (2, 6, 4), {"batch_norm": True}, True),
        ((2, 4, 9), (2, 6, 9), {}, True),
    ],
)
def test_hint_regressor_maps_to_the_teacher_and_learns(s_shape, t_shape, options, expect_params):
    torch.manual_seed(0)
    module = build_feature_loss("hint", s_shape, t_shape, **options)
    assert (module.regressor is not None) == expect_params
    f_s, f_t = torch.randn(s_shape), torch.randn(t_shape)
    if not expect_params:
        assert module(f_s, f_t).item() == pytest.approx(KF.hint_loss(f_s, f_t).item())
        return
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    first = module(f_s, f_t).item()
    for _ in range(20):
        opt.zero_grad()
        loss = module(f_s, f_t)
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_hint_module_positional_signature():
    module = HintLoss((2, 3, 5, 5), (2, 8, 5, 5), 3)
    assert module.regressor[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        HintLoss((2, 3, 5, 5), (2, 8, 5, 5), 2)
