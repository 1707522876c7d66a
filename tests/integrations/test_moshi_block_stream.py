"""The Moshi TTT block (TTT-Linear/MLP) streams without host syncs and in place, so moshi's `LMGen` can capture
its step in a CUDA graph; captured streaming equals the parallel forward."""

from __future__ import annotations

import pytest
import torch
from host_sync import forbid_host_reads
from lmgen_record import record_main
from moshi.utils.compile import CUDAGraphed, no_cuda_graph
from moshi_codes import random_codes

from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, make_lm_gen, ttt_modules
from ttt_speech.integrations.moshi_block import MoshiTTTBlock
from ttt_speech.nn import TTTConfig


def block_model(layer_type: str = "linear", device: str = "cpu", **cfg) -> torch.nn.Module:
    """A tiny moshi LMModel with the TTT block on layers 1 and 3, mini-batch 3, a gate and LR that make the block
    matter (the default init keeps it near the base model)."""
    model = build_lm(seed=0, device=device)
    cfg = {"kind": "block", "layers": [1, 3], "ttt_mini_batch_size": 3, "ttt_num_heads": 2,
           "ttt_layer_type": layer_type, "gate_init": 0.5} | cfg
    apply_ttt(model, MoshiTTTConfig(**cfg))
    with torch.no_grad():
        for block in ttt_modules(model).values():
            block.ttt.learnable_ttt_lr_bias.fill_(2.0)
    return model.eval()


def forward_text_input(model, B: int, T: int) -> torch.Tensor:
    return random_codes(model, B, T).to(next(model.parameters()).device)


@pytest.fixture
def sync_free_block_steps(monkeypatch):
    """Every streaming forward of a MoshiTTTBlock runs under `forbid_host_reads`; yields the list of the T of
    each such call."""
    calls: list[int] = []
    forward = MoshiTTTBlock.forward

    def guarded(self, x):
        if self._streaming_state is None:
            return forward(self, x)
        calls.append(x.shape[1])
        with forbid_host_reads():
            return forward(self, x)

    monkeypatch.setattr(MoshiTTTBlock, "forward", guarded)
    return calls


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_lmgen_steps_the_block_without_host_syncs(layer_type, sync_free_block_steps):
    model = block_model(layer_type)
    block = ttt_modules(model)[3]
    lm_gen = make_lm_gen(model)
    codes = random_codes(model, 2, 9)
    with torch.no_grad(), lm_gen.streaming(2):
        for t in range(5):
            lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
        state = block._streaming_state.ttt
        frozen = state.select_rows(torch.tensor([1]))
        lm_gen.set_exec_mask(torch.tensor([True, False]))
        lm_gen.step(codes[:, model.dep_q + 1:, 5:6])
        for a, b in zip(state.select_rows(torch.tensor([1])).tensors(), frozen.tensors(), strict=True):
            assert torch.equal(a, b)  # exec_mask: row 1 kept its state, through masked arithmetic
        lm_gen.set_exec_mask(torch.tensor([True, True]))
        lm_gen.reset_streaming(torch.tensor([True, False]))
        fresh = block.ttt.init_state(1)
        for a, b in zip(state.select_rows(torch.tensor([0])).tensors(), fresh.tensors(), strict=True):
            assert torch.equal(a, b)
        for t in range(6, 9):  # a whole mini-batch: row 0 commits
            lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
        assert not torch.equal(state.params["W1"][0], fresh.params["W1"][0])
    assert sync_free_block_steps == [1] * 2 * 9  # two blocks, every frame guarded


