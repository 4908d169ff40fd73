import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featkd
from featkd.terms import FeatureAdapter, Warmup
from featkd.engine import DistillMethod, build_optimizer
from featkd.models import create_model


def wrns(teacher="wrn16_2", student="wrn16_1"):
    torch.manual_seed(0)
    return create_model(teacher, 10, 1), create_model(student, 10, 1)


def groups(model, x):
    """The WRN group outputs computed by hand (no hooks)."""
    g1 = model.group1(model.conv1(x))
    g2 = model.group2(g1)
    g3 = model.group3(g2)
    return {"group1": g1, "group2": g2, "group3": g3}


def ref_at(f_s, f_t):
    a = [F.normalize(f.pow(2).mean(1).flatten(1)) for f in (f_s, f_t)]
    return (a[0] - a[1]).pow(2).mean()


def ref_nst_poly(f_s, f_t):
    x, y = (F.normalize(f.flatten(2), dim=2) for f in (f_s, f_t))
    k = lambda a, b: torch.einsum("bin,bjn->bij", a, b).pow(2).mean((1, 2))
    return (k(x, x) + k(y, y) - 2 * k(x, y)).mean()


def ref_kd(s, t, T):
    p_t = F.softmax(t / T, 1)
    return (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T


def test_losses_match_hand_computed_features_and_sum_to_total():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[
        featkd.Term("group1", "group1", loss="at", weight=1000),
        featkd.Term("group3", "group3", loss="nst", weight=50, options={"kernel": "poly"}),
    ], kd={"loss": "kd", "weight": 0.9, "T": 4}, ce_weight=0.1)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    d.setup(x[:2])
    logits, losses = d(x, y)
    assert list(losses) == ["ce", "kd", "at:group1", "nst:group3", "total"]
    d.remove_hooks()  # the references below run the models without capture
    with torch.no_grad():
        f_t, t_logits = groups(teacher, x), teacher(x)
        f_s, s_logits = groups(student, x), student(x)
    torch.testing.assert_close(logits.detach(), s_logits)
    torch.testing.assert_close(losses["ce"], 0.1 * F.cross_entropy(s_logits, y))
    torch.testing.assert_close(losses["kd"], 0.9 * ref_kd(s_logits, t_logits, 4.0))
    torch.testing.assert_close(losses["at:group1"], 1000 * ref_at(f_s["group1"], f_t["group1"]))
    torch.testing.assert_close(losses["nst:group3"], 50 * ref_nst_poly(f_s["group3"], f_t["group3"]))
    parts = [v for k, v in losses.items() if k != "total"]
    torch.testing.assert_close(losses["total"], sum(parts))


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher, student = wrns()
    teacher.train()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group2", loss="at")])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d.setup(torch.randn(2, 1, 28, 28))
    d.train()
    assert not teacher.training and student.training
    _, losses = d(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    losses["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats untouched
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    ids = {id(p) for p in d.trainable_parameters()}
    assert ids == {id(p) for p in student.parameters()}


class KeepsTeacherInputs(nn.Module):
    """A feature loss (or a logit loss) that keeps what the teacher gave it and adds nothing."""

    def __init__(self):
        super().__init__()
        self.teacher_inputs = []

    def forward(self, student, teacher, targets=None):
        self.teacher_inputs.append(teacher)
        return student.sum() * 0


@pytest.mark.parametrize("teacher_bn", ["eval", "batch_stats"])
def test_teacher_bn_uses_running_or_batch_statistics_and_leaves_the_teacher_as_it_was(teacher_bn):
    teacher, student = wrns()
    reference = copy.deepcopy(teacher)  # run plainly below: eval mode, or training mode (batch statistics)
    feature, logits = KeepsTeacherInputs(), KeepsTeacherInputs()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("bn", loss=feature, adapter=None)], kd=logits,
                         teacher_bn=teacher_bn)
    x = torch.randn(8, 1, 28, 28)
    d.setup(x[:2])
    d.train()
    d(x)
    d(x)
    # the teacher's running statistics, batch counts and modes are what they were
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert not any(m.training for m in teacher.modules())
    assert all(m.track_running_stats for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    captured = {}
    reference.bn.register_forward_hook(lambda module, inputs, output: captured.update(bn=output))
    with torch.no_grad():
        reference_logits = reference.train(teacher_bn == "batch_stats")(x)
    torch.testing.assert_close(feature.teacher_inputs[-1], captured["bn"])
    torch.testing.assert_close(logits.teacher_inputs[-1], reference_logits)
    with pytest.raises(ValueError, match=r"teacher_bn must be one of \['eval', 'batch_stats'\], got 'train'"):
        featkd.Distiller(teacher, student, kd="kd", teacher_bn="train")


def test_dry_run_does_not_touch_student_bn_statistics():
    teacher, student = wrns()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="nst")]).setup(torch.randn(2, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student.training


class MSE(nn.Module):
    """A loss that needs identical shapes (checked up front, like the registry's losses)."""

    def check_shapes(self, s, t):
        if tuple(s[1:]) != tuple(t[1:]):
            raise ValueError(f"mse needs equal shapes, got {s} and {t}")

    def forward(self, f_s, f_t):
        return (f_s - f_t).pow(2).mean()


def test_automatic_adapters_only_where_needed_and_trained():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[
        featkd.Term("group3", "group3", loss="at"),                 # channels differ: AT does not care
        featkd.Term("group3", "group3", loss=MSE(), name="mse3"),    # channels differ: 1x1 conv
        featkd.Term("group2", "group3", loss="at", name="at32"),    # 14x14 teacher vs 7x7 student
        # 7x7x128 teacher vs 14x14x32 student: AT needs the size matched, not the channels; MSE both
        featkd.Term("group3", "group2", loss="at", name="at23"),
        featkd.Term("group3", "group2", loss=MSE(), name="mse23"),
    ])
    d.setup(torch.randn(2, 1, 28, 28))
    plain, conv, resize, pooled, both = (pair[0] for pair in d.adapters)
    assert pooled.resize == "pool" and pooled.conv is None and not list(pooled.parameters())
    assert both.resize == "pool" and both.conv[0].weight.shape == (128, 32, 1, 1)
    assert isinstance(plain, nn.Identity)
    assert isinstance(conv, FeatureAdapter) and conv.conv[0].weight.shape == (128, 64, 1, 1) and conv.resize is None
    assert isinstance(resize, FeatureAdapter) and resize.conv is None and resize.resize == "interpolate"
    assert {id(p) for p in conv.parameters()} <= {id(p) for p in d.trainable_parameters()}
    _, losses = d(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    losses["total"].backward()
    assert conv.conv[0].weight.grad.abs().sum() > 0


def test_shape_mismatch_without_adapter_names_layers_and_shapes():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group2", "group3", loss="at", adapter=None)])
    with pytest.raises(ValueError, match=r"term 'at:group3'.*\['group3'\].*\(2, 64, 7, 7\).*\['group2'\].*\(2, 64, 14, 14\)"):
        d.setup(torch.randn(2, 1, 28, 28))


def test_term_over_several_layer_pairs_sums_them():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term(["group1", "group2", "group3"], loss="at", weight=1000)])
    x = torch.randn(4, 1, 28, 28)
    d.setup(x[:2])
    _, losses = d(x)
    d.remove_hooks()
    with torch.no_grad():
        f_s, f_t = groups(student, x), groups(teacher, x)
    expected = 1000 * sum(ref_at(f_s[g], f_t[g]) for g in ("group1", "group2", "group3"))
    torch.testing.assert_close(losses["at:group1+group2+group3"], expected)
    with pytest.raises(ValueError, match="shared by all its layer pairs"):
        featkd.Term(["group1", "group2"], loss=MSE())


