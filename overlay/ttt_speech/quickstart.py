"""`ttt-speech quickstart` (`make quickstart`): the whole pipeline on the embedded tiny Moshi, on a CPU.

1. checks the patched moshi and that frame-by-frame streaming reproduces the parallel forward with In-Place TTT;
2. pre-encodes the sample set (espeak-ng dialogues and audiobook, built by `make samples`) with a tiny random Mimi;
3. fine-tunes a tiny TTT Moshi on the dialogues through submitit's local executor, stopped half-way (a checkpoint)
   and resumed by a second job, and a base model without TTT the same way in this process;
4. plots the monitoring CSVs, and ends with the eval-librilight report comparing the two on the audiobook;
5. prints the first and last loss windows and writes `summary.json`;
6. the spoken-recall benchmark in small (`run_recall`): a window model, the same with In-Place TTT, and full
   attention, trained on spoken-recall documents; the table of recall NLL on held-out documents (voices and content
   never trained on) past the window, the paired difference with its CI, the gap closed, and a plot.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ttt_speech.constants import FRAME_RATE
from ttt_speech.integrations import moshi as moshi_int
from ttt_speech.integrations.moshi_lm import moshi_location, moshi_version

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"
CROP_SEC = 8.0  # the quickstart's training crops: 100 frames at 12.5 Hz


class StepClock:
    """Wall and CPU seconds per quickstart step; CPU counts this process and its finished children (the submitit
    jobs), user + system, so that it bounds the wall time on an idle machine whatever the load now."""

    def __init__(self) -> None:
        self.last = self._now()
        self.startup_cpu = round(self.last[1], 1)  # the process before the clock: interpreter, torch, moshi imports
        self.steps: dict[str, dict[str, float]] = {}

    @staticmethod
    def _now() -> tuple[float, float]:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def lap(self, step: str) -> str:
        """Record the time since the last lap as `step`'s; returns "(W s wall, C s CPU)"."""
        now = self._now()
        wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        self.steps[step] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        return f"({wall:.0f} s wall, {cpu:.0f} s CPU)"

    def total(self) -> dict[str, float]:
        """The steps' wall time; CPU time since the process started."""
        return {"wall_s": round(sum(s["wall_s"] for s in self.steps.values()), 1),
                "cpu_s": round(self.startup_cpu + sum(s["cpu_s"] for s in self.steps.values()), 1)}


