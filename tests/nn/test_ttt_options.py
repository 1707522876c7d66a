"""TTTConfig's input options (qk_norm, conv_size, use_rope, eta_schedule, centre, pre_conv): each against a plain
token-by-token reference, and each keeping one semantics (full == split calls == decode, dual == primal), causality,
per-row state, fp32 state, and the reference's state_dict layout."""

import math

import pytest
import torch

from ttt_speech.nn import RECALL_OPTIONS, TTTConfig, TTTState, build_ttt_layer
from ttt_speech.ops import ttt as ops

C, H, B_SZ = 32, 4, 8
D = C // H
ATOL = 1e-5

ALL = dict(qk_norm="l2", conv_size=3, use_rope=False, eta_schedule="sum", centre=True, pre_conv=True, use_gate=True)
OPTION_SETS = {
    "qk_norm": dict(qk_norm="l2"),
    "conv_size": dict(conv_size=4),
    "no_rope": dict(use_rope=False),
    "eta_sum": dict(eta_schedule="sum"),
    "centre": dict(centre=True),
    "pre_conv": dict(pre_conv=True),
    "all": ALL,
    "share_qk+pre_conv+centre+l2": dict(share_qk=True, pre_conv=True, centre=True, qk_norm="l2", conv_kernel=3),
    "recall": dict(RECALL_OPTIONS),  # the integrations' default (TTTConfig.recall)
}
CASES = [(name, lt) for name in OPTION_SETS for lt in ("linear", "mlp")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_layer(layer_type="linear", seed=0, **kw):
    """A seeded layer whose inner loop and input transforms move visibly (the default init hides them)."""
    torch.manual_seed(seed)
    layer = build_ttt_layer(TTTConfig(hidden_size=C, num_heads=H, layer_type=layer_type, mini_batch_size=B_SZ, **kw))
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.fill_(1.0)
        layer.learnable_token_idx.normal_(0.0, 0.2)
        layer.ttt_norm_weight.normal_(1.0, 0.2)
        layer.ttt_norm_bias.normal_(0.0, 0.2)
        layer.post_norm.bias.normal_(0.0, 0.2)
        layer.o_proj.weight.normal_(0.0, C**-0.5)
        if kw.get("use_gate"):
            layer.g_proj.weight.normal_(0.0, C**-0.5)
        for name in layer.fast_weight_names:
            getattr(layer, name).normal_(0.0, 0.2)
        for name in ("q_conv", "k_conv", "v_conv"):
            if hasattr(layer, name):  # off the identity init, so that a wrong tap order shows
                getattr(layer, name).weight.normal_(0.0, 0.5)
        if kw.get("pre_conv"):
            layer.pre_conv.norm.weight.normal_(1.0, 0.2)
    return layer


def inputs(B=2, T=29, seed=1):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, name, atol=ATOL):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs diff {err:.3e} > {atol:.1e}"


def assert_states_close(a: TTTState, b: TTTState, atol=ATOL):
    assert torch.equal(a.position, b.position)
    assert set(a.input_state) == set(b.input_state)
    pairs = [(f"params[{n}]", t, b.params[n]) for n, t in a.params.items()]
    pairs += [(f"grads[{n}]", t, b.grads[n]) for n, t in a.grads.items()]
    pairs += [(f"input_state[{n}]", t, b.input_state[n]) for n, t in a.input_state.items()]
    if a.conv_tail is not None:
        pairs.append(("conv_tail", a.conv_tail, b.conv_tail))
    for name, x, y in pairs:
        assert x.dtype == torch.float32, name
        assert_close(x, y, f"state.{name}", atol)


def run_split(layer, x, lengths, state=None):
    outs, t = [], 0
    for n in lengths:
        y, state = layer(x[:, t : t + n], state)
        outs.append(y)
        t += n
    return torch.cat(outs, dim=1), state


