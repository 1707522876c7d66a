"""moshi-finetune's config keys (kyutai-labs/moshi-finetune, `finetune/args.py`) on `TrainConfig`.

Every key of moshi-finetune's `TrainArgs` is accepted. Most mean the same here and are plain fields of
`TrainConfig` (`run_dir`, `data.*`, `optim.{lr, weight_decay, pct_start}`, `lora.*`, `duration_sec`, ...). Three
live under another name here and are moved there with a one-line note (`ALIASES`); `moshi_paths` is resolved
through moshi's own `CheckpointInfo` when the run starts (`resolve_moshi_paths`); the rest is checked for
consistency (`full_finetuning` against `lora.enable`) or refused with the reason (`overwrite_run_dir: true`).
docs/finetune.md lists the defaults that differ and why.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttt_speech.errors import ConfigError

# moshi-finetune's name -> ours (dotted)
ALIASES = {"max_norm": "optim.max_norm", "num_ckpt_keep": "keep_checkpoints", "param_dtype": "model.dtype"}


@dataclass
class MoshiPathsConfig:
    """moshi-finetune's `moshi_paths`: where the model comes from, resolved by moshi's
    `CheckpointInfo.from_hf_repo` when the run starts (`--check` touches no network).

    Args:
        hf_repo_id: a Hugging Face repository (e.g. "kyutai/moshiko-pytorch-bf16"): its `config.json`, Moshi and
            Mimi weights and tokenizer, each unless given below. None (our default; moshi-finetune's is
            "kyutai/moshiko-pytorch-bf16"): nothing is downloaded, the paths below must then name the files.
        moshi_path, mimi_path, tokenizer_path, config_path: local files or `hf://repo/file`, as moshi's `hf_get`
            reads them. They become `model.checkpoint`, `data.mimi`, `data.tokenizer` and `model.lm_kwargs`
            (moshi's `config.json`, its non-LM keys dropped as `CheckpointInfo` does). `mimi_path` may also be
            "tiny-random" (tests).
    """

    hf_repo_id: str | None = None
    mimi_path: str | None = None
    moshi_path: str | None = None
    tokenizer_path: str | None = None
    config_path: str | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in dataclasses.asdict(self).values())


@dataclass
class WandbConfig:
    """moshi-finetune's `wandb`: metrics also go to Weights & Biases when `project` is set (wandb must be
    installed; it is not in requirements.txt). `offline`: WANDB_MODE=offline; `key`: `wandb.login(key=...)`;
    `run_name`: None names the run after `run_dir`."""

    project: str | None = None
    offline: bool = False
    key: str | None = None
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.project is None:
            return
        if not self.project:
            raise ConfigError("wandb.project is empty; name the project, or drop it (null) to log without wandb")
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"wandb.project={self.project!r} but wandb is not installed; `pip install wandb` in "
                              ".venv, or set wandb.project: null (TensorBoard, jsonl and CSV are always "
                              "written)") from e


def note(message: str) -> None:
    """One line on stderr, from the first process only (every torchrun / SLURM task loads the config)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr, flush=True)


