"""`ttt-speech quickstart` (`make quickstart`): the whole pipeline on the embedded tiny Moshi, on a CPU.

1. checks the patched moshi and that frame-by-frame streaming reproduces the parallel forward with In-Place TTT;
2. pre-encodes the sample set (espeak-ng dialogues and audiobook, built by `make samples`) with a tiny random Mimi;
3. fine-tunes a tiny TTT Moshi on the dialogues through submitit's local executor, stopped half-way (a checkpoint)
   and resumed by a second job, and a base model without TTT the same way in this process;
4. plots the monitoring CSVs, and ends with the eval-librilight report comparing the two on the audiobook;
5. prints the first and last loss windows and writes `summary.json`.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from ttt_speech.integrations import moshi as moshi_int

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


def check_streaming(batch_size: int = 2, frames: int = 48, seed: int = 0) -> float:
    """Patched moshi present; In-Place TTT streaming frame by frame == the parallel forward. Returns max |diff|."""
    import moshi

    moshi_int.check_patched()
    model = moshi_int.build_lm(seed=seed).eval()
    cfg = moshi_int.MoshiTTTConfig(kind="inplace", layers=[0, 2], chunk_size=8, lr=0.3)
    moshi_int.apply_ttt(model, cfg)
    with torch.no_grad():  # move the conv off its zero init so TTT visibly acts in this check
        for m in moshi_int.ttt_modules(model).values():
            m.ttt_conv.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, model.card, (batch_size, model.num_codebooks, frames), generator=gen)
    with torch.no_grad():
        parallel, _ = model.forward_text(seq)
        with model.streaming(batch_size):
            stepped = torch.cat([model.forward_text(seq[:, :, t:t + 1])[0] for t in range(frames)], dim=1)
    diff = (parallel - stepped).abs().max().item()
    print(f"[1/5] moshi {moshi.__version__} from {Path(moshi.__file__).parent} (4 patches present); In-Place TTT "
          f"in layers {cfg.layers}, chunk {cfg.chunk_size}: frame-by-frame streaming vs parallel, max |diff| "
          f"{diff:.1e} (<= 1e-5)")
    if diff > 1e-5:
        raise RuntimeError(f"streaming and parallel disagree by {diff:.2e}")
    return diff


def _losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def run(out: str | Path = "runs/quickstart", steps: int = 200, window: int = 20, eval_max_frames: int | None = None,
        eval_step: int = 1, seed: int = 0) -> dict:
    from ttt_speech.config import load_config
    from ttt_speech.data.codes import pre_encode
    from ttt_speech.eval import librilight
    from ttt_speech.launch.submit import SlurmConfig, submit
    from ttt_speech.train.config import TrainConfig
    from ttt_speech.train.monitor import plot_monitor
    from ttt_speech.train.trainer import train

    t_start = time.perf_counter()
    out = Path(out).resolve()
    check_streaming(seed=seed)
    if not (SAMPLES / "samples.json").is_file():
        raise FileNotFoundError(f"sample set missing at {SAMPLES}: run `make samples` (make quickstart does)")
    codes = {}
    for name in ("dialogues", "audiobook"):
        codes[name] = out / "codes" / name
        if not (codes[name] / "index.json").is_file():
            pre_encode(SAMPLES / f"{name}.jsonl", codes[name], mimi="tiny-random")
    print(f"[2/5] sample set {SAMPLES}: dialogues (stereo) and audiobook (mono), Mimi codes in {out / 'codes'}")

    config = REPO / "configs" / "tiny.yaml"
    # 8 s crops: 100 frames, 12 chunk updates of 8, far past the 32-frame window. The evaluation runs 2900 frames
    # (360 chunks): `ttt.decay` 0.9 (a horizon of ~10 chunks) keeps the fast weight in the range training visits
    # (unbounded, the paper's rule, the TTT model's NLL rose with position; docs/moshi_ttt.md, "The recipe")
    common = [f"--data.train_data={SAMPLES / 'dialogues.jsonl'}", f"--data.tokenizer={SAMPLES / 'tokenizer.model'}",
              f"--data.codes_dir={codes['dialogues']}", "--duration_sec=8.0", f"--max_steps={steps}",
              f"--ckpt_freq={max(1, steps // 2)}", "--log_freq=1", f"--seed={seed}", "--ttt.decay=0.9"]
    ttt_dir, base_dir = out / "ttt", out / "base"
    local = SlurmConfig(cluster="local", time_min=30)
    first = submit(str(config), [*common, f"--run_dir={ttt_dir}", f"--stop_after={steps // 2}"], local).result()
    second = submit(str(config), [*common, f"--run_dir={ttt_dir}"], local).result()
    print(f"[3/5] TTT run {ttt_dir}: submitit job 1 {first['status']} at step {first['steps']} (checkpoint), "
          f"job 2 resumed from step {second['resumed_from_step']} to {second['steps']}")
    base = train(load_config(TrainConfig, config, [*common, f"--run_dir={base_dir}", "--ttt=null"]))
    print(f"      base run {base_dir} (no TTT): {base['steps']} steps")

    plots = [str(p) for p in plot_monitor(ttt_dir)]
    report = librilight.run([f"base={base_dir / 'export'}", f"ttt={ttt_dir / 'export'}"],
                            str(SAMPLES / "audiobook.jsonl"), str(SAMPLES / "tokenizer.model"), str(out / "eval"),
                            codes_dir=str(codes["audiobook"]), step=eval_step, bins=[50, 100, 200, 400, 800, 1600],
                            max_frames=eval_max_frames, print_paired=False)
    plots.append(str(out / "eval" / "nll_vs_position.png"))
    print(f"      {librilight.paired_line(report, 'ttt')}")  # one audiobook: a difference, not a CI
    print(f"[4/5] plots: {', '.join(plots)}")

    losses = _losses(ttt_dir)
    n = min(window, len(losses) // 2)
    summary = {"steps": second["steps"], "resumed_from_step": second["resumed_from_step"],
               "loss_first_window": sum(losses[:n]) / n, "loss_last_window": sum(losses[-n:]) / n, "window": n,
               "base_loss_last_window": sum(_losses(base_dir)[-n:]) / n, "plots": plots,
               "eval_report": str(out / "eval" / "report.json"), "export": second["export"],
               "attention_context": report["checkpoints"]["ttt"]["attention_context"],
               "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[5/5] TTT run loss: first {n} steps {summary['loss_first_window']:.3f}, last {n} steps "
          f"{summary['loss_last_window']:.3f} (base model, last {n}: {summary['base_loss_last_window']:.3f}); "
          f"summary {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return summary
