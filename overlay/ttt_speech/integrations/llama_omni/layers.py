"""The TTT layers in the decoder: `apply_ttt`, the attention replacement (`replace`), the gated residual hook
(`gated_residual`), and the forward that reads and writes a layer's state in the cache, padding masked out."""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn

from ttt_speech.integrations.llama_omni.cache import TTTDynamicCache
from ttt_speech.integrations.llama_omni.config import LlamaTTTConfig
from ttt_speech.nn import TTTBase, TTTConfig, TTTState, build_ttt_layer

_TTT_KEY = re.compile(r"(^|\.)layers\.(\d+)\.self_attn\.(ttt\.|ttt_gate$)")


def _is_ttt_key(key: str) -> bool:
    """A state-dict key of a TTT parameter (LoRA adapters on TTT projections belong to the adapter, not to TTT)."""
    return bool(_TTT_KEY.search(key)) and ".lora_" not in key


def _valid_tokens(attention_mask: Tensor | None, cache_position: Tensor | None, B: int, T: int) -> Tensor | None:
    """Which of this call's T tokens are real (not padding), of shape [B, T] bool, read from the mask the decoder
    layers receive; None when there is no mask (no padding).

    4D (eager/sdpa, additive, 0 = attend): the last query's row; its own token is real in generate (left padding)
    and in training (right padding keeps a real token before it), so its row is never one SDPA un-masks. 2D
    (flash-attention): the mask itself.
    """
    if attention_mask is None:
        return None
    S = attention_mask.shape[-1]
    pos = cache_position if cache_position is not None else torch.arange(S - T, S, device=attention_mask.device)
    if attention_mask.dim() == 4:
        valid = attention_mask[:, 0, -1, :].index_select(-1, pos) == 0
    elif attention_mask.dim() == 2:
        valid = attention_mask.index_select(-1, pos).bool()
    else:
        raise ValueError(f"attention_mask must be 2D or 4D, got {list(attention_mask.shape)}")
    return valid.expand(B, T)


def _masked_ttt(ttt: TTTBase, x: Tensor, state: TTTState | None, valid: Tensor | None) -> tuple[Tensor, TTTState]:
    """`ttt(x, state)` where only the True tokens of `valid` [B, T] enter the state; outputs at the other positions
    are 0. Rows sharing a pattern of real tokens run as one call; a row without real tokens keeps its state."""
    if valid is not None:
        valid = valid.to("cpu", torch.bool)
    if valid is None or bool(valid.all()):
        return ttt(x, state)
    B, T, C = x.shape
    if state is None:
        state = ttt.init_state(B, x.device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(B):
        cols = tuple(valid[r].nonzero().flatten().tolist())
        if cols:
            groups.setdefault(cols, []).append(r)
    pieces = []
    for cols, rows in groups.items():
        r_idx, c_idx = torch.tensor(rows), torch.tensor(cols)
        r_dev, c_dev = r_idx.to(x.device), c_idx.to(x.device)
        y, part = ttt(x.index_select(0, r_dev).index_select(1, c_dev), state.select_rows(r_idx))
        pieces.append((r_dev, c_dev, y))
        state = state.put_rows(r_idx, part)
    dtype = pieces[0][2].dtype if pieces else x.dtype
    out = x.new_zeros(B, T, C, dtype=dtype)
    for r_dev, c_dev, y in pieces:
        out = out.index_put((r_dev[:, None], c_dev[None, :]), y)
    return out, state


def ttt_forward(ttt: TTTBase, layer_idx: int, hidden_states: Tensor, attention_mask: Tensor | None = None,
                past_key_value: Any = None, cache_position: Tensor | None = None) -> Tensor:
    """Run TTT layer `layer_idx` on `hidden_states` [B, T, C] from (and into) its state in `past_key_value`.

    Padding (per `cache.token_mask`, else the attention mask) is skipped: it neither enters the state nor gets an
    output (0). Without a cache the layer starts from W0 and keeps nothing.
    """
    B, T = hidden_states.shape[:2]
    cache, state, valid = None, None, None
    if past_key_value is not None:
        if not isinstance(past_key_value, TTTDynamicCache):
            raise ValueError(
                f"TTT layer {layer_idx}: past_key_value must be a TTTDynamicCache, got "
                f"{type(past_key_value).__name__} (the model's forward supplies one: call the model, or pass "
                "past_key_values=TTTDynamicCache())")
        cache = past_key_value
        state = cache.ttt_states.get(layer_idx)
        valid = cache.token_mask
        if valid is not None and tuple(valid.shape) != (B, T):
            raise ValueError(f"TTT layer {layer_idx}: cache.token_mask must be [{B}, {T}] bool, "
                             f"got {list(valid.shape)}")
    if valid is None:
        valid = _valid_tokens(attention_mask, cache_position, B, T)
    out, new_state = _masked_ttt(ttt, hidden_states, state, valid)
    if cache is not None:
        cache.update_ttt(layer_idx, new_state, T)
    return out


class LlamaTTTSelfAttention(nn.Module):
    """Stands in for `LlamaDecoderLayer.self_attn` in `replace` mode: the TTT layer, with attention's call
    signature and return value `(output, None, past_key_value)` (the incoming cache object, as `LlamaModel` needs).

    Args:
        config: the TTT layer's config.
        layer_idx: the decoder layer index (the key of its state in `TTTDynamicCache.ttt_states`).
    """

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ttt = build_ttt_layer(config)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_value: Any = None, output_attentions: bool = False, use_cache: bool = False,
                cache_position: Tensor | None = None, position_embeddings: Any = None,
                **kwargs: Any) -> tuple[Tensor, None, Any]:
        # position_ids / position_embeddings are the attention layers' global positions; TTT restarts its RoPE
        # positions every mini-batch from the position in its state
        out = ttt_forward(self.ttt, self.layer_idx, hidden_states, attention_mask, past_key_value, cache_position)
        return out, None, past_key_value


