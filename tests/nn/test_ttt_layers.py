"""TTTLinear / TTTMLP: one semantics across full forward, prefill + decode and split calls; state handling."""

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ttt_speech.nn import TTTMLP, TTTConfig, TTTLinear, TTTPreConv, TTTState, build_ttt_layer
from ttt_speech.ops import ttt as ops
from ttt_speech.ops.ttt import chunk as chunk_module

C, H, B_SZ = 32, 4, 8  # hidden size, heads, mini-batch size
ATOL = 1e-5


def make_layer(layer_type="linear", seed=0, **kw):
    """A seeded layer whose inner loop moves visibly (default init makes the updates tiny)."""
    torch.manual_seed(seed)
    layer = build_ttt_layer(TTTConfig(hidden_size=C, num_heads=H, layer_type=layer_type, mini_batch_size=B_SZ, **kw))
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.fill_(1.0)
        layer.learnable_token_idx.normal_(0.0, 0.2)
        layer.ttt_norm_weight.normal_(1.0, 0.2)
        layer.ttt_norm_bias.normal_(0.0, 0.2)
        layer.post_norm.bias.normal_(0.0, 0.2)
        layer.o_proj.weight.normal_(0.0, C**-0.5)  # outputs of order 1, so absolute tolerances mean something
        for name in layer.fast_weight_names:
            getattr(layer, name).normal_(0.0, 0.2)
    return layer


@functools.cache
def cached_layer(layer_type, share_qk, scan_mode="dual"):
    return make_layer(layer_type, share_qk=share_qk, use_gate=share_qk, scan_mode=scan_mode)


def inputs(B=2, T=40, seed=1):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, name, atol=ATOL):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs diff {err:.3e} > {atol:.1e}"


def assert_states_close(a: TTTState, b: TTTState, atol=ATOL):
    assert torch.equal(a.position, b.position), (a.position, b.position)
    for group in ("params", "grads"):
        for name, t in getattr(a, group).items():
            assert t.dtype == torch.float32
            assert_close(t, getattr(b, group)[name], f"state.{group}[{name}]", atol)
    if a.conv_tail is not None:
        assert_close(a.conv_tail, b.conv_tail, "state.conv_tail", atol)


def run_split(layer, x, lengths, state=None):
    outs, t = [], 0
    for n in lengths:
        y, state = layer(x[:, t : t + n], state)
        outs.append(y)
        t += n
    return torch.cat(outs, dim=1), state


CONFIGS = [("linear", False), ("linear", True), ("mlp", False), ("mlp", True)]


@pytest.mark.parametrize("layer_type, share_qk", CONFIGS)
@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 11), min_size=1, max_size=7))
def test_split_calls_equal_full_forward(layer_type, share_qk, lengths):
    layer = cached_layer(layer_type, share_qk)
    x = inputs(T=sum(lengths))
    with torch.no_grad():
        y_full, s_full = layer(x)
        y_split, s_split = run_split(layer, x, lengths)
    assert_close(y_split, y_full, "output")
    assert_states_close(s_split, s_full)