def causal_depthwise(x, weight, bias=None):
    """Plain causal depthwise conv: ``y[t, c] = sum_j weight[c, 0, j] * x[t - K + 1 + j, c]`` (zero history),
    x of shape [T, C]."""
    T, K = x.shape[0], weight.shape[-1]
    y = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                y[t] = y[t] + weight[:, 0, j] * x[s]
    return y if bias is None else y + bias


def reference_forward(layer, x):
    """The layer's function written plainly, one row and one token at a time, fed to the naive primal op."""
    cfg = layer.config
    outs = []
    for r in range(x.shape[0]):
        xr = x[r]  # [T, C]
        T = xr.shape[0]
        if cfg.pre_conv:
            h = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * layer.pre_conv.norm.weight
            xr = xr + causal_depthwise(h, layer.pre_conv.conv.weight, layer.pre_conv.conv.bias)
        if cfg.share_qk:
            base = xr @ layer.q_proj.weight.T
            q = causal_depthwise(base, layer.conv_q.weight, layer.conv_q.bias)
            k = causal_depthwise(base, layer.conv_k.weight, layer.conv_k.bias)
        else:
            q, k = xr @ layer.q_proj.weight.T, xr @ layer.k_proj.weight.T
        v = xr @ layer.v_proj.weight.T
        if cfg.conv_size:
            convs = (layer.q_conv, layer.k_conv, layer.v_conv)
            q, k, v = (causal_depthwise(t, conv.weight) for t, conv in zip((q, k, v), convs, strict=True))
        if cfg.centre:
            q, k, v = (torch.stack([t[i] - t[: i + 1].mean(0) for i in range(T)]) for t in (q, k, v))
        q, k, v = (t.view(T, H, D) for t in (q, k, v))
        if cfg.qk_norm == "l2":
            q, k = (t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
        if cfg.use_rope:
            pos = (torch.arange(T) % B_SZ)[None]
            q, k = layer._rope(q[None], pos)[0], layer._rope(k[None], pos)[0]
        eta = cfg.ttt_base_lr * torch.sigmoid(
            torch.einsum("tc,hc->th", xr, layer.learnable_ttt_lr_weight[:, 0]) + layer.learnable_ttt_lr_bias[:, 0]
        ) / D
        base = [1.0 / (i + 1) if cfg.eta_schedule == "mean" else 1.0 for i in range(B_SZ)]
        token_idx = torch.clamp_min(torch.tensor(base) + layer.learnable_token_idx, 0.0)
        w0 = [getattr(layer, n).detach()[None].clone() for n in layer.fast_weight_names]
        op = ops.naive_recurrent_ttt_linear if cfg.layer_type == "linear" else ops.naive_recurrent_ttt_mlp
        o, _, _ = op(q[None], k[None], v[None], eta[None], token_idx, layer.ttt_norm_weight, layer.ttt_norm_bias, w0)
        o = layer.post_norm(o.reshape(T, C))
        if cfg.use_gate:
            o = ops.gelu_tanh(xr @ layer.g_proj.weight.T) * o
        outs.append(o @ layer.o_proj.weight.T)
    return torch.stack(outs)


@pytest.mark.parametrize("name, layer_type", CASES)
def test_options_match_the_plain_reference(name, layer_type):
    layer = make_layer(layer_type, **OPTION_SETS[name])
    x = inputs(T=19)
    with torch.no_grad():
        y, _ = layer(x)
        y_ref = reference_forward(layer, x)
    assert y.abs().max() > 0.5
    assert_close(y, y_ref, f"{name} output vs plain reference")


@pytest.mark.parametrize("name, layer_type", CASES)
def test_options_split_calls_decode_and_primal_equal_the_full_forward(name, layer_type):
    layer = make_layer(layer_type, **OPTION_SETS[name])
    x = inputs(T=23)
    with torch.no_grad():
        y_full, s_full = layer(x)
        for lengths in ([5, 1, 1, 9, 3, 4], [13, 1, 1, 1, 7]):
            y_split, s_split = run_split(layer, x, lengths)
            assert_close(y_split, y_full, f"{name} {lengths} output")
            assert_states_close(s_split, s_full)
        if name in ("all", "share_qk+pre_conv+centre+l2"):  # the options act before the op: one check suffices
            primal = make_layer(layer_type, scan_mode="primal", **OPTION_SETS[name])
            primal.load_state_dict(layer.state_dict())
            y_p, s_p = run_split(primal, x, [15, 8])
            assert_close(y_p, y_full, f"{name} primal output")
            assert_states_close(s_p, s_full)


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_are_causal_exactly(name):
    layer = make_layer("mlp" if "share" in name else "linear", **OPTION_SETS[name])
    x = inputs(B=1, T=30)
    t = 13
    x2 = x.clone()
    x2[:, t:] += torch.randn(1, 30 - t, C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, _ = layer(x)
        y2, _ = layer(x2)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_each_option_changes_the_function(name):
    """Nothing is accepted and ignored: the same parameters without the option compute something else."""
    opts = OPTION_SETS[name]
    layer = make_layer("linear", **opts)
    plain = {k: v for k, v in opts.items() if k in ("share_qk", "use_gate", "conv_kernel")}
    without = make_layer("linear", **plain)
    without.load_state_dict({k: v for k, v in layer.state_dict().items() if k in without.state_dict()})
    x = inputs()
    with torch.no_grad():
        assert (layer(x)[0] - without(x)[0]).abs().max() > 1e-3


def test_short_convs_start_as_the_identity():
    torch.manual_seed(0)
    layer = build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ, conv_size=4))
    torch.manual_seed(0)
    plain = build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ))
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
    x = inputs()
    with torch.no_grad():
        assert_close(layer(x)[0], plain(x)[0], "identity short convs", 1e-6)
    assert torch.equal(layer.k_conv.weight[:, 0, -1], torch.ones(C))
    assert layer.k_conv.weight[:, 0, :-1].abs().max() == 0


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_reset_index_select_cat_and_where_carry_the_input_state(layer_type):
    layer = make_layer(layer_type, **ALL)
    x = inputs(B=3, T=21)
    with torch.no_grad():
        _, state = layer(x[:, :11])
        assert sorted(state.input_state) == ["centre_count", "centre_sum", "pre_conv", "qkv_conv"]
        assert state.input_state["centre_count"].flatten().tolist() == [11.0] * 3
        mask = torch.tensor([True, False, True])
        reset = layer.reset_state(state, mask)
        for n, t in reset.input_state.items():
            assert t[mask].abs().max() == 0, n
            assert torch.equal(t[1], state.input_state[n][1]), n
        y, _ = layer(x[:, 11:], reset)
        y_fresh, _ = layer(x[0:1, 11:])
        assert_close(y[0:1], y_fresh, "reset row", 1e-6)
        rows = state.index_select(torch.tensor([2, 0]))
        assert torch.equal(rows.input_state["qkv_conv"], state.input_state["qkv_conv"][[2, 0]])
        both = TTTState.cat([rows, state.index_select(torch.tensor([1]))])
        assert torch.equal(both.input_state["pre_conv"], state.input_state["pre_conv"][[2, 0, 1]])
        copied = state.index_copy(torch.tensor([1]), rows.index_select(torch.tensor([0])))
        assert torch.equal(copied.input_state["centre_sum"][1], state.input_state["centre_sum"][2])
        assert sum(t.numel() for t in state.tensors()) > sum(t.numel() for t in state.params.values())