def test_fsp_term_over_two_layers():
    teacher, student = wrns("wrn16_1", "wrn16_1")
    d = featkd.Distiller(teacher, student, terms=[featkd.Term(["group2", "group3"], loss="fsp", options={"resize": "pool"})])
    x = torch.randn(4, 1, 28, 28)
    d.setup(x[:2])
    _, losses = d(x)
    assert set(losses) == {"fsp:group2+group3", "total"}  # no y: no CE
    assert losses["total"] > 0


def test_warmup_weight_and_unlabelled_batches():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="at", weight=Warmup(100, steps=10))],
                         kd="kd")
    x = torch.randn(4, 1, 28, 28)
    d.setup(x[:2]).eval()
    unlabelled = torch.full((4,), -1)
    _, full = d(x, unlabelled)
    _, half = d(x, unlabelled, step=5)
    _, start = d(x, unlabelled, step=0)
    assert full["ce"] == 0 and full["kd"] > 0
    torch.testing.assert_close(half["at:group3"], full["at:group3"] / 2)
    assert start["at:group3"] == 0
    w = Warmup(8.0, epochs=4)
    assert [w(epoch=e) for e in (0, 1, 2.5, 4, 10)] == [0.0, 2.0, 5.0, 8.0, 8.0] and w() == 8.0
    with pytest.raises(ValueError, match="exactly one"):
        Warmup(1.0)


