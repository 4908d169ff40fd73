"""Deep Mutual Learning: the loss against SciPy, Algorithm 1's update order, BN statistics, learning."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr, softmax
from torch import nn

from featkd.functional import cross_entropy
from featkd.strategies.dml import DeepMutualLearning, PeerTermConfig, mutual_loss, preserved_norm_statistics
from featkd.models.ensemble import ProbabilityAverage


def _reference_peer_loss(z_k, others, y, mode):
    """L_k of the paper, per sample with SciPy, averaged over the batch."""
    p_k = softmax(z_k, axis=1)
    ce = -log_softmax(z_k, axis=1)[np.arange(len(y)), y].mean()
    if mode == "pairwise":
        kl = np.mean([rel_entr(softmax(z_l, axis=1), p_k).sum(1).mean() for z_l in others])
    else:
        p_avg = np.mean([softmax(z_l, axis=1) for z_l in others], axis=0)
        kl = rel_entr(p_avg, p_k).sum(1).mean()
    return ce, kl


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("num_peers", [2, 3, 4])
def test_mutual_loss_matches_scipy(mode, num_peers):
    g = torch.Generator().manual_seed(num_peers)
    logits = [3 * torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(num_peers)]
    y = torch.randint(0, 5, (6,), generator=g)
    ce_ref, kl_ref = _reference_peer_loss(logits[0].numpy(), [z.numpy() for z in logits[1:]], y.numpy(), mode)
    assert mutual_loss(logits[0], logits[1:], mode).item() == pytest.approx(kl_ref, rel=1e-10)
    # featkd's cross-entropy (the one the DML step adds), not torch's, against the SciPy reference
    assert cross_entropy(logits[0], y).item() == pytest.approx(ce_ref, rel=1e-10)


def test_mutual_loss_identities():
    z = torch.randn(4, 7, dtype=torch.float64)
    # a peer that agrees with everyone pays nothing; two peers make both modes the same
    assert mutual_loss(z, [z.clone(), z + 3.0], "pairwise").item() == pytest.approx(0, abs=1e-12)
    other = torch.randn(4, 7, dtype=torch.float64)
    assert mutual_loss(z, [other], "pairwise").item() == pytest.approx(mutual_loss(z, [other], "ensemble").item())


def test_mutual_loss_gradient_is_probability_difference():
    # d/dz_k of mean_b KL(p_l || p_k) is (p_k - p_l) / B, averaged over the peers l
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    peers = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    mutual_loss(z, peers, "pairwise").backward()
    expected = sum(z.softmax(1) - p.softmax(1) for p in peers).detach() / (2 * 5)
    torch.testing.assert_close(z.grad, expected)
    assert torch.autograd.gradcheck(lambda t: mutual_loss(t, peers, "ensemble"), (z.detach().requires_grad_(),))


def test_mutual_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="pairwise"):
        mutual_loss(torch.zeros(2, 3), [torch.zeros(2, 3)], "mean")
    with pytest.raises(ValueError, match="at least one other peer"):
        mutual_loss(torch.zeros(2, 3), [], "pairwise")


def _peer(seed, in_features=8, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))


def _reference_dml_step(peers, lrs, x, y, mode, sequential):
    """Algorithm 1 with explicit sums: every peer's prediction is recomputed before each update
    (``sequential``), or all peers step against the predictions from the start of the step."""
    start = [p(x).detach() for p in peers]
    for k, peer in enumerate(peers):
        z_k = peer(x)
        others = [(peers[l](x).detach() if sequential else start[l]) for l in range(len(peers)) if l != k]
        log_p_k = z_k.log_softmax(1)
        ce = -log_p_k[torch.arange(len(y)), y].mean()
        if mode == "pairwise":
            kl = sum((o.softmax(1) * (o.log_softmax(1) - log_p_k)).sum(1).mean() for o in others) / len(others)
        else:
            q = sum(o.softmax(1) for o in others) / len(others)
            kl = (q * (q.log() - log_p_k)).sum(1).mean()
        grads = torch.autograd.grad(ce + kl, list(peer.parameters()))
        with torch.no_grad():
            for p, g in zip(peer.parameters(), grads):
                p -= lrs[k] * g


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_step_follows_algorithm_1_order(mode):
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    peers = [_peer(s) for s in range(3)]
    lrs = [0.5, 0.3, 0.2]
    sequential = copy.deepcopy(peers)
    simultaneous = copy.deepcopy(peers)
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=lr) for p, lr in zip(peers, lrs)], mode=mode)
    for _ in range(2):
        method.train_step(x, y, 0)
        _reference_dml_step(sequential, lrs, x, y, mode, sequential=True)
        _reference_dml_step(simultaneous, lrs, x, y, mode, sequential=False)
    for got, ref, other in zip(peers, sequential, simultaneous):
        for a, b in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b)
    # the order is observable: updating against stale predictions gives different later peers
    assert not torch.allclose(peers[2][0].weight, simultaneous[2][0].weight, atol=1e-5)


def test_step_moves_batch_norm_statistics_once_per_peer():
    torch.manual_seed(1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    peers = [_peer(s) for s in range(2)]
    expected = [copy.deepcopy(p) for p in peers]
    for p in expected:
        p(x)  # one training-mode forward: what the running statistics should have seen
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.1) for p in peers])
    method.train_step(x, y, 0)
    for got, ref in zip(peers, expected):
        torch.testing.assert_close(got[1].running_mean, ref[1].running_mean)
        torch.testing.assert_close(got[1].running_var, ref[1].running_var)
        assert got[1].num_batches_tracked.item() == 1


def test_preserved_norm_statistics_restores_buffers():
    net = _peer(0)
    before = net[1].running_mean.clone()
    with torch.no_grad(), preserved_norm_statistics(net):
        net(torch.randn(8, 8) + 5)
    torch.testing.assert_close(net[1].running_mean, before)


def test_named_losses_and_eval_models():
    peers = [_peer(s) for s in range(3)]
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.1) for p in peers])
    metrics = method.train_step(torch.randn(8, 8), torch.randint(0, 4, (8,)), 0)
    assert set(metrics) == {f"peer{k}/{n}" for k in range(3) for n in ("ce", "mimicry", "total")}
    for k in range(3):
        assert metrics[f"peer{k}/total"] == pytest.approx(metrics[f"peer{k}/ce"] + metrics[f"peer{k}/mimicry"])
    models = method.eval_models()
    assert list(models) == ["peer0", "peer1", "peer2", "ensemble"]
    assert isinstance(models["ensemble"], ProbabilityAverage)


def test_ensemble_averages_probabilities():
    peers = [_peer(s).eval() for s in range(3)]
    x = torch.randn(5, 8)
    expected = torch.stack([p(x).softmax(1) for p in peers]).mean(0)
    torch.testing.assert_close(ProbabilityAverage(peers)(x).exp(), expected)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(2)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def build():
        peers = [_peer(s) for s in range(2)]
        opts = [torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9) for p in peers]
        return DeepMutualLearning(peers, opts, schedulers=[torch.optim.lr_scheduler.StepLR(o, 1) for o in opts])

    a = build()
    a.train_step(x, y, 0)
    a.on_epoch_end(0)
    b = build()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.train_step(x, y, 1)
    b.train_step(x, y, 1)
    for pa, pb in zip(a.peers, b.peers):
        for ta, tb in zip(pa.state_dict().values(), pb.state_dict().values()):
            torch.testing.assert_close(ta, tb)
    assert b.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_bad_configuration_is_reported():
    peers = [_peer(0)]
    with pytest.raises(ValueError, match="at least 2 peers"):
        DeepMutualLearning(peers, [torch.optim.SGD(peers[0].parameters(), lr=0.1)])
    peers = [_peer(0), _peer(1)]
    with pytest.raises(ValueError, match="one optimizer per peer"):
        DeepMutualLearning(peers, [torch.optim.SGD(peers[0].parameters(), lr=0.1)])


def test_peer_feature_terms_use_the_other_peers_detached_features():
    from featkd.hooks import FeatureExtractor
    from featkd.functional import at_loss
    from featkd.models import create_model

    torch.manual_seed(3)
    peers = [create_model("resnet8", num_classes=4, in_channels=1) for _ in range(2)]
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    before = [copy.deepcopy(p) for p in peers]
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.05) for p in peers],
                                terms=[PeerTermConfig("at", ["layer*"], weight=100.0)], example_input=x)
    assert method.terms[0].layers == ["layer1", "layer2", "layer3"]
    metrics = method.train_step(x, y, 0)

    def feats(model):
        with FeatureExtractor(model, ["layer1", "layer2", "layer3"]) as ext, preserved_norm_statistics(model):
            return ext(x)[1]

    f0, f1 = feats(before[0]), feats(before[1])
    expected0 = sum(at_loss(f0[n], f1[n]) for n in f0).item()
    f0_updated = feats(peers[0])  # peer 1 learns from the updated peer 0 (Algorithm 1)
    expected1 = sum(at_loss(f1[n], f0_updated[n]) for n in f1).item()
    assert metrics["peer0/at"] == pytest.approx(expected0, rel=1e-4)
    assert metrics["peer1/at"] == pytest.approx(expected1, rel=1e-4)
    ce, mimicry = metrics["peer0/ce"], metrics["peer0/mimicry"]
    assert metrics["peer0/total"] == pytest.approx(ce + mimicry + 100.0 * expected0, rel=1e-4)


def test_peers_of_different_widths_get_the_distillers_adapters():
    from featkd.functional import gram_loss
    from featkd.hooks import FeatureExtractor
    from featkd.models import create_model
    from featkd.terms import FeatureAdapter

    torch.manual_seed(4)
    peers = [create_model(name, num_classes=4, in_channels=1) for name in ("wrn10_1", "wrn10_2")]
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 4, (4,))
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.05) for p in peers],
                                terms=[PeerTermConfig("gram", ["group2"], options={"mode": "channel"})],
                                example_input=x)
    # the channel Gram needs equal channel counts: 32 vs 64, so each direction gets a 1x1 conv + BN
    adapter01, adapter10 = method.pairs[(0, 1, 0, "group2")][0], method.pairs[(1, 0, 0, "group2")][0]
    assert isinstance(adapter01, FeatureAdapter) and adapter01.conv[0].weight.shape == (64, 32, 1, 1)
    assert adapter10.conv[0].weight.shape == (32, 64, 1, 1)
    assert {id(p) for p in adapter01.parameters()} <= {id(p) for p in method.optimizers[0].param_groups[1]["params"]}
    before_peer, before_adapter = copy.deepcopy(peers[0]), copy.deepcopy(adapter01)
    target = copy.deepcopy(peers[1])
    metrics = method.train_step(x, y, 0)
    with FeatureExtractor(before_peer, ["group2"]) as own, FeatureExtractor(target, ["group2"]) as other:
        with torch.no_grad(), preserved_norm_statistics(before_peer), preserved_norm_statistics(target):
            expected = gram_loss(before_adapter(own(x)[1]["group2"]), other(x)[1]["group2"], mode="channel")
    assert metrics["peer0/gram"] == pytest.approx(expected.item(), rel=1e-4)
    assert not torch.equal(adapter01.conv[0].weight, before_adapter.conv[0].weight)  # trained with peer 0


def test_feature_terms_need_an_example_batch():
    peers = [_peer(0), _peer(1)]
    with pytest.raises(ValueError, match="example_input"):
        DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.1) for p in peers],
                           terms=[PeerTermConfig("at", ["0"])])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_short_run_on_synthetic_data_improves_every_peer(mode):
    from featkd.data import DeviceLoader, load_dataset
    from featkd.engine import evaluate
    from featkd.models import create_model

    train = load_dataset("synthetic", split="train", size=512, image_size=16)
    test = load_dataset("synthetic", split="test", size=256, image_size=16)
    torch.manual_seed(0)
    peers = [create_model("resnet8", num_classes=10, in_channels=1) for _ in range(2)]
    method = DeepMutualLearning(peers, [torch.optim.SGD(p.parameters(), lr=0.05, momentum=0.9) for p in peers],
                                mode=mode)
    test_loader = DeviceLoader(test, 128, shuffle=False, drop_last=False)
    at_init = {name: evaluate(m, test_loader)["acc1"] for name, m in method.eval_models().items()}
    loader = DeviceLoader(train, 64, seed=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            method.train_step(x, y, step)
    after = {name: evaluate(m, test_loader)["acc1"] for name, m in method.eval_models().items()}
    for name in ("peer0", "peer1", "ensemble"):
        assert after[name] > at_init[name] + 20, (name, at_init[name], after[name])


@pytest.mark.slow
def test_cli_logs_every_peer_and_the_ensemble(tmp_path, subprocess_env, python_exe):
    import json
    import subprocess

    run = tmp_path / "dml"
    cmd = [python_exe, "-m", "featkd.cli", "dml", "--config", "dml", "--run-dir", str(run), "epochs=1",
           "data.name=synthetic", "data.options={size: 64, image_size: 16}", "data.batch_size=32",
           "data.eval_batch_size=64", "dml.peers=[{name: resnet8}, {name: resnet8}]", "dml.mode=ensemble"]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for k in range(2):
        assert {f"train/peer{k}/ce", f"train/peer{k}/mimicry", f"train/peer{k}/total", f"peer{k}/acc1"} <= set(row)
    assert "ensemble/acc1" in row


def test_config_section_errors_name_the_key():
    from featkd.strategies.dml import DMLConfig
    from featkd.config import ConfigError
    from featkd.runs import load_strategy_config

    with pytest.raises(ConfigError, match="dml.mode"):
        load_strategy_config("dml", DMLConfig, "dml", "x", False, ["dml.mdoe=ensemble"])
    overrides = ["dml.peers.0.name=resnet20", "epochs=3"]
    cfg, dml, resolved = load_strategy_config("dml", DMLConfig, "dml", "x", False, overrides)
    assert cfg.epochs == 3 and dml.peers[0].name == "resnet20" and resolved["dml"]["peers"][1]["name"] == "wrn16_1"
    with pytest.raises(ConfigError, match="--config"):
        load_strategy_config("dml", DMLConfig, None, "x", False, overrides)