def test_state_stays_fp32_under_bf16_with_every_option():
    layer = make_layer("linear", **ALL)
    x = inputs(T=19)
    with torch.no_grad():
        y_ref, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac, s_ac = run_split(layer, x, [10, 1, 8])
        y_bf, s_bf = run_split(make_layer("linear", **ALL).bfloat16(), x.bfloat16(), [10, 1, 8])
    for s in (s_ac, s_bf):
        assert all(t.dtype == torch.float32 for t in (*s.params.values(), *s.grads.values(),
                                                      *s.input_state.values()))
    assert_close(y_ac.float(), y_ref, "autocast output", 0.05)
    assert_close(y_bf.float(), y_ref, "bf16 output", 0.1)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_gradients_reach_the_option_parameters_and_dual_equals_primal(layer_type):
    dual = make_layer(layer_type, **ALL)
    primal = make_layer(layer_type, scan_mode="primal", **ALL)
    primal.load_state_dict(dual.state_dict())
    x = inputs(T=21)
    for layer in (dual, primal):
        y, s = layer(x)
        (y.square().sum() + sum(t.sum() for t in s.params.values())).backward()
    for (name, p_d), p_p in zip(dual.named_parameters(), primal.parameters(), strict=True):
        assert p_d.grad is not None and p_d.grad.abs().max() > 0, name
        assert_close(p_d.grad, p_p.grad, f"d/d{name}", 1e-5 * max(1.0, p_p.grad.abs().max().item()))