def test_distill_method_steps_and_uses_epoch_schedule():
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="at", weight=Warmup(10, epochs=2))],
                         kd="kd")
    with pytest.raises(RuntimeError, match=r"call distiller.setup\(example_x\)"):
        DistillMethod(d, torch.optim.SGD(student.parameters(), lr=0.1))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    d.setup(x[:2])
    opt = build_optimizer(d.trainable_parameters(), lr=0.01)
    method = DistillMethod(d, opt, steps_per_epoch=4)
    before = [p.clone() for p in student.parameters()]
    with torch.no_grad():
        _, full = d.train()(x, y)  # no step given: the full weight
    losses = method.train_step(x, y, step=2)  # epoch 0.5 of a 2-epoch warm-up: a quarter of the weight
    assert set(losses) == {"ce", "kd", "at:group3", "total"} and all(isinstance(v, float) for v in losses.values())
    assert losses["at:group3"] == pytest.approx(full["at:group3"].item() / 4, rel=1e-5)
    assert losses["kd"] == pytest.approx(full["kd"].item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert method.eval_models() == {"student": student}
    assert not teacher.training


def test_bad_terms_are_reported():
    teacher, student = wrns()
    with pytest.raises(ValueError, match="unique"):
        featkd.Distiller(teacher, student, terms=[featkd.Term("group3"), featkd.Term("group3")])
    with pytest.raises(ValueError, match="nothing to distill"):
        featkd.Distiller(teacher, student)
    with pytest.raises(ValueError, match="same length"):
        featkd.Term(["group1", "group2"], "group1")
    with pytest.raises(KeyError, match="group4"):
        featkd.Distiller(teacher, student, terms=[featkd.Term("group4")])
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="nts")])
    with pytest.raises(ValueError, match="nst"):
        d.setup(torch.randn(2, 1, 28, 28))


def test_negative_weights_are_refused_through_the_api():
    # issue #19: a negative weight maximises its loss and trained silently; 0 (a loss switched off) stays allowed
    teacher, student = wrns()
    with pytest.raises(ValueError, match=r"term 'at:group3': weight must be >= 0 .*got -1000"):
        featkd.Term("group3", loss="at", weight=-1000)
    with pytest.raises(ValueError, match=r"Warmup value must be >= 0 .*got -2"):
        Warmup(-2.0, epochs=1)
    with pytest.raises(ValueError, match=r"Warmup value must be >= 0 .*got nan"):
        Warmup(float("nan"), steps=10)
    with pytest.raises(ValueError, match=r"kd weight must be >= 0 .*got -16"):
        featkd.Distiller(teacher, student, kd={"loss": "kd", "weight": -16, "T": 4})
    with pytest.raises(ValueError, match=r"ce_weight must be >= 0 .*got -1"):
        featkd.Distiller(teacher, student, kd="kd", ce_weight=-1)
    off = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", weight=0)], kd={"weight": 0}, ce_weight=0)
    off.setup(torch.randn(2, 1, 28, 28))
    _, losses = off(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    assert losses["total"].item() == 0.0


def test_a_layout_that_contradicts_the_wrn_is_refused():
    # issue #19: layout="NHWC" read the WRN's (B, 16, 28, 28) map as 28 channels on a 16x28 grid and trained
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group1", loss="at", layout="NHWC")])
    with pytest.raises(ValueError, match=r"term 'at:group1': student layer 'group1': student_layout NHWC given, which "
                                         r"reads the shape \(2, 16, 28, 28\) as 28 channels on a 16x28 grid, but the "
                                         r"model states NCHW \(16 channels on a 28x28 grid\)"):
        d.setup(torch.randn(2, 1, 28, 28))


# Issue #19 §2: torch's "Input type (unsigned char) and bias type (float) should be the same" and a bare
# IndexError (CPU) for a label past the classes, unexplained
@pytest.mark.parametrize("batch, labels, message", [
    (lambda x: x.mul(50).clamp(0, 255).to(torch.uint8), None,
     "the batch is torch.uint8 (2, 1, 28, 28), but models take float images: convert it with x.float() / 255"),
    (lambda x: x.long(), None, "the batch is torch.int64 (2, 1, 28, 28), but models take float images"),
    (lambda x: x.half(), None, "the batch is torch.float16 but the model's weights are torch.float32: pass "
                               "x.to(torch.float32)"),
    (lambda x: x, [3, 10], "labels must be class indices 0..9 for the model's 10 outputs (or -1 for unlabelled), "
                           "got 10: build the model with num_classes covering the data's labels"),
    (lambda x: x, [-2, 1], "labels must be class indices 0..9 for the model's 10 outputs (or -1 for unlabelled), "
                           "got -2"),
])
def test_a_batch_the_student_cannot_take_is_one_line_with_the_fix(batch, labels, message):
    teacher, student = wrns()
    distiller = featkd.Distiller(teacher, student, kd="kd").setup(torch.randn(2, 1, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError) as error:
        distiller(batch(x), None if labels is None else torch.tensor(labels))
    assert str(error.value).startswith(message)
    optimizer = build_optimizer(distiller.trainable_parameters())
    with pytest.raises(ValueError) as error:  # the same through the training step (full precision)
        DistillMethod(distiller, optimizer).train_step(batch(x), torch.tensor(labels or [0, 1]), 0)
    assert str(error.value).startswith(message)


def test_forward_before_setup_refuses_and_says_why():
    # set up on the first batch, the adapter would be missing from an optimiser built on the student's parameters
    teacher, student = wrns()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss="nst")])
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    with pytest.raises(RuntimeError) as error:
        d(x, y)
    message = str(error.value)
    assert "\n" not in message and "optimiser" in message
    assert "distiller.setup(example_x)" in message and "distiller.trainable_parameters()" in message
    assert not d.is_setup and len(d.adapters) == 0
    with pytest.raises(RuntimeError, match="trainable_parameters"):
        d.trainable_parameters()
    _, losses = d.setup(x[:2])(x, y)
    assert losses["nst:group3"] > 0


