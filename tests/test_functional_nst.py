import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featkd.functional as KF
from featkd.functional import nst as nst_module
from _loss_reference import (
    k_linear,
    lower_median,
    make_gaussian,
    make_poly,
    nst_reference,
    unit_rows,
)

KERNEL_CASES = [
    ("linear", {}, lambda: k_linear),
    ("poly", {}, lambda: make_poly(2, 0.0)),
    ("poly", {"degree": 3, "c": 0.5}, lambda: make_poly(3, 0.5)),
    ("poly", {"degree": 1, "c": 0.5}, lambda: make_poly(1, 0.5)),
    ("gaussian", {"sigma2": 0.7}, lambda: make_gaussian(0.7)),
    ("gaussian", {"sigma2": [0.25, 1.0, 4.0]}, lambda: make_gaussian([0.25, 1.0, 4.0])),
]


def feats(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kernel,options,ref_kernel", KERNEL_CASES)
@pytest.mark.parametrize("cs,ct", [(3, 3), (2, 5)])
def test_nst_matches_loop_reference(kernel, options, ref_kernel, cs, ct):
    f_s, f_t = feats(3, cs, 4, 3), feats(3, ct, 4, 3)
    got = KF.nst_loss(f_s, f_t, kernel, **options)
    want = nst_reference(f_s.flatten(2).numpy(), f_t.flatten(2).numpy(), ref_kernel())
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # The same value when the forward also prepares the backward (the paired route then works in place).
    with_grad = KF.nst_loss(f_s.clone().requires_grad_(), f_t, kernel, **options)
    assert with_grad.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("route", ["spatial", "channels", "auto"])
@pytest.mark.parametrize("cs,ct,n", [(2, 3, 16), (12, 9, 4), (3, 3, 16), (12, 12, 4)])
def test_poly2_routes_match_reference(route, cs, ct, n):
    f_s, f_t = feats(2, cs, n), feats(2, ct, n)
    want = nst_reference(f_s.numpy(), f_t.numpy(), make_poly(2, 0.0))
    assert KF.nst_loss(f_s, f_t, "poly", route=route).item() == pytest.approx(want, rel=1e-10)


def test_gaussian_median_heuristic_matches_reference():
    f_s, f_t = feats(2, 3, 5), feats(2, 4, 5)
    xs = [unit_rows(f_s[b].numpy()) for b in range(2)]
    ys = [unit_rows(f_t[b].numpy()) for b in range(2)]
    cross = [np.sum((x - y) ** 2) for b in range(2) for x in xs[b] for y in ys[b]]
    sigma2 = lower_median(cross)
    want = nst_reference(f_s.numpy(), f_t.numpy(), make_gaussian(sigma2))
    assert KF.nst_loss(f_s, f_t, "gaussian").item() == pytest.approx(want, rel=1e-10)


def test_tokens_layout_and_flat_maps_agree_with_maps():
    f_s, f_t = feats(2, 3, 4, 4), feats(2, 6, 4, 4)
    want = KF.nst_loss(f_s, f_t)
    assert KF.nst_loss(f_s.flatten(2), f_t.flatten(2)).item() == pytest.approx(want.item(), rel=1e-12)
    tokens = KF.nst_loss(f_s.flatten(2).transpose(1, 2), f_t.flatten(2).transpose(1, 2), layout="tokens")
    assert tokens.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("resize", ["pool", "interpolate"])
def test_resize_options_match_explicit_resize(resize):
    f_s, f_t = feats(2, 3, 8, 8), feats(2, 4, 4, 4)
    if resize == "pool":
        pooled = torch.nn.functional.adaptive_avg_pool2d(f_s, 4)
    else:
        pooled = torch.nn.functional.interpolate(f_s, size=(4, 4), mode="bilinear", align_corners=False)
    want = nst_reference(pooled.flatten(2).numpy(), f_t.flatten(2).numpy(), make_poly())
    assert KF.nst_loss(f_s, f_t, resize=resize).item() == pytest.approx(want, rel=1e-10)


def test_spatial_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"spatial sizes differ.*\(2, 3, 8, 8\).*\(2, 4, 4, 4\).*resize='pool'"):
        KF.nst_loss(feats(2, 3, 8, 8), feats(2, 4, 4, 4))
    with pytest.raises(ValueError, match="needs \\(B, C, H, W\\) maps"):
        KF.nst_loss(feats(2, 3, 64), feats(2, 4, 16), resize="pool")


