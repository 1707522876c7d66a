"""TTT in a real (tiny, random) transformers 4.43 Llama: generate, beams, sessions, positions, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from ttt_speech.integrations.llama_omni import (
    ConversationSession,
    LlamaTTTConfig,
    LlamaTTTForCausalLM,
    LlamaTTTSelfAttention,
    TTTDynamicCache,
    apply_ttt,
    from_pretrained_ttt,
    load_non_lora_trainables,
    load_ttt_state_dict,
    ttt_modules,
    ttt_parameter_names,
    ttt_state_dict,
)
from ttt_speech.nn import TTTConfig

V = 128
MODES = ["replace", "gated_residual"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, bos_token_id=None,
                eos_token_id=None, pad_token_id=0)
    return LlamaConfig(**(base | kw))


def ttt_config(mode: str = "replace", layers=(0, 2), **kw) -> LlamaConfig:
    # lr 5 and mini-batch 4: the fast weights move enough within a few tokens for every check to see them
    ttt = dict(use_ttt=True, ttt_layers=list(layers), ttt_mode=mode, ttt_mini_batch_size=4, ttt_base_lr=5.0)
    if mode == "gated_residual":
        ttt["ttt_gate_init"] = 1.0
    return llama_config(**(ttt | kw))


def make_model(mode: str = "replace", layers=(0, 2), seed: int = 0, **kw) -> LlamaTTTForCausalLM:
    torch.manual_seed(seed)
    return LlamaTTTForCausalLM(ttt_config(mode, layers, **kw)).eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy_by_recompute(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


# ---------------------------------------------------------------- config and installation


def test_config_fields_are_validated_and_default_to_the_top_quarter() -> None:
    assert LlamaTTTConfig(use_ttt=True).layer_indices(32) == list(range(24, 32))
    assert LlamaTTTConfig(use_ttt=True).ttt_mini_batch_size == 64
    with pytest.raises(ValueError, match=r"unknown TTT config keys \['ttt_layer'\]"):
        apply_ttt(LlamaForCausalLM(llama_config()), llama_config(use_ttt=True, ttt_layer=[1]))
    with pytest.raises(ValueError, match="ttt_mode must be one of"):
        LlamaTTTForCausalLM(ttt_config(mode="residual"))
    with pytest.raises(ValueError, match=r"ttt_layers must be distinct indices in \[0, 4\), got \[1, 4\]"):
        LlamaTTTForCausalLM(ttt_config(layers=(1, 4)))
    with pytest.raises(ValueError, match="use_ttt is not set"):
        apply_ttt(LlamaForCausalLM(llama_config()))


@pytest.mark.parametrize("mode", MODES)
def test_apply_ttt_patches_the_decoder_layer_instances(mode: str) -> None:
    model = make_model(mode)
    assert sorted(ttt_modules(model)) == [0, 2]
    for i, layer in enumerate(model.model.layers):
        replaced = mode == "replace" and i in (0, 2)
        assert isinstance(layer.self_attn, LlamaTTTSelfAttention) == replaced
        assert hasattr(layer.self_attn, "q_proj") == (not replaced)
    keys = set(ttt_parameter_names(model))
    assert "model.layers.0.self_attn.ttt.W1" in keys and "model.layers.2.self_attn.ttt.learnable_token_idx" in keys
    assert ("model.layers.2.self_attn.ttt_gate" in keys) == (mode == "gated_residual")
    assert not any(".layers.1." in k or ".layers.3." in k for k in keys)
    assert model.config.ttt_layers == [0, 2] and model.config.ttt_mode == mode
    with pytest.raises(ValueError, match=r"already installed in layers \[0, 2\]"):
        apply_ttt(model)


def test_gated_residual_with_a_zero_gate_is_the_pretrained_model() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    model = LlamaTTTForCausalLM(ttt_config("gated_residual", ttt_gate_init=0.0)).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    x = ids(2, 9)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=0)
    with torch.no_grad():
        for layer in (0, 2):
            model.model.layers[layer].self_attn.ttt_gate.fill_(0.1)
    assert (model(x).logits - base(x).logits).abs().max() > 1e-4


# ---------------------------------------------------------------- generate


@pytest.mark.parametrize("mode,layers", [("replace", (0, 2)), ("gated_residual", (0, 2)), ("replace", (0, 1, 2, 3))])
def test_greedy_generate_with_the_cache_equals_full_recomputation(mode: str, layers) -> None:
    model = make_model(mode, layers)
    prompt, n = ids(2, 11), 12
    ref = greedy_by_recompute(model, prompt, n)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, return_legacy_cache=False)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], ref)
    cache = out.past_key_values
    assert isinstance(cache, TTTDynamicCache)
    assert cache.get_seq_length() == prompt.shape[1] + n - 1  # layer 0 is a TTT layer in replace mode
    assert sorted(cache.ttt_states) == list(layers)
    assert all(t.dtype == torch.float32 for s in cache.ttt_states.values() for t in s.params.values())
    # transformers 4.43's own way to give generate a cache: pass it; generate fills and returns that object
    mine = TTTDynamicCache()
    out_p = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                           return_dict_in_generate=True, past_key_values=mine)
    assert torch.equal(out_p.sequences[:, prompt.shape[1]:], ref) and out_p.past_key_values is mine
    # LLaMA-Omni's generate passes only inputs_embeds
    emb = model.get_input_embeddings()(prompt)
    out_e = model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           do_sample=False)
    assert torch.equal(out_e, ref)


def test_sampling_with_num_return_sequences_uses_the_right_state_per_row() -> None:
    model = make_model("replace")
    prompt = ids(2, 7)
    torch.manual_seed(3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                         num_return_sequences=3, max_new_tokens=9, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (6, 16)
    assert len({tuple(s.tolist()) for s in out.sequences}) > 1
    cached = torch.stack(out.logits, dim=1)  # [6, 9, V]
    full = model(out.sequences, use_cache=False).logits[:, 6:-1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_beam_search_reorders_the_ttt_states(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(mode)
    prompt = ids(2, 6, seed=5)
    kw = dict(attention_mask=torch.ones_like(prompt), num_beams=4, num_return_sequences=4, max_new_tokens=10,
              length_penalty=0.0, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(prompt, use_cache=False, **kw)
    out = model.generate(prompt, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)

    # this case needs the TTT rows to follow their beams: reordering only the KV gives another search
    def kv_only(cache, beam_idx):
        DynamicCache.reorder_cache(cache, beam_idx)

    monkeypatch.setattr(TTTDynamicCache, "reorder_cache", kv_only)
    broken = model.generate(prompt, **kw)
    assert not (torch.equal(broken.sequences, ref.sequences)
                and torch.allclose(broken.sequences_scores, ref.sequences_scores, atol=1e-5))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_generates_what_each_row_generates_alone(attn: str) -> None:
    torch.manual_seed(0)
    config = ttt_config("replace")
    config._attn_implementation = attn
    model = LlamaTTTForCausalLM(config).eval()
    a, b = ids(1, 9, seed=7), ids(1, 5, seed=8)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 9:]
    assert torch.equal(out[0], greedy_by_recompute(model, a, 8)[0])
    assert torch.equal(out[1], greedy_by_recompute(model, b, 8)[0])


@pytest.mark.parametrize("mode", MODES)
def test_training_on_a_right_padded_batch_with_checkpointing_reaches_w0(mode: str) -> None:
    model = make_model(mode).train()
    model.gradient_checkpointing_enable()
    a, b = ids(1, 10, seed=2), ids(1, 6, seed=3)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    labels = batch.masked_fill(mask == 0, -100)
    out = model(batch, attention_mask=mask, labels=labels)
    out.loss.backward()
    for layer in (0, 2):
        attn = model.model.layers[layer].self_attn
        assert attn.ttt.W1.grad is not None and attn.ttt.W1.grad.abs().sum() > 0
        assert mode == "replace" or attn.ttt_gate.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        alone = model(b).logits[0]
        torch.testing.assert_close(model(batch, attention_mask=mask).logits[1, :6], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- cache contents, positions, dtypes


@pytest.mark.parametrize("mode", MODES)
def test_ttt_state_size_is_constant_and_kv_exists_only_for_attention_layers(mode: str) -> None:
    model = make_model(mode)
    sizes = {}
    for T in (8, 41):
        cache = TTTDynamicCache()
        with torch.no_grad():
            model(ids(2, T), past_key_values=cache, use_cache=True)
        sizes[T] = cache.memory_bytes()
        assert sorted(cache.ttt_states) == [0, 2]
        assert cache.kv_layers == ([1, 3] if mode == "replace" else [0, 1, 2, 3])
        assert len(cache.key_cache) == len(cache.kv_layers) and cache.get_seq_length(1) == T
        if mode == "replace":
            with pytest.raises(KeyError, match="layer 0 is a TTT layer"):
                cache[0]
    assert sizes[8]["ttt"] == sizes[41]["ttt"] > 0
    assert sizes[41]["kv"] > sizes[8]["kv"]


def test_ttt_layers_use_their_own_positions_and_attention_the_global_ones() -> None:
    x = ids(1, 13)
    shuffled = torch.randperm(13, generator=torch.Generator().manual_seed(0))[None] * 7
    all_ttt = make_model("replace", (0, 1, 2, 3))
    torch.testing.assert_close(all_ttt(x, position_ids=shuffled).logits, all_ttt(x).logits, rtol=0, atol=0)
    mixed = make_model("replace", (0, 2))
    assert (mixed(x, position_ids=shuffled).logits - mixed(x).logits).abs().max() > 1e-3


def test_fp16_and_bf16_models_keep_fp32_ttt_state() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        model = make_model("gated_residual").to(dtype)
        out = model.generate(ids(2, 6), max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, return_legacy_cache=False)
        state = out.past_key_values.ttt_states[0]
        assert model.model.layers[0].self_attn.ttt.W1.dtype == dtype
        assert {t.dtype for t in [*state.params.values(), *state.grads.values()]} == {torch.float32}
        assert all(torch.isfinite(lg).all() for lg in out.logits)


def test_unsupported_caches_and_legacy_continuations_are_refused() -> None:
    model = make_model("replace")
    # generate refuses a static cache up front (test_generate_refuses_caches_...); a forward given one, here
    with pytest.raises(ValueError, match="past_key_values must be a TTTDynamicCache .* got StaticCache"), \
            torch.no_grad():
        model(ids(1, 5), past_key_values=StaticCache(model.config, 1, 8, "cpu", torch.float32), use_cache=True)
    with torch.no_grad():
        kept = model(ids(1, 5), use_cache=True).past_key_values  # eval with use_cache: a TTTDynamicCache, not tuples
        assert isinstance(kept, TTTDynamicCache) and sorted(kept.ttt_states) == [0, 2]
        legacy = kept.to_legacy_cache()  # tuples: KV of layers 1 and 3 only
        assert isinstance(legacy, tuple) and len(legacy) == 2
        with pytest.raises(ValueError, match="legacy KV tuples hold no TTT state"):
            model(ids(1, 1), past_key_values=legacy, use_cache=True)
        with pytest.raises(ValueError, match="the DynamicCache already holds 5 tokens but no TTT state"):
            model(ids(1, 1), past_key_values=DynamicCache.from_legacy_cache(legacy), use_cache=True)
        # an empty DynamicCache (generate's default) is handed over to a TTTDynamicCache, which the forward returns;
        # passing the emptied DynamicCache again would silently restart, so it is refused
        plain = DynamicCache()
        out = model(ids(1, 5), past_key_values=plain, use_cache=True).past_key_values
        assert isinstance(out, TTTDynamicCache) and out.get_seq_length() == 5
        assert type(plain) is DynamicCache and len(plain.key_cache) == 0  # not turned into a TTTDynamicCache
        positional = model.model(ids(1, 3), None, None, DynamicCache(), use_cache=True).past_key_values
        assert isinstance(positional, TTTDynamicCache) and sorted(positional.ttt_states) == [0, 2]
        with pytest.raises(ValueError, match="handed over to a TTTDynamicCache by an earlier forward"):
            model(ids(1, 1), past_key_values=plain, use_cache=True)
        with pytest.raises(ValueError, match="TTT layer 0: past_key_value must be a TTTDynamicCache, got DynamicCache"):
            model.model.layers[0](torch.zeros(1, 2, 64), past_key_value=DynamicCache(), use_cache=True)
    cache = TTTDynamicCache()
    with torch.no_grad():
        model(ids(1, 5), past_key_values=cache, use_cache=True)
    cache.crop(5)
    with pytest.raises(ValueError, match="fast weights cannot be rewound"):
        cache.crop(-1)


def test_cache_batch_operations_move_ttt_rows_with_kv_rows() -> None:
    model = make_model("replace")
    cache = TTTDynamicCache()
    with torch.no_grad():
        model(ids(3, 6), past_key_values=cache, use_cache=True)
    w = cache.ttt_states[2].params["W1"].clone()
    k = cache.key_cache[0].clone()
    parts = cache.batch_split(3, 2)
    assert [p.batch_size for p in parts] == [2, 1]
    whole = TTTDynamicCache.from_batch_splits(parts)
    assert torch.equal(whole.ttt_states[2].params["W1"], w) and whole.get_seq_length() == 6
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.ttt_states[2].params["W1"], w.repeat_interleave(2, 0))
    cache.batch_select_indices(torch.tensor([5, 0]))
    assert torch.equal(cache.ttt_states[2].params["W1"], w[[2, 0]])
    assert torch.equal(cache.key_cache[0], k[[2, 0]])
    assert cache.ttt_states[2].position.tolist() == [2, 2]


def test_cache_token_mask_keeps_marked_tokens_out_of_the_ttt_state() -> None:
    model = make_model("replace", (0, 1, 2, 3))
    x = ids(2, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 3:7] = False
    cache, ref = TTTDynamicCache(), TTTDynamicCache()
    cache.token_mask = keep
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
        model(x[1:, keep[1]], past_key_values=ref, use_cache=True)
    for i in range(4):
        torch.testing.assert_close(cache.ttt_states[i].params["W1"][1], ref.ttt_states[i].params["W1"][0])
        assert cache.ttt_states[i].position.tolist() == [9 % 4, 5 % 4]
    cache.token_mask = keep[:, :3]
    with pytest.raises(ValueError, match=r"cache.token_mask must be \[2, 9\] bool, got \[2, 3\]"):
        model(x, past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------- sessions


@pytest.mark.parametrize("mode", MODES)
def test_session_turns_equal_one_shot_per_row(mode: str) -> None:
    model = make_model(mode)
    g = torch.Generator().manual_seed(11)
    turns = [[torch.randint(1, V, (n,), generator=g) for n in lens] for lens in ([5, 9, 0], [7, 0, 3], [2, 6, 6])]
    session = ConversationSession(model, batch_size=3)
    history = [torch.zeros(0, dtype=torch.long) for _ in range(3)]
    states = []
    for turn in turns:
        out = session.step(input_ids=turn, conversation_ids=["a", "b", "c"])
        states.append(session.cache.ttt_states[2].params["W1"].clone())
        for r, tokens in enumerate(turn):
            history[r] = torch.cat([history[r], tokens])
            if len(tokens):
                full = model(history[r][None], use_cache=False).logits[0, -len(tokens):]
                torch.testing.assert_close(out.logits[r, : len(tokens)], full, rtol=1e-5, atol=1e-5)
    assert session.positions.tolist() == [len(h) for h in history]
    assert not torch.equal(states[0][0], states[1][0])  # row 0 learned from turn 2
    assert torch.equal(states[0][1], states[1][1])  # row 1 had nothing to say in turn 2


def test_session_new_conversation_id_resets_only_its_row() -> None:
    model = make_model("replace")
    session = ConversationSession(model, batch_size=2)
    first = ids(2, 10, seed=3)
    session.step(input_ids=first, conversation_ids=["u1", "u2"])
    before = {i: s.params["W1"].clone() for i, s in session.cache.ttt_states.items()}
    session._switch(["u1", "u3"])  # what step does first
    fresh = model.model.layers[0].self_attn.ttt.init_state(2)
    for i, ttt in ttt_modules(model).items():
        state = session.cache.ttt_states[i]
        assert torch.equal(state.params["W1"][1], ttt.W1.float())  # reset restores W0
        assert torch.equal(state.params["W1"][0], before[i][0])  # the other row is untouched
        assert state.position.tolist() == [10 % 4, 0] and torch.equal(state.grads["W1"][1], fresh.grads["W1"][1])
    nxt = ids(2, 6, seed=4)
    out = session.step(input_ids=nxt, conversation_ids=["u1", "u3"])
    torch.testing.assert_close(out.logits[1], model(nxt[1:], use_cache=False).logits[0], rtol=1e-5, atol=1e-5)
    full0 = model(torch.cat([first[:1], nxt[:1]], 1), use_cache=False).logits[0, 10:]
    torch.testing.assert_close(out.logits[0], full0, rtol=1e-5, atol=1e-5)


def test_session_generate_continues_without_resending_the_history() -> None:
    model = make_model("gated_residual")
    session = ConversationSession(model)
    p1, p2 = ids(1, 7, seed=5), ids(1, 5, seed=6)
    r1 = session.generate(input_ids=[p1[0]], max_new_tokens=6)[0]
    assert torch.equal(r1, greedy_by_recompute(model, p1, 6)[0])
    r2 = session.generate(input_ids=[p2[0]], max_new_tokens=6)[0]
    history = torch.cat([p1[0], r1, p2[0]])[None]
    assert torch.equal(r2, greedy_by_recompute(model, history, 6)[0])
    assert session.cache.get_seq_length(1) == 7 + 6 + 5 + 6  # every generated token was fed
    eos = int(r2[2])
    r3 = session.generate(input_ids=[p2[0]], max_new_tokens=6, eos_token_id=eos)[0]
    assert int(r3[-1]) == eos or len(r3) == 6


# ---------------------------------------------------------------- checkpoints and init


def test_transformers_init_leaves_ttt_parameters_at_their_own_init() -> None:
    # the model's std (1.0) differs from TTT's (0.02): a re-draw by LlamaPreTrainedModel._init_weights would show
    model = LlamaTTTForCausalLM(ttt_config("gated_residual", initializer_range=1.0, ttt_initializer_range=0.02,
                                           ttt_gate_init=0.1))
    ttt = model.model.layers[2].self_attn.ttt
    assert ttt.q_proj.weight.std() < 0.05 and ttt.W1.std() < 0.05
    assert torch.equal(ttt.ttt_norm_weight, torch.ones_like(ttt.ttt_norm_weight))
    assert torch.equal(model.model.layers[2].self_attn.ttt_gate, torch.full((64,), 0.1))
    snapshot = {k: v.clone() for k, v in ttt_state_dict(model).items()}
    model.post_init()  # LLaMA-Omni's speech-to-speech class calls it a second time
    assert all(torch.equal(v, snapshot[k]) for k, v in ttt_state_dict(model).items())
    # a module transformers initialises (from_pretrained: its keys are missing) gets TTT's init, not Llama's
    for p in ttt.parameters():
        p.data.fill_(7.0)
    for m in ttt.modules():
        m._is_hf_initialized = False
    ttt.apply(model._initialize_weights)
    assert ttt.q_proj.weight.std() < 0.05 and torch.equal(ttt.post_norm.weight, torch.ones(64))


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = make_model("gated_residual", ttt_layer_type="mlp")
    with torch.no_grad():
        for p in ttt_state_dict(model).values():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_ttt"] is True and saved["ttt_layers"] == [0, 2] and saved["ttt_layer_type"] == "mlp"
    loaded, report = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path)
    assert report.initialised == [] and report.loaded == sorted(ttt_parameter_names(model))
    assert LlamaTTTConfig.from_config(loaded.config) == LlamaTTTConfig.from_config(model.config)
    x = ids(2, 9)
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("mode,low_cpu_mem_usage", [("replace", False), ("replace", True), ("gated_residual", True)])
def test_base_checkpoint_loads_with_fresh_ttt_and_reports_it(tmp_path: Path, mode: str,
                                                             low_cpu_mem_usage: bool) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)
    cfg = ttt_config(mode, ttt_gate_init=0.1)
    with pytest.raises(ValueError, match=r"missing TTT keys \[.*'model.layers.0.self_attn.ttt.W1'"):
        from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path, config=cfg, low_cpu_mem_usage=low_cpu_mem_usage)
    model, report = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path, config=cfg, require_ttt=False,
                                        low_cpu_mem_usage=low_cpu_mem_usage)
    assert report.initialised == sorted(ttt_parameter_names(model)) and report.loaded == []
    # replace mode drops the base attention of the TTT layers, and only that
    assert ("model.layers.0.self_attn.q_proj.weight" in report.dropped) == (mode == "replace")
    assert all(".layers.0." in k or ".layers.2." in k for k in report.dropped)
    ttt = model.model.layers[0].self_attn.ttt
    assert torch.equal(ttt.ttt_norm_weight, torch.ones_like(ttt.ttt_norm_weight))
    assert torch.equal(ttt.learnable_token_idx, torch.zeros(4))
    assert 0.01 < ttt.W1.std() < 0.2 and 0.01 < ttt.q_proj.weight.std() < 0.2
    if mode == "gated_residual":
        assert torch.equal(model.model.layers[0].self_attn.ttt_gate, torch.full((64,), 0.1))
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(ids(1, 6)).logits).all()


def test_non_lora_trainables_and_a_lora_adapter_load_like_llama_omni(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    trained = make_model("replace", seed=0)
    with torch.no_grad():
        for p in ttt_state_dict(trained).values():
            p.add_(0.05 * torch.randn_like(p))
    peft_names = {f"base_model.model.{k}": v for k, v in ttt_state_dict(trained).items()}
    torch.save(peft_names, tmp_path / "non_lora_trainables.bin")
    model = make_model("replace", seed=0)  # the base weights again, TTT fresh
    model.load_state_dict({k: v for k, v in trained.state_dict().items() if k not in ttt_parameter_names(trained)},
                          strict=False)
    x = ids(1, 9)
    assert (model(x).logits - trained(x).logits).abs().max() > 1e-3
    report = load_non_lora_trainables(model, tmp_path)
    assert report.loaded == sorted(ttt_parameter_names(model))
    torch.testing.assert_close(model(x).logits, trained(x).logits, rtol=0, atol=0)

    # LoRA on q_proj/v_proj also wraps the TTT projections; PeftModel.from_pretrained + merge keep them working
    lora = get_peft_model(trained, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    want = lora(x).logits
    merged = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)
    assert sorted(ttt_modules(merged)) == [0, 2]


def test_ttt_key_mismatches_are_named() -> None:
    model = make_model("replace")
    partial = {k: v for k, v in ttt_state_dict(model).items() if ".layers.2." in k}
    with pytest.raises(ValueError, match=r"missing TTT keys \[.*'model.layers.0.self_attn.ttt.W1'"):
        model.load_state_dict(partial, strict=False)  # LLaMA-Omni's builder loads this way
    other = {k.replace(".layers.2.", ".layers.3."): v for k, v in ttt_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"unexpected TTT keys \[.*'model.layers.3.self_attn.ttt.W1'"):
        model.load_state_dict(other, strict=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.speech_projector.weight'\]"):
        load_ttt_state_dict(model, {**ttt_state_dict(model), "model.speech_projector.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing TTT keys \[.*'model.layers.2.self_attn.ttt.b1'"):
        load_ttt_state_dict(model, {})


# ---------------------------------------------------------------- TTT layer options, causality


def test_default_layers_are_the_recall_preset_and_reference_fields_give_the_reference() -> None:
    assert LlamaTTTConfig().ttt_config(64, 4, 0.1) == TTTConfig.recall(64, 1, mini_batch_size=64,
                                                                         initializer_range=0.1)
    reference = LlamaTTTConfig(ttt_num_heads=None, ttt_share_qk=False, ttt_qk_norm="none", ttt_use_rope=True,
                               ttt_eta_schedule="mean", ttt_centre=False)
    assert reference.ttt_config(64, 4, 0.1) == TTTConfig.reference(64, 4, mini_batch_size=64, initializer_range=0.1)


@pytest.mark.parametrize("cache", ["static", "quantized"])
def test_generate_refuses_caches_without_room_for_the_ttt_state(cache: str) -> None:
    model = make_model("gated_residual")
    assert type(model)._supports_static_cache  # Llama itself supports it; TTT turns it off
    with pytest.raises(ValueError, match="does not support"):
        model.generate(ids(1, 4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                       cache_implementation=cache)


def test_a_config_saved_before_the_layer_options_keeps_its_meaning() -> None:
    # what write_to saved before the options existed: every field of that time (share_qk off, the model's heads)
    saved = {"use_ttt": True, "ttt_layers": None, "ttt_layer_type": "linear", "ttt_mode": "replace",
             "ttt_mini_batch_size": 64, "ttt_base_lr": 1.0, "ttt_num_heads": None, "ttt_use_gate": False,
             "ttt_share_qk": False, "ttt_rope_theta": 10000.0, "ttt_gate_init": 0.1, "ttt_initializer_range": None,
             "ttt_check_finite": True}
    old = LlamaTTTConfig.from_config(LlamaConfig(**saved))
    assert old.ttt_config(64, 4, 0.1) == TTTConfig.reference(64, 4, mini_batch_size=64, initializer_range=0.1)
    # a config written by hand with a few fields gets today's defaults; one that names an option keeps it
    assert LlamaTTTConfig.from_config(LlamaConfig(use_ttt=True)).ttt_config(64, 4, 0.1) == \
        TTTConfig.recall(64, 1, mini_batch_size=64, initializer_range=0.1)
    assert LlamaTTTConfig.from_config(LlamaConfig(**saved, ttt_qk_norm="l2")).ttt_centre is True

# every option on (conv_size needs share_qk off); the default config is the recall preset
LAYER_OPTIONS = dict(ttt_share_qk=False, ttt_pre_conv=True, ttt_qk_norm="l2", ttt_conv_size=3, ttt_use_rope=False,
                     ttt_eta_schedule="sum", ttt_centre=True)


def options_model(mode: str, **kw) -> LlamaTTTForCausalLM:
    model = make_model(mode, **(LAYER_OPTIONS | kw))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for ttt in ttt_modules(model).values():
            for conv in (ttt.q_conv, ttt.k_conv, ttt.v_conv):  # off the identity init, so that a lost tail shows
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    return model


def test_layer_option_fields_reach_the_ttt_layers_and_config_json(tmp_path: Path) -> None:
    model = options_model("replace", ttt_conv_kernel=3)
    cfg = ttt_modules(model)[2].config
    assert (cfg.pre_conv, cfg.conv_kernel, cfg.qk_norm, cfg.conv_size, cfg.use_rope, cfg.eta_schedule, cfg.centre) \
        == (True, 3, "l2", 3, False, "sum", True)
    assert "model.layers.2.self_attn.ttt.pre_conv.conv.weight" in ttt_parameter_names(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ttt_centre"] is True and saved["ttt_qk_norm"] == "l2" and saved["ttt_conv_size"] == 3
    with pytest.raises(ValueError, match=r"config.ttt_qk_norm must be one of \('none', 'l2'\), got 'rms'"):
        make_model("replace", ttt_qk_norm="rms")


@pytest.mark.parametrize("mode", MODES)
def test_layer_options_split_calls_with_the_cache_equal_one_call(mode: str) -> None:
    model = options_model(mode)
    x = ids(2, 19)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache, pieces = TTTDynamicCache(), []
        for a, b in ((0, 7), (7, 8), (8, 9), (9, 19)):
            out = model(x[:, a:b], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    state = cache.ttt_states[2]
    assert sorted(state.input_state) == ["centre_count", "centre_sum", "pre_conv", "qkv_conv"]
    assert state.input_state["centre_count"].flatten().tolist() == [19.0, 19.0]


def test_layer_options_greedy_generate_equals_full_recomputation() -> None:
    model = options_model("replace")
    prompt, n = ids(2, 9), 8
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    assert torch.equal(out[:, prompt.shape[1]:], greedy_by_recompute(model, prompt, n))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [False, True])
def test_ttt_layer_and_model_are_causal_exactly(mode: str, options: bool) -> None:
    """Changing inputs at positions >= t changes no output before t, bit for bit: the TTT layer alone and the
    whole model around it."""
    model = options_model(mode) if options else make_model(mode)
    g = torch.Generator().manual_seed(9)
    x = ids(2, 21)
    with torch.no_grad():
        for t in (1, 6, 20):
            x2 = x.clone()
            x2[:, t:] = torch.randint(1, V, x2[:, t:].shape, generator=g)
            a, b = model(x, use_cache=False).logits, model(x2, use_cache=False).logits
            assert torch.equal(a[:, :t], b[:, :t]), t
            assert not torch.equal(a[:, t], b[:, t])
            h = torch.randn(2, 21, 64, generator=g)
            h2 = h.clone()
            h2[:, t:] = torch.randn(h2[:, t:].shape, generator=g)
            ttt = ttt_modules(model)[2]
            y, y2 = ttt(h)[0], ttt(h2)[0]
            assert torch.equal(y[:, :t], y2[:, :t]) and not torch.equal(y[:, t], y2[:, t])


def test_layer_options_keep_padding_out_of_the_input_state() -> None:
    model = options_model("replace")
    a, b = ids(1, 9, seed=7), ids(1, 5, seed=8)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         return_legacy_cache=False)
    assert torch.equal(out.sequences[1, 9:], greedy_by_recompute(model, b, 6)[0])
    alone = TTTDynamicCache()
    with torch.no_grad():
        model(torch.cat([b, out.sequences[1:, 9:-1]], 1), past_key_values=alone, use_cache=True)
    for name, t in alone.ttt_states[0].input_state.items():
        torch.testing.assert_close(out.past_key_values.ttt_states[0].input_state[name][1], t[0], rtol=1e-5,
                                   atol=1e-5)
