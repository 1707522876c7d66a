"""A TTT-Linear/MLP decode step (T = 1) reads no tensor value on the host, so it can be captured in a CUDA graph;
replaying the captured step equals the parallel forward."""

import pytest
import torch
from host_sync import HostRead, forbid_host_reads

from ttt_speech.nn import TTTConfig, build_ttt_layer

C, H, B_SZ = 16, 2, 4
OPTIONS = {
    "reference": {},
    "recall": dict(share_qk=True, qk_norm="l2", use_rope=False, eta_schedule="sum", centre=True),
    "every input transform": dict(pre_conv=True, conv_size=3, centre=True, use_gate=True),
}


def make_layer(layer_type: str, options: str, device: str = "cpu"):
    torch.manual_seed(0)
    cfg = TTTConfig(hidden_size=C, num_heads=H, layer_type=layer_type, mini_batch_size=B_SZ, **OPTIONS[options])
    layer = build_ttt_layer(cfg)
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.fill_(1.0)
        layer.learnable_token_idx.normal_(0.0, 0.2)
        layer.o_proj.weight.normal_(0.0, C**-0.5)
        for name in layer.fast_weight_names:
            getattr(layer, name).normal_(0.0, 0.2)
    return layer.to(device)


def test_the_guard_catches_host_reads():
    x = torch.ones(2)
    for read in (lambda: x.item(), lambda: bool(x.sum()), lambda: x.tolist(), lambda: x.cpu(),
                 lambda: int(x[0]), lambda: torch.tensor([1, 2])):
        with pytest.raises(HostRead), forbid_host_reads():
            read()
    assert bool(x.sum()) and x.tolist() == [1.0, 1.0]  # restored


@pytest.mark.parametrize("decode_mode", ["anchored", "online"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_decode_steps_read_nothing_on_the_host_and_equal_the_full_forward(layer_type, options, decode_mode):
    layer = make_layer(layer_type, options)
    layer.config.decode_mode = decode_mode
    x = torch.randn(3, 2 * B_SZ + 3, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = layer.init_state(3)
        state = layer.reset_state(state, torch.tensor([False, True, False]))  # reset is outside the step
        outs = []
        for t in range(x.shape[1]):
            with forbid_host_reads():
                y, state = layer(x[:, t : t + 1], state)
            outs.append(y)
        stepped = torch.cat(outs, dim=1)
        full, full_state = layer(x)
    if decode_mode == "online":  # a different function (docs/ttt.md): only the first token agrees
        torch.testing.assert_close(stepped[:, :1], full[:, :1], rtol=1e-5, atol=1e-5)
        assert (stepped - full).abs().max() > 1e-4
        return
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(state.position, full_state.position)
    for a, b in zip(state.tensors(), full_state.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_multi_token_calls_still_check_values(layer_type):
    layer = make_layer(layer_type, "reference")
    with pytest.raises(HostRead), forbid_host_reads():  # check_finite and the dual form's host offsets
        layer(torch.randn(1, 3, C))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("B", [1, 3])
def test_decode_step_captured_in_a_cuda_graph_equals_the_parallel_forward(layer_type, options, B, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 tolerances below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layer = make_layer(layer_type, options, "cuda")
    T = 2 * B_SZ + 3
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full, full_state = layer(x)
        eager = layer.init_state(B)
        eager_out = []
        for t in range(T):
            y, new = layer(x[:, t : t + 1], eager)
            eager.copy_(new)
            eager_out.append(y)
        state, x_step = layer.init_state(B), x[:, :1].clone()
        side = torch.cuda.Stream()  # warm up on a side stream before capture, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x_step, layer.init_state(B))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # raises if the step syncs with the host
            y_step, new = layer(x_step, state)
            state.copy_(new)
        outs = []
        for t in range(T):
            x_step.copy_(x[:, t : t + 1])
            graph.replay()
            outs.append(y_step.clone())
        torch.cuda.synchronize()
    stepped = torch.cat(outs, dim=1)
    torch.testing.assert_close(stepped, torch.cat(eager_out, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)  # one frame vs batched kernels, cuDNN convs
    assert torch.equal(state.position, full_state.position)
    for a, b in zip(state.tensors(), eager.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