def test_unknown_kernel_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'gaussian'"):
        KF.nst_loss(feats(1, 2, 4), feats(1, 2, 4), "gausian")
    with pytest.raises(ValueError, match="unknown NST route"):
        KF.nst_loss(feats(1, 2, 4), feats(1, 2, 4), route="fastest")


def test_a_new_kernel_is_one_registered_function():
    @KF.register_kernel("imq_test")
    def inverse_multiquadric(sq_dist, *, sigma2, beta=0.5):
        return (1 + sq_dist / sigma2).pow(-beta)

    try:
        f_s, f_t = feats(2, 3, 6), feats(2, 2, 6)
        ref = lambda x, y: float((1 + np.sum((x - y) ** 2) / 0.8) ** -0.25)  # noqa: E731
        got = KF.nst_loss(f_s, f_t, "imq_test", sigma2=0.8, beta=0.25)
        assert got.item() == pytest.approx(nst_reference(f_s.numpy(), f_t.numpy(), ref), rel=1e-10)
        # sigma2=None: the median heuristic applies to any kernel with a sigma2 parameter
        assert torch.isfinite(KF.nst_loss(f_s, f_t, "imq_test"))
        with pytest.raises(ValueError, match="unknown \\['gamma'\\]"):
            KF.nst_loss(f_s, f_t, "imq_test", gamma=1.0)
    finally:
        del nst_module.KERNELS["imq_test"]


GRADCHECK_CASES = [("linear", {}), ("poly", {"route": "spatial"}), ("poly", {"route": "channels"}),
                   ("poly", {"degree": 3, "c": 1.0}), ("poly", {"degree": 2, "c": 0.5}), ("gaussian", {"sigma2": 0.7}),
                   ("gaussian", {"sigma2": [0.5, 2.0]})]