@pytest.mark.parametrize("layer_type, share_qk", CONFIGS)
@pytest.mark.parametrize("prefill", [1, 8, 13])
def test_prefill_then_decode_equals_full_forward(layer_type, share_qk, prefill):
    layer = cached_layer(layer_type, share_qk)
    x = inputs(T=29)
    with torch.no_grad():
        y_full, s_full = layer(x)
        y_dec, s_dec = run_split(layer, x, [prefill] + [1] * (29 - prefill))
    assert_close(y_dec, y_full, "output")
    assert_states_close(s_dec, s_full)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_primal_scan_mode_equals_dual(layer_type):
    dual, primal = cached_layer(layer_type, True), cached_layer(layer_type, True, "primal")
    primal.load_state_dict(dual.state_dict())
    x = inputs(T=27)
    with torch.no_grad():
        y_d, s_d = run_split(dual, x, [19, 8])
        y_p, s_p = run_split(primal, x, [19, 8])
    assert_close(y_p, y_d, "output")
    assert_states_close(s_p, s_d)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_rows_are_independent_with_mixed_positions(layer_type):
    layer = cached_layer(layer_type, True)
    x = inputs(B=3, T=20)
    with torch.no_grad():
        _, state = layer(x[:, :5])
        state = layer.reset_state(state, torch.tensor([False, True, False]))  # rows now at positions 5, 0, 5
        _, state = layer(x[:, 5:8], state)  # 0, 3, 0
        y, s = layer(x[:, 8:], state)
        for r in range(3):
            idx = torch.tensor([r])
            y_r, s_r = layer(x[r : r + 1, 8:], state.index_select(idx))
            assert_close(y[r : r + 1], y_r, f"row {r} output", 1e-6)
            assert_states_close(s.index_select(idx), s_r, 1e-6)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_reset_restores_w0_for_chosen_rows_only(layer_type):
    layer = cached_layer(layer_type, True)
    x = inputs(B=3, T=21)
    with torch.no_grad():
        _, state = layer(x[:, :11])
        mask = torch.tensor([True, False, True])
        reset = layer.reset_state(state, mask)
        fresh = layer.init_state(3)
        for group in ("params", "grads"):
            for name, t in getattr(reset, group).items():
                assert torch.equal(t[mask], getattr(fresh, group)[name][mask])
                assert torch.equal(t[1], getattr(state, group)[name][1])
        assert reset.position.tolist() == [0, 11 % B_SZ, 0]
        assert torch.equal(reset.conv_tail[mask], torch.zeros_like(reset.conv_tail[mask]))
        assert torch.equal(reset.conv_tail[1], state.conv_tail[1])
        # a reset row then behaves exactly like a fresh sequence
        y, _ = layer(x[:, 11:], reset)
        y_fresh, _ = layer(x[0:1, 11:])
    assert_close(y[0:1], y_fresh, "reset row output", 1e-6)


@pytest.mark.parametrize("layer_type, share_qk", CONFIGS)
def test_causality(layer_type, share_qk):
    layer = cached_layer(layer_type, share_qk)
    x = inputs(B=1, T=30)
    t = 13
    x2 = x.clone()
    x2[:, t] += 1.0
    with torch.no_grad():
        y, _ = layer(x)
        y2, _ = layer(x2)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_padding_values_never_reach_outputs_or_state(layer_type, monkeypatch):
    layer = cached_layer(layer_type, False)
    x = inputs(T=19)
    with torch.no_grad():
        _, state = layer(x[:, :3])
        y, s = layer(x[:, 3:], state)
        g = torch.Generator().manual_seed(0)
        monkeypatch.setattr(
            chunk_module, "_padding", lambda t, shape: 50 * torch.randn(shape, generator=g, dtype=t.dtype)
        )
        y2, s2 = layer(x[:, 3:], state)
    assert_close(y2, y, "output", 1e-6)
    assert_states_close(s2, s, 1e-6)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_state_stays_fp32_under_bf16(layer_type):
    layer = make_layer(layer_type, share_qk=True)
    x = inputs(T=19)
    with torch.no_grad():
        y_ref, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac, s_ac = run_split(layer, x, [10, 1, 8])
        layer_bf16 = make_layer(layer_type, share_qk=True).bfloat16()
        y_bf, s_bf = run_split(layer_bf16, x.bfloat16(), [10, 1, 8])
    for s in (s_ac, s_bf, layer_bf16.init_state(2)):
        assert all(t.dtype == torch.float32 for t in (*s.params.values(), *s.grads.values(), s.conv_tail))
    assert y_bf.dtype == torch.bfloat16
    assert y_ref.abs().max() > 0.5
    assert_close(y_ac.float(), y_ref, "autocast output", 0.03)
    assert_close(y_bf.float(), y_ref, "bf16 output", 0.06)


