"""Forward-hook capture: values against manual forwards, and every failure mode users hit."""

import collections
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import featkd
from featkd.hooks import Features
from featkd.layer_info import LayerInfo


def torchvision_models():
    """torchvision's models, or a skip where it is not installed (the oldest-torch CI run has no torchvision)."""
    return pytest.importorskip("torchvision").models


@pytest.fixture(scope="module")
def resnet():
    return torchvision_models().resnet18(num_classes=10).eval()


def resnet_stem(m, x):
    return m.maxpool(m.relu(m.bn1(m.conv1(x))))


def tiny_vit():
    return torchvision_models().VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


# ----------------------------------------------------------------------------- names


def test_values_match_manual_forward(resnet):
    x = torch.randn(2, 3, 64, 64)
    with featkd.capture(resnet, ["layer1", "layer3:input", "layer2.0.conv1", "fc"]) as feats:
        logits = resnet(x)
    with torch.no_grad():
        layer1 = resnet.layer1(resnet_stem(resnet, x))
        layer2 = resnet.layer2(layer1)
    torch.testing.assert_close(feats["layer1"], layer1)
    torch.testing.assert_close(feats["layer3:input"], layer2)
    torch.testing.assert_close(feats["layer2.0.conv1"], resnet.layer2[0].conv1(layer1))
    torch.testing.assert_close(feats["fc"], logits)
    assert list(feats) == ["layer1", "layer3:input", "layer2.0.conv1", "fc"]


def test_globs_stay_within_a_segment_unless_double_star(resnet):
    assert featkd.resolve_layers(resnet, ["layer*"]) == ["layer1", "layer2", "layer3", "layer4"]
    assert featkd.resolve_layers(resnet, "layer*.1.conv2") == [f"layer{i}.1.conv2" for i in range(1, 5)]
    assert featkd.resolve_layers(resnet, ["layer?.0.downsample.0:input"]) == [
        f"layer{i}.0.downsample.0:input" for i in (2, 3, 4)
    ]
    assert featkd.resolve_layers(resnet, ["layer4.**.conv1"]) == ["layer4.0.conv1", "layer4.1.conv1"]
    x = torch.randn(1, 3, 32, 32)
    with featkd.capture(resnet, ["layer*.1.conv2"]) as feats:
        resnet(x)
    assert [feats[k].shape[1] for k in feats] == [64, 128, 256, 512]


def test_sequential_indices_on_mobilenet():
    m = torchvision_models().mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with featkd.capture(m, ["features.3", "features.3.block.0.0", "classifier.0:input"]) as feats:
        m(x)
    with torch.no_grad():
        h = m.features[:3](x)
        torch.testing.assert_close(feats["features.3"], m.features[3](h))
        torch.testing.assert_close(feats["features.3.block.0.0"], m.features[3].block[0][0](h))
        torch.testing.assert_close(feats["classifier.0:input"], torch.flatten(m.avgpool(m.features(x)), 1))


def test_unknown_name_lists_close_matches(resnet):
    with pytest.raises(KeyError, match=r"layer1\.0\.conv2.*layer1\.0\.conv1"):
        featkd.resolve_layers(resnet, ["layer1.0.conv3"])
    with pytest.raises(KeyError, match="no module matches the pattern 'layr\\*'.*layer1"):
        featkd.resolve_layers(resnet, ["layr*"])
    with pytest.raises(ValueError, match="cannot parse layer spec"):
        featkd.resolve_layers(resnet, ["layer1[x]"])


def test_wrapper_prefixes_resolve_both_ways(resnet):
    dp = nn.DataParallel(resnet)  # on a CPU-only machine it just calls the module
    # keys are the names as written; globs expand to names without wrapper segments
    names = ["module.layer1", "_orig_mod.layer2.0.conv1", "module.layer*.1"]
    expected = ["module.layer1", "_orig_mod.layer2.0.conv1"] + [f"layer{i}.1" for i in range(1, 5)]
    assert featkd.resolve_layers(dp, names) == expected
    assert featkd.resolve_layers(resnet, names) == expected
    compiled = torch.compile(dp, backend="eager")  # compile wraps DataParallel: _orig_mod.module.layer1
    assert featkd.resolve_layers(compiled, names) == expected
    assert [i.name for i in featkd.list_layers(dp, torch.randn(1, 3, 32, 32))][:2] == ["conv1", "bn1"]
    x = torch.randn(2, 3, 32, 32)
    with featkd.capture(dp, ["module.layer1"]) as feats:
        dp(x)
    with torch.no_grad():
        torch.testing.assert_close(feats["module.layer1"], resnet.layer1(resnet_stem(resnet, x)))
    assert feats["layer1"] is feats["module.layer1"] is feats["_orig_mod.module.layer1"]