def test_works_with_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        teacher, student = wrns()
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        terms = [featkd.Term("group2", loss="at"), featkd.Term("group3", loss="nst")]
        plain = featkd.Distiller(teacher, student, terms=terms).setup(x[:2])
        _, expected = plain(x, y)
        plain.remove_hooks()
        wrapped = featkd.Distiller(teacher, nn.parallel.DistributedDataParallel(student), terms=terms).setup(x[:2])
        _, got = wrapped(x, y)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_student_keeps_its_hooks():
    # The student is compiled after the hooks are registered, so they are traced into the graph.
    teacher, student = wrns("wrn10_1", "wrn10_1")
    terms = [featkd.Term("group2", loss="at", weight=10), featkd.Term("group3", loss="nst", weight=5)]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    plain = featkd.Distiller(teacher, student, terms=terms, kd="kd").setup(x[:2])
    _, expected = plain(x, y)
    plain.remove_hooks()
    compiled = featkd.Distiller(teacher, student, terms=terms, kd="kd", compile={"backend": "eager"}).setup(x[:2])
    _, got = compiled(x, y)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    got["total"].backward()
    assert student.fc.weight.grad.abs().sum() > 0


def test_shared_teacher_outputs_replace_the_teacher_forward():
    teacher, student = wrns()
    terms = [featkd.Term(teacher="group3", loss="nst", weight=50)]
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    own = featkd.Distiller(teacher, student, terms=terms, kd={"loss": "kd", "T": 4})
    with pytest.raises(RuntimeError, match="setup"):
        own.share_teacher(lambda x: None)
    own.setup(x[:2])
    _, expected = own(x, y)
    own.remove_hooks()

    shared = featkd.Distiller(teacher, student, terms=terms, kd={"loss": "kd", "T": 4}).setup(x[:2])
    assert shared.teacher_layers == ["group3"]
    with torch.no_grad():
        logits, feats = teacher(x), groups(teacher, x)
    calls = []
    shared.share_teacher(lambda batch: calls.append(batch) or (logits, {"group3": feats["group3"]}))
    _, losses = shared(x, y)
    assert calls == [x]
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)
    # its own teacher hooks are gone; the student's stay
    assert not teacher.group3._forward_hooks and student.group3._forward_hooks


