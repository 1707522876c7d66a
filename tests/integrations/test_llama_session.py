"""Saved sessions: a `ConversationSession` row (TTT fast weights + attention KV) to safetensors per conversation
id and back, continuing exactly; reset rows free their KV columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from ttt_speech.integrations.llama_omni import ConversationSession, LlamaTTTForCausalLM
from ttt_speech.integrations.llama_session import compact_kv, load_conversation, load_session, save_session

V = 128
MODES = ["replace", "gated_residual"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_model(mode: str = "replace", layers=(0, 2)) -> LlamaTTTForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0, use_ttt=True,
                         ttt_layers=list(layers), ttt_mode=mode, ttt_mini_batch_size=4, ttt_base_lr=5.0,
                         **({"ttt_gate_init": 1.0} if mode == "gated_residual" else {}))
    return LlamaTTTForCausalLM(config).eval()


def tokens(*lengths: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("mode", MODES)
def test_a_saved_session_reloads_and_continues_exactly(tmp_path: Path, mode: str) -> None:
    model = make_model(mode)
    session = ConversationSession(model, batch_size=2)
    for seed, lengths in ((1, (5, 9)), (2, (7, 0)), (3, (2, 6))):  # uneven turns: padding columns in the KV
        session.step(input_ids=tokens(*lengths, seed=seed), conversation_ids=["alice", "bob"])
    files = save_session(session, tmp_path)
    assert sorted(p.name for p in files) == ["alice.safetensors", "bob.safetensors"]

    restored = ConversationSession(model, batch_size=2)
    load_session(restored, tmp_path, ["alice", "bob"])
    assert restored.conversation_ids == ["alice", "bob"] and restored.positions.tolist() == [14, 15]
    nxt = tokens(6, 3, seed=4)
    want = session.step(input_ids=nxt, conversation_ids=["alice", "bob"]).logits
    got = restored.step(input_ids=nxt, conversation_ids=["alice", "bob"]).logits
    assert torch.equal(got, want)  # tolerance: exact
    for layer, state in session.cache.ttt_states.items():
        other = restored.cache.ttt_states[layer]
        assert all(torch.equal(state.params[k], other.params[k]) for k in state.params)
        assert torch.equal(state.position, other.position)


def test_a_parked_conversation_resumes_in_another_row_of_a_busy_session(tmp_path: Path) -> None:
    model = make_model("gated_residual")
    history = tokens(5, 8, seed=5)
    session = ConversationSession(model, batch_size=1)
    session.step(input_ids=history[:1], conversation_ids=["a"])
    session.step(input_ids=history[1:], conversation_ids=["a"])
    save_session(session, tmp_path)

    busy = ConversationSession(model, batch_size=2)
    busy.step(input_ids=tokens(30, 4, seed=6), conversation_ids=["x", "y"])
    assert load_conversation(busy, 1, tmp_path / "a.safetensors") == "a"
    nxt = tokens(1, 6, seed=7)
    out = busy.step(input_ids=nxt, conversation_ids=["x", "a"]).logits[1, :6]
    full = model(torch.cat([*history, nxt[1]])[None], use_cache=False).logits[0, -6:]
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_reset_rows_free_their_kv() -> None:
    model = make_model("gated_residual")
    session = ConversationSession(model, batch_size=2)
    session.step(input_ids=tokens(20, 5, seed=8), conversation_ids=["long", "short"])
    assert session.attention_mask.shape[1] == 20
    before = session.cache.memory_bytes()["kv"]
    session.step(input_ids=tokens(0, 2, seed=9), conversation_ids=["new", "short"])  # row 0 reset, then fed nothing
    assert session.attention_mask.shape[1] == 7  # row 1's 5 + 2 tokens; row 0's 20 columns are gone
    assert session.cache.memory_bytes()["kv"] == before * 7 // 20
    assert session.attention_mask[0].sum() == 0 and session.attention_mask[1].tolist() == [1] * 7
    assert compact_kv(session) == 0  # already compact


def test_a_file_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    session = ConversationSession(make_model("replace", layers=(0, 2)), batch_size=1)
    session.step(input_ids=tokens(6, seed=10), conversation_ids=["c1"])
    save_session(session, tmp_path)
    other = ConversationSession(make_model("replace", layers=(1,)), batch_size=1)
    with pytest.raises(ValueError, match=r"c1.safetensors: saved from another model layout: \{'ttt_layers'"):
        load_session(other, tmp_path, ["c1"])
    with pytest.raises(FileNotFoundError, match="nobody.safetensors: no saved conversation"):
        load_session(other, tmp_path, ["nobody"])
    session.conversation_ids = ["../etc"]
    with pytest.raises(ValueError, match="conversation id '../etc': only letters"):
        save_session(session, tmp_path)


def test_the_old_llama_session_module_re_exports_the_package_functions() -> None:
    from ttt_speech.integrations import llama_omni, llama_session
    from ttt_speech.integrations.llama_omni import session

    for name in ("compact_kv", "load_conversation", "load_session", "save_conversation", "save_session", "FORMAT"):
        assert getattr(llama_session, name) is getattr(session, name)
    for name in llama_omni.__all__:
        assert getattr(llama_omni, name) is not None, name