# ----------------------------------------------------------------------------- in-place ops


class ConvInplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x.mean(1, keepdim=True)  # the residual add of a ResNet block, in place
        return self.relu(out)


def test_inplace_ops_corrupt_uncloned_features_only():
    torch.manual_seed(0)
    m = ConvInplaceRelu().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        bn_out = m.bn(m.conv(x))
    assert (bn_out < 0).any()
    with featkd.capture(m, ["bn"], clone=False) as shared:
        m(x)
    with featkd.capture(m, ["bn"]) as cloned:
        m(x)
    # Without the clone the stored tensor *is* the activation that `+=` and ReLU(inplace) overwrote.
    assert not torch.allclose(shared["bn"], bn_out)
    assert (shared["bn"] >= 0).all()
    torch.testing.assert_close(cloned["bn"], bn_out)


def test_resnet_block_inplace_residual(resnet):
    # BasicBlock: out = bn2(...); out += identity; relu_(out) -- bn2's output is overwritten twice.
    x = torch.randn(1, 3, 32, 32)
    with featkd.capture(resnet, ["layer1.0.bn2"]) as feats:
        resnet(x)
    block = resnet.layer1[0]
    with torch.no_grad():
        h = resnet_stem(resnet, x)
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
    torch.testing.assert_close(feats["layer1.0.bn2"], expected)


def test_clone_keeps_autograd_and_gradients_match_manual():
    torch.manual_seed(0)
    m = ConvInplaceRelu()
    x = torch.randn(2, 3, 8, 8)
    ext = featkd.FeatureExtractor(m, ["bn"])
    out, feats = ext(x)
    (feats["bn"].pow(2).mean() + out.mean()).backward()
    grad = m.conv.weight.grad.clone()

    m.zero_grad()
    bn_out = m.bn(m.conv(x))
    reference = bn_out.pow(2).mean()
    out = m.relu(bn_out.clone() + x.mean(1, keepdim=True))
    (reference + out.mean()).backward()
    torch.testing.assert_close(grad, m.conv.weight.grad)
    assert grad.abs().sum() > 0


# ----------------------------------------------------------------------------- shared modules


class SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.block(x))))


def test_shared_module_keeps_every_call():
    m = SharedBlock()
    x = torch.randn(3, 4)
    with featkd.capture(m, ["block", "block:input"]) as feats:
        m(x)
    first = m.block(x)
    second = m.block(torch.tanh(first))
    with pytest.raises(RuntimeError, match=r"ran 2 times.*'block#k'.*calls\('block'\)"):
        feats["block"]
    torch.testing.assert_close(feats["block#0"], first)
    torch.testing.assert_close(feats["block#1"], second)
    torch.testing.assert_close(feats["block:input#1"], torch.tanh(first))
    assert [t.shape for t in feats.calls("block")] == [(3, 4), (3, 4)]
    torch.testing.assert_close(feats.calls("block")[1], second)
    assert feats.num_calls("block") == 2
    with pytest.raises(RuntimeError, match="ran 2 time.*3 needed"):
        feats["block#2"]


def test_selected_call_is_the_only_one_stored():
    m = SharedBlock()
    x = torch.randn(3, 4)
    out, feats = featkd.FeatureExtractor(m, ["block#1"])(x)
    torch.testing.assert_close(feats["block#1"], m.block(torch.tanh(m.block(x))))
    assert feats.calls("block#1")[0] is feats["block#1"]
    assert feats._calls["block#1"][0] is None  # call 0 counted, not kept


def test_resnet_relu_runs_twice_per_block(resnet):
    infos = {i.name: i for i in featkd.list_layers(resnet, torch.randn(1, 3, 32, 32))}
    assert infos["layer1.0.relu"].calls == 2 and infos["relu"].calls == 1
    x = torch.randn(1, 3, 32, 32)
    with featkd.capture(resnet, ["layer1.0.relu"]) as feats:
        resnet(x)
    block = resnet.layer1[0]
    with torch.no_grad():
        h = resnet_stem(resnet, x)
        after_bn1 = torch.relu(block.bn1(block.conv1(h)))
        torch.testing.assert_close(feats["layer1.0.relu#0"], after_bn1)
        torch.testing.assert_close(feats["layer1.0.relu#1"], block(h))


