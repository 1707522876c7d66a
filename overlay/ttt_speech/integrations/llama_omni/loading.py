"""Loading and saving TTT weights with their keys checked by name: `LlamaTTTForCausalLM`, `from_pretrained_ttt`,
`load_ttt_state_dict` (LLaMA-Omni's partial `non_lora_trainables.bin`), and what a load did (`TTTLoadReport`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from ttt_speech.integrations.llama_omni.config import LlamaTTTModelConfig
from ttt_speech.integrations.llama_omni.layers import (
    LlamaTTTSelfAttention,
    _is_ttt_key,
    apply_ttt,
    ttt_modules,
    ttt_parameter_names,
)

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.bin"


class LlamaTTTForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` that installs TTT when `config.use_ttt` is set, as the patched LLaMA-Omni class does, so
    `from_pretrained` / `save_pretrained` carry the TTT fields and weights for a plain Llama checkpoint.

    Its config is a `LlamaTTTModelConfig` (`model_type` "llama-ttt"; a plain `LlamaConfig` given to the constructor
    is copied into one, so `model.config` is not the object passed), registered with `AutoModelForCausalLM`:
    `AutoModelForCausalLM.from_pretrained` on a folder it saved returns a `LlamaTTTForCausalLM` with its TTT
    weights, once `ttt_speech.integrations.llama_omni` is imported (no `trust_remote_code`).
    """

    config_class = LlamaTTTModelConfig

    def __init__(self, config: Any):
        config = LlamaTTTModelConfig.from_llama_config(config)
        super().__init__(config)
        if getattr(config, "use_ttt", False):
            apply_ttt(self, config)
            self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        _warn_if_saved_as_llama(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _warn_if_saved_as_llama(path: Any) -> None:
    """A local folder whose config.json says `model_type` "llama" and `use_ttt` loads here with its TTT weights, but
    not through Auto: say so, and how to fix the folder."""
    config_file = Path(str(path)) / "config.json"
    if not config_file.is_file():
        return
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") == "llama" and raw.get("use_ttt"):
        logger.warning(
            "%s: config.json has model_type 'llama' with use_ttt (saved by apply_ttt on a LlamaForCausalLM, or before "
            "model_type 'llama-ttt' existed): loaded here with its TTT weights, but AutoModelForCausalLM would build a "
            "plain LlamaForCausalLM and drop them. save_pretrained this model (or set \"model_type\": \"llama-ttt\" in "
            "config.json) to make the folder load through Auto", path)


AutoConfig.register(LlamaTTTModelConfig.model_type, LlamaTTTModelConfig)
AutoModelForCausalLM.register(LlamaTTTModelConfig, LlamaTTTForCausalLM)


@dataclasses.dataclass
class TTTLoadReport:
    """What a load did with the TTT keys.

    Args:
        loaded: TTT keys taken from the checkpoint.
        initialised: TTT keys the checkpoint lacked, left at their init (W0 of TTT-Linear/MLP, `ttt_gate_init`).
        dropped: checkpoint keys the model has no place for: the attention weights of layers that `replace` mode
            turned into TTT.
    """

    loaded: list[str]
    initialised: list[str]
    dropped: list[str]


def _replaced_attention_key(key: str, model: nn.Module) -> bool:
    m = re.search(r"(^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|rotary_emb)\.", key)
    return bool(m) and isinstance(model.model.layers[int(m.group(2))].self_attn, LlamaTTTSelfAttention)


def _report(model: nn.Module, missing: list[str], unexpected: list[str], require_ttt: bool,
            where: str) -> TTTLoadReport:
    ttt_keys = ttt_parameter_names(model)
    initialised = sorted(k for k in ttt_keys if k in set(missing))
    wrong = sorted(k for k in unexpected if not _replaced_attention_key(k, model))
    other_missing = sorted(set(missing) - set(ttt_keys))
    problems = []
    if wrong:
        problems.append(f"unexpected keys {wrong}")
    if other_missing:
        problems.append(f"missing non-TTT keys {other_missing}")
    if initialised and (require_ttt or len(initialised) < len(ttt_keys)):
        problems.append(f"missing TTT keys {initialised}" + ("" if require_ttt else " (some TTT keys are present)"))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    report = TTTLoadReport(loaded=sorted(set(ttt_keys) - set(initialised)), initialised=initialised,
                           dropped=sorted(unexpected))
    if initialised:
        logger.warning("%s: %d TTT parameters are not in the checkpoint and keep their init: %s", where,
                       len(initialised), initialised)
    if report.dropped:
        logger.info("%s: attention weights of replaced layers not used: %s", where, report.dropped)
    return report


def _checkpoint_keys(path: str | Path) -> set[str] | None:
    """The tensor names of a local transformers checkpoint (sharded or not), without loading tensors; None when
    `path` is not a local directory holding one."""
    path = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return set(json.loads((path / index).read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
    return None


def _materialise_meta_ttt(model: nn.Module) -> list[str]:
    """Allocate and initialise TTT parameters left on the meta device; returns their keys.

    transformers 4.43 with `low_cpu_mem_usage` (or a `device_map`) counts meta tensors of equal size as tied, drops
    such new parameters from its missing keys and never allocates them."""
    left = []
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        names = [f"model.layers.{idx}.self_attn.{n}" for n, p in attn.named_parameters() if p.is_meta]
        names = [n for n in names if _is_ttt_key(n)]
        if not names:
            continue
        left += names
        ref = next(p for p in layer.parameters() if not p.is_meta)
        attn.ttt.to_empty(device=ref.device)
        attn.ttt.reset_parameters()
        if "ttt_gate" in attn._parameters and attn.ttt_gate.is_meta:
            attn.ttt_gate = nn.Parameter(torch.full(attn.ttt_gate.shape, attn.ttt_gate_init, device=ref.device,
                                                    dtype=attn.ttt_gate.dtype))
    return left


def from_pretrained_ttt(cls: type, path: str | Path, *, require_ttt: bool = True,
                        **kwargs: Any) -> tuple[nn.Module, TTTLoadReport]:
    """`cls.from_pretrained(path, **kwargs)` with the TTT keys checked by name.

    `cls` is `LlamaTTTForCausalLM` or a patched LLaMA-Omni class; the config (from `path` or `config=`) must set
    `use_ttt`. With `require_ttt=False` a base checkpoint without TTT keys is accepted (they keep their init and are
    listed in the report); a partial set of TTT keys, TTT keys for other layers, or any other unexpected or missing
    key is an error naming them. In `replace` mode the base attention weights of the TTT layers are `dropped`.
    For a local directory the keys are read from the checkpoint itself.
    """
    model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    if not ttt_modules(model):
        raise ValueError(f"{path}: the model has no TTT layers; set use_ttt in its config (or pass config=)")
    if info.get("mismatched_keys"):
        raise ValueError(f"{path}: keys with mismatched shapes {info['mismatched_keys']}")
    left_on_meta = _materialise_meta_ttt(model)
    ckpt = _checkpoint_keys(path)
    expected = set(model.state_dict())
    if ckpt is None:
        missing, unexpected = set(info["missing_keys"]) | set(left_on_meta), set(info["unexpected_keys"])
    else:
        if not ckpt & expected and {f"model.{k}" for k in ckpt} & expected:  # saved from the bare LlamaModel
            ckpt = {f"model.{k}" for k in ckpt}
        buffers = {n for n, _ in model.named_buffers()}
        missing, unexpected = expected - ckpt, ckpt - expected - buffers
        if model.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
    report = _report(model, sorted(missing), sorted(unexpected), require_ttt, str(path))
    return model, report


def _normalise_key(key: str) -> str:
    # PEFT's names (`base_model.model.` + the causal LM's) and LLaMA-Omni's builder's `model.model.` variant
    key = key.removeprefix("base_model.model.")
    return key[len("model."):] if key.startswith("model.model.") else key


def load_ttt_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, require_ttt: bool = True,
                        where: str = "state_dict") -> TTTLoadReport:
    """Load a partial state dict (TTT weights and other non-LoRA trainables) into `model`, keys checked by name.

    Keys may carry PEFT's `base_model.model.` prefix. Every key must exist in the model; with `require_ttt` every
    TTT key of the model must be present. Values are cast to the parameters' dtype.
    """
    state = {_normalise_key(k): v for k, v in state_dict.items()}
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    ttt_keys = ttt_parameter_names(model)
    missing_ttt = [k for k in ttt_keys if k not in state]
    report = _report(model, missing_ttt, unexpected, require_ttt, where)
    result = model.load_state_dict(state, strict=False)  # partial by design: keys were checked by name above
    if result.unexpected_keys:
        raise ValueError(f"{where}: unexpected keys {sorted(result.unexpected_keys)}")
    return report


def load_non_lora_trainables(model: nn.Module, path: str | Path, *, require_ttt: bool = True) -> TTTLoadReport:
    """LLaMA-Omni's LoRA path: load `non_lora_trainables.bin` (a file, or a directory holding it) into `model`
    (built from the base model with the TTT config), with TTT keys checked by name; then apply the LoRA adapter."""
    path = Path(path)
    if path.is_dir():
        path = path / NON_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {NON_LORA_FILE} at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return load_ttt_state_dict(model, state, require_ttt=require_ttt, where=str(path))