@contextlib.contextmanager
def threads_per_process(threads: int):
    """torch threads here and, through OMP_NUM_THREADS, in child processes; restored on exit. The tiny models'
    operations are too small to share between threads: on the 2-core machine under load, 20 training steps took
    48.7 s of CPU and 230 s of wall time at 2 threads (the extra threads spin), 2.9 s and 28 s at one."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def check_streaming(batch_size: int = 2, frames: int = 48, seed: int = 0, clock: StepClock | None = None) -> float:
    """Patched moshi present; In-Place TTT streaming frame by frame == the parallel forward. Returns max |diff|."""
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
    print(f"[1/6] moshi {moshi_version()} from {moshi_location()} (5 patches present); "
          f"In-Place TTT in layers {cfg.layers}, chunk {cfg.chunk_size}: frame-by-frame streaming vs parallel, "
          f"max |diff| {diff:.1e} (<= 1e-5)" + (f" {clock.lap('1')}" if clock else ""))
    if diff > 1e-5:
        raise RuntimeError(f"streaming and parallel disagree by {diff:.2e}")
    return diff


def run_recall(out: Path, seed: int = 0, steps: int = 250, documents: int | None = None,
               variants: tuple[str, ...] = ("window", "inplace", "full"),
               only_banks: list[tuple[str, int]] | None = None) -> dict:
    """The spoken-recall benchmark in small (`ttt_speech.eval.recall_spoken`, one seed): a tiny Moshi with a short
    window, and the same with In-Place TTT (and with full attention), trained on new documents drawn from the
    training voices and content, scored on the held-out documents (voices and content never trained on) where A is
    repeated past the window's whole receptive field. Prints the table and the paired In-Place - window difference
    on the repeat with a cluster-bootstrap CI over voices; returns the `recall` section of `summary.json`.

    Args:
        documents: score the first N held-out documents (all by default).
        only_banks: encode only these (voice, rate) word banks (a quick test).
    """
    from ttt_speech.eval import recall_spoken as rs
    from ttt_speech.eval.recall import receptive_field

    cfg = rs.SpokenRecallConfig(steps=steps)
    rf = receptive_field(cfg.lm_kwargs("window"))
    banks = rs.Banks(SAMPLES, cache=out / "codes", only=only_banks)
    docs = banks.heldout(rf, limit=documents)
    results = {}
    for v in variants:
        t0 = time.perf_counter()
        results[v] = rs.run_one(v, seed, cfg, banks, docs, out / "recall", progress=True)  # a bar per variant
        print(f"      recall: {v} trained {steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    ttt = next(v for v in variants if v not in ("window", "full"))
    mean = {v: {k: float(np.mean(r[k])) for k in rs.SCORES} for v, r in results.items()}
    diff = rs.paired_by_document(results[ttt], results["window"], "text_repeat")
    print(f"[6/6] spoken recall on {len(docs)} held-out documents ({len({d.voice for d in docs})} voices and content "
          f"never trained on; A repeated >= {min(d.distance for d in docs)} frames after its first mention, window "
          f"receptive field {rf} frames). NLL on the content (nats):")
    print(f"      {'variant':<13} {'text first':>10} {'repeat':>7} {'unrelated':>9} {'audio first':>11} {'repeat':>7} "
          f"{'unrelated':>9}")
    for v, m in mean.items():
        print(f"      {v:<13} {m['text_first']:>10.3f} {m['text_repeat']:>7.3f} {m['text_unrelated']:>9.3f} "
              f"{m['audio_first']:>11.3f} {m['audio_repeat']:>7.3f} {m['audio_unrelated']:>9.3f}")
    ci = "no CI (< 3 voices)" if diff.ci95 is None else f"95% CI [{diff.lo:+.3f}, {diff.hi:+.3f}]"
    section = {"window_nll": mean["window"]["text_repeat"], "ttt_nll": mean[ttt]["text_repeat"],
               "diff": diff.mean, "diff_ci95": diff.ci95, "n_documents": len(docs), "n_voices": diff.n_clusters,
               "ttt_variant": ttt, "receptive_field": rf, "steps": steps, "seed": seed,
               "audio": {v: {k: m[k] for k in ("audio_first", "audio_repeat", "audio_unrelated")}
                         for v, m in mean.items()},
               "text": {v: {k: m[k] for k in ("text_first", "text_repeat", "text_unrelated")}
                        for v, m in mean.items()}}
    line = f"      {ttt} - window on the repeat (text): {diff.mean:+.3f} nats, {ci} (paired by document, cluster " \
           f"bootstrap over voices; one training seed)"
    if "full" in mean:
        full = rs.paired_by_document(results["full"], results["window"], "text_repeat")
        section["full_nll"] = mean["full"]["text_repeat"]
        section["full_diff_ci95"] = full.ci95
        # a ratio over a gap that may be zero is no measurement: only when full attention beats the window
        section["gap_closed"] = None if full.hi is None or full.hi >= 0 else \
            (mean["window"]["text_repeat"] - mean[ttt]["text_repeat"]) / \
            (mean["window"]["text_repeat"] - mean["full"]["text_repeat"])
        line += f"\n      full - window: {full.mean:+.3f} nats" + ("" if full.ci95 is None else
                                                              f", 95% CI [{full.lo:+.3f}, {full.hi:+.3f}]")
        line += "; gap closed (window - {}) / (window - full) = {}".format(
            ttt, "n/a: full attention does not beat the window here" if section["gap_closed"] is None
            else f"{section['gap_closed']:.2f}")
    print(line)
    section["plot"] = str(_recall_plot(results, out / "recall" / "recall.png"))
    return section


def _recall_plot(results: dict[str, dict], path: Path) -> Path:
    """Held-out training curves (text NLL on the first mention and the repeat) and per-document NLL on each
    mention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (v, r) in enumerate(results.items()):
        a.plot(r["curve"]["eval_steps"], r["curve"]["eval_text_repeat"], color=f"C{i}", label=f"{v} repeat")
        a.plot(r["curve"]["eval_steps"], r["curve"]["eval_text_first"], ":", color=f"C{i}", label=f"{v} first")
        for j, m in enumerate(("first", "repeat", "unrelated")):
            x = i + (j - 1) * 0.27
            vals = r[f"text_{m}"]
            b.bar(x, np.mean(vals), 0.25, color=f"C{j}", alpha=0.6, label=m if i == 0 else None)
            b.plot(np.full(len(vals), x), vals, "k.", ms=3)
    a.set_xlabel("training step")
    a.set_ylabel("text NLL, held-out documents")
    a.legend(fontsize=8)
    b.set_xticks(range(len(results)), list(results))
    b.set_ylabel("text NLL on the content, held-out documents")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def run(out: str | Path = "runs/quickstart", steps: int = 200, window: int = 20, eval_max_frames: int | None = None,
        eval_step: int = 1, seed: int = 0, recall_steps: int = 250, recall_documents: int | None = None,
        recall_variants: tuple[str, ...] = ("window", "inplace", "full"),
        recall_banks: list[tuple[str, int]] | None = None, threads: int = 1) -> dict:
    """The quickstart (module docstring). `threads`: torch threads of this process and of the submitit jobs."""
    from ttt_speech.config import load_config
    from ttt_speech.data.codes import pre_encode
    from ttt_speech.eval import librilight
    from ttt_speech.launch.submit import SlurmConfig, submit
    from ttt_speech.train.config import TrainConfig
    from ttt_speech.train.monitor import plot_monitor
    from ttt_speech.train.trainer import train

    with threads_per_process(threads):  # the submitit jobs inherit OMP_NUM_THREADS
        clock = StepClock()
        out = Path(out).resolve()
        check_streaming(seed=seed, clock=clock)
        if not (SAMPLES / "samples.json").is_file():
            raise FileNotFoundError(f"sample set missing at {SAMPLES}: run `make samples` (make quickstart does)")
        codes = {}
        for name in ("dialogues", "audiobook"):
            codes[name] = out / "codes" / name
            if not (codes[name] / "index.json").is_file():
                pre_encode(SAMPLES / f"{name}.jsonl", codes[name], mimi="tiny-random")
        print(f"[2/6] sample set {SAMPLES}: dialogues (stereo) and audiobook (mono), Mimi codes in {out / 'codes'} "
              f"{clock.lap('2')}")

        config = REPO / "configs" / "tiny.yaml"
        # 8 s crops: 100 frames, 12 chunk updates of 8, far past the 32-frame window. The evaluation runs 2900 frames
        # (360 chunks): `ttt.decay` 0.9 (a horizon of ~10 chunks) keeps the fast weight in the range training visits
        # (unbounded, the paper's rule, the TTT model's NLL rose with position; docs/moshi_ttt.md, "The recipe").
        # `ttt.centre_update`: without it 73-93% of each chunk update lies in one direction, mostly the rank-one
        # chunk-mean term; centred, over 12 seeds the last-bin difference to the base has the same mean and a smaller
        # spread in text (docs/moshi_ttt.md, "Third round")
        common = [f"--data.train_data={SAMPLES / 'dialogues.jsonl'}", f"--data.tokenizer={SAMPLES / 'tokenizer.model'}",
                  f"--data.codes_dir={codes['dialogues']}", f"--duration_sec={CROP_SEC}", f"--max_steps={steps}",
                  f"--ckpt_freq={max(1, steps // 2)}", "--log_freq=1", f"--seed={seed}", "--ttt.decay=0.9",
                  "--ttt.centre_update=true"]
        ttt_dir, base_dir = out / "ttt", out / "base"
        local = SlurmConfig(cluster="local", time_min=30)
        first = submit(str(config), [*common, f"--run_dir={ttt_dir}", f"--stop_after={steps // 2}"], local).result()
        second = submit(str(config), [*common, f"--run_dir={ttt_dir}"], local).result()
        print(f"[3/6] TTT run {ttt_dir}: submitit job 1 {first['status']} at step {first['steps']} (checkpoint), "
              f"job 2 resumed from step {second['resumed_from_step']} to {second['steps']}")
        base = train(load_config(TrainConfig, config, [*common, f"--run_dir={base_dir}", "--ttt=null"]))
        print(f"      base run {base_dir} (no TTT): {base['steps']} steps {clock.lap('3')}")

        plots = [str(p) for p in plot_monitor(ttt_dir)]
        report = librilight.run([f"base={base_dir / 'export'}", f"ttt={ttt_dir / 'export'}"],
                                str(SAMPLES / "audiobook.jsonl"), str(SAMPLES / "tokenizer.model"), str(out / "eval"),
                                codes_dir=str(codes["audiobook"]), step=eval_step, bins=[50, 100, 200, 400, 800, 1600],
                                max_frames=eval_max_frames, print_paired=False)
        plots.append(str(out / "eval" / "nll_vs_position.png"))
        print(f"      {librilight.paired_line(report, 'ttt')}")  # one audiobook: a difference, not a CI
        last = report["checkpoints"]["ttt"]["paired"]["bins"][-1]
        last_bin = {s: last["streams"][s]["mean"] for s in ("text", "audio")}
        crop = round(CROP_SEC * FRAME_RATE)
        print(f"      ttt - base in the last bin (frames {last['lo']}-{last['hi']}, past the {crop}-frame training "
              f"crops): " + ", ".join("{} {}".format(s, "no data" if v is None else f"{v:+.3f}")
                                                for s, v in last_bin.items()))
        print(f"[4/6] plots: {', '.join(plots)} {clock.lap('4')}")

        losses = _losses(ttt_dir)
        n = min(window, len(losses) // 2)
        summary = {"steps": second["steps"], "resumed_from_step": second["resumed_from_step"],
                   "loss_first_window": sum(losses[:n]) / n, "loss_last_window": sum(losses[-n:]) / n, "window": n,
                   "base_loss_last_window": sum(_losses(base_dir)[-n:]) / n, "plots": plots,
                   "eval_report": str(out / "eval" / "report.json"), "export": second["export"],
                   "attention_context": report["checkpoints"]["ttt"]["attention_context"],
                   "last_bin": {"frames": [last["lo"], last["hi"]], **last_bin}}
        lap = clock.lap("5")
        summary.update(timing=clock.steps, seconds=clock.total()["wall_s"], cpu_seconds=clock.total()["cpu_s"])
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"[5/6] TTT run loss: first {n} steps {summary['loss_first_window']:.3f}, last {n} steps "
              f"{summary['loss_last_window']:.3f} (base model, last {n}: {summary['base_loss_last_window']:.3f}); "
              f"summary {out / 'summary.json'} {lap}")

        summary["recall"] = run_recall(out, seed=seed, steps=recall_steps, documents=recall_documents,
                                       variants=recall_variants, only_banks=recall_banks)
        summary["plots"].append(summary["recall"]["plot"])
        lap = clock.lap("6")
        summary.update(timing=clock.steps, seconds=clock.total()["wall_s"], cpu_seconds=clock.total()["cpu_s"])
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"      recall plot {summary['recall']['plot']} {lap}; summary {out / 'summary.json'}")
        print("      time per step (wall / CPU s, CPU: this process and its submitit jobs): " + ", ".join(
            f"{k} {v['wall_s']:.0f} / {v['cpu_s']:.0f}" for k, v in clock.steps.items()) +
              f"; total {summary['seconds']:.0f} / {summary['cpu_seconds']:.0f} (CPU including "
              f"{clock.startup_cpu:.0f} s of start-up before step 1)")
        return summary
