"""dtql_fast.kernels: the Triton kernels and the torch ops against the plain formula in dtql_fast.edm.

Reference: the formula evaluated in float64 on the very same float32 inputs. (Not the formula in
float32: at sigma = 0.002 it cancels catastrophically, (D - x) / c_out with D ~ x and
c_out = 0.002, which is its own rounding error, not a property of the loss. The kernels use a
cancellation-free form; see kernels/edm_loss.py.)

Tolerance, per entry:  |got - want| <= atol + rtol * scale,   rtol = 1e-5, atol = 1e-6,
with scale = max(|want|, sum over the float32 inputs T of |d want / d T . T|), the latter the
componentwise condition of the float64 result: how far it moves when every input moves by its
own relative rounding (the clamp bound m counts as an input). scale = |want| where nothing
cancels; where terms do cancel (r = F + ... near 0, or dL/dx summed over K noise levels of
opposite signs) no float32 arithmetic can do better than a few ulps of the terms, so that is
what rtol is relative to. The loss itself is a sum of squares (nothing cancels): plain rtol.
Measured: the kernels stay below 3% of this bound; the float32 formula exceeds it 5-135x.

Loss gradients are taken for an upstream gradient of N = B*K*A, so they are O(r) at every size
(dL/dF = 2 r g / N) and atol means the same for B = 1 as for B = 1000.

Without a GPU, Triton runs on CPU tensors under the interpreter. It must be chosen before a
kernel is defined (tests/conftest.py sets it at import time); the first lines below cover
running this file on its own.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dtql_fast.kernels as kernels  # noqa: E402
from dtql_fast import edm  # noqa: E402
from dtql_fast.kernels.edm_loss import _loss_bwd_triton, _loss_fwd_triton  # noqa: E402
from dtql_fast.kernels.edm_loss import _fwd as _loss_fwd_kernel  # noqa: E402
from dtql_fast.kernels.edm_prepare import _prepare_bwd_triton, _prepare_fwd_triton  # noqa: E402

# torch.func.jvp's first use loads torch's forward-AD decompositions via torch.jit.script, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script(_method)?` is deprecated:DeprecationWarning")

RTOL, ATOL = 1e-5, 1e-6
SD = edm.SIGMA_DATA
MAX_ACTION = 1.0


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_loss_fwd_kernel, InterpretedFunction)


def _require_triton_on_cpu():
    if _interpreted():
        return
    if torch.cuda.is_available():
        pytest.skip("Triton kernels are compiled for the GPU here; test_cuda_matches_formula covers them")
    pytest.fail("dtql_fast.kernels was imported before TRITON_INTERPRET=1 was set, so its Triton kernels "
                "cannot run on CPU tensors; set it in the environment or in tests/conftest.py")


def _draws(B, A, K, seed=0, device="cpu"):
    """x, sigma, noise, F (float32) with sigma hitting exactly 0.002 and 80, and entries on both sides of the clamp."""
    g = torch.Generator().manual_seed(seed)
    # Slightly beyond the action box, so that at small sigma (D ~ x) some entries clamp.
    x = (torch.rand(B, A, generator=g) * 2.4 - 1.2) * MAX_ACTION
    sigma = edm.sample_sigma((B, K), generator=g).reshape(-1)
    sigma[0::4] = edm.SIGMA_MIN
    sigma[1::4] = edm.SIGMA_MAX
    sigma = sigma.reshape(B, K)
    noise = torch.randn(B, K, A, generator=g)
    # At large sigma D ~ c_out F ~ F / 2: a wide F puts entries on both sides of the clamp there too.
    F = torch.randn(B * K, A, generator=g) * 2.0
    return [t.to(device) for t in (x, sigma, noise, F)]


class _Ref:
    """A float64 reference value with its componentwise condition scale (module docstring)."""

    def __init__(self, value, scale):
        self.value, self.scale = value, scale


def _with_scale(fn, inputs):
    """fn(*inputs) -> tuple of tensors, in float64, each output with its condition scale.

    fn must be elementwise in each input (an output entry reads at most one entry of it), so
    the forward-mode derivative along T itself is d out / d T . T entry by entry.
    """
    inputs = tuple(t.detach().double() for t in inputs)
    outputs = fn(*inputs)
    scales = [torch.zeros_like(o) for o in outputs]
    for i, T in enumerate(inputs):
        tangents = tuple(T if j == i else torch.zeros_like(t) for j, t in enumerate(inputs))
        _, derivatives = torch.func.jvp(fn, inputs, tangents)
        for scale, d in zip(scales, derivatives):
            scale += d.abs()
    return outputs, scales


def _reference_loss(F, x, sigma, noise, max_action):
    """The formula in float64: loss, dL/dF, dL/dx (each a _Ref) for upstream gradient N = B*K*A.

    Level by level: N * loss = sum over k of (B*A) * (loss of level k alone), and each level's
    gradients are elementwise in its inputs, as _with_scale needs.
    """
    B, K = sigma.shape
    A = x.shape[1]

    # The clamp bound is an input too (a clamped D = +-m carries m's rounding), so it takes
    # part as a tensor; without a clamp it is a dummy that nothing reads.
    m = torch.tensor(max_action if max_action is not None else 0.0)

    def level(F_k, x, sigma_k, noise_k, m):
        def scaled_loss(F_k, x):
            D_bound = m if max_action is not None else None
            return edm.edm_loss_from_output(F_k, x, sigma_k, noise_k, D_bound) * (B * A)
        return torch.func.grad(scaled_loss, argnums=(0, 1))(F_k, x)

    dF, dF_scale, dx, dx_scale = [], [], 0, 0
    for k in range(K):
        (dF_k, dx_k), (dF_k_scale, dx_k_scale) = _with_scale(
            level, (F.reshape(B, K, A)[:, k], x, sigma[:, k:k + 1], noise[:, k:k + 1], m))
        dF.append(dF_k)
        dF_scale.append(dF_k_scale)
        dx, dx_scale = dx + dx_k, dx_scale + dx_k_scale
    loss = edm.edm_loss_from_output(F.double(), x.double(), sigma.double(), noise.double(), max_action)
    dF, dF_scale = (torch.stack(t, dim=1).reshape(B * K, A) for t in (dF, dF_scale))
    return _Ref(loss, loss.abs()), _Ref(dF, dF_scale), _Ref(dx, dx_scale)


def _reference_prepare(x, sigma, noise, grad_x_in):
    """The formula in float64: x_in, t, and dx for upstream gradient grad_x_in (each a _Ref)."""
    B, K = sigma.shape
    A = x.shape[1]

    def level(x, sigma_k, noise_k, grad_k):
        def contracted(x):
            x_in, t = edm.edm_prepare(x, sigma_k, noise_k)
            return (x_in * grad_k).sum(), (x_in, t)
        dx, (x_in, t) = torch.func.grad(contracted, has_aux=True)(x)
        return x_in, t, dx

    x_in, t, dx = [], [], []
    for k in range(K):
        outputs, scales = _with_scale(level, (x, sigma[:, k:k + 1], noise[:, k:k + 1],
                                              grad_x_in.reshape(B, K, A)[:, k]))
        for acc, value, scale in zip((x_in, t, dx), outputs, scales):
            acc.append((value, scale))
    x_in, t = (_Ref(torch.stack([v for v, _ in acc], 1).reshape(B * K, -1),
                    torch.stack([s for _, s in acc], 1).reshape(B * K, -1)) for acc in (x_in, t))
    return x_in, t, _Ref(sum(v for v, _ in dx), sum(s for _, s in dx))


def _close(actual, expected: _Ref):
    want = expected.value.double().cpu()
    got = actual.detach().double().cpu().reshape(want.shape)
    err = (got - want).abs()
    bound = ATOL + RTOL * torch.maximum(expected.scale.double().cpu(), want.abs())
    if not (err <= bound).all():
        worst = int((err / bound).flatten().argmax())
        raise AssertionError(
            f"{int((err > bound).sum())} of {err.numel()} entries off; worst at flat index {worst}: got "
            f"{got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r}, |error| "
            f"{err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}")


def _pre_clamp(F, x, sigma, noise):
    B, K = sigma.shape
    c_skip, c_out, _ = edm.precondition(sigma.double())
    return (c_out[..., None] * F.double().reshape(B, K, -1)
            + c_skip[..., None] * (x.double()[:, None] + sigma.double()[..., None] * noise.double()))


# Every (B, A, K) for small B; for B = 1000 (slow under the interpreter) a subset that still covers
# every A, both K, and the largest case.
SHAPES = ([(B, A, K) for B in (1, 7, 256) for A in (1, 2, 6, 8, 24) for K in (1, 4)]
          + [(1000, 1, 4), (1000, 2, 1), (1000, 6, 4), (1000, 8, 1), (1000, 24, 4)])


@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "noclamp"])
@pytest.mark.parametrize("B,A,K", SHAPES)
def test_triton_loss_matches_formula(B, A, K, clamp):
    _require_triton_on_cpu()
    x, sigma, noise, F = _draws(B, A, K)
    max_action = MAX_ACTION if clamp else None
    loss_ref, dF_ref, dx_ref = _reference_loss(F, x, sigma, noise, max_action)
    if clamp and B * K * A >= 24:
        inside = _pre_clamp(F, x, sigma, noise).abs() <= MAX_ACTION
        assert inside.any() and not inside.all(), "the draws should put entries on both sides of the clamp"

    loss = _loss_fwd_triton(F, x, sigma, noise, MAX_ACTION, clamp, SD)
    dF, dx = _loss_bwd_triton(torch.tensor(float(F.numel())), F, x, sigma, noise, MAX_ACTION, clamp, SD)
    _close(loss, loss_ref)
    _close(dF, dF_ref)
    _close(dx, dx_ref)


@pytest.mark.parametrize("B,A,K", SHAPES)
def test_triton_prepare_matches_formula(B, A, K):
    _require_triton_on_cpu()
    x, sigma, noise, _ = _draws(B, A, K)
    grad_x_in = torch.randn(B * K, A)
    x_in_ref, t_ref, dx_ref = _reference_prepare(x, sigma, noise, grad_x_in)

    x_in, t = _prepare_fwd_triton(x, sigma, noise, SD)
    _close(x_in, x_in_ref)
    _close(t, t_ref)
    _close(_prepare_bwd_triton(grad_x_in, sigma, SD), dx_ref)


@pytest.mark.parametrize("B,A,K", [(B, A, K) for B in (1, 7, 256, 1000) for A in (1, 2, 6, 8, 24) for K in (1, 4)])
def test_ops_match_formula(B, A, K):
    """The public functions (the op's CPU implementation here), through autograd."""
    x, sigma, noise, F = _draws(B, A, K, seed=1)
    for max_action in (MAX_ACTION, None):
        loss_ref, dF_ref, dx_ref = _reference_loss(F, x, sigma, noise, max_action)
        F_, x_ = F.clone().requires_grad_(), x.clone().requires_grad_()
        loss = kernels.edm_loss(F_, x_, sigma, noise, max_action)
        (loss * F.numel()).backward()
        _close(loss, loss_ref)
        _close(F_.grad, dF_ref)
        _close(x_.grad, dx_ref)

    grad_x_in = torch.randn(B * K, A)
    x_in_ref, t_ref, dx_ref = _reference_prepare(x, sigma, noise, grad_x_in)
    x_ = x.clone().requires_grad_()
    x_in, t = kernels.edm_prepare(x_, sigma, noise)
    assert not t.requires_grad
    (x_in * grad_x_in).sum().backward()
    _close(x_in, x_in_ref)
    _close(t, t_ref)
    _close(x_.grad, dx_ref)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["upper", "lower"])
