"""Parallelism, applied in one place: activation checkpointing, then FSDP2 `fully_shard` per transformer layer
(main and depformer), then the root."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun/submitit environment variables; one process if none are set."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def parallelize(model: nn.Module, *, gradient_checkpointing: bool, strategy: str, world_size: int) -> nn.Module:
    if gradient_checkpointing:
        model.transformer.checkpointing = True  # moshi checkpoints each layer of the main transformer
    if strategy == "fsdp2" and world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for stack in (model.transformer, model.depformer):
            if stack is None:
                continue
            for layer in stack.layers:
                fully_shard(layer)
        fully_shard(model)
    return model


def all_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any (so that all ranks take a collective path together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