# ----------------------------------------------------------------------------- structured outputs


class Pair(collections.namedtuple("Pair", "low high")):
    pass


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    logits: torch.Tensor


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, kind):
        h = self.lin(x)
        return {"tuple": (h, 2 * h), "dict": {"a": h, "b": -h}, "named": Pair(h, h + 1), "dc": Out(h, h.sum(1))}[kind]


class Wrap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.inner = Structured()
        self.kind = kind

    def forward(self, x):
        return self.inner(x, self.kind)


@pytest.mark.parametrize("kind,spec,expected", [
    ("tuple", "inner[1]", lambda h: 2 * h),
    ("dict", "inner['b']", lambda h: -h),
    ("dict", 'inner["a"]', lambda h: h),
    ("named", "inner[1]", lambda h: h + 1),
    ("named", "inner['high']", lambda h: h + 1),
    ("named", "inner:output.low", lambda h: h),
    ("dc", "inner:output.logits", lambda h: h.sum(1)),
    ("dc", "inner['hidden']", lambda h: h),
])
def test_selectors_on_structured_outputs(kind, spec, expected):
    m = Wrap(kind)
    x = torch.randn(2, 4)
    with featkd.capture(m, [spec, "inner:input"]) as feats:
        m(x)
    torch.testing.assert_close(feats[spec], expected(m.inner.lin(x)))
    # two positional arguments: the input is their tuple
    assert feats["inner:input"][1] == kind and torch.equal(feats["inner:input"][0], x)


def test_structured_output_without_selector_is_cloned_elementwise():
    m = Wrap("named")
    x = torch.randn(2, 4)
    with featkd.capture(m, ["inner"]) as feats:
        m(x)
    assert isinstance(feats["inner"], Pair)
    torch.testing.assert_close(feats["inner"].high, m.inner.lin(x) + 1)


def test_bad_selector_describes_the_output():
    m = Wrap("dict")
    with pytest.raises(KeyError, match=r"""cannot select 'c' from a dict with keys \['a', 'b'\]"""):
        with featkd.capture(m, ["inner['c']"]):
            m(torch.randn(2, 4))
    m = Wrap("tuple")
    with pytest.raises(KeyError, match=r"cannot select 2 from a tuple of length 2"):
        with featkd.capture(m, ["inner[2]"]):
            m(torch.randn(2, 4))


def test_vit_tokens_and_attention_tuple():
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    block = "encoder.layers.encoder_layer_0"
    with featkd.capture(m, [block, f"{block}.self_attention[0]", f"{block}.self_attention:input[0]"]) as feats:
        m(x)
    blk = m.encoder.layers.encoder_layer_0
    with torch.no_grad():
        tokens = m._process_input(x)
        tokens = torch.cat([m.class_token.expand(2, -1, -1), tokens], dim=1) + m.encoder.pos_embedding
        normed = blk.ln_1(tokens)
        attended = blk.self_attention(normed, normed, normed, need_weights=False)[0]
        torch.testing.assert_close(feats[f"{block}.self_attention:input[0]"], normed)
        torch.testing.assert_close(feats[f"{block}.self_attention[0]"], attended)
        torch.testing.assert_close(feats[block], blk(tokens))

    infos = {i.name: i for i in featkd.list_layers(m, x)}
    enc = infos[block]
    assert (enc.shape, enc.channels, enc.layout, enc.stride, enc.prefix_tokens) == ((2, 17, 32), 32, "NLC", 8, 1)
    conv = infos["conv_proj"]
    assert (conv.shape, conv.channels, conv.layout, conv.stride) == ((2, 32, 4, 4), 32, "NCHW", 8)
    assert infos[f"{block}.self_attention"].shape == ((2, 17, 32), None)
    assert infos["heads"].layout == "NC" and infos["heads"].channels == 10


# ----------------------------------------------------------------------------- teacher / student


