"""The model to fine-tune: base checkpoint -> TTT init -> (LoRA) -> parameter groups."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ttt_speech.config import ConfigError
from ttt_speech.constants import DTYPES
from ttt_speech.integrations import moshi as moshi_int
from ttt_speech.integrations.moshi_lm import load_moshi_lm, moshi_7b_lm_kwargs
from ttt_speech.train.config import LoraConfig, TrainConfig, read_lm_kwargs_file


def resolve_lm_kwargs(spec: Any) -> dict[str, Any]:
    """`"tiny"`, `"moshi-7b"`, a JSON path, or a mapping -> LMModel keyword arguments."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec == "tiny":
        return moshi_int.tiny_lm_kwargs()
    if spec == "moshi-7b":
        return moshi_7b_lm_kwargs()
    return read_lm_kwargs_file(spec)  # the same check as `--check`'s


def resolve_ttt_config(cfg: TrainConfig) -> moshi_int.MoshiTTTConfig | None:
    """The run's TTT config: `ttt:` itself, or with `ttt: from_checkpoint` the `ttt_config.json` beside
    `model.checkpoint` (the stage hand-off). A config that restates `ttt:` is checked against that file when the
    model is loaded (`load_ttt_lm`)."""
    if cfg.ttt is None:
        return None
    if cfg.ttt == moshi_int.FROM_CHECKPOINT:
        if not cfg.model.checkpoint:
            raise ConfigError("ttt: from_checkpoint needs model.checkpoint (a checkpoint with ttt_config.json)")
        return moshi_int.checkpoint_ttt_config(cfg.model.checkpoint, required=True)
    return cfg.ttt  # a MoshiTTTConfig (config.from_dict typed it)


def check_precision(cfg: TrainConfig) -> torch.dtype:
    """The parameter dtype: float32 master weights (compute in bf16 runs through autocast). bf16 parameters only
    with `optim.bf16_params: true`, and with a warning: AdamW's small updates round away in bf16."""
    dtype = DTYPES[cfg.model.dtype]
    if dtype != torch.float32:
        if not cfg.optim.bf16_params:
            raise ConfigError(f"model.dtype: {cfg.model.dtype} trains bf16 parameters without an fp32 master copy, "
                              "where most AdamW updates at lr ~1e-5 round away; use model.dtype: float32 (compute "
                              "runs in bf16 under autocast on GPU), or set optim.bf16_params: true to accept it")
        warnings.warn(f"model.dtype: {cfg.model.dtype} with optim.bf16_params: parameters and optimizer state are "
                      "bf16; updates smaller than 1/256 of a weight are lost", stacklevel=2)
    return dtype


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Base model (from `model.checkpoint`, or random from `seed`), then TTT (`cfg.ttt`). Returns (model, lm_kwargs).

    Parameters are float32 unless `optim.bf16_params` (see `check_precision`). `model.context` replaces the
    main transformer's attention context; it is part of the returned lm_kwargs, so the export's `lm_config.json`
    carries it to inference."""
    lm_kwargs = resolve_lm_kwargs(cfg.model.lm_kwargs)
    if cfg.model.context is not None:
        lm_kwargs["context"] = cfg.model.context
    dtype = check_precision(cfg)
    ttt_cfg = resolve_ttt_config(cfg)
    if cfg.model.checkpoint:
        if ttt_cfg is not None:
            model = moshi_int.load_ttt_lm(cfg.model.checkpoint, ttt_cfg, lm_kwargs, device=device, dtype=dtype)
        else:
            model = load_moshi_lm(cfg.model.checkpoint, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    else:
        model = moshi_int.build_lm(lm_kwargs, seed=cfg.seed, device=device, dtype=dtype)
        if ttt_cfg is not None:
            moshi_int.apply_ttt(model, ttt_cfg)
    return model.train(), lm_kwargs


def w_down_names(model: nn.Module) -> set[str]:
    """W_down (`linear_out.weight`, = W0) of the In-Place layers."""
    return {f"transformer.layers.{idx}.gating.linear_out.weight" for idx, module in moshi_int.ttt_modules(model).items()
            if hasattr(module, "linear_out") and hasattr(module, "ttt_conv")}


def ttt_trainable_names(model: nn.Module) -> set[str]:
    """TTT parameters: what TTT added, plus W_down (= W0) of In-Place layers, which In-Place trains as the fast
    weight's initial state (fully, also under LoRA). Its lr group is `optim.w_down_lr`."""
    return set(moshi_int.ttt_parameter_names(model)) | w_down_names(model)


def apply_lora(model: nn.Module, cfg: LoraConfig, keep_full: set[str]) -> list[str]:
    """peft LoRA on the base linears (attention projections and FFN gatings of transformer and depformer), except
    the modules holding TTT parameters; base weights are frozen, TTT parameters stay trainable. Returns the LoRA
    targets."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    pattern = re.compile(r"(transformer|depformer)\.layers\.\d+\.(self_attn\.(in_projs|out_projs)\.\d+|"
                         r"gating\.(\d+\.)?linear_(in|out))$")
    full_modules = {n.rsplit(".", 1)[0] for n in keep_full}
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and pattern.search(n) and n not in full_modules
               and not any(n.startswith(f + ".") or n == f for f in full_modules)]
    if not targets:
        raise ValueError("lora.enable: no base linear matched; is this a moshi LMModel?")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.scaling * cfg.rank, target_modules=targets,
                              lora_dropout=0.0, bias="none")
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name in keep_full
    return targets


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold `x.lora_A.default.weight` / `x.lora_B.default.weight` into `x.weight` (keys back to moshi's names)."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        base = key.replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[base] = value
    return out


def parameter_groups(model: nn.Module, cfg: TrainConfig, ttt_names: set[str]) -> list[dict[str, Any]]:
    """Two groups, TTT and base, each with its own peak lr; no weight decay on 1-D parameters (norms, gates).
    In-Place W_down goes with the base (`optim.w_down_lr: base`, a pretrained weight) or with TTT (`ttt`)."""
    if cfg.optim.w_down_lr == "base":
        ttt_names = ttt_names - w_down_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("ttt" if name in ttt_names else "base", p.dim() > 1)
        groups.setdefault(key, []).append(p)
    lrs = {"ttt": cfg.optim.ttt_lr if cfg.optim.ttt_lr is not None else cfg.optim.lr, "base": cfg.optim.lr}
    return [{"params": ps, "name": f"{kind}{'' if decay else '_no_decay'}", "peak_lr": lrs[kind], "lr": lrs[kind],
             "weight_decay": cfg.optim.weight_decay if decay else 0.0}
            for (kind, decay), ps in sorted(groups.items())]