@pytest.mark.parametrize("kernel,options", GRADCHECK_CASES)
@pytest.mark.parametrize("ct", [4, 3])  # unequal channel counts: three-mean form; equal: the paired route
def test_gradcheck(kernel, options, ct):
    f_s = feats(2, 3, 3, 2).requires_grad_()
    f_t = feats(2, ct, 3, 2)
    assert torch.autograd.gradcheck(lambda s: KF.nst_loss(s, f_t, kernel, **options), (f_s,))
    close = (f_t[:, :3] + 1e-3 * feats(2, 3, 3, 2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: KF.nst_loss(s, f_t, kernel, **options), (close,))


@pytest.mark.parametrize("kernel,options", GRADCHECK_CASES)
def test_paired_gradient_with_dead_channels(kernel, options):
    # A dead (all-zero) channel is a zero vector and gets no gradient (the loss is not differentiable
    # there); the live entries are checked by finite differences with the dead channel held at zero.
    # Student dead where the teacher is live, and the other way round.
    f_s, f_t = feats(2, 4, 3, 2), feats(2, 4, 3, 2)
    f_t[1, 2] = 0
    live = torch.ones_like(f_s, dtype=torch.bool)
    live[0, 1] = False

    def loss(values):
        return KF.nst_loss(torch.zeros_like(f_s).masked_scatter(live, values), f_t, kernel, **options)

    assert torch.autograd.gradcheck(loss, (f_s[live].requires_grad_(),))
    s = f_s.masked_fill(~live, 0.0).requires_grad_()
    KF.nst_loss(s, f_t, kernel, **options).backward()
    assert torch.equal(s.grad[0, 1], torch.zeros_like(s.grad[0, 1]))


def test_paired_backward_runs_twice():
    f_s, f_t = feats(2, 5, 8).requires_grad_(), feats(2, 5, 8)
    for kernel, options in GRADCHECK_CASES[1:]:
        loss = KF.nst_loss(f_s, f_t, kernel, **options)
        first, = torch.autograd.grad(loss, f_s, retain_graph=True)
        again, = torch.autograd.grad(loss, f_s)
        assert torch.equal(first, again)


@pytest.mark.parametrize("kernel,options", GRADCHECK_CASES[1:])
def test_paired_route_has_second_derivatives(kernel, options):
    # gradgradcheck differences the hand-written first derivative numerically and compares it with the
    # second derivative that create_graph=True builds: the two must describe the same function.
    f_s, f_t = feats(2, 3, 3, 2).requires_grad_(), feats(2, 3, 3, 2)
    assert torch.autograd.gradgradcheck(lambda s: KF.nst_loss(s, f_t, kernel, **options), (f_s,))


def test_teacher_gets_no_gradient():
    f_s, f_t = feats(2, 3, 8).requires_grad_(), feats(2, 4, 8).requires_grad_()
    KF.nst_loss(f_s, f_t, "gaussian").backward()
    assert f_t.grad is None and f_s.grad is not None


@pytest.mark.parametrize(
    "kernel,options",
    [("linear", {}), ("poly", {"route": "spatial"}), ("poly", {"route": "channels"}), ("gaussian", {}),
     ("gaussian", {"sigma2": 0.3})],
)
def test_dead_channels_are_zero_vectors(kernel, options):
    f_s, f_t = feats(2, 4, 9), feats(2, 3, 9)
    f_s[:, 1] = 0
    f_t[0, 2] = 0
    got = KF.nst_loss(f_s, f_t, kernel, **options)
    assert torch.isfinite(got)
    if kernel == "gaussian" and "sigma2" not in options:
        xs = [unit_rows(f_s[b].numpy()) for b in range(2)]
        ys = [unit_rows(f_t[b].numpy()) for b in range(2)]
        options = {"sigma2": lower_median([np.sum((x - y) ** 2) for b in range(2) for x in xs[b] for y in ys[b]])}
    ref_kernel = {"linear": lambda: k_linear, "poly": lambda: make_poly(), "gaussian": lambda: make_gaussian(options["sigma2"])}[kernel]()
    assert got.item() == pytest.approx(nst_reference(f_s.numpy(), f_t.numpy(), ref_kernel), rel=1e-10)
    f_s.requires_grad_()
    KF.nst_loss(f_s, f_t, kernel, **options).backward()
    assert torch.isfinite(f_s.grad).all()


ACCURACY_CASES = [("linear", {}), ("poly", {"route": "channels"}), ("poly", {"route": "spatial"}), ("poly", {}),
                  ("poly", {"degree": 3, "c": 0.5}), ("gaussian", {"sigma2": 0.5}), ("gaussian", {}),
                  ("gaussian", {"sigma2": [0.25, 1.0, 4.0]})]


@pytest.mark.parametrize("kernel,options", ACCURACY_CASES)
@pytest.mark.parametrize("shape,relu", [((4, 16, 12, 12), False), ((4, 16, 12, 12), True), ((3, 40, 4, 4), False)])
def test_student_close_to_teacher_is_accurate_in_float32_and_bf16_autocast(kernel, options, shape, relu):
    # Student = teacher + eps: the value is O(eps^2) while each kernel mean is O(1). Against float64 on the
    # same float32 tensors, every kernel and route keeps 1e-3 relative (or 1e-9 absolute) and is never negative.
    g = torch.Generator().manual_seed(0)
    f_t = torch.randn(*shape, generator=g)
    f_t = f_t.relu() if relu else f_t
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        f_s = f_t + eps * torch.randn(*shape, generator=g)
        f_s = f_s.relu() if relu else f_s
        exact = nst_reference(f_s.double().flatten(2).numpy(), f_t.double().flatten(2).numpy(),
                              _reference_kernel(kernel, options, f_s.double(), f_t.double()))
        got32 = KF.nst_loss(f_s, f_t, kernel, **options).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = KF.nst_loss(f_s, f_t, kernel, **options).item()
        for got in (got32, got_bf16):
            assert got >= 0.0
            assert got == pytest.approx(exact, rel=1e-3, abs=1e-9), (eps, got, exact)


@pytest.mark.parametrize("kernel,options", [case for case in ACCURACY_CASES if case[0] != "linear"])
def test_student_close_to_teacher_gradient_is_accurate_in_float32(kernel, options):
    # The hand-written backward of the paired route keeps the gradient's digits too: against float64
    # (itself checked by gradcheck), 1e-3 relative in norm down to eps = 1e-4 (7e-4 seen, from D's rounding).
    # Linear NST (autograd through the channel means) is not held to this.
    g = torch.Generator().manual_seed(0)
    f_t = torch.randn(3, 40, 4, 4, generator=g)
    for eps in (1e-1, 1e-4):
        f_s = f_t + eps * torch.randn(f_t.shape, generator=g)
        grads = []
        for dtype in (torch.float64, torch.float32):
            s = f_s.to(dtype).requires_grad_()
            KF.nst_loss(s, f_t.to(dtype), kernel, **options).backward()
            grads.append(s.grad.double())
        assert (grads[1] - grads[0]).norm() <= 1e-3 * grads[0].norm(), eps


def _reference_kernel(kernel, options, f_s, f_t):
    if kernel == "linear":
        return k_linear
    if kernel == "poly":
        return make_poly(options.get("degree", 2), options.get("c", 0.0))
    sigma2 = options.get("sigma2")
    if sigma2 is None:
        xs = [unit_rows(f_s[b].flatten(1).numpy()) for b in range(f_s.shape[0])]
        ys = [unit_rows(f_t[b].flatten(1).numpy()) for b in range(f_t.shape[0])]
        sigma2 = lower_median([np.sum((x - y) ** 2) for b in range(len(xs)) for x in xs[b] for y in ys[b]])
    return make_gaussian(sigma2)


@pytest.mark.parametrize("kernel,options,message", [
    ("gaussian", {"sigma2": -1}, "sigma2 must be > 0"),
    ("gaussian", {"sigma2": 0}, "sigma2 must be > 0"),
    ("gaussian", {"sigma2": [1.0, -2.0]}, "sigma2 must be > 0"),
    ("poly", {"degree": -1}, "degree must be a positive integer"),
    ("poly", {"degree": 0}, "degree must be a positive integer"),
    ("poly", {"degree": 2.5}, "degree must be a positive integer"),
    ("poly", {"c": -1.0}, "c must be >= 0"),
])
def test_invalid_kernel_parameters_are_refused(kernel, options, message):
    with pytest.raises(ValueError, match=message):
        KF.nst_loss(feats(2, 3, 4), feats(2, 3, 4), kernel, **options)


@pytest.mark.parametrize("loss", [KF.nst_loss, KF.at_loss, KF.gram_loss, KF.hint_loss])
def test_empty_batch_is_a_clear_error(loss):
    with pytest.raises(ValueError, match="empty batch"):
        loss(feats(0, 3, 4, 4), feats(0, 3, 4, 4))


def test_a_new_kernel_gets_its_own_defaults_not_polys():
    # A registered kernel with a `degree` parameter keeps its own default (poly's 2 is not passed to it).
    @KF.register_kernel("cubic_test")
    def cubic(dot, *, degree=3):
        return dot.pow(degree)

    try:
        f_s, f_t = feats(2, 3, 6), feats(2, 3, 6)
        want = nst_reference(f_s.numpy(), f_t.numpy(), make_poly(3, 0.0))
        assert KF.nst_loss(f_s, f_t, "cubic_test").item() == pytest.approx(want, rel=1e-10)
    finally:
        del nst_module.KERNELS["cubic_test"]


def test_identical_inputs_give_zero_and_losses_are_non_negative():
    f = feats(3, 5, 16).float()
    for kernel in ("linear", "poly", "gaussian"):
        assert KF.nst_loss(f, f.clone(), kernel).item() == pytest.approx(0.0, abs=1e-6)
    same = KF.nst_loss(f, f.clone(), "poly", route="spatial").item()
    assert 0.0 <= same < 1e-12
    for _ in range(5):  # the N×N route is a sum of squares: never negative, even when nearly equal
        assert KF.nst_loss(f, f + 1e-6 * torch.randn_like(f), "poly", route="spatial").item() >= 0.0


def test_bf16_autocast_computes_in_float32():
    f_s, f_t = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4)
    for kernel in ("poly", "gaussian"):
        want = KF.nst_loss(f_s, f_t, kernel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = KF.nst_loss(f_s, f_t, kernel)
            got_bf16_inputs = KF.nst_loss(f_s.bfloat16(), f_t.bfloat16(), kernel)
        assert got.dtype == torch.float32 and got_bf16_inputs.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert got_bf16_inputs.item() == pytest.approx(want.item(), rel=0.1)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), cs=st.integers(1, 5), ct=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4),
    kernel=st.sampled_from(["linear", "poly", "poly3", "gaussian"]), seed=st.integers(0, 2**16),
)
def test_property_matches_reference_non_negative_zero_on_self(b, cs, ct, h, w, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64)
    f_t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64)
    name, options, ref = {
        "linear": ("linear", {}, k_linear),
        "poly": ("poly", {}, make_poly()),
        "poly3": ("poly", {"degree": 3, "c": 0.2}, make_poly(3, 0.2)),
        "gaussian": ("gaussian", {"sigma2": 0.5}, make_gaussian(0.5)),
    }[kernel]
    got = KF.nst_loss(f_s, f_t, name, **options).item()
    assert got == pytest.approx(nst_reference(f_s.flatten(2).numpy(), f_t.flatten(2).numpy(), ref), rel=1e-9, abs=1e-12)
    assert got >= -1e-12
    assert abs(KF.nst_loss(f_s, f_s.clone(), name, **options).item()) < 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["linear", "poly", "gaussian"])
