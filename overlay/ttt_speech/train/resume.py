"""What a resume may change, and the logs it continues.

A resume continues the run a checkpoint was made by, so its config must be that run's. Keys fall in three sets:

- free: they only say how this invocation logs, evaluates, saves and stops (`stop_after`, `log_freq`, `ckpt_freq`,
  `do_eval`, `eval_freq`, `data.eval_data`, `wandb`, ...);
- allowed on request: they change the optimisation, not what the checkpoint holds or which data comes next
  (`max_steps`, a stage's `steps` or `lr`, `optim.*`, the loss weights, `gradient_checkpointing`, `autocast`,
  `data.codes_dir`); `--allow-config-change KEY ...` names them;
- fixed: everything else (model, TTT, LoRA, batch, crops, data, seed, parallelism). A run with other values is
  another run: start it in another `run_dir`.
"""

from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import Any

from ttt_speech.config import to_dict
from ttt_speech.errors import ConfigError

FREE = ("run_dir", "stop_after", "log_freq", "monitor_freq", "ckpt_freq", "keep_checkpoints", "export_safetensors",
        "max_nonfinite_steps", "allow_config_change", "do_eval", "eval_freq", "eval_batches", "data.eval_data",
        "do_ckpt", "save_adapters", "wandb", "overwrite_run_dir", "llama.val_batches",
        "llama.export_stages")
ALLOWABLE = ("max_steps", "optim", "first_codebook_weight_multiplier", "text_padding_weight",
             "gradient_checkpointing", "autocast", "data.codes_dir", "llama.temperature", "llama.hidden_mse_weight",
             "llama.loss_chunk", "llama.val_data", "num_microbatches")
ALLOWABLE_STAGE_KEYS = ("steps", "lr")


def _matches(key: str, name: str) -> bool:
    return key == name or key.startswith((name + ".", name + "["))


def _diff(old: Any, new: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in new:
            if k in old:  # a key the saved config lacks was added to the schema since: not compared
                _diff(old[k], new[k], f"{key}.{k}" if key else str(k), out)
    elif (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
          and all(isinstance(v, dict) for v in old + new)):
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            _diff(o, n, f"{key}[{i}]", out)
    elif old != new:
        out.append((key, old, new))


def _normalise(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """A saved config with today's defaults filled in (and `ttt:` with MoshiTTTConfig's), so that spelling out a
    default, or a field added since, is no change; as saved when it no longer loads."""
    from ttt_speech.config import from_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data = to_dict(from_dict(cls, data, where=""))
        except ConfigError:
            data = dict(data)
    data["ttt"] = _normalise_ttt(data.get("ttt"))
    return data


def _normalise_ttt(ttt: Any) -> Any:
    if not isinstance(ttt, dict):
        return ttt
    from ttt_speech.config import from_dict
    from ttt_speech.integrations.moshi import MoshiTTTConfig

    try:
        return dataclasses.asdict(from_dict(MoshiTTTConfig, ttt, where=""))
    except ConfigError:
        return ttt


def allowable(key: str) -> bool:
    if any(_matches(key, name) for name in ALLOWABLE):
        return True
    return key.startswith("stages[") and key.rsplit(".", 1)[-1] in ALLOWABLE_STAGE_KEYS


def config_changes(saved: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key of `cfg` that differs from the `saved` config,
    free keys excepted."""
    changes: list[tuple[str, Any, Any]] = []
    _diff(_normalise(saved, type(cfg)), _normalise(to_dict(cfg), type(cfg)), "", changes)
    return [c for c in changes if not any(_matches(c[0], name) for name in FREE)]


def check_resume_config(saved: dict[str, Any] | None, cfg: Any, checkpoint: Path) -> list[str]:
    """Refuse (`ConfigError` naming the keys) a resume whose config differs from the checkpoint's, except in free
    keys and in allowable keys listed in `cfg.allow_config_change`. Returns the allowed changes, as text."""
    if saved is None:
        return []
    changes = config_changes(saved, cfg)
    allowed = list(cfg.allow_config_change)
    unsafe = [a for a in allowed if not allowable(a) and not any(_matches(a, f) for f in FREE)
              and not any(allowable(k) for k, _, _ in changes if _matches(k, a))]
    if unsafe:
        raise ConfigError(f"--allow-config-change {' '.join(unsafe)}: not a key a resume may change; allowed: "
                          f"{', '.join(ALLOWABLE)}, stages[i].steps, stages[i].lr. A run with another model, TTT, "
                          "LoRA, batch, crop, data or seed is a new run: use another run_dir")
    refused = [c for c in changes if not (allowable(c[0]) and any(_matches(c[0], a) for a in allowed))]
    if refused:
        shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        fixable = [k for k, _, _ in refused if allowable(k)]
        hint = (f"; to change {', '.join(fixable)} on purpose, add --allow-config-change {' '.join(fixable)}"
                if fixable else "")
        fixed = [k for k, _, _ in refused if not allowable(k)]
        hint += ("; " + ", ".join(fixed) + " cannot change within a run: use another run_dir") if fixed else ""
        raise ConfigError(f"{checkpoint}: resuming with a config that differs from the checkpoint's: {shown}{more}"
                          f"{hint}")
    return [f"{k}: {o!r} -> {n!r}" for k, o, n in changes]


def truncate_log(path: Path, keep) -> int:
    """Rewrite the CSV `path` keeping its header and the rows for which `keep(row)` is true (a resume drops the
    rows of steps it will redo). Returns how many rows were dropped; a missing file is left missing."""
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    kept = []
    for row in body:
        try:
            ok = keep(dict(zip(header, row, strict=False)))
        except (KeyError, ValueError):
            ok = False  # a torn last line from a kill mid-write
        if ok:
            kept.append(row)
    if len(kept) != len(body):
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([header, *kept])
        tmp.replace(path)
    return len(body) - len(kept)