@pytest.mark.parametrize("path", ["triton", "op"])
def test_clamp_boundary_gradient_like_torch_clamp(path, sign):
    """A pre-clamp value exactly at +-m passes gradient (torch.clamp does); one ulp outside does not."""
    if path == "triton":
        _require_triton_on_cpu()
    x = torch.full((1, 3), 0.2 * sign)
    sigma = torch.ones(1, 1)
    noise = torch.zeros(1, 1, 3)
    F = torch.tensor([[1.0, 0.1, 5.0]]) * sign
    # The pre-clamp value in float32 with the kernels' (and the formula's) operation order, so
    # that entry 0 sits exactly on the boundary for all of them.
    s = sigma[..., None]
    ss = s * s + SD * SD
    c_out, c_skip = s * SD / torch.sqrt(ss), (1.0 / ss) * (SD * SD)
    on_boundary = abs((c_out * F[:, None] + c_skip * (x[:, None] + s * noise))[0, 0, 0].item())

    for m, passes in ((on_boundary, True), (torch.nextafter(torch.tensor(on_boundary), torch.tensor(0.0)).item(), False)):
        F_ref, x_ref = F.clone().requires_grad_(), x.clone().requires_grad_()
        (edm.edm_loss_from_output(F_ref, x_ref, sigma, noise, m) * 3).backward()
        assert (F_ref.grad[0, 0] != 0) == passes, "the construction must sit on torch.clamp's boundary"
        if path == "triton":
            dF, dx = _loss_bwd_triton(torch.tensor(3.0), F, x, sigma, noise, m, True, SD)
        else:
            F_, x_ = F.clone().requires_grad_(), x.clone().requires_grad_()
            (kernels.edm_loss(F_, x_, sigma, noise, m) * 3).backward()
            dF, dx = F_.grad, x_.grad
        assert (dF[0, 0] != 0) == passes
        assert dF[0, 2] == 0  # well outside the box
        # sigma = 1: nothing cancels, so the float32 formula is an accurate enough reference here.
        torch.testing.assert_close(dF, F_ref.grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(dx, x_ref.grad, rtol=RTOL, atol=ATOL)


def test_triton_loss_is_deterministic():
    _require_triton_on_cpu()
    x, sigma, noise, F = _draws(256, 6, 4)
    first = _loss_fwd_triton(F, x, sigma, noise, MAX_ACTION, True, SD)
    assert torch.equal(first, _loss_fwd_triton(F, x, sigma, noise, MAX_ACTION, True, SD))


def test_no_gradient_to_sigma_or_noise():
    x, sigma, noise, F = _draws(7, 6, 4)
    sigma.requires_grad_()
    noise.requires_grad_()
    x.requires_grad_()
    x_in, t = kernels.edm_prepare(x, sigma, noise)
    (x_in.sum() + kernels.edm_loss(F, x, sigma, noise, MAX_ACTION)).backward()
    assert sigma.grad is None and noise.grad is None and x.grad is not None


def test_input_validation():
    x, sigma, noise, F = _draws(7, 6, 4)
    loss, prep = kernels.edm_loss, kernels.edm_prepare
    with pytest.raises(ValueError, match="one device"):
        prep(x, sigma.to("meta"), noise)
    with pytest.raises(TypeError, match="float32"):
        loss(F.half(), x.half(), sigma.half(), noise.half(), MAX_ACTION)
    with pytest.raises(TypeError, match="share one dtype"):
        loss(F.double(), x, sigma, noise, MAX_ACTION)
    with pytest.raises(TypeError, match="Triton kernels take float32"):
        _prepare_fwd_triton(x.double(), sigma.double(), noise.double(), SD)
    with pytest.raises(ValueError, match="contiguous"):
        prep(x, sigma.t().contiguous().t(), noise)
    with pytest.raises(ValueError, match="shapes disagree"):
        prep(x, sigma, noise[:, :, :5].contiguous())
    with pytest.raises(ValueError, match="shapes disagree"):
        prep(x[:6].contiguous(), sigma, noise)
    with pytest.raises(ValueError, match=r"F has shape \(27, 6\)"):
        loss(F[:27].contiguous(), x, sigma, noise, MAX_ACTION)
    with pytest.raises(ValueError, match="expected x"):
        prep(x[None], sigma, noise)
    with pytest.raises(ValueError, match="empty"):
        prep(x[:0], sigma[:0], noise[:0])


def _op_cases():
    x, sigma, noise, F = _draws(5, 3, 4, seed=2)
    F, x = F.requires_grad_(), x.requires_grad_()
    grad = torch.tensor(1.7)
    return [
        ("edm_prepare", torch.ops.dtql.edm_prepare.default, (x, sigma, noise, SD)),
        ("edm_loss_clamp", torch.ops.dtql.edm_loss.default, (F, x, sigma, noise, MAX_ACTION, True, SD)),
        ("edm_loss_noclamp", torch.ops.dtql.edm_loss.default, (F, x, sigma, noise, 0.0, False, SD)),
        ("edm_prepare_backward", torch.ops.dtql.edm_prepare_backward.default, (torch.randn(20, 3), sigma, SD)),
        ("edm_loss_backward", torch.ops.dtql.edm_loss_backward.default,
         (grad, F.detach(), x.detach(), sigma, noise, MAX_ACTION, True, SD)),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("max_action", [MAX_ACTION, None], ids=["clamp", "noclamp"])
def test_gradcheck_float64(max_action):
    x, sigma, noise, F = (t.double() for t in _draws(3, 2, 4, seed=3))
    if max_action is not None:
        # Finite differences must not straddle the clamp boundary.
        assert ((_pre_clamp(F, x, sigma, noise).abs() - max_action).abs() > 1e-3).all()
    F.requires_grad_()
    x.requires_grad_()
    clamp, m = max_action is not None, max_action or 0.0
    # Both entry points: the public functions and the registered ops' own autograd.
    assert torch.autograd.gradcheck(lambda F, x: kernels.edm_loss(F, x, sigma, noise, max_action), (F, x))
    assert torch.autograd.gradcheck(lambda F, x: torch.ops.dtql.edm_loss(F, x, sigma, noise, m, clamp, SD), (F, x))
    assert torch.autograd.gradcheck(lambda x: kernels.edm_prepare(x, sigma, noise)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: torch.ops.dtql.edm_prepare(x, sigma, noise, SD)[0], (x,))


def test_double_backward_is_refused():
    x, sigma, noise, F = _draws(3, 2, 4)
    F.requires_grad_()
    x.requires_grad_()
    (dx,) = torch.autograd.grad(kernels.edm_loss(F, x, sigma, noise, MAX_ACTION), (x,), create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dx.sum(), (x,))


class _TinyStep(torch.nn.Module):
    """A policy and a denoiser wired as in DTQL's trust-region loss: gradient reaches the policy both ways."""

    def __init__(self, state_dim=5, action_dim=6, hidden=32):
        super().__init__()
        self.policy = torch.nn.Linear(state_dim, action_dim)
        self.denoiser = torch.nn.Sequential(
            torch.nn.Linear(action_dim + state_dim + 1, hidden), torch.nn.Mish(), torch.nn.Linear(hidden, action_dim))

    def forward(self, s, sigma, noise, prepare, loss):
        K = sigma.shape[1]
        x = torch.tanh(self.policy(s))
        x_in, t = prepare(x, sigma, noise)
        F = self.denoiser(torch.cat([x_in, s.repeat_interleave(K, dim=0), t[:, None]], dim=1))
        return loss(F, x, sigma, noise, MAX_ACTION)


def _loss_and_grads(fn, model, args):
    model.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _TinyStep()
    B, K = 16, 4
    s, sigma, noise = torch.randn(B, 5), edm.sample_sigma((B, K)), torch.randn(B, K, 6)
    args = (s, sigma, noise, kernels.edm_prepare, kernels.edm_loss)
    # fullgraph=True turns any graph break into an error.
    compiled = torch.compile(model, fullgraph=True)
    loss_c, grads_c = _loss_and_grads(compiled, model, args)
    loss_e, grads_e = _loss_and_grads(model, model, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    # And the ops' eager result matches the plain formula through the same model.
    loss_f, grads_f = _loss_and_grads(model, model, (s, sigma, noise, edm.edm_prepare, edm.edm_loss_from_output))
    torch.testing.assert_close(loss_e, loss_f, rtol=1e-4, atol=1e-5)


def test_func_grad_eager_and_compiled():
    """torch.func.grad over the parameters, as the training step differentiates (dtql_fast.update)."""
    torch.manual_seed(0)
    model = _TinyStep()
    params = {k: v.detach() for k, v in model.named_parameters()}
    B, K = 16, 4
    s, sigma, noise = torch.randn(B, 5), edm.sample_sigma((B, K)), torch.randn(B, K, 6)

    def loss(params, prepare, loss_fn):
        return torch.func.functional_call(model, params, (s, sigma, noise, prepare, loss_fn))

    def grads(prepare, loss_fn):
        return torch.func.grad(loss)(params, prepare, loss_fn)

    eager = grads(kernels.edm_prepare, kernels.edm_loss)
    compiled = torch.compile(grads, fullgraph=True)(kernels.edm_prepare, kernels.edm_loss)
    formula = grads(edm.edm_prepare, edm.edm_loss_from_output)
    for name in params:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eager[name], formula[name], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("B,A,K", [(1, 1, 1), (7, 6, 4), (256, 6, 1), (256, 6, 4), (1000, 24, 4), (2048, 8, 4)])
def test_cuda_matches_formula(B, A, K):
    x, sigma, noise, F = _draws(B, A, K, device="cuda")
    for max_action in (MAX_ACTION, None):
        clamp = max_action is not None
        loss_ref, dF_ref, dx_ref = _reference_loss(F, x, sigma, noise, max_action)
        loss = _loss_fwd_triton(F, x, sigma, noise, MAX_ACTION, clamp, SD)
        assert torch.equal(loss, _loss_fwd_triton(F, x, sigma, noise, MAX_ACTION, clamp, SD))  # deterministic
        _close(loss, loss_ref)
        # Through the op and autograd, eager and compiled: both must launch the Triton kernels.
        for fn in (kernels.edm_loss, torch.compile(kernels.edm_loss, fullgraph=True)):
            F_, x_ = F.clone().requires_grad_(), x.clone().requires_grad_()
            (fn(F_, x_, sigma, noise, max_action) * F.numel()).backward()
            _close(F_.grad, dF_ref)
            _close(x_.grad, dx_ref)

    grad_x_in = torch.randn(B * K, A, device="cuda")
    x_in_ref, t_ref, dx_ref = _reference_prepare(x, sigma, noise, grad_x_in)
    for fn in (kernels.edm_prepare, torch.compile(kernels.edm_prepare, fullgraph=True)):
        x_ = x.clone().requires_grad_()
        x_in, t = fn(x_, sigma, noise)
        (x_in * grad_x_in).sum().backward()
        _close(x_in, x_in_ref)
        _close(t, t_ref)
        _close(x_.grad, dx_ref)