def test_online_decode_is_opt_in_and_different():
    anchored = cached_layer("linear", False)
    online = make_layer("linear", decode_mode="online")
    online.load_state_dict(anchored.state_dict())
    x = inputs(T=20)
    with torch.no_grad():
        y_a, _ = run_split(anchored, x, [12] + [1] * 8)
        y_o, s_o = run_split(online, x, [12] + [1] * 8)
    assert torch.equal(y_o[:, :12], y_a[:, :12])  # multi-token calls are anchored in both modes
    assert (y_o[:, 13:] - y_a[:, 13:]).abs().max() > 1e-4
    assert all(t.abs().max() == 0 for t in s_o.grads.values())  # every online step commits


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_gradients_reach_w0_incoming_state_and_all_parameters(layer_type):
    layer = make_layer(layer_type, share_qk=True, use_gate=True)
    x = inputs(T=13)
    with torch.no_grad():
        _, state = layer(x[:, :5])
    state = TTTState(
        params={n: t.clone().requires_grad_(True) for n, t in state.params.items()},
        grads={n: t.clone().requires_grad_(True) for n, t in state.grads.items()},
        position=state.position,
        conv_tail=state.conv_tail.clone().requires_grad_(True),
    )
    y, s = layer(x[:, 5:], state)
    y_fresh, _ = layer(x)
    (y.square().sum() + s.params["W1"].sum() + y_fresh.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    for t in (*state.params.values(), *state.grads.values(), state.conv_tail):
        assert t.grad is not None and t.grad.abs().max() > 0


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_module_gradients_dual_equal_primal(layer_type):
    dual = make_layer(layer_type)
    primal = make_layer(layer_type, scan_mode="primal")
    primal.load_state_dict(dual.state_dict())
    x = inputs(T=21)
    for layer in (dual, primal):
        y, s = layer(x)
        (y.square().sum() + sum(t.sum() for t in s.params.values())).backward()
    for (name, p_d), p_p in zip(dual.named_parameters(), primal.parameters(), strict=True):
        scale = max(1.0, p_p.grad.abs().max().item())
        assert_close(p_d.grad, p_p.grad, f"d/d{name}", 1e-5 * scale)


def test_layer_matches_ops_reference():
    """The module feeds the ops exactly what the naive reference expects (no hidden re-ordering)."""
    layer = cached_layer("mlp", False)
    x = inputs(T=11)
    with torch.no_grad():
        y, s = layer(x)
        q, k, v, _ = layer._qkv(x, None)
        pos = torch.arange(11) % B_SZ
        q, k = (layer._rope(t.view(2, 11, H, C // H), pos.expand(2, 11)) for t in (q, k))
        eta, token_idx = layer._eta(x)
        st0 = layer.init_state(2)
        o, params, _ = ops.naive_recurrent_ttt_mlp(
            q,
            k,
            v.view(2, 11, H, C // H),
            eta,
            token_idx,
            layer.ttt_norm_weight,
            layer.ttt_norm_bias,
            [st0.params[n] for n in layer.fast_weight_names],
        )
        y_ref = layer.o_proj(layer.post_norm(o.reshape(2, 11, C)))
    assert_close(y, y_ref, "output")
    assert_close(s.params["W2"], params[2], "W2")


def reference_keys(layer_type, share_qk, use_gate, C=C, H=H, b=B_SZ, K=4):
    """Key names and shapes of ttt-lm-pytorch's TTTLinear / TTTMLP state_dict."""
    D = C // H
    keys = {"q_proj.weight": (C, C), "v_proj.weight": (C, C), "o_proj.weight": (C, C)}
    if share_qk:
        keys.update({"conv_q.weight": (C, 1, K), "conv_q.bias": (C,), "conv_k.weight": (C, 1, K), "conv_k.bias": (C,)})
    else:
        keys["k_proj.weight"] = (C, C)
    keys.update(
        {
            "learnable_ttt_lr_weight": (H, 1, C),
            "learnable_ttt_lr_bias": (H, 1),
            "learnable_token_idx": (b,),
            "ttt_norm_weight": (H, D),
            "ttt_norm_bias": (H, D),
            "post_norm.weight": (C,),
            "post_norm.bias": (C,),
        }
    )
    if use_gate:
        keys["g_proj.weight"] = (C, C)
    if layer_type == "linear":
        keys.update({"W1": (H, D, D), "b1": (H, 1, D)})
    else:
        keys.update({"W1": (H, D, 4 * D), "b1": (H, 1, 4 * D), "W2": (H, 4 * D, D), "b2": (H, 1, D)})
    return keys


@pytest.mark.parametrize("layer_type, share_qk", CONFIGS)
def test_reference_state_dict_loads_strictly_and_round_trips(layer_type, share_qk):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in reference_keys(layer_type, share_qk, share_qk).items()}
    layer = build_ttt_layer(TTTConfig(C, H, layer_type, B_SZ, share_qk=share_qk, use_gate=share_qk))
    layer.load_state_dict(sd, strict=True)
    out = layer.state_dict()
    assert set(out) == set(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    with pytest.raises(RuntimeError):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "W1"}, strict=True)
    with pytest.raises(RuntimeError):
        layer.load_state_dict({**sd, "token_idx": torch.zeros(B_SZ)}, strict=True)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("preset, share_qk", [("reference", False), ("reference", True), ("recall", True)])
def test_presets_load_reference_state_dicts_strictly(preset, share_qk, layer_type):
    """TTTConfig.reference() is ttt-lm-pytorch's layer; TTTConfig.recall() (the integrations' default) is its
    share_qk layout: both load the reference's state_dicts strictly, whatever else their options do."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in reference_keys(layer_type, share_qk, False).items()}
    make = TTTConfig.reference if preset == "reference" else TTTConfig.recall
    cfg = make(C, H, layer_type=layer_type, mini_batch_size=B_SZ, **({"share_qk": True} if share_qk else {}))
    assert cfg.share_qk == share_qk
    layer = build_ttt_layer(cfg)
    layer.load_state_dict(sd, strict=True)
    assert set(layer.state_dict()) == set(sd)
    if preset == "reference":
        assert TTTConfig.reference(C, H) == TTTConfig(C, H)  # the field defaults are the reference's
    else:
        assert (cfg.qk_norm, cfg.centre, cfg.use_rope, cfg.eta_schedule) == ("l2", True, False, "sum")
        assert TTTConfig.recall(C).num_heads == 1


def test_init_does_not_rely_on_torch_init(monkeypatch):
    """transformers' no_init_weights and LLaMA-Omni's disable_torch_init disable these; ours must not care."""

    def poison(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.fill_(math.nan)

    for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_", "trunc_normal_"):
        monkeypatch.setattr(nn.init, name, poison)
    for cls in (nn.Linear, nn.Conv1d, nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", lambda self: poison(self.weight))
    layer = TTTMLP(TTTConfig(256, 4, "mlp", 16, share_qk=True, use_gate=True))
    check_reference_init(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(math.nan)
    layer.reset_parameters()
    check_reference_init(layer)


def check_reference_init(layer):
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    for name in (
        "q_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "g_proj.weight",
        "W1",
        "W2",
        "learnable_ttt_lr_weight",
    ):
        std = layer.get_parameter(name).std().item()
        assert 0.017 < std < 0.023, (name, std)
    for name in ("b1", "b2", "learnable_ttt_lr_bias", "learnable_token_idx", "ttt_norm_bias", "post_norm.bias"):
        assert torch.equal(layer.get_parameter(name), torch.zeros_like(layer.get_parameter(name))), name
    for name in ("ttt_norm_weight", "post_norm.weight"):
        assert torch.equal(layer.get_parameter(name), torch.ones_like(layer.get_parameter(name))), name
    bound = 1 / math.sqrt(layer.config.conv_kernel)
    for name in ("conv_q.weight", "conv_q.bias", "conv_k.weight", "conv_k.bias"):
        p = layer.get_parameter(name)
        assert p.abs().max() <= bound and p.std() > 0.2 * bound, name


def test_init_state_clones_w0_per_row():
    layer = make_layer("linear").bfloat16()
    state = layer.init_state(3)
    assert state.params["W1"].dtype == torch.float32
    assert torch.equal(state.params["W1"][2], layer.W1.float())
    state.params["W1"][0].zero_()
    assert state.params["W1"][1].abs().max() > 0 and layer.W1.abs().max() > 0


def test_state_index_select_and_detach():
    layer = cached_layer("mlp", True)
    with torch.no_grad():
        _, state = layer(inputs(B=3, T=5))
    idx = torch.tensor([2, 0, 2])
    sel = state.reorder(idx)
    assert sel.batch_size == 3 and sel.position.tolist() == state.position[idx].tolist()
    assert torch.equal(sel.params["W2"], state.params["W2"][idx]) and torch.equal(sel.conv_tail, state.conv_tail[idx])
    sel.params["W2"][0].zero_()
    assert state.params["W2"][2].abs().max() > 0
    y, s = make_layer("linear")(inputs(T=3))
    assert s.params["W1"].requires_grad and not s.detach().params["W1"].requires_grad


@pytest.mark.parametrize(
    "make_x, match",
    [
        (
            lambda: torch.randn(2, 5, C + 1),
            rf"hidden_states must be a floating \[B, T, {C}\] tensor, got \[2, 5, {C + 1}\]",
        ),
        (lambda: torch.randn(5, C), rf"hidden_states must be a floating \[B, T, {C}\] tensor, got \[5, {C}\]"),
        (lambda: torch.randn(2, 0, C), rf"hidden_states must be \[B, T, {C}\] with B, T >= 1, got \[2, 0, {C}\]"),
        (lambda: torch.full((2, 3, C), math.nan), r"hidden_states \[B, T, 32\] = \[2, 3, 32\] holds NaN or inf"),
        (lambda: torch.tensor([[[math.inf] * C] * 2]), r"holds NaN or inf"),
    ],
)
def test_bad_inputs_raise(make_x, match):
    with pytest.raises(ValueError, match=match):
        cached_layer("linear", False)(make_x())


def test_a_decode_step_reads_no_values_on_the_host():
    """T == 1 skips the host-side value checks (they would sync with the device): a NaN input shows in the output,
    a position out of range is caught by the op's device-side assert (at once on the CPU, at the next sync on
    CUDA); multi-token calls refuse both on the host."""
    layer = cached_layer("linear", True)
    with torch.no_grad():
        y, _ = layer(torch.full((1, 1, C), math.nan))
        assert torch.isnan(y).all()
        state = layer.init_state(2)
        state.position.fill_(B_SZ + 1)
        with pytest.raises(RuntimeError, match=r"offset must hold values in \[0, 8\)"):
            layer(inputs(T=1), state)
        with pytest.raises(ValueError, match=r"state.position must be in \[0, 8\)"):
            layer(inputs(T=2), state)


def _bad_states():
    layer = cached_layer("linear", True)
    good = layer.init_state(2)

    def edit(**kw):
        return TTTState(**{**good.__dict__, **kw})

    return [
        (layer.init_state(3), r"state.params\['W1'\] must be \[2, 4, 8, 8\] float32 on cpu, got \[3, 4, 8, 8\]"),
        (
            edit(params={**good.params, "W1": good.params["W1"].bfloat16()}),
            r"must be \[2, 4, 8, 8\] float32 on cpu, got \[2, 4, 8, 8\] bfloat16",
        ),
        (
            edit(grads={**good.grads, "b1": good.grads["b1"].to("meta")}),
            r"state.grads\['b1'\] must be \[2, 4, 1, 8\] float32 on cpu, got .* on meta",
        ),
        (edit(params={"W1": good.params["W1"]}), r"state.params must hold \['W1', 'b1'\]"),
        (edit(position=torch.tensor([0, 8])), r"state.position must be in \[0, 8\)"),
        (edit(position=torch.zeros(2, dtype=torch.int32)), r"state.position must be \[2\] int64 on cpu"),
        (
            edit(conv_tail=torch.zeros(2, C, 2)),
            rf"state.conv_tail must be \[2, {C}, 3\] float32 on cpu, got \[2, {C}, 2\]",
        ),
        (edit(conv_tail=None), r"state.conv_tail must be \[2, 32, 3\]"),
        ({"W1": good.params["W1"]}, r"state must be a TTTState, got dict"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_states_raise(case):
    state, match = _bad_states()[case]
    with pytest.raises(ValueError, match=match):
        cached_layer("linear", True)(inputs(T=3), state)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(hidden_size=30, num_heads=4), r"hidden_size \(30\) must be num_heads \(4\) times an even head_dim"),
        (dict(hidden_size=12, num_heads=4), r"even head_dim"),
        (dict(layer_type="conv"), r"layer_type must be one of \('linear', 'mlp'\)"),
        (dict(scan_mode="fast"), r"scan_mode must be one of"),
        (dict(decode_mode="eager"), r"decode_mode must be one of"),
        (dict(mini_batch_size=0), r"mini_batch_size must be >= 1"),
        (dict(mini_batch_size=16.0), r"mini_batch_size must be int"),
        (dict(use_gate=1), r"use_gate must be bool"),
        (dict(ttt_base_lr=math.nan), r"ttt_base_lr must be finite"),
        (dict(rope_theta=0.0), r"rope_theta must be finite and > 0"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        TTTConfig(**{"hidden_size": C, "num_heads": H, **kw})


def test_layer_type_mismatch_raises():
    with pytest.raises(ValueError, match=r"TTTLinear needs TTTConfig.layer_type='linear', got 'mlp'"):
        TTTLinear(TTTConfig(C, H, "mlp"))
    assert isinstance(build_ttt_layer(TTTConfig(C, H, "mlp")), TTTMLP)


def test_pre_conv_streams_and_uses_reference_keys():
    conv = TTTPreConv(TTTConfig(C, H, pre_conv=True))
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {
        "norm.weight": (C,),
        "conv.weight": (C, 1, 4),
        "conv.bias": (C,),
    }
    x = inputs(T=17)
    with torch.no_grad():
        y, tail = conv(x)
        y_split, tail_split = run_split(conv, x, [2, 1, 9, 5])
        # causal depthwise conv with zero history, as nn.Conv1d(padding=K - 1) trimmed on the right
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * conv.norm.weight
        y_ref = conv.conv(h.mT)[..., :17].mT
    assert_close(y, y_ref, "pre-conv output", 1e-6)
    assert_close(y_split, y, "split output", 1e-6)
    assert torch.equal(tail_split, tail)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_cuda_bf16_streaming_keeps_fp32_state(layer_type):
    layer = make_layer(layer_type, share_qk=True).cuda()
    x = inputs(T=37).cuda()
    with torch.no_grad():
        y_ref, s_ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_full, s_full = layer(x)
            y_split, s_split = run_split(layer, x, [13, 1, 1, 22])
    for s in (s_full, s_split):
        assert all(t.dtype == torch.float32 and t.is_cuda for t in (*s.params.values(), *s.grads.values(), s.conv_tail))
    assert_close(y_full.float(), y_ref, "bf16 output", 0.06)
    assert_close(y_split.float(), y_full.float(), "bf16 split output", 0.06)
