"""Evaluation during training (moshi-finetune's `do_eval`, `eval_freq`, `data.eval_data`) and the run's metrics
sinks, as the trainer calls them: `log_train` and `log_ttt` after each step, `after_step` to evaluate when due.

An evaluation reads the first `eval_batches` batches of `data.eval_data` (split over the processes; crops of the
current stage's length, in manifest order, from each recording's start, so every evaluation sees the same
crops) and logs the loss per stream (`loss`, `text_loss`, `audio_loss`, weighted as in training) to the sinks and
`metrics.eval.jsonl`. A lower loss than any before exports the model to `run_dir/best/` (as `export/`, with
`best.json`: step and losses); checkpoint rotation never touches it, and a resume keeps comparing against it.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ttt_speech.config import to_dict
from ttt_speech.errors import ConfigError
from ttt_speech.train.data import FRAME_RATE, SyntheticCodes
from ttt_speech.train.loss import moshi_loss
from ttt_speech.train.metrics import MetricsSinks
from ttt_speech.train.parallel import all_mean, barrier

BEST = "best"
BEST_FILE = "best.json"
EVAL_SEED_OFFSET = 1_000_003  # synthetic eval codes: another stream than any training seed's


def best_loss(run_dir: Path) -> float:
    """The eval loss of `run_dir/best`, or inf when there is none."""
    try:
        return float(json.loads((Path(run_dir) / BEST / BEST_FILE).read_text())["loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


class TrainReports:
    """The metrics sinks of a run and its evaluations. Every rank calls every method (evaluation is collective);
    only rank 0 writes.

    Args:
        cfg: the resolved `TrainConfig`.
        run_dir: the run folder (metrics.csv written already: its header names the train columns).
        rank, world, device: this process.
        resumed_from: the resumed step, or None.
    """

    def __init__(self, cfg, run_dir: Path, rank: int, world: int, device: torch.device,
                 resumed_from: int | None) -> None:
        self.cfg, self.run_dir, self.rank, self.world, self.device = cfg, Path(run_dir), rank, world, device
        if cfg.do_eval and getattr(cfg.model, "family", "moshi") != "moshi":
            raise ConfigError("do_eval: evaluation during training reads Moshi codes (data.eval_data); this run is "
                              f"model.family: {cfg.model.family}")
        self.sinks = MetricsSinks(self.run_dir, rank == 0, resumed_from, cfg.wandb, to_dict(cfg))
        self.header: list[str] = []
        if rank == 0 and (self.run_dir / "metrics.csv").is_file():
            with (self.run_dir / "metrics.csv").open(newline="") as f:
                self.header = next(csv.reader(f), [])
        self.best = best_loss(self.run_dir) if resumed_from is not None else math.inf
        self.loaders: dict[float, tuple[Any, dict[str, Any], int]] = {}
        self.lm_kwargs: dict[str, Any] | None = None

    def log_train(self, row: list[Any]) -> None:
        """One metrics.csv row (`[step, stage, ...]`, the same columns) to the other sinks."""
        self.sinks.log("train", int(row[0]), {k: v for k, v in zip(self.header[1:], row[1:], strict=False)})

    def log_ttt(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.sinks.log_ttt(rows)
        return rows

    def due(self, step: int, total: int) -> bool:
        return self.cfg.do_eval and ((self.cfg.eval_freq > 0 and step % self.cfg.eval_freq == 0) or step == total)

    def after_step(self, model, step: int, total: int, duration_sec: float) -> dict[str, float] | None:
        """Evaluate when due (`eval_freq`, and the last step); a new best is exported to `run_dir/best`
        (collective). Returns the losses, or None when not due."""
        if not self.due(step, total):
            return None
        losses = self.evaluate(model, duration_sec)
        if self.rank == 0:
            self.sinks.log("eval", step, losses)
            self.sinks.flush()
            best = " (best so far)" if losses["loss"] < self.best else ""
            tqdm.write(f"eval at step {step}: loss {losses['loss']:.4f} (text {losses['text_loss']:.4f}, audio "
                       f"{losses['audio_loss']:.4f}) on {losses['batches']} batches of {self.cfg.data.eval_data}{best}")
        if losses["loss"] < self.best:
            self.best = losses["loss"]
            tmp = self.run_dir / (BEST + ".partial")
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            from ttt_speech.train.trainer import export_consolidated

            export_consolidated(model, self.cfg, self._lm_kwargs(), tmp, self.rank)
            if self.rank == 0:
                (tmp / BEST_FILE).write_text(json.dumps({"step": step, **losses}, indent=1) + "\n")
                shutil.rmtree(self.run_dir / BEST, ignore_errors=True)
                tmp.rename(self.run_dir / BEST)
            barrier()
        return losses

    def loader(self, duration_sec: float):
        """The eval loader for crops of `duration_sec`, rewound to its start, and how many batches to read (the
        same on every rank: FSDP's forward is collective)."""
        if duration_sec not in self.loaders:
            cfg = self.cfg
            frames = int(round(duration_sec * FRAME_RATE))
            per_rank = max(1, cfg.eval_batches // self.world)
            if cfg.data.eval_data == "synthetic":
                kw = self._lm_kwargs()
                loader = SyntheticCodes(batch_size=cfg.batch_size, frames=frames, num_codebooks=1 + kw["n_q"],
                                        card=kw["card"], text_card=kw["text_card"],
                                        seed=EVAL_SEED_OFFSET + cfg.seed, rank=self.rank)
                batches = per_rank
            else:
                from ttt_speech import data

                data_cfg = data.DataConfig(train_manifest=cfg.data.eval_data, duration_sec=duration_sec,
                                           batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False, random_crop=False,
                                           tokenizer=cfg.data.tokenizer or "", mimi=cfg.data.mimi,
                                           device=str(self.device), text_card=self._lm_kwargs()["text_card"])
                loader = data.build_loader(data_cfg, rank=self.rank, world_size=self.world)
                smallest_shard = loader.sampler.num_samples // self.world
                batches = min(per_rank, max(1, smallest_shard // cfg.batch_size))
            self.loaders[duration_sec] = (loader, loader.state_dict(), batches)
        loader, start, batches = self.loaders[duration_sec]
        loader.load_state_dict(start)
        return loader, batches

    def _lm_kwargs(self) -> dict[str, Any]:
        """The model's LMModel arguments, as `build_model` makes them (`model.context` included)."""
        if self.lm_kwargs is None:
            from ttt_speech.train.model import resolve_lm_kwargs

            self.lm_kwargs = resolve_lm_kwargs(self.cfg.model.lm_kwargs)
            if self.cfg.model.context is not None:
                self.lm_kwargs["context"] = self.cfg.model.context
        return self.lm_kwargs

    @torch.no_grad()
    def evaluate(self, model, duration_sec: float) -> dict[str, float]:
        """Mean loss, text and audio loss over the eval batches, averaged over the processes."""
        cfg = self.cfg
        loader, batches = self.loader(duration_sec)
        autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        total = torch.zeros(3, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for _ in range(batches):
                codes = next(loader).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model(codes)
                    loss, parts = moshi_loss(out, codes, text_padding_id=model.existing_text_padding_id,
                                             first_codebook_weight_multiplier=cfg.first_codebook_weight_multiplier,
                                             text_padding_weight=cfg.text_padding_weight)
                total += torch.stack([loss.detach(), parts["text"], parts["audio"]]).double().cpu()
        finally:
            model.train(was_training)
        mean = all_mean((total / batches).float().to(self.device)).cpu().tolist()
        return {"loss": mean[0], "text_loss": mean[1], "audio_loss": mean[2], "batches": batches * self.world}

    def close(self) -> None:
        self.sinks.close()
