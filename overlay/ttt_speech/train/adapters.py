"""Adapter-only export (`save_adapters` with `lora.enable`), in moshi's own LoRA format.

`lora.safetensors` holds, under moshi's names (`moshi.modules.lora.LoRALinear`):
- `<linear>.lora_A.weight` [r, in] and `<linear>.lora_B.weight` [out, r] for EVERY `nn.Linear` of the moshi model
  (zeros where our LoRA put no adapter: moshi's loader wraps every linear and builds the adapters on the meta
  device, so each must be in the file);
- by their plain names, the parameters that train fully under LoRA: the TTT parameters, In-Place W_down, and the
  embeddings with `lora.ft_embed`.

`lora_config.json` is the run's `lm_kwargs` plus `lora`, `lora_rank`, `lora_scaling`: with a base checkpoint and no
TTT, `moshi.models.loaders.get_moshi_lm(base, lm_kwargs=<lora_config.json>, lora_weights=<lora.safetensors>)` loads
it. With TTT (moshi's loader knows no TTT layer), `load_adapters(load_ttt_lm(base, ...), export_dir)` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttt_speech.errors import CheckpointMismatch

ADAPTERS_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
_PEFT = ".lora_{}.default.weight"


def embedding_names(model: nn.Module) -> set[str]:
    """The embedding tables (text and audio, main and depformer): what `lora.ft_embed` trains fully."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def linear_names(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear of the moshi model as moshi names it (a peft-wrapped one by its wrapper's name), with its
    (out_features, in_features)."""
    out = {}
    for name, m in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or "lora_" in name.rsplit(".", 1)[-1]:
            continue
        base = getattr(m, "base_layer", None)
        if isinstance(base, nn.Linear):
            out[name] = (base.out_features, base.in_features)
        elif isinstance(m, nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def adapter_state(state: dict[str, torch.Tensor], linears: dict[str, tuple[int, int]], full: set[str],
                  rank: int) -> dict[str, torch.Tensor]:
    """The adapter file's tensors from a full (unmerged, peft-named) state dict; see the module docstring."""
    out: dict[str, torch.Tensor] = {}
    for name, (n_out, n_in) in sorted(linears.items()):
        a, b = state.get(name + _PEFT.format("A")), state.get(name + _PEFT.format("B"))
        out[f"{name}.lora_A.weight"] = a if a is not None else torch.zeros(rank, n_in)
        out[f"{name}.lora_B.weight"] = b if b is not None else torch.zeros(n_out, rank)
    for name in sorted(full):
        out[name] = state[name]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def write_adapters(state: dict[str, torch.Tensor], model: nn.Module, lora_cfg: Any, lm_kwargs: dict[str, Any],
                   out_dir: Path) -> Path:
    """`lora.safetensors` and `lora_config.json` in `out_dir` (rank 0, with the gathered full state)."""
    from safetensors.torch import save_file

    full = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    tensors = adapter_state(state, linear_names(model), full, lora_cfg.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTERS_FILE))
    config = {**lm_kwargs, "lora": True, "lora_rank": lora_cfg.rank, "lora_scaling": lora_cfg.scaling}
    (out_dir / LORA_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / ADAPTERS_FILE


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Fold an adapter export into `model` (built from the base weights, TTT installed): W += scaling * B @ A for
    each linear, the fully trained tensors copied. `path`: the export folder or its `lora.safetensors` (with
    `lora_config.json` beside it). Any key the model lacks, or a shape that differs, is a `CheckpointMismatch`."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / ADAPTERS_FILE if path.is_dir() else path
    scaling = float(json.loads((file.parent / LORA_CONFIG_FILE).read_text())["lora_scaling"])
    tensors = load_file(str(file))
    params = dict(model.named_parameters())
    unknown = []
    for key, value in tensors.items():
        if key.endswith(".lora_B.weight"):
            continue
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            target = params.get(prefix + ".weight")
            b = tensors[prefix + ".lora_B.weight"]
            if target is None or target.shape != (b.shape[0], value.shape[1]):
                unknown.append(f"{key} {tuple(value.shape)}")
                continue
            target.copy_((target.float() + scaling * (b.float() @ value.float())).to(target.dtype))
        elif key in params and params[key].shape == value.shape:
            params[key].copy_(value.to(params[key].dtype))
        else:
            unknown.append(f"{key} {tuple(value.shape)}")
    if unknown:
        raise CheckpointMismatch(f"{file}: {len(unknown)} tensors do not fit the model: {', '.join(unknown[:5])}"
                                 f"{' ...' if len(unknown) > 5 else ''}; was it exported from a run on this base "
                                 "model and TTT config?")
    return model
