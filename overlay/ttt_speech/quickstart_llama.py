"""`ttt-speech quickstart --llama` (`make quickstart-llama`): distil a tiny random Llama's top-quarter attention into
TTT-Linear on CPU, stop half way and resume, then compare student and teacher by position and on recall.

Writes `<out>/summary.json` with `kl_first_window` / `kl_last_window` (mean KL over the first and last 20 steps),
`resumed_from_step`, the validation perplexities, perplexity by position and the recall test, and prints its path.
`<out>/run` (the training run) is started afresh every time.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ttt_speech.config import load_config
from ttt_speech.eval.llama_eval import evaluate_run
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.trainer import train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama_tiny.yaml"
WINDOW = 20


def run(out: str | Path = "runs/quickstart-llama", steps: int = 240, seed: int = 0,
        config: str | Path = CONFIG) -> Path:
    out = Path(out)
    t0 = time.perf_counter()
    overrides = [f"--run_dir={out / 'run'}", f"--max_steps={steps}", f"--seed={seed}", "--log_freq=1",
                 f"--ckpt_freq={steps}"]
    shutil.rmtree(out / "run", ignore_errors=True)  # the quickstart's own folder: always a fresh run
    first = train(load_config(TrainConfig, config, [*overrides, f"--stop_after={steps // 2}"]))
    assert first["status"] == "stopped", first["status"]
    cfg = load_config(TrainConfig, config, overrides)
    result = train(cfg)
    kl = [float(r["kl"]) for r in csv.DictReader((out / "run" / "metrics.csv").open())]

    val_file = out / "run" / "val.csv"
    evaluation = evaluate_run(out / "run", out=out / "eval_llama.json")
    summary: dict[str, Any] = {
        "kl_first_window": sum(kl[:WINDOW]) / len(kl[:WINDOW]),
        "kl_last_window": sum(kl[-WINDOW:]) / len(kl[-WINDOW:]),
        "window_steps": WINDOW,
        "steps": result["steps"],
        "resumed_from_step": result["resumed_from_step"],
        "validation": list(csv.DictReader(val_file.open())) if val_file.is_file() else [],
        "perplexity_by_position": evaluation["perplexity_by_position"],
        "recall": evaluation["recall"],
        "export": result["export"],
        "seconds": round(time.perf_counter() - t0, 1),
        "device": "cpu",
    }
    summary["kl_ratio"] = summary["kl_last_window"] / summary["kl_first_window"]
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"KL(teacher || student): first {WINDOW} steps {summary['kl_first_window']:.4f}, last {WINDOW} "
          f"{summary['kl_last_window']:.4f} ({100 * summary['kl_ratio']:.0f}%); resumed from step "
          f"{summary['resumed_from_step']}")
    for row in summary["recall"]:
        print(f"recall after {row['turns']} turns: answer NLL teacher {row['teacher_answer_nll']:.3f}, student "
              f"{row['student_answer_nll']:.3f}")
    print(f"wrote {path}")
    return path
