"""Where the training's numbers go besides `metrics.csv`: TensorBoard (`run_dir/tb`), jsonl
(`run_dir/metrics.{train,eval,ttt}.jsonl`, one object per line with its step, as moshi-finetune's
`MetricsLogger` writes them) and Weights & Biases when `wandb.project` is set.

Each step is written once: a fresh run starts these empty, a resume drops what was logged after the checkpoint
it resumes from (TensorBoard through `purge_step`). Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

TAGS = ("train", "eval", "ttt")


def jsonl_path(run_dir: Path, tag: str) -> Path:
    return Path(run_dir) / f"metrics.{tag}.jsonl"


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the lines of `path` whose step is <= `last_step` (a torn last line goes too); returns how many went."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


class MetricsSinks:
    """TensorBoard + jsonl (+ wandb) for rank 0; every method is a no-op on other ranks.

    Args:
        run_dir: the run folder.
        enabled: rank 0.
        resumed_from: the step the run resumes from (None: a fresh run, old sinks are cleared).
        wandb: a `WandbConfig`; used when its `project` is set.
        config: the resolved training config, recorded by wandb.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_from: int | None = None, wandb: Any = None,
                 config: dict[str, Any] | None = None) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        self.wandb_run = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_from is None:
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
            for tag in TAGS:
                jsonl_path(self.run_dir, tag).unlink(missing_ok=True)
        else:  # train/eval steps count from 1, the TTT monitor's from 0 (the step it ran)
            for tag in TAGS:
                truncate_jsonl(jsonl_path(self.run_dir, tag), resumed_from - (tag == "ttt"))
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), max_queue=1000,
                                    purge_step=None if resumed_from is None else resumed_from + 1)
        if wandb is not None and wandb.project is not None:
            import wandb as wandb_lib

            if wandb.key is not None:
                wandb_lib.login(key=wandb.key)
            if wandb.offline:
                os.environ["WANDB_MODE"] = "offline"
            self.wandb_run = wandb_lib.init(project=wandb.project, name=wandb.run_name or self.run_dir.name,
                                            dir=str(self.run_dir), config=config, resume="allow")

    def log(self, tag: str, step: int, values: dict[str, Any]) -> None:
        """One record: `values` (numbers; others only in the jsonl) at `step`, under `tag/` in TensorBoard and
        wandb, as one line of `metrics.<tag>.jsonl`."""
        if not self.enabled:
            return
        record = {"step": step, **values}
        with jsonl_path(self.run_dir, tag).open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{tag}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def log_ttt(self, rows: list[dict[str, Any]]) -> None:
        """The TTT monitor's rows (one per layer and collection), as `ttt/layer<i>/<statistic>`."""
        for row in rows:
            values = {f"layer{row['layer']}/{k}": v for k, v in row.items() if k not in ("step", "layer")}
            self.log("ttt", int(row["step"]), values)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
