"""The fine-tuning loop: model -> TTT -> LoRA -> parallelize -> optimizer -> schedule -> data -> checkpoint, then
steps. Reads top to bottom; no callbacks."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ttt_speech.config import save_config
from ttt_speech.integrations import moshi as moshi_int
from ttt_speech.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.data import FRAME_RATE, build_train_loader
from ttt_speech.train.loss import moshi_loss
from ttt_speech.train.model import apply_lora, build_model, merge_lora, parameter_groups, ttt_trainable_names
from ttt_speech.train.monitor import Monitor
from ttt_speech.train.parallel import all_mean, any_rank, barrier, init_distributed, parallelize
from ttt_speech.train.schedule import Schedule

METRICS = ["step", "stage", "loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens_per_s"]
_stop_requested = False


def request_stop(*_: Any) -> None:
    """Finish the current step, save a checkpoint and return (SIGTERM / SIGUSR1 on SLURM)."""
    global _stop_requested
    _stop_requested = True


def train(cfg: TrainConfig) -> dict[str, Any]:
    global _stop_requested
    _stop_requested = False
    rank, world, device = init_distributed()
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)

    model, lm_kwargs = build_model(cfg, device)
    ttt_names = ttt_trainable_names(model)
    if cfg.lora.enable:
        apply_lora(model, cfg.lora, keep_full=ttt_names)
    parallelize(model, gradient_checkpointing=cfg.gradient_checkpointing, strategy=cfg.parallel, world_size=world)
    groups = parameter_groups(model, cfg, ttt_names)
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    stages = cfg.stage_list()
    schedule = Schedule(stages, cfg.optim.lr, cfg.optim.pct_start)
    autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")

    step, resumed_from, stage_idx, loader = 0, None, -1, None
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        train_state, rank_state = load_checkpoint(checkpoints[-1], model, optimizer, schedule, rank)
        if train_state["world_size"] != world:
            raise CheckpointError(f"{checkpoints[-1]}: saved by {train_state['world_size']} processes, this run has "
                                  f"{world}; the data position is per process, so resume with the same count")
        step = resumed_from = int(train_state["step"])
        stage_idx = rank_state["stage"]
        loader = build_train_loader(cfg, stages[stage_idx].duration_sec, lm_kwargs, rank, world, str(device))
        loader.load_state_dict(rank_state["loader"])
    monitor = Monitor(model, run_dir / "ttt_stats.csv" if rank == 0 else None)
    if rank == 0 and resumed_from is None:
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerow(METRICS)
    if cfg.stop_after is None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    total = cfg.total_steps
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="finetune", unit="step")
    losses: list[float] = []
    while step < total:
        i, _ = schedule.stage_at(step)
        if i != stage_idx:  # a new curriculum stage: crops of its duration, data from its start
            stage_idx = i
            loader = build_train_loader(cfg, stages[i].duration_sec, lm_kwargs, rank, world, str(device))
        codes = next(loader).to(device)
        lr = schedule.apply(optimizer, step)
        if rank == 0 and step % cfg.monitor_freq == 0:
            monitor.arm()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(codes)
            loss, parts = moshi_loss(out, codes, text_padding_id=model.existing_text_padding_id,
                                     first_codebook_weight_multiplier=cfg.first_codebook_weight_multiplier,
                                     text_padding_weight=cfg.text_padding_weight)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        logged = all_mean(torch.stack([loss.detach(), parts["text"], parts["audio"]]).float()).cpu()
        if not torch.isfinite(logged[0]):
            bar.write(f"warning: step {step}: non-finite loss {logged[0].item()}; check lr, ttt.lr, ttt.clip_tau")
        losses.append(logged[0].item())
        tok_s = world * codes.shape[0] * codes.shape[-1] / (time.perf_counter() - t0)
        if rank == 0:
            monitor.collect(step - 1)
            if step % cfg.log_freq == 0 or step == total:
                with (run_dir / "metrics.csv").open("a", newline="") as f:
                    csv.writer(f).writerow([step, stage_idx, *[f"{v:.6f}" for v in logged.tolist()], f"{lr:.3e}",
                                            f"{grad_norm.item():.4f}", f"{tok_s:.0f}"])
            bar.set_postfix(loss=f"{logged[0].item():.3f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
        stopping = any_rank(_stop_requested, device) or step == cfg.stop_after  # signals reach ranks at different times
        if step % cfg.ckpt_freq == 0 or step == total or stopping:
            save_checkpoint(run_dir, step, model, optimizer, schedule, {"step": step, "world_size": world},
                            {"stage": stage_idx, "loader": loader.state_dict()}, rank, cfg.keep_checkpoints)
        if stopping and step < total:
            bar.close()
            return {"status": "stopped", "steps": step, "resumed_from_step": resumed_from, "losses": losses}
    bar.close()
    exported = export_consolidated(model, cfg, lm_kwargs, run_dir / "export", rank) if cfg.export_safetensors else None
    return {"status": "done", "steps": step, "resumed_from_step": resumed_from, "losses": losses,
            "export": str(exported) if exported else None, "frames_per_sample": int(round(cfg.duration_sec *
                                                                                         FRAME_RATE))}


def export_consolidated(model, cfg: TrainConfig, lm_kwargs: dict[str, Any], out_dir: Path, rank: int) -> Path | None:
    """A single safetensors file (LoRA merged) plus ttt_config.json and lm_config.json, which
    `ttt_speech.integrations.moshi.load_ttt_lm` (moshi's loader plus the TTT config) loads for inference."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if cfg.lora.enable:
            state = merge_lora(state, cfg.lora.scaling)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / moshi_int.WEIGHTS_FILE))
        if cfg.ttt is not None:
            (out_dir / moshi_int.TTT_CONFIG_FILE).write_text(json.dumps(cfg.ttt, indent=2) + "\n")
        (out_dir / moshi_int.LM_CONFIG_FILE).write_text(json.dumps(lm_kwargs, indent=2) + "\n")
    barrier()
    return out_dir if rank == 0 else None