@pytest.mark.parametrize("opts", [dict(qk_norm="l2", use_rope=False, eta_schedule="sum", centre=True), {}])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_options_without_parameters_keep_the_reference_state_dict(opts, layer_type):
    ref = build_ttt_layer(TTTConfig(C, H, layer_type, B_SZ))
    layer = build_ttt_layer(TTTConfig(C, H, layer_type, B_SZ, **opts))
    layer.load_state_dict(ref.state_dict(), strict=True)
    assert set(layer.state_dict()) == set(ref.state_dict())


def test_options_with_parameters_add_only_their_own_keys():
    ref = set(build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ)).state_dict())
    layer = build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ, pre_conv=True, conv_size=4))
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k not in ref}
    assert shapes == {"pre_conv.norm.weight": (C,), "pre_conv.conv.weight": (C, 1, 4), "pre_conv.conv.bias": (C,),
                      "q_conv.weight": (C, 1, 4), "k_conv.weight": (C, 1, 4), "v_conv.weight": (C, 1, 4)}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(conv_size=4, share_qk=True), r"conv_size needs share_qk=False"),
        (dict(conv_size=-1), r"conv_size must be 0 \(off\) or >= 1"),
        (dict(qk_norm="rms"), r"qk_norm must be one of \('none', 'l2'\)"),
        (dict(eta_schedule="cosine"), r"eta_schedule must be one of \('mean', 'sum'\)"),
        (dict(centre=1), r"centre must be bool"),
        (dict(use_rope="no"), r"use_rope must be bool"),
    ],
)
def test_bad_option_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        TTTConfig(hidden_size=C, num_heads=H, **kw)


def test_a_state_without_the_options_input_state_is_refused():
    layer = make_layer("linear", centre=True, conv_size=2)
    plain_state = make_layer("linear").init_state(2)
    with pytest.raises(ValueError, match=r"state.input_state must hold \['centre_count', 'centre_sum', 'qkv_conv'\]"):
        layer(inputs(T=3), plain_state)
    state = layer.init_state(2)
    state.input_state["qkv_conv"] = torch.zeros(2, 3 * C, 3)
    with pytest.raises(ValueError, match=r"state.input_state\['qkv_conv'\] must be \[2, 96, 1\] float32"):
        layer(inputs(T=3), state)


def test_eta_schedule_sum_scales_the_commit_by_the_mini_batch():
    """With zero learnable_token_idx, a full mini-batch commits mean * b == sum."""
    mean = build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ))
    total = build_ttt_layer(TTTConfig(C, H, mini_batch_size=B_SZ, eta_schedule="sum"))
    total.load_state_dict(mean.state_dict())
    x = inputs(T=B_SZ)
    with torch.no_grad():
        _, s_mean = mean(x)
        _, s_sum = total(x)
    w0 = mean.W1[None]
    assert_close(s_sum.params["W1"] - w0, B_SZ * (s_mean.params["W1"] - w0), "commit", 1e-6)
    assert math.isclose(total._eta(x)[1][3].item(), 1.0)