def test_teacher_detached_student_keeps_graph():
    torch.manual_seed(0)
    teacher, student = ConvInplaceRelu(), ConvInplaceRelu()
    t_ext = featkd.FeatureExtractor(teacher, ["conv", "bn"], no_grad=True, detach=True)
    s_ext = featkd.FeatureExtractor(student, ["conv", "bn"])
    x = torch.randn(2, 3, 8, 8)
    _, f_t = t_ext(x)
    _, f_s = s_ext(x)
    assert not any(f.requires_grad for f in f_t.values())
    assert all(f.requires_grad for f in f_s.values())
    loss = (f_s["bn"] - f_t["bn"]).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, student.conv.weight)
    bn_t = teacher.bn(teacher.conv(x)).detach()
    (expected,) = torch.autograd.grad((student.bn(student.conv(x)) - bn_t).pow(2).mean(), student.conv.weight)
    torch.testing.assert_close(grad, expected)
    assert teacher.conv.weight.grad is None


# ----------------------------------------------------------------------------- torch.compile


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        h = self.relu(self.conv2(h))
        return self.head(h.mean((2, 3)))


def test_compiled_student_delivers_features_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SmallNet()
    compiled = torch.compile(m, backend="eager")
    ext = featkd.FeatureExtractor(compiled, ["_orig_mod.conv1", "conv2", "relu"])  # before the first call
    assert ext.layers == ["_orig_mod.conv1", "conv2", "relu"]
    x = torch.randn(2, 3, 8, 8)
    for step in range(3):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out, feats = ext(x + step)
        conv1 = m.conv1(x + step)
        torch.testing.assert_close(feats["conv1"], conv1)  # cloned before the in-place ReLU
        torch.testing.assert_close(feats["relu#1"], torch.relu(m.conv2(torch.relu(conv1))))
        assert feats.num_calls("relu") == 2
    feats["conv2"].sum().backward()
    assert m.conv1.weight.grad.abs().sum() > 0
    ext.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_extractor_created_after_first_compiled_call_still_captures(how):
    import torch._dynamo

    torch._dynamo.reset()
    m = SmallNet()
    if how == "Module.compile":
        m.compile(backend="eager")
        compiled = m
    else:
        compiled = torch.compile(m, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x)  # compiled without hooks; dynamo would keep running this code
    with featkd.FeatureExtractor(compiled, ["head:input"]) as late:
        _, feats = late(x)
    torch.testing.assert_close(feats["head:input"], m.conv2(m.conv1(x).relu()).relu().mean((2, 3)))
    torch._dynamo.reset()


def test_compiled_function_without_hooks_is_reported():
    import torch._dynamo

    torch._dynamo.reset()
    m = SmallNet()
    step = torch.compile(lambda x: m(x), backend="eager")
    x = torch.randn(2, 3, 8, 8)
    step(x)
    with featkd.capture(m, ["head"]) as feats:
        step(x)
    with pytest.raises(RuntimeError, match=r"'head' ran 0 time.*torch.compile.*create the extractor before"):
        feats["head"]
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- checkpointing


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.use_reentrant = use_reentrant

    def segment(self, x):
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x):
        if self.use_reentrant is None:
            return self.c(self.segment(x))
        return self.c(checkpoint(self.segment, x, use_reentrant=self.use_reentrant))


