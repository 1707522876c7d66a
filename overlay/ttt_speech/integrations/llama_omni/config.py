"""The TTT fields of a Llama / LLaMA-Omni config (`LlamaTTTConfig`), as config.json records them, and the
transformers config of a Llama with TTT layers (`LlamaTTTModelConfig`, `model_type` "llama-ttt")."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from transformers import LlamaConfig

from ttt_speech.nn import TTTConfig

MODES = ("replace", "gated_residual")


# config.json as LlamaTTTConfig.write_to saved it before the layer options existed: every field of that time, none
# of the option fields. Such a config meant ttt-lm-pytorch's layer, whatever the option defaults are now.
_SAVED_BEFORE_OPTIONS = {"use_ttt", "ttt_layers", "ttt_layer_type", "ttt_mode", "ttt_mini_batch_size", "ttt_base_lr",
                         "ttt_num_heads", "ttt_use_gate", "ttt_share_qk", "ttt_rope_theta", "ttt_gate_init",
                         "ttt_initializer_range", "ttt_check_finite"}
_OPTIONS_BEFORE = {"ttt_pre_conv": False, "ttt_conv_kernel": 4, "ttt_qk_norm": "none", "ttt_conv_size": 0,
                   "ttt_use_rope": True, "ttt_eta_schedule": "mean", "ttt_centre": False}
_OPTION_FIELDS = set(_OPTIONS_BEFORE)


@dataclasses.dataclass
class LlamaTTTConfig:
    """The TTT fields of a Llama / LLaMA-Omni config (saved in config.json under these names).

    Args:
        use_ttt: install TTT layers when the model is constructed.
        ttt_layers: decoder layer indices; None means the top quarter (24-31 for Llama-3.1-8B's 32 layers).
        ttt_layer_type: "linear" (TTT-Linear) or "mlp" (TTT-MLP).
        ttt_mode: "replace" (TTT instead of attention) or "gated_residual" (attention + tanh-gated TTT).
        ttt_mini_batch_size: inner-loop mini-batch; also the period of the TTT layers' RoPE positions.
        ttt_base_lr: scale of the learnable inner learning rate.
        ttt_num_heads: TTT heads; None means the model's `num_attention_heads`. Default 1 (the recall preset).
        ttt_use_gate: the TTT layer's own output gate `gelu(g_proj(x))` (not the residual gate).
        ttt_share_qk: q and k from one projection through two causal convs (default: on, the recall preset).
        ttt_rope_theta: RoPE base of the TTT layers (positions restart every mini-batch).
        ttt_pre_conv, ttt_conv_kernel, ttt_qk_norm, ttt_conv_size, ttt_use_rope, ttt_eta_schedule, ttt_centre: the
            TTT layer's input options, `TTTConfig`'s fields of the same names without `ttt_` (docs/ttt.md,
            "Options"). The defaults (with `ttt_share_qk` and one head) are the recall preset, `TTTConfig.recall`:
            `ttt_qk_norm="l2"`, `ttt_use_rope=False`, `ttt_eta_schedule="sum"`, `ttt_centre=True`, the block
            ablation's winner (docs/eval.md). ttt-lm-pytorch's layer: `ttt_share_qk=False`, `ttt_qk_norm="none"`,
            `ttt_use_rope=True`, `ttt_eta_schedule="mean"`, `ttt_centre=False`, `ttt_num_heads=None`.
        ttt_gate_init: initial `ttt_gate` (gated_residual); tanh(0.1) ~ 0.1 keeps the model near the pretrained one.
        ttt_initializer_range: std of the TTT projections at init; None means the model's `initializer_range`.
        ttt_check_finite: the TTT layers raise on NaN/inf input (one device sync per layer and call).
    """

    use_ttt: bool = False
    ttt_layers: list[int] | None = None
    ttt_layer_type: str = "linear"
    ttt_mode: str = "replace"
    ttt_mini_batch_size: int = 64
    ttt_base_lr: float = 1.0
    ttt_num_heads: int | None = 1
    ttt_use_gate: bool = False
    ttt_share_qk: bool = True
    ttt_rope_theta: float = 10000.0
    ttt_pre_conv: bool = False
    ttt_conv_kernel: int = 4
    ttt_qk_norm: str = "l2"
    ttt_conv_size: int = 0
    ttt_use_rope: bool = False
    ttt_eta_schedule: str = "sum"
    ttt_centre: bool = True
    ttt_gate_init: float = 0.1
    ttt_initializer_range: float | None = None
    ttt_check_finite: bool = True

    def __post_init__(self) -> None:
        if self.ttt_mode not in MODES:
            raise ValueError(f"config.ttt_mode must be one of {MODES}, got {self.ttt_mode!r}")
        if not isinstance(self.use_ttt, bool):
            raise ValueError(f"config.use_ttt must be a bool, got {self.use_ttt!r}")
        if isinstance(self.ttt_gate_init, bool) or not isinstance(self.ttt_gate_init, (int, float)) \
                or not math.isfinite(self.ttt_gate_init):
            raise ValueError(f"config.ttt_gate_init must be a finite number, got {self.ttt_gate_init!r}")
        if self.ttt_layers is not None:
            if not isinstance(self.ttt_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.ttt_layers
            ):
                raise ValueError(f"config.ttt_layers must be a list of ints or None, got {self.ttt_layers!r}")
            self.ttt_layers = list(self.ttt_layers)
        heads = self.ttt_num_heads
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"config.ttt_num_heads must be >= 1 or None (the model's head count), got {heads!r}")
        try:  # the layer's own fields, checked now with stand-in dimensions (the model's come at build time)
            self.ttt_config(hidden_size=64 * (heads or 1), num_heads=heads or 1, initializer_range=0.02)
        except ValueError as e:  # TTTConfig.<field> is config.ttt_<field> here
            raise ValueError(re.sub(r"TTTConfig\.(?:ttt_)?(\w+)", r"config.ttt_\1", str(e))) from e

    @classmethod
    def from_config(cls, config: Any) -> LlamaTTTConfig:
        """Read `use_ttt` and the `ttt_*` attributes of a transformers config; an unknown `ttt_*` attribute (a typo)
        is an error. A config saved before the layer options existed (it lists every field of that time and none of
        the options) keeps its meaning: ttt-lm-pytorch's layer options, not the recall preset's defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in vars(config) if k.startswith("ttt_") and k not in names)
        if unknown:
            raise ValueError(f"unknown TTT config keys {unknown}; known: {sorted(names)}")
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        if _SAVED_BEFORE_OPTIONS <= values.keys() and not _OPTION_FIELDS & values.keys():
            values.update(_OPTIONS_BEFORE)
        return cls(**values)

    def write_to(self, config: Any) -> None:
        """Set every field on `config`, so config.json records the resolved values."""
        for f in dataclasses.fields(self):
            setattr(config, f.name, getattr(self, f.name))

    def layer_indices(self, num_layers: int) -> list[int]:
        layers = list(range(num_layers - max(1, num_layers // 4), num_layers)) if self.ttt_layers is None \
            else list(self.ttt_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers) or not layers:
            raise ValueError(f"config.ttt_layers must be distinct indices in [0, {num_layers}), got {layers}")
        return sorted(layers)

    def ttt_config(self, hidden_size: int, num_heads: int, initializer_range: float) -> TTTConfig:
        return TTTConfig(
            hidden_size=hidden_size,
            num_heads=num_heads if self.ttt_num_heads is None else self.ttt_num_heads,
            layer_type=self.ttt_layer_type,
            mini_batch_size=self.ttt_mini_batch_size,
            ttt_base_lr=float(self.ttt_base_lr),
            rope_theta=float(self.ttt_rope_theta),
            use_gate=self.ttt_use_gate,
            share_qk=self.ttt_share_qk,
            pre_conv=self.ttt_pre_conv,
            conv_kernel=self.ttt_conv_kernel,
            qk_norm=self.ttt_qk_norm,
            conv_size=self.ttt_conv_size,
            use_rope=self.ttt_use_rope,
            eta_schedule=self.ttt_eta_schedule,
            centre=self.ttt_centre,
            initializer_range=float(
                initializer_range if self.ttt_initializer_range is None else self.ttt_initializer_range
            ),
            check_finite=self.ttt_check_finite,
        )


class LlamaTTTModelConfig(LlamaConfig):
    """The transformers config of `LlamaTTTForCausalLM`: `LlamaConfig` plus the `use_ttt` / `ttt_*` fields of
    `LlamaTTTConfig`, under its own `model_type` "llama-ttt". Importing `ttt_speech.integrations.llama_omni`
    registers it with `AutoConfig` (and the model with `AutoModelForCausalLM`), so a folder saved by
    `save_pretrained` comes back with its TTT layers and weights through Auto; a folder saved as `model_type`
    "llama" comes back through Auto as a plain `LlamaForCausalLM`, without them.

    The TTT fields are checked on construction (an unknown `ttt_*` key, e.g. a typo in config.json, is an error
    naming it); fields not given are left unset, so that `LlamaTTTConfig.from_config` still recognises a config
    saved before the layer options existed. `apply_ttt` writes the resolved values back.
    """

    model_type = "llama-ttt"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        cfg = LlamaTTTConfig.from_config(self)
        if cfg.use_ttt:
            cfg.layer_indices(self.num_hidden_layers)
            cfg.ttt_config(self.hidden_size, self.num_attention_heads, self.initializer_range)

    @classmethod
    def from_llama_config(cls, config: LlamaConfig) -> LlamaTTTModelConfig:
        """`config` itself if it is one, else a new `LlamaTTTModelConfig` with the same values (the attention
        implementation transformers picked included)."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"a TTT Llama needs a LlamaConfig, got {type(config).__name__}")
        values = config.to_dict()
        for key in ("model_type", "transformers_version"):
            values.pop(key, None)
        new = cls(**values)
        for private in ("_attn_implementation_internal", "_commit_hash"):
            if private in vars(config):
                setattr(new, private, getattr(config, private))
        return new
