"""TTT ops: fast paths against their naive twins (outputs, final state, gradients), and dual == primal."""

import pytest
import torch
import torch.nn.functional as F

from ttt_speech.ops import ttt as ops
from ttt_speech.ops.ttt import chunk as chunk_module

KINDS = ("linear", "mlp")


def make_inputs(kind, B=3, T=37, H=2, D=8, b=8, offsets=(0, 3, 7), with_grads=True, dtype=torch.float32, seed=0):
    """Seeded op arguments with non-trivial dynamics (eta, token_idx and W away from their inits)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    Fh = 4 * D
    q, k, v = rn(B, T, H, D), rn(B, T, H, D), rn(B, T, H, D)
    eta = (0.3 * torch.rand(B, T, H, generator=g)).to(dtype)
    token_idx = (1.0 / torch.arange(1, b + 1) + 0.1 * torch.randn(b, generator=g)).clamp_min(0.0).to(dtype)
    ln_weight, ln_bias = (1.0 + rn(H, D, scale=0.2)), rn(H, D, scale=0.2)
    if kind == "linear":
        params = [rn(B, H, D, D, scale=0.3), rn(B, H, 1, D, scale=0.3)]
    else:
        params = [
            rn(B, H, D, Fh, scale=0.3),
            rn(B, H, 1, Fh, scale=0.3),
            rn(B, H, Fh, D, scale=0.2),
            rn(B, H, 1, D, scale=0.3),
        ]
    grads = [rn(*p.shape, scale=0.1) for p in params] if with_grads else None
    return dict(
        q=q,
        k=k,
        v=v,
        eta=eta,
        token_idx=token_idx,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        params=params,
        grads=grads,
        offset=list(offsets),
    )


def op(name, kind):
    return getattr(ops, f"{name}_ttt_{kind}")


def assert_close(actual, expected, atol, name):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs diff {err:.3e} > {atol:.1e}"


def assert_results_close(res, ref, atol=1e-5):
    o, params, grads = res
    o_ref, params_ref, grads_ref = ref
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert_close(o, o_ref, atol, "output")
    for i, (a, e) in enumerate(zip(params + grads, params_ref + grads_ref, strict=True)):
        assert a.dtype == torch.float32 or a.dtype == torch.float64
        assert_close(a, e, atol, f"state[{i}]")


def test_ln_fused_l2_grad_matches_autograd():
    torch.manual_seed(0)
    z = torch.randn(3, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 5, 16, dtype=torch.float64)
    w, b = 1 + 0.3 * torch.randn(2, 1, 16, dtype=torch.float64), 0.3 * torch.randn(2, 1, 16, dtype=torch.float64)
    (expected,) = torch.autograd.grad(ops.ln_fused_l2_loss(z, target, w, b).sum(), z)
    assert torch.allclose(ops.ln_fused_l2_grad(z, target, w, b), expected, rtol=1e-10, atol=1e-12)
    z32, t32, w32, b32 = z.float(), target.float(), w.float(), b.float()
    assert_close(ops.ln_fused_l2_grad(z32, t32, w32, b32), expected.float(), 1e-5, "fp32 grad")


def test_layer_norm_and_gelu_grad_match_torch():
    torch.manual_seed(0)
    z = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert torch.allclose(ops.layer_norm(z, w, b), F.layer_norm(z, (16,), w, b, eps=1e-6), atol=1e-12)
    (expected,) = torch.autograd.grad(F.gelu(z, approximate="tanh").sum(), z)
    assert torch.allclose(ops.gelu_tanh_grad(z), expected, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 7, 63, 100])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_fast_matches_naive_twin(kind, T, mode):
    args = make_inputs(kind, T=T)
    with torch.no_grad():
        assert_results_close(op(mode, kind)(**args), op(f"naive_{mode}", kind)(**args))


@pytest.mark.parametrize("kind", KINDS)
def test_dual_equals_primal_references(kind):
    args = make_inputs(kind, T=45)
    with torch.no_grad():
        assert_results_close(op("naive_chunk", kind)(**args), op("naive_recurrent", kind)(**args))
        assert_results_close(op("chunk", kind)(**args), op("recurrent", kind)(**args))


def _grads_of(fn, args):
    """Gradients of a fixed random functional of (output, final state) w.r.t. every tensor input."""
    leaves = {}
    call = dict(args)
    for name in ("q", "k", "v", "eta", "token_idx", "ln_weight", "ln_bias"):
        call[name] = leaves[name] = args[name].clone().requires_grad_(True)
    for group in ("params", "grads"):
        call[group] = [t.clone().requires_grad_(True) for t in args[group]]
        leaves.update({f"{group}[{i}]": t for i, t in enumerate(call[group])})
    o, params, grads = fn(**call)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (o, *params, *grads))
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_gradients_match_naive_twin(kind, mode):
    args = make_inputs(kind, B=2, T=21, offsets=(5, 0))
    fast, ref = _grads_of(op(mode, kind), args), _grads_of(op(f"naive_{mode}", kind), args)
    for name, expected in ref.items():
        scale = max(1.0, expected.abs().max().item())
        assert_close(fast[name], expected, 2e-5 * scale, f"d/d{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_dual_gradients_equal_primal_gradients(kind):
    args = make_inputs(kind, B=2, T=19, offsets=(2, 6))
    dual, primal = _grads_of(op("chunk", kind), args), _grads_of(op("naive_recurrent", kind), args)
    for name, expected in primal.items():
        scale = max(1.0, expected.abs().max().item())
        assert_close(dual[name], expected, 2e-5 * scale, f"d/d{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_gradcheck_fp64(kind):
    """Every input, the carried accumulators included (the dual form's backward is written by hand). TTT-MLP uses
    gradcheck's fast mode (random projections of the Jacobian) to keep the test quick."""
    args = make_inputs(kind, B=1, T=6, H=1, D=4, b=4, offsets=(2,), dtype=torch.float64)
    names = ("q", "k", "v", "eta", "token_idx", "ln_weight", "ln_bias")
    n_params = len(args["params"])

    def fn(*xs):
        call = dict(args, **dict(zip(names, xs[: len(names)], strict=True)))
        call["params"] = list(xs[len(names) : len(names) + n_params])
        call["grads"] = list(xs[len(names) + n_params :])
        o, params, grads = ops.__dict__[f"chunk_ttt_{kind}"](**call)
        return (o, *params, *grads)

    inputs = [args[n].clone().requires_grad_(True) for n in names]
    inputs += [t.clone().requires_grad_(True) for t in (*args["params"], *args["grads"])]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=kind == "mlp")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def num_threads(request):
    """The dual form's LN math takes one fused path on one thread and row blocks on more: run both."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_thread_paths_match_naive(kind, num_threads):
    """Heads x mini-batch x D = 32768 elements: several row blocks on 2 threads, one fused block on 1."""
    args = make_inputs(kind, B=2, T=70, H=4, D=64, b=64, offsets=(5, 0), seed=3)
    res = op("chunk", kind)(**args)
    with torch.no_grad():
        ref = op("naive_chunk", kind)(**args)
    assert_results_close(res, ref, atol=2e-5)


def test_gelu_sigmoid_form_is_gelu_tanh():
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    assert torch.allclose(chunk_module._gelu(x), F.gelu(x, approximate="tanh"), atol=1e-14, rtol=0)
    out = torch.empty(2001, dtype=torch.float32)
    assert chunk_module._gelu(x.float(), out=out) is out
    assert torch.allclose(out, F.gelu(x.float(), approximate="tanh"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5, 16), (4, 100, 128)])  # one row block, and several
def test_chunk_helpers_match_autograd_fp64(shape, num_threads):
    """The closed forms inside the dual form's hand-written backward: the LN-fused gradient, its VJP, gelu''."""
    torch.manual_seed(0)
    R, K, D = shape
    z = torch.randn(R, K, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(R, K, D, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(R, 1, D, dtype=torch.float64)).requires_grad_(True)
    b = (0.3 * torch.randn(R, 1, D, dtype=torch.float64)).requires_grad_(True)
    g = ops.ln_fused_l2_grad(z, target, w, b)
    with torch.no_grad():
        c, gamma2 = w * (b - target), w * w
        fast = chunk_module._ln_l2_grad(z, c, gamma2, out=torch.empty_like(z))
    assert torch.allclose(fast, g, atol=1e-12)
    dg = torch.randn_like(g)
    dz_ref, dt_ref, dw_ref = torch.autograd.grad(g, (z, target, w), dg)
    with torch.no_grad():
        dz, dc, dgamma2 = torch.empty_like(z), torch.empty_like(z), torch.zeros_like(w)
        chunk_module._ln_l2_grad_vjp(dg, fast, z, c, gamma2, dz, dc, dgamma2)
    assert torch.allclose(dz, dz_ref, atol=1e-12)
    assert torch.allclose(-w * dc, dt_ref, atol=1e-12)  # c = w * (b - target)
    assert torch.allclose((dc * (b - target)).sum(dim=1, keepdim=True) + 2 * w * dgamma2, dw_ref, atol=1e-12)
    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    (second,) = torch.autograd.grad(ops.gelu_tanh_grad(x).sum(), x)
    assert torch.allclose(chunk_module._gelu_grad2(x.detach()), second, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_same_with_and_without_autograd(kind):
    """With a backward to follow the forward keeps every anchor (TTT-MLP: and forms the outputs after the loop);
    without, one anchor buffer (TTT-MLP: outputs inside the loop). Same numbers."""
    args = make_inputs(kind, T=29, offsets=(1, 6, 0))
    with torch.no_grad():
        plain = op("chunk", kind)(**args)
    tracked = dict(args, q=args["q"].clone().requires_grad_(True))
    o, params, grads = op("chunk", kind)(**tracked)
    detached = (o.detach(), tuple(t.detach() for t in params), tuple(t.detach() for t in grads))
    assert_results_close(detached, plain, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_double_backward_raises(kind):
    """The dual form's backward is first-order: asking for a second derivative fails loudly."""
    args = make_inputs(kind, B=1, T=9, offsets=(0,))
    q = args["q"].clone().requires_grad_(True)
    o, _, _ = op("chunk", kind)(**dict(args, q=q))
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_padding_values_never_matter(kind, monkeypatch):
    args = make_inputs(kind, T=13, offsets=(5, 0, 2))
    with torch.no_grad():
        clean = ops.__dict__[f"chunk_ttt_{kind}"](**args)
        g = torch.Generator().manual_seed(3)
        monkeypatch.setattr(
            chunk_module, "_padding", lambda x, shape: 50 * torch.randn(shape, generator=g, dtype=x.dtype)
        )
        noisy = ops.__dict__[f"chunk_ttt_{kind}"](**args)
    assert_results_close(noisy, clean, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rows_are_independent(kind, mode):
    args = make_inputs(kind, T=11, offsets=(6, 0, 3))
    with torch.no_grad():
        o, params, grads = op(mode, kind)(**args)
        for r in range(3):
            row = dict(args, offset=[args["offset"][r]])
            row.update({n: args[n][r : r + 1] for n in ("q", "k", "v", "eta")})
            row.update({n: [t[r : r + 1] for t in args[n]] for n in ("params", "grads")})
            o_r, p_r, g_r = op(mode, kind)(**row)
            assert_close(o[r : r + 1], o_r, 1e-6, f"row {r} output")
            for a, e in zip(params + grads, p_r + g_r, strict=True):
                assert_close(a[r : r + 1], e, 1e-6, f"row {r} state")


@pytest.mark.parametrize("kind", KINDS)
def test_commit_only_at_mini_batch_end(kind):
    b = 8
    args = make_inputs(kind, B=2, T=b - 1, b=b, offsets=(0, 1), with_grads=False)
    with torch.no_grad():
        _, params, grads = op("chunk", kind)(**args)
    # row 0 stopped one token short of the end: anchor untouched, gradients pending
    for p0, p, g in zip(args["params"], params, grads, strict=True):
        assert torch.equal(p[0], p0[0]) and g[0].abs().max() > 0
    # row 1 reached the end: committed, accumulators cleared, anchor moved
    for p0, p, g in zip(args["params"], params, grads, strict=True):
        assert torch.equal(g[1], torch.zeros_like(g[1])) and (p[1] - p0[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_online_matches_naive_and_differs_from_anchored(kind):
    args = make_inputs(kind, T=10)
    with torch.no_grad():
        online = op("recurrent", kind)(**args, online=True)
        assert_results_close(online, op("naive_recurrent", kind)(**args, online=True))
        anchored = op("recurrent", kind)(**args)
    assert (online[0] - anchored[0]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_low_precision_inputs_keep_fp32_state(mode):
    args = make_inputs("linear", T=12)
    for name in ("q", "k", "v", "eta"):
        args[name] = args[name].bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o, params, grads = op(mode, "linear")(**args)
    assert o.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in params + grads)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.zeros(3, 0, 2, 8)), r"q must be \[B, T, H, D\] with T >= 1"),
        (dict(k=torch.zeros(3, 37, 2, 4)), r"k must be \[3, 37, 2, 8\]"),
        (dict(eta=torch.zeros(3, 37)), r"eta must be \[3, 37, 2\]"),
        (dict(ln_weight=torch.zeros(8)), r"ln_weight must be \[2, 8\]"),
        (dict(offset=[0, 8, 1]), r"offset must be \[3\] with values in \[0, 8\)"),
        (dict(params=[torch.zeros(3, 2, 8, 8)]), r"params must hold 2 tensors"),
        (dict(params=[torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 1, 8)]), r"params W1 must be \[3, 2, 8, 8\]"),
    ],
)
def test_bad_arguments_raise(change, match):
    args = make_inputs("linear")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.chunk_ttt_linear(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_cuda_matches_cpu(kind, mode):
    args = make_inputs(kind, T=45)
    on_gpu = dict(args)
    on_gpu.update({n: args[n].cuda() for n in ("q", "k", "v", "eta", "token_idx", "ln_weight", "ln_bias")})
    on_gpu.update({n: [t.cuda() for t in args[n]] for n in ("params", "grads")})
    with torch.no_grad():
        o, params, grads = op(mode, kind)(**on_gpu)
        ref = op(mode, kind)(**args)
    assert_results_close((o.cpu(), tuple(t.cpu() for t in params), tuple(t.cpu() for t in grads)), ref, atol=1e-4)
