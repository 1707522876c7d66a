"""The fine-tuning loop: model -> TTT -> LoRA -> parallelize -> optimizer -> schedule -> data -> checkpoint, then
steps. Reads top to bottom; no callbacks."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ttt_speech.config import save_config
from ttt_speech.errors import CheckpointMismatch, ConfigError, TrainingDiverged, TTTSpeechError
from ttt_speech.integrations import moshi as moshi_int
from ttt_speech.train.adapters import embedding_names, write_adapters
from ttt_speech.train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    nonfinite_parameters,
    save_checkpoint,
    saved_config,
)
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.data import FRAME_RATE, build_train_loader
from ttt_speech.train.evaluation import TrainReports
from ttt_speech.train.loss import moshi_loss
from ttt_speech.train.model import apply_lora, build_model, merge_lora, parameter_groups, ttt_trainable_names
from ttt_speech.train.monitor import Monitor
from ttt_speech.train.moshi_finetune import resolve_moshi_paths
from ttt_speech.train.parallel import all_mean, any_rank, barrier, init_distributed, parallelize
from ttt_speech.train.resume import check_resume_config, truncate_log
from ttt_speech.train.schedule import Schedule

METRICS = ["step", "stage", "loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens_per_s"]
_stop_requested = False


def request_stop(*_: Any) -> None:
    """Finish the current step, save a checkpoint and return (SIGTERM / SIGUSR1 on SLURM, a first Ctrl-C)."""
    global _stop_requested
    _stop_requested = True


def interrupt(*_: Any) -> None:
    """Ctrl-C: the first stops like SIGTERM (save at the end of the step); a second aborts at once."""
    if _stop_requested:
        raise KeyboardInterrupt
    request_stop()
    print("\nstopping at the end of this step and saving a checkpoint; Ctrl-C again aborts", file=sys.stderr,
          flush=True)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM, SIGUSR1 and a first Ctrl-C stop at the end of the step with a checkpoint; the previous handlers
    come back afterwards. Only the main thread can set handlers (submitit's debug executor may run elsewhere)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGTERM, request_stop), (signal.SIGUSR1, request_stop),
                             (signal.SIGINT, interrupt)):
            handlers[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def find_resume(run_dir: Path, cfg: TrainConfig, rank: int) -> Path | None:
    """The checkpoint to resume from: the newest that verifies (damaged newer ones are set aside with a warning),
    refused when its config differs from `cfg` (see `ttt_speech.train.resume`)."""
    path, skipped = find_resume_checkpoint(run_dir)
    for bad, reason in skipped:
        if rank == 0:
            print(f"warning: skipping damaged checkpoint {bad} ({reason}); renamed to {bad.name}.damaged",
                  file=sys.stderr, flush=True)
    barrier()
    if rank == 0:
        for bad, _ in skipped:
            bad.rename(bad.with_name(bad.name + ".damaged"))
    if path is None:
        return None
    saved = saved_config(path)
    if saved is None and (run_dir / "config.yaml").is_file():  # checkpoints written before configs were saved
        saved = saved_config(run_dir)
    for change in check_resume_config(saved, cfg, path):
        if rank == 0:
            print(f"note: resuming with {change} (allowed by --allow-config-change)", file=sys.stderr, flush=True)
    return path


def continue_logs(run_dir: Path, resumed_from: int | None, header: list[str] = METRICS) -> None:
    """metrics.csv and ttt_stats.csv hold each step once: a fresh run starts them empty, a resume drops the rows of
    the steps it redoes (written after the checkpoint it resumes from, before a kill)."""
    if resumed_from is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerow(header)
        (run_dir / "ttt_stats.csv").unlink(missing_ok=True)  # the monitor writes it afresh, header included
        return
    truncate_log(run_dir / "metrics.csv", lambda row: int(row["step"]) <= resumed_from)  # steps counted from 1
    truncate_log(run_dir / "ttt_stats.csv", lambda row: int(row["step"]) < resumed_from)  # steps counted from 0


def build_named(cfg: TrainConfig, device: torch.device):
    """`build_model`, with what a config or checkpoint can get wrong raised as a one-line error naming it."""
    try:
        return build_model(cfg, device)
    except TTTSpeechError:
        raise
    except ValueError as e:  # the model's own checks (ttt.layers against the layer count, lm_kwargs, ...)
        raise ConfigError(f"model: {' '.join(str(e).split())}") from e
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        with_ttt = "and ttt" if cfg.ttt is not None else "(ttt: null)"
        raise CheckpointMismatch(f"model.checkpoint {cfg.model.checkpoint}: does not fit the model built from "
                                 f"model.lm_kwargs {with_ttt}: {' '.join(str(e).split())}") from e


def diverged(reason: str, run_dir: Path, model, optimizer, schedule, rank: int) -> TrainingDiverged:
    """Restore the last good checkpoint into `model` and return the error to raise."""
    path, _ = find_resume_checkpoint(run_dir)
    if path is None:
        where = "no checkpoint was saved before it; nothing to restore"
    else:
        load_checkpoint(path, model, optimizer, schedule, rank, verify=False)
        where = f"restored the last good checkpoint {path}; a resume continues from it"
    return TrainingDiverged(f"{run_dir}: {reason}; run stopped, {where}. Lower optim.lr / optim.ttt_lr, or bound "
                            "the fast weights (ttt.clip_tau)")


class MoshiFamily:
    """What is Moshi's in a run: the model (TTT, LoRA, FSDP2 per transformer layer), its batches (codes
    [B, 17, T] of a stage's crops), its loss and its export. `LlamaFamily` (`train/llama.py`) is the other one."""

    metrics = METRICS

    def build(self, cfg: TrainConfig, device: torch.device, world: int) -> tuple[Any, list[dict[str, Any]]]:
        model, self.lm_kwargs = build_named(cfg, device)
        ttt_names = ttt_trainable_names(model)
        if cfg.lora.enable:
            apply_lora(model, cfg.lora, keep_full=ttt_names | (embedding_names(model) if cfg.lora.ft_embed else set()))
        parallelize(model, gradient_checkpointing=cfg.gradient_checkpointing, strategy=cfg.parallel,
                    world_size=world)
        return model, parameter_groups(model, cfg, ttt_names)

    def ttt_modules(self, model) -> dict[int, Any]:
        return moshi_int.ttt_modules(model)

    def loader(self, cfg: TrainConfig, stage, rank: int, world: int, device: torch.device):
        return build_train_loader(cfg, stage.duration_sec, self.lm_kwargs, rank, world, str(device))

    def loss(self, model, batch: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model(batch)
        loss, parts = moshi_loss(out, batch, text_padding_id=model.existing_text_padding_id,
                                 first_codebook_weight_multiplier=cfg.first_codebook_weight_multiplier,
                                 text_padding_weight=cfg.text_padding_weight)
        return loss, [parts["text"], parts["audio"]]

    def tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * batch.shape[-1]

    def validate(self, model, cfg: TrainConfig, step: int, stage: int, rank: int, world: int,
                 device: torch.device) -> None:
        """Moshi runs have no held-out set in this trainer (`ttt-speech eval librilight` measures after)."""

    def export(self, model, cfg: TrainConfig, out_dir: Path, rank: int) -> Path | None:
        return export_consolidated(model, cfg, self.lm_kwargs, out_dir, rank)

    def result(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"frames_per_sample": int(round(cfg.duration_sec * FRAME_RATE))}


def family_for(cfg: TrainConfig):
    """The model family's part of the run (`model.family`)."""
    if cfg.model.family == "llama":
        from ttt_speech.train.llama import LlamaFamily

        return LlamaFamily()
    return MoshiFamily()


def train(cfg: TrainConfig) -> dict[str, Any]:
    global _stop_requested
    _stop_requested = False
    rank, world, device = init_distributed()
    if world > 1 and cfg.parallel == "none":
        raise ConfigError(f"parallel: none with {world} processes: nothing would synchronise their gradients; use "
                          "parallel: fsdp2, or one process")
    run_dir = Path(cfg.run_dir)
    cfg = resolve_moshi_paths(cfg)  # moshi-finetune's moshi_paths, through moshi's CheckpointInfo
    resume_path = find_resume(run_dir, cfg, rank)
    if rank == 0:  # only once the resume checks passed
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)

    family = family_for(cfg)
    model, groups = family.build(cfg, device, world)
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    stages = cfg.stage_list()
    schedule = Schedule(stages, cfg.optim.lr, cfg.optim.pct_start)
    autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")

    step, resumed_from, stage_idx, loader = 0, None, -1, None
    if resume_path is not None:
        train_state, rank_state = load_checkpoint(resume_path, model, optimizer, schedule, rank, verify=False)
        if train_state["world_size"] != world:
            raise CheckpointError(f"{resume_path}: saved by {train_state['world_size']} processes, this run has "
                                  f"{world}; the data position is per process, so resume with the same count")
        step = resumed_from = int(train_state["step"])
        stage_idx = rank_state["stage"]
        loader = family.loader(cfg, stages[stage_idx], rank, world, device)
        loader.load_state_dict(rank_state["loader"])
    if rank == 0:
        continue_logs(run_dir, resumed_from, family.metrics)
    monitor = Monitor(model, run_dir / "ttt_stats.csv" if rank == 0 else None, modules=family.ttt_modules(model))
    reports = TrainReports(cfg, run_dir, rank, world, device, resumed_from)  # TensorBoard, jsonl, wandb; eval
    total = cfg.total_steps
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="finetune", unit="step")
    losses: list[float] = []
    bad_streak, skipped = 0, 0
    # the bar is closed before an error is printed, so that gets its own line
    with stop_signals(), contextlib.closing(bar), contextlib.closing(reports):
        while step < total:
            i, _ = schedule.stage_at(step)
            if i != stage_idx:  # a new curriculum stage: crops of its duration, data from its start
                stage_idx = i
                loader = family.loader(cfg, stages[i], rank, world, device)
            lr = schedule.apply(optimizer, step)
            if rank == 0 and step % cfg.monitor_freq == 0:
                monitor.arm()
            t0 = time.perf_counter()
            logged, tokens = 0.0, 0
            for _ in range(cfg.num_microbatches):  # gradient accumulation: the mean of the microbatches' gradients
                batch = next(loader).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, parts = family.loss(model, batch, cfg)
                (loss / cfg.num_microbatches).backward()
                logged = logged + torch.stack([loss.detach(), *parts]).float() / cfg.num_microbatches
                tokens += family.tokens(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            logged = all_mean(logged).cpu()
            if math.isfinite(logged[0].item()) and math.isfinite(grad_norm.item()):  # the same on every rank
                optimizer.step()
                bad_streak = 0
            else:  # skipped: the weights stay those of the last finite step
                bad_streak, skipped = bad_streak + 1, skipped + 1
                if rank == 0:
                    bar.write(f"warning: step {step + 1}: non-finite loss {logged[0].item()} or gradient norm "
                              f"{grad_norm.item()}; step skipped ({bad_streak} in a row, the run stops at "
                              f"{cfg.max_nonfinite_steps})")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bad_streak >= cfg.max_nonfinite_steps:
                bar.close()
                raise diverged(f"loss or gradients non-finite for {bad_streak} steps in a row (steps "
                               f"{step - bad_streak + 1}-{step})", run_dir, model, optimizer, schedule, rank)
            losses.append(logged[0].item())
            tok_s = world * tokens / (time.perf_counter() - t0)
            if rank == 0:
                reports.log_ttt(monitor.collect(step - 1))
                if step % cfg.log_freq == 0 or step == total:
                    reports.log_train([step, stage_idx, *logged.tolist(), lr, grad_norm.item(), tok_s])
                    with (run_dir / "metrics.csv").open("a", newline="") as f:
                        csv.writer(f).writerow([step, stage_idx, *[f"{v:.6f}" for v in logged.tolist()], f"{lr:.3e}",
                                                f"{grad_norm.item():.4f}", f"{tok_s:.0f}"])
                bar.set_postfix(loss=f"{logged[0].item():.3f}", tok_s=f"{tok_s:.0f}")
                bar.update(1)
            if step == total or schedule.stage_at(step)[0] != stage_idx:  # a stage's end
                family.validate(model, cfg, step, stage_idx, rank, world, device)
            reports.after_step(model, step, total, stages[stage_idx].duration_sec)  # do_eval, eval_freq
            # signals reach ranks at different times
            stopping = any_rank(_stop_requested, device) or step == cfg.stop_after
            # not mid-streak: keep the last good ones; ckpt_freq 0 or do_ckpt false: no periodic checkpoint
            periodic = cfg.do_ckpt and cfg.ckpt_freq > 0 and step % cfg.ckpt_freq == 0 and bad_streak == 0
            if periodic or (step == total and cfg.do_ckpt) or stopping:
                try:
                    save_checkpoint(run_dir, step, model, optimizer, schedule, {"step": step, "world_size": world},
                                    {"stage": stage_idx, "loader": loader.state_dict()}, rank, cfg.keep_checkpoints,
                                    config=cfg)
                except CheckpointError as e:
                    if "non-finite weights" not in str(e):
                        raise
                    bar.close()
                    raise diverged(f"the weights are non-finite after step {step}", run_dir, model, optimizer,
                                   schedule, rank) from e
            if stopping and step < total:
                bar.close()
                return {"status": "stopped", "steps": step, "resumed_from_step": resumed_from, "losses": losses,
                        "skipped_steps": skipped}
    bar.close()
    exported = family.export(model, cfg, run_dir / "export", rank) if cfg.export_safetensors else None
    return {"status": "done", "steps": step, "resumed_from_step": resumed_from, "losses": losses,
            "export": str(exported) if exported else None, "skipped_steps": skipped, **family.result(cfg)}


def export_consolidated(model, cfg: TrainConfig, lm_kwargs: dict[str, Any], out_dir: Path, rank: int) -> Path | None:
    """A single safetensors file (LoRA merged) plus ttt_config.json, lm_config.json (with `model.context`) and
    ttt_training.json (the longest crop, in frames and chunk updates), which
    `ttt_speech.integrations.moshi.load_ttt_lm` (moshi's loader plus the TTT config) loads for inference."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    bad = nonfinite_parameters(model)
    if bad:  # the checkpoint at the last step was refused already; this guards direct callers
        raise CheckpointError(f"{out_dir}: not exporting non-finite weights ({', '.join(bad[:5])})")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if cfg.lora.enable:
            if cfg.save_adapters:
                write_adapters(state, model, cfg.lora, lm_kwargs, out_dir)
            state = merge_lora(state, cfg.lora.scaling)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / moshi_int.WEIGHTS_FILE))
        ttt_config = getattr(model, "ttt_config", None)  # resolved: also for `ttt: from_checkpoint`
        if ttt_config is not None:
            (out_dir / moshi_int.TTT_CONFIG_FILE).write_text(json.dumps(ttt_config.to_dict(), indent=2) + "\n")
            frames = max(round(s.duration_sec * FRAME_RATE) for s in cfg.stage_list())
            previous = moshi_int.training_record(cfg.model.checkpoint)  # a stage 1 checkpoint's, kept if longer
            moshi_int.write_training_record(out_dir, ttt_config, frames, previous)
        (out_dir / moshi_int.LM_CONFIG_FILE).write_text(json.dumps(lm_kwargs, indent=2) + "\n")
    barrier()
    return out_dir if rank == 0 else None