def test_checkpoint_non_reentrant_no_duplicates_and_same_gradients():
    torch.manual_seed(0)
    m = Checkpointed(use_reentrant=False)
    plain = Checkpointed(use_reentrant=None)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, 4)
    grads = []
    for model in (m, plain):
        with featkd.capture(model, ["a", "b"]) as feats:
            out = model(x)
            (feats["a"].pow(2).sum() + feats["b"].sum() + out.sum()).backward()  # recomputes a, b
        assert feats.num_calls("a") == 1 and feats.num_calls("b") == 1
        grads.append(model.a.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_checkpoint_reentrant_is_detected():
    m = Checkpointed(use_reentrant=True)
    x = torch.randn(3, 4, requires_grad=True)
    with featkd.FeatureExtractor(m, ["a"]) as ext, pytest.raises(RuntimeError, match="use_reentrant=True"):
        ext(x)
    # a teacher's detached features have no graph to lose: fine, and no duplicates on backward
    with featkd.capture(m, ["a"], detach=True) as feats:
        m(x).sum().backward()
    assert feats.num_calls("a") == 1
    torch.testing.assert_close(feats["a"], m.a(x).detach())


def test_submodule_called_directly_under_no_grad_is_not_mistaken_for_checkpointing():
    m = Checkpointed(use_reentrant=None)
    x = torch.randn(3, 4)
    with featkd.capture(m, ["a"]) as feats:
        m(x)  # a forward with grad on sets the check up; it must not outlive the forward
        with torch.no_grad():
            m.segment(x)
    assert feats.num_calls("a") == 2 and feats["a#0"].requires_grad and not feats["a#1"].requires_grad


# ----------------------------------------------------------------------------- lifetime


def test_hooks_removed_when_forward_raises():
    m = Wrap("tuple")
    m.kind = "missing"
    with pytest.raises(KeyError), featkd.capture(m, ["inner", "inner.lin:input"]):
        m(torch.randn(2, 4))
    assert not m.inner._forward_hooks and not m.inner.lin._forward_pre_hooks and not m._forward_pre_hooks


def test_extractor_keeps_no_reference():
    m = SmallNet()
    ext = featkd.FeatureExtractor(m, ["conv1", "conv2"])
    _, feats = ext(torch.randn(1, 3, 8, 8))
    ref = weakref.ref(feats["conv1"])
    del feats
    gc.collect()
    assert ref() is None

    _, feats = ext(torch.randn(1, 3, 8, 8))
    ref = weakref.ref(feats["conv2"])
    feats.clear()
    gc.collect()
    assert ref() is None and list(feats) == ["conv1", "conv2"]


def test_extractor_clear_remove_and_context_manager():
    m = SmallNet()
    with featkd.FeatureExtractor(m, ["conv*"]) as ext:
        assert ext.layers == ["conv1", "conv2"]
        for _ in range(3):
            m(torch.randn(1, 3, 8, 8))  # direct calls (an evaluation, another extractor's): nothing stored
        assert not ext._recorder.calls["conv1"] and not ext._recorder.calls["conv2"]
        _, feats = ext(torch.randn(1, 3, 8, 8))
        assert feats.num_calls("conv1") == 1  # only its own call
        m.head = nn.Linear(5, 2)  # fails after conv1 and conv2 have stored their outputs
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            ext(torch.randn(1, 3, 8, 8))
        assert not ext._recorder.calls["conv1"] and not ext._recorder.calls["conv2"]
    assert not m.conv1._forward_hooks and not m._forward_pre_hooks
    with pytest.raises(RuntimeError, match="removed"):
        ext(torch.randn(1, 3, 8, 8))


def test_extractor_raises_when_a_layer_did_not_run():
    class Branchy(SmallNet):
        def forward(self, x):
            return self.head(self.conv1(x).mean((2, 3)))

    with pytest.raises(RuntimeError, match="'conv2' ran 0 time"):
        featkd.FeatureExtractor(Branchy(), ["conv2"])(torch.randn(1, 3, 8, 8))


def test_features_mapping_errors():
    feats = Features({"layer1": []}, {"layer1": None})
    with pytest.raises(RuntimeError, match="ran 0 time"):
        feats["layer1"]
    with pytest.raises(KeyError, match="Closest existing names: layer1"):
        feats["layer2"]
    assert "layer1" in feats and len(feats) == 1


# ----------------------------------------------------------------------------- list_layers


def test_list_layers_resnet_strides_and_no_side_effects(resnet):
    resnet.train()
    before = resnet.bn1.running_mean.clone()
    infos = featkd.list_layers(resnet, torch.randn(2, 3, 64, 64))
    assert resnet.training and resnet.layer1[0].bn1.training
    torch.testing.assert_close(resnet.bn1.running_mean, before)
    resnet.eval()
    by_name = {i.name: i for i in infos}
    assert all(isinstance(i, LayerInfo) for i in infos)
    assert [(by_name[f"layer{k}"].channels, by_name[f"layer{k}"].stride) for k in range(1, 5)] == [
        (64, 4), (128, 8), (256, 16), (512, 32)
    ]
    assert by_name["layer3"].shape == (2, 256, 4, 4) and by_name["conv1"].type == "Conv2d"
    assert by_name["fc"].shape == (2, 10) and by_name["fc"].stride is None
    assert "" not in by_name and [i.name for i in infos][:3] == ["conv1", "bn1", "relu"]


def test_list_layers_conv1d_is_channels_first():
    m = nn.Sequential(nn.Conv1d(2, 5, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(5 * 8, 3))
    infos = featkd.list_layers(m, torch.randn(1, 2, 16))
    assert (infos[0].layout, infos[0].channels, infos[0].stride) == ("NCL", 5, 2)