def _default(cfg: Any, dotted: str) -> Any:
    """The default of the field at `dotted` in `cfg`'s schema."""
    *parents, name = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    field = next(f for f in dataclasses.fields(node) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, value)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def fold_moshi_finetune(cfg: Any) -> None:
    """Move moshi-finetune's names into ours (a note each), and check moshi-finetune's keys that have no twin
    here. Called first in `TrainConfig.__post_init__`; raises `ConfigError` naming the key."""
    for theirs, ours in ALIASES.items():
        value = getattr(cfg, theirs)
        if value is None:
            continue
        setattr(cfg, theirs, None)
        if theirs == "param_dtype":
            _fold_param_dtype(cfg, value)
            continue
        if theirs == "max_norm" and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"max_norm must be a finite number > 0, got {value}")
        if theirs == "num_ckpt_keep" and value < 1:
            raise ConfigError(f"num_ckpt_keep must be >= 1, got {value}")
        current = _get(cfg, ours)
        if current != _default(cfg, ours) and current != value:
            raise ConfigError(f"{theirs}: {value!r} (moshi-finetune's name for {ours}) and {ours}: {current!r} "
                              "differ; keep one")
        _set(cfg, ours, value)
        note(f"{theirs}: {value!r} is {ours} here")
    if cfg.full_finetuning is not None and cfg.full_finetuning == cfg.lora.enable:
        raise ConfigError(f"full_finetuning: {str(cfg.full_finetuning).lower()} with lora.enable: "
                          f"{str(cfg.lora.enable).lower()}: a run trains either every weight (full_finetuning: true, "
                          "lora.enable: false) or LoRA adapters (full_finetuning: false, lora.enable: true)")
    if cfg.overwrite_run_dir:
        raise ConfigError("overwrite_run_dir: true is refused: an existing run_dir is resumed from its checkpoints "
                          "here (a requeued SLURM job finds them), so deleting it at start would lose them; remove "
                          "the folder yourself or choose a new run_dir")
    if cfg.overwrite_run_dir is False:
        cfg.overwrite_run_dir = None
        note("overwrite_run_dir: false: an existing run_dir is resumed here (moshi-finetune refuses it)")
    paths = cfg.moshi_paths
    if paths.active:
        for theirs, ours, default in (("moshi_path", "model.checkpoint", None),
                                      ("mimi_path", "data.mimi", "tiny-random"),
                                      ("tokenizer_path", "data.tokenizer", None),
                                      ("config_path", "model.lm_kwargs", "tiny")):
            current = _get(cfg, ours)
            if current != default:
                source = f"moshi_paths.{theirs}" if getattr(paths, theirs) is not None else "moshi_paths.hf_repo_id"
                raise ConfigError(f"{ours}: {current!r} with moshi_paths set: {source} supplies it; give it in one "
                                  "place (moshi_paths, or model/data without moshi_paths)")
        for key in ("moshi_path", "mimi_path", "tokenizer_path", "config_path"):  # local files: checked now
            value = getattr(paths, key)
            if value is not None and not value.startswith("hf://") and value != "tiny-random" \
                    and not Path(value).is_file():
                raise ConfigError(f"moshi_paths.{key}: no file at {value} (a local file, or hf://repo/file)")
        if paths.hf_repo_id is None and None in (paths.moshi_path, paths.mimi_path, paths.tokenizer_path):
            missing = [k for k in ("moshi_path", "mimi_path", "tokenizer_path") if getattr(paths, k) is None]
            raise ConfigError(f"moshi_paths: without hf_repo_id, {', '.join('moshi_paths.' + k for k in missing)} "
                              "must name the files (nothing is downloaded)")


def _fold_param_dtype(cfg: Any, value: str) -> None:
    if value == "bfloat16":
        note("param_dtype: bfloat16 is model.dtype: float32 here, with the compute in bf16 under autocast on GPU "
             "(moshi-finetune keeps bf16 parameters with fp32 copies for the optimizer; here the fp32 copy is the "
             "parameter)")
    elif value == "float32":
        if cfg.autocast == "auto":
            cfg.autocast = "none"
        note("param_dtype: float32 is model.dtype: float32 with autocast: none here")
    else:
        raise ConfigError(f"param_dtype must be bfloat16 or float32 (moshi-finetune's values), got {value!r}")
    if cfg.model.dtype != "float32" and not cfg.optim.bf16_params:
        raise ConfigError(f"param_dtype: {value} with model.dtype: {cfg.model.dtype}; keep one")


def resolve_moshi_paths(cfg: Any) -> Any:
    """`cfg` with `moshi_paths` turned into `model.checkpoint`, `model.lm_kwargs`, `data.mimi` and
    `data.tokenizer` by moshi's `CheckpointInfo` (downloads with `hf_repo_id`), and `moshi_paths` emptied; `cfg`
    itself when it has none. The result is what the run saves and a resume compares."""
    if not cfg.moshi_paths.active:
        return cfg
    from ttt_speech.integrations.moshi_paths import checkpoint_info

    paths = cfg.moshi_paths
    info = checkpoint_info(paths.hf_repo_id, moshi_path=paths.moshi_path, mimi_path=paths.mimi_path,
                           tokenizer_path=paths.tokenizer_path, config_path=paths.config_path)
    out = copy.deepcopy(cfg)
    out.moshi_paths = MoshiPathsConfig()
    out.model.checkpoint = str(info["moshi_weights"])
    out.model.lm_kwargs = info["lm_config"] if info["lm_config"] is not None else "moshi-7b"
    out.data.mimi = str(info["mimi_weights"])
    out.data.tokenizer = str(info["tokenizer"])
    return out