def _gated_residual_hook(attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """Forward hook of an attention module in `gated_residual` mode: add `tanh(ttt_gate) * ttt(x)`; nothing while
    `attn.ttt_bypass` (the distillation teacher, `llama_train.ttt_bypassed`)."""
    if getattr(attn, "ttt_bypass", False):
        return output
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    y = ttt_forward(attn.ttt, attn.layer_idx, x, kwargs.get("attention_mask"), kwargs.get("past_key_value"),
                    kwargs.get("cache_position"))
    return (output[0] + torch.tanh(attn.ttt_gate).to(y.dtype) * y, *output[1:])


_PAST_KEY_VALUES_ARG = 3  # LlamaModel.forward(input_ids, attention_mask, position_ids, past_key_values, ...)


def _supply_ttt_cache(decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of `model.model` (the `LlamaModel`): its layers get a `TTTDynamicCache`
    (`TTTDynamicCache.supply`), which the forward returns as `past_key_values`. A new one where LlamaModel would
    build a `DynamicCache` itself (eval with `use_cache`, no cache given)."""
    positional = len(args) > _PAST_KEY_VALUES_ARG
    past = args[_PAST_KEY_VALUES_ARG] if positional else kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache")
    use_cache = decoder.config.use_cache if use_cache is None else use_cache
    cache = TTTDynamicCache.supply(past, create=bool(use_cache) and not decoder.training)
    if cache is past:
        return args, kwargs
    if positional:
        args = (*args[:_PAST_KEY_VALUES_ARG], cache, *args[_PAST_KEY_VALUES_ARG + 1:])
    else:
        kwargs = {**kwargs, "past_key_values": cache}
    return args, kwargs


def _init_weights_with_ttt(base_init: Any, module: nn.Module) -> None:
    """The model's `_init_weights`, then TTT's own init for TTT modules (post-order: after their children).

    transformers calls it from `post_init` (LLaMA-Omni's speech-to-speech class calls that twice) and, in
    `from_pretrained`, for modules whose keys the checkpoint lacks (with `low_cpu_mem_usage` their memory is then
    uninitialised); Llama's own `_init_weights` would leave the TTT norms, W0 and the gate untouched or re-draw the
    projections with the model's std.
    """
    base_init(module)
    if isinstance(module, TTTBase):
        module.reset_parameters()
    gate = module._parameters.get("ttt_gate")
    if gate is not None:
        with torch.no_grad():
            gate.fill_(module.ttt_gate_init)


def _check_ttt_load(module: nn.Module, incompatible: Any) -> None:
    """`load_state_dict` post-hook: a load that brings some TTT keys must bring all, and TTT keys the model has no
    place for are an error (LLaMA-Omni's builder loads `non_lora_trainables.bin` with strict=False)."""
    ttt_keys = set(ttt_parameter_names(module))
    missing = [k for k in incompatible.missing_keys if any(k == t or k.endswith("." + t) for t in ttt_keys)]
    unexpected = [k for k in incompatible.unexpected_keys if _is_ttt_key(k)]
    if unexpected or 0 < len(missing) < len(ttt_keys):
        raise ValueError(
            f"TTT weights do not fit the model (TTT in layers {sorted(ttt_modules(module))}): "
            f"missing TTT keys {sorted(missing) if len(missing) < len(ttt_keys) else []}, "
            f"unexpected TTT keys {sorted(unexpected)}")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"apply_ttt needs a Llama causal LM with model.model.layers, got {type(model).__name__}")
    return layers


def ttt_modules(model: nn.Module) -> dict[int, TTTBase]:
    """The TTT layers installed in `model.model.layers`, by layer index."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    found = {}
    for idx, layer in enumerate(layers if isinstance(layers, nn.ModuleList) else []):
        ttt = getattr(getattr(layer, "self_attn", None), "ttt", None)
        if isinstance(ttt, TTTBase):
            found[idx] = ttt
    return found


def ttt_parameter_names(model: nn.Module) -> list[str]:
    """State-dict keys of everything TTT added to `model` (`...self_attn.ttt.*`, `...self_attn.ttt_gate`)."""
    return [k for k in model.state_dict() if _is_ttt_key(k)]


def ttt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the TTT parameters of `model`, e.g. to save beside a LoRA adapter."""
    return {k: v for k, v in model.state_dict().items() if _is_ttt_key(k)}


def apply_ttt(model: nn.Module, config: Any = None) -> nn.Module:
    """Install TTT layers into `model.model.layers` (in place) as `config` (default `model.config`) asks.

    Called by the patched `OmniSpeechLlamaForCausalLM.__init__` before `post_init()`; works on any transformers
    4.43 Llama causal LM. New modules take the dtype and device of their layer; the resolved TTT fields are written
    back to `config` (so `save_pretrained` records them); `model._init_weights` is wrapped so that transformers'
    init re-runs the TTT modules' own init; `load_state_dict` checks TTT keys by name; the decoder (`model.model`)
    gets a forward pre-hook that gives its layers a `TTTDynamicCache` (`TTTDynamicCache.supply`: `generate`'s default
    `DynamicCache` is handed over to one); `generate` refuses `cache_implementation="static"` / `"quantized"` (they
    have no room for the TTT state).

    Raises:
        ValueError: `use_ttt` is not set, TTT is already installed, or a field is invalid.
    """
    config = model.config if config is None else config
    cfg = LlamaTTTConfig.from_config(config)
    if not cfg.use_ttt:
        raise ValueError("apply_ttt: config.use_ttt is not set")
    layers = _decoder_layers(model)
    if ttt_modules(model):
        raise ValueError(f"TTT is already installed in layers {sorted(ttt_modules(model))}")
    indices = cfg.layer_indices(len(layers))
    ttt_cfg = cfg.ttt_config(config.hidden_size, config.num_attention_heads, config.initializer_range)
    for idx in indices:
        layer = layers[idx]
        ref = next(layer.parameters())
        if cfg.ttt_mode == "replace":
            layer.self_attn = LlamaTTTSelfAttention(ttt_cfg, idx).to(device=ref.device, dtype=ref.dtype)
            continue
        attn = layer.self_attn
        if getattr(attn, "layer_idx", None) != idx:
            raise ValueError(f"layer {idx}: self_attn.layer_idx is {getattr(attn, 'layer_idx', None)}, expected {idx}")
        attn.ttt = build_ttt_layer(ttt_cfg).to(device=ref.device, dtype=ref.dtype)
        attn.ttt_gate_init = float(cfg.ttt_gate_init)
        attn.ttt_gate = nn.Parameter(torch.full((config.hidden_size,), float(cfg.ttt_gate_init), device=ref.device,
                                                dtype=ref.dtype))
        attn.register_forward_hook(_gated_residual_hook, with_kwargs=True)
    cfg.ttt_layers = indices
    cfg.write_to(config)
    if config is not model.config:
        cfg.write_to(model.config)
    model.ttt_config = cfg
    # the TTT state lives in TTTDynamicCache: transformers refuses its static and quantized caches up front
    model._supports_static_cache = False
    model._supports_quantized_cache = False
    # the decoder runs with a TTTDynamicCache: generate's default DynamicCache is handed over to one
    model.model.register_forward_pre_hook(_supply_ttt_cache, with_kwargs=True)
    model._init_weights = functools.partial(_init_weights_with_ttt, type(model)._init_weights.__get__(model))
    model.register_load_state_dict_post_hook(_check_ttt_load)
    return model