def test_streaming_writes_the_state_in_place():
    """A captured CUDA graph reads the addresses it saw: steps and resets must keep the state's storage."""
    model = block_model()
    block = ttt_modules(model)[1]
    seq = forward_text_input(model, 2, 7)
    with torch.no_grad(), model.streaming(2):
        state = block._streaming_state.ttt
        storage = [t.data_ptr() for t in state.tensors()]
        start = state.select_rows(torch.arange(2))
        for t in range(4):
            model.forward_text(seq[:, :, t:t + 1])
        model.reset_streaming(torch.tensor([False, True]))
        model.forward_text(seq[:, :, 4:7])
        assert block._streaming_state.ttt is state
        assert [t.data_ptr() for t in state.tensors()] == storage
        assert not torch.equal(state.params["W1"], start.params["W1"]) and state.position.tolist() == [1, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_cuda_graphed_streaming_equals_the_parallel_forward(layer_type, monkeypatch):
    monkeypatch.delenv("NO_CUDA_GRAPH", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 tolerances below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = block_model(layer_type, "cuda")
    B, T, cut = 2, 11, 6
    seq = forward_text_input(model, B, T)
    with torch.no_grad():
        full, _ = model.forward_text(seq)
        fresh_row0, _ = model.forward_text(seq[:1, :, cut:])
        graphed = CUDAGraphed(model.forward_text)  # moshi's own wrapper, as LMGen uses it
        outs = []
        with model.streaming(B):
            for t in range(T):
                if t == cut:
                    model.reset_streaming(torch.tensor([True, False], device="cuda"))
                outs.append(graphed(seq[:, :, t:t + 1])[0].clone())
        assert graphed._graph is not None  # captured (the first call warms up)
    stepped = torch.cat(outs, dim=1)
    torch.testing.assert_close(stepped[1:], full[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepped[:1, :cut], full[:1, :cut], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepped[:1, cut:], fresh_row0, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lmgen_with_cuda_graphs_generates_as_without_and_as_the_parallel_forward(monkeypatch):
    monkeypatch.delenv("NO_CUDA_GRAPH", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 tolerances below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = block_model("mlp", "cuda")
    codes = random_codes(model, 2, 12).cuda()
    cut = 7

    def generate():
        """Greedy LMGen over the user codes, row 1 reset before frame `cut`: generated tokens, the frames fed to
        the main transformer and its text logits, the block's final state, whether the main step was captured."""
        lm_gen = make_lm_gen(model, use_sampling=False)
        tokens = []
        with torch.no_grad(), lm_gen.streaming(2):
            main = lm_gen._streaming_state.graphed_main
            fed, logits = record_main(lm_gen)
            for t in range(12):
                if t == cut:
                    lm_gen.reset_streaming(torch.tensor([False, True], device="cuda"))
                out = lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
                if out is not None:
                    tokens.append(out.clone())
            state = [t.clone() for t in ttt_modules(model)[3]._streaming_state.ttt.tensors()]
        return tokens, fed, logits, state, main._graph is not None

    tokens, fed, logits, state, graphed = generate()
    with no_cuda_graph():
        eager_tokens, _, eager_logits, eager_state, eager_graphed = generate()
    assert graphed and not eager_graphed and len(tokens) == len(eager_tokens) > 0
    for a, b in zip(tokens, eager_tokens, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(logits + state, eager_logits + eager_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the same frames through the parallel forward: row 0 whole, row 1 from its reset
        _, full0 = model.forward_text(torch.cat([f[:1] for f in fed], dim=2))
        _, full1 = model.forward_text(torch.cat([f[1:] for f in fed[cut:]], dim=2))
    torch.testing.assert_close(torch.cat([x[:1] for x in logits], dim=2), full0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([x[1:] for x in logits[cut:]], dim=2), full1, rtol=1e-4, atol=1e-4)


def test_a_half_precision_block_computes_in_its_own_dtype() -> None:
    """The block's autocast names the module's dtype: unnamed, it is autocast's device default (bfloat16 on the CPU,
    float16 on CUDA), and a float16 block then ran its projections in bfloat16 (on the CPU it crashed in LayerNorm)."""
    block = MoshiTTTBlock(32, TTTConfig(hidden_size=32, num_heads=2, mini_batch_size=4)).to(torch.float16)
    seen = []
    block.ttt.v_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    y = block(torch.randn(1, 8, 32, dtype=torch.float16))
    assert seen == [torch.float16] and y.dtype == torch.float16 and torch.isfinite(y).all()