class MemoryBankLoss(nn.Module):
    """A loss against per-sample memory, as CRD keeps one: it needs the batch's dataset indices."""

    uses_context = True

    def __init__(self, bank):
        super().__init__()
        self.bank, self.seen = bank, []

    def forward(self, f_s, f_t, context):
        self.seen.append((context.indices, context.targets, context.step))
        return (f_s.mean((2, 3)) - self.bank[context.indices]).pow(2).sum(1).mean()


class WithIndices:
    """A DeviceLoader whose batches also carry their samples' dataset indices (from its epoch plan)."""

    def __init__(self, loader):
        self.loader, self.info = loader, loader.info

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        plan, size = self.loader.epoch_plan(), self.loader.batch_size
        for i, (x, y) in enumerate(self.loader):
            yield x, y, plan.indices[i * size:(i + 1) * size]


def test_losses_that_use_the_batch_context_get_the_sample_indices_through_fit(tmp_path):
    from featkd.data import DeviceLoader, load_dataset
    from featkd.engine import fit

    data = load_dataset("synthetic", size=48, image_size=28, num_classes=10)
    teacher, student = wrns()
    bank = torch.randn(len(data), 64)
    loss = MemoryBankLoss(bank)
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss=loss, name="bank")])
    x, y = data.images[:4].float(), data.labels[:4]
    d.setup(x[:2])
    _, losses = d(x, y, indices=torch.tensor([5, 0, 7, 2]))
    d.remove_hooks()
    with torch.no_grad():
        pooled = groups(student, x)["group3"].mean((2, 3))
    torch.testing.assert_close(losses["bank"], (pooled - bank[[5, 0, 7, 2]]).pow(2).sum(1).mean())

    loss.seen.clear()
    d = featkd.Distiller(teacher, student, terms=[featkd.Term("group3", loss=loss, name="bank")]).setup(x[:2])
    loader = DeviceLoader(data, 16, shuffle=True, seed=3)
    fit(DistillMethod(d, build_optimizer(d.trainable_parameters(), lr=0.01)), WithIndices(loader),
        DeviceLoader(data, 48, shuffle=False, drop_last=False), tmp_path / "run", 1, log=lambda _: None)
    plan = loader.epoch_plan(0).indices
    assert [step for _, _, step in loss.seen] == [0, 1, 2]
    for k, (indices, targets, _) in enumerate(loss.seen):
        assert torch.equal(indices, plan[16 * k:16 * (k + 1)])
        assert torch.equal(targets, data.labels[indices])  # the indices name the samples of the batch


def test_glob_layers_in_a_term_are_the_layers_written_out():
    # issue #19 §2: the README's globs crashed with KeyError: 'group*'
    t, s = wrns()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    written = featkd.Distiller(t, s, [featkd.Term(["group1", "group2", "group3"], loss="at", name="at"),
                                      featkd.Term("group3", loss="nst", name="nst")]).setup(x[:2])
    globbed = featkd.Distiller(t, s, [featkd.Term("group*", loss="at", name="at"),  # overlaps the NST term's group3
                                      featkd.Term("group3", loss="nst", name="nst")]).setup(x[:2])
    assert globbed.terms[0].teacher_layers == globbed.terms[0].student_layers == ["group1", "group2", "group3"]
    a, b = written(x, y)[1], globbed(x, y)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"term 'x': the teacher's \['group\*'\] match 3 layers \['group1', 'group2', "
                                         r"'group3'\], the student's \['group1\*'\] match 1 \['group1'\]"):
        featkd.Distiller(t, s, [featkd.Term("group*", "group1*", name="x")])


def test_distillers_sharing_a_teacher_store_nothing_of_each_other_s_forwards():
    teacher, _ = wrns()
    x = torch.randn(4, 1, 28, 28)
    first = featkd.Distiller(teacher, wrns()[1], [featkd.Term("group*", loss="at")]).setup(x[:2])
    second = featkd.Distiller(teacher, wrns()[1], [featkd.Term("group*", loss="at")]).setup(x[:2])
    for _ in range(3):
        second(x, torch.zeros(4, dtype=torch.long))
        first.student.eval()(x)  # an evaluation of the first one's student
    stored = [entries for extractor in (first._teacher_features, first._student_features)
              for entries in extractor._recorder.calls.values()]
    assert not any(stored)  # the hooks of the first one kept nothing of the second's teacher forwards
    _, losses = first(x, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(losses["total"])
