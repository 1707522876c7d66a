"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP) and exact resume.

A checkpoint is a folder `checkpoints/step_0000100/` holding
- the DCP shards of `{"model", "optimizer", "schedule", "train_state"}` (each rank writes its own shards);
- `rank_<r>.pt`: what differs per rank: the data loader's position and the RNG states;
- `config.yaml`: the training config the checkpoint was made under (a resume compares against it);
- `MANIFEST.json`, written last by rank 0: the step and the sha256 of every file.

A save writes `step_N.partial/` and renames it to `step_N/` once the manifest is in; `.partial` folders (an
interrupted save) are never taken as checkpoints. A checkpoint whose weights are not all finite is never written,
and rotation keeps the newest `keep` complete checkpoints, so the last good one always survives. On resume,
`find_resume_checkpoint` takes the newest checkpoint that verifies and names the damaged ones it skipped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ttt_speech.config import save_config
from ttt_speech.errors import CheckpointError
from ttt_speech.train.parallel import any_rank, barrier

MANIFEST = "MANIFEST.json"
CONFIG = "config.yaml"
_NAME = re.compile(r"step_(\d{7})")

__all__ = ["CheckpointError", "find_resume_checkpoint", "list_checkpoints", "load_checkpoint", "nonfinite_parameters",
           "save_checkpoint", "verify_checkpoint"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def nonfinite_parameters(model, device: torch.device | None = None) -> list[str]:
    """Names of the parameters holding a NaN or Inf in this rank's shard; collective: every rank calls it, and
    each gets ["<on another rank>"] when only another rank's shards are bad."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    device = device or next(model.parameters()).device
    if any_rank(bool(bad), device) and not bad:
        bad = ["<on another rank>"]
    return bad


def save_checkpoint(run_dir: Path, step: int, model, optimizer, schedule, train_state: dict[str, Any],
                    rank_state: dict[str, Any], rank: int, keep: int, config: Any = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    Refuses (`CheckpointError`, nothing written) when a weight is not finite. `config` (a config dataclass) is
    saved beside the shards for resume checks.
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise CheckpointError(f"{run_dir}: not saving step {step}: non-finite weights in {', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}")
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if config is not None:
            save_config(config, tmp / CONFIG)
    barrier()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
             "schedule": schedule.state_dict(), "train_state": dict(train_state)}
    with warnings.catch_warnings():  # one process without a process group is a supported, intended use
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:  # the newest, just written and verified finite, stays
            shutil.rmtree(old)
        for stale in (run_dir / "checkpoints").glob("step_*.partial"):  # saves interrupted earlier
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (`step_NNNNNNN` folders with a manifest; never `.partial` ones), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and (p / MANIFEST).is_file())


def find_resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped as damaged with the reason for each.

    Raises `CheckpointError` when checkpoints exist but none verifies (starting over would hide the damage).
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    if skipped:
        raise CheckpointError(f"{run_dir}: no usable checkpoint: " + "; ".join(reason for _, reason in skipped))
    return None, []


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise `CheckpointError` naming what is missing or corrupted."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupted (sha256 differs from {MANIFEST})")
    return manifest


def saved_config(path: Path) -> dict[str, Any] | None:
    """The config a checkpoint was made under (its `config.yaml`), or None for checkpoints that lack one."""
    import yaml

    file = path / CONFIG
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping, got {type(data).__name__}")
    return data


def load_checkpoint(path: Path, model, optimizer, schedule, rank: int,
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and schedule in place; returns (train_state, this rank's state).

    The RNG states are restored too. A checkpoint saved with another number of ranks loads the sharded parts
    (DCP reshards) but not the per-rank loader positions: that is refused. `verify=False` skips the checksums
    (when `find_resume_checkpoint` has just checked them).
    """
    if verify:
        verify_checkpoint(path)
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: no {rank_file.name}; it was saved with fewer ranks than this run has")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
             "schedule": schedule.state_dict(), "train_state": {"step": 0, "world_size": 0}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's wraps each rank's traceback (a BaseException)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            reason = next((ln for ln in reversed(lines)
                           if re.search(r"Missing key|Unexpected key|size mismatch|shape", ln)), lines[-1])
            raise CheckpointError(f"{path}: does not fit the model this config builds ({reason}); resume with the "
                                  "config it was saved with, or start a new run_dir") from e
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return state["train_state"], rank_state
