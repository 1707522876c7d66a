"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP) and exact resume.

A checkpoint is a folder `checkpoints/step_0000100/` holding
- the DCP shards of `{"model", "optimizer", "schedule", "train_state"}` (each rank writes its own shards);
- `rank_<r>.pt`: what differs per rank: the data loader's position and the RNG states;
- `MANIFEST.json`, written last by rank 0: the step and the sha256 of every file. A folder without it is an
  interrupted save and is ignored; a file whose checksum differs is reported as corrupted by name.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ttt_speech.train.parallel import barrier

MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, schedule, train_state: dict[str, Any],
                    rank_state: dict[str, Any], rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise `CheckpointError` naming what is missing or corrupted."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from e
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupted (sha256 differs from {MANIFEST})")
    return manifest


def load_checkpoint(path: Path, model, optimizer, schedule, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and schedule in place; returns (train_state, this rank's state).

    The RNG states are restored too. A checkpoint saved with another number of ranks loads the sharded parts
    (DCP reshards) but not the per-rank loader positions: that is refused.
    """
    verify_checkpoint(path)
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: no {rank_file.name}; it was saved with fewer ranks than this run has")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
             "schedule": schedule.state_dict(), "train_state": {"step": 0, "world_size": 0}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return state["train_state"], rank_state