def test_cuda_matches_cpu_and_fp16_autocast_stays_float32(kernel):
    f_s, f_t = torch.randn(4, 32, 6, 6), torch.randn(4, 48, 6, 6)
    options = {"sigma2": 0.5} if kernel == "gaussian" else {}
    want = KF.nst_loss(f_s, f_t, kernel, **options)
    s, t = f_s.cuda(), f_t.cuda()
    assert KF.nst_loss(s, t, kernel, **options).item() == pytest.approx(want.item(), rel=1e-4)
    with torch.autocast("cuda", dtype=torch.float16):
        got = KF.nst_loss(s, t, kernel, **options)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.cuda
def test_keyword_tensors_decide_which_autocast_is_turned_off():
    # full_precision looks at keyword tensors too: nst_loss(f_s=..., f_t=...) on CUDA under fp16 autocast
    # computes in float32 (it once read the device from positional tensors only and left CUDA autocast on).
    f_s, f_t = torch.randn(2, 8, 4, 4).cuda(), torch.randn(2, 6, 4, 4).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        got = KF.nst_loss(f_s=f_s, f_t=f_t, kernel="gaussian", sigma2=0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(KF.nst_loss(f_s.cpu(), f_t.cpu(), "gaussian", sigma2=0.5).item(), rel=1e-4)
