"""The fair recall benchmark: can a Moshi-shaped model carry information past everything its attention can see?

A tiny Moshi-shaped model (the real `LMModel`: text + 2 + 2 audio codebooks with acoustic delays and a depformer)
is trained on sequences whose later part repeats an earlier random segment S:

    [ S (seg frames) | random filler (gap frames) | S again | random filler (tail frames) ]

Text tokens are uniform over `vocab` ids (4.., clear of moshi's special ids 0..3); audio codebook k repeats the
text token shifted by k, so it carries no extra information. A model that remembers S predicts the copy; one that
cannot see it is at chance, ln(vocab). Scored: the text NLL on the copy (its first token excepted: nothing
announces the copy) and on the filler.

The gap is larger than the window model's whole receptive field. Moshi masks attention per layer, so L layers
with context c reach L (c - 1) frames back, plus the acoustic delay and the one-frame input shift
(`receptive_field`); `tests/eval/test_recall.py` checks that the window model's logits on the copy are
bit-identical when S is replaced, at initialisation and after training, and that full attention's are not.

Variants (`VARIANTS`), all from the same initialisation (`build_lm(seed)`, TTT parameters seeded too) and the same
data order per seed:
- window: attention context `context` frames (blind to S on the copy, proven by the test);
- full: unlimited attention (the oracle);
- inplace: window + In-Place TTT with Moshi's default conv (centred, kernel 5) and target `target`;
- inplace_next: window + In-Place TTT with the next-token conv (kernel 2);
- ttt_linear, ttt_mlp: window + the gated TTT-Linear / TTT-MLP block with ttt-lm-pytorch's layer options (the
  reference preset; the recall preset is `scripts/ablate_ttt_block.py`'s).

Statistics (`summarize`): per variant and seed the mean copy NLL over the same evaluation sequences; across seeds
the mean with a Student-t 95% CI. Paired against the window model: per seed, the difference of the two means (same
sequences, same initialisation, same data order), then a t-interval over seeds. Gap closed,
(window - variant) / (window - full), is computed per seed and given with a t-interval over seeds. The unit of
replication is the training seed; evaluation sequences only reduce the noise within a seed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt_speech.eval.nll import frame_nll
from ttt_speech.eval.stats import Estimate, t_interval
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, tiny_lm_kwargs
from ttt_speech.train.loss import moshi_loss

VARIANTS = ("window", "full", "inplace", "inplace_next", "ttt_linear", "ttt_mlp")
FIRST_TEXT_ID = 4  # moshi's text ids 0..3 are special (end-of-pad, bos, eos, pad)


@dataclasses.dataclass
class RecallConfig:
    """The synthetic task, the model, and the training budget.

    Args:
        seg, tail: frames of S and of the filler after its copy.
        gap: frames between the end of S and the start of its copy; None means `receptive_field + margin`. A gap
            inside the window model's receptive field is refused.
        margin: frames of the default gap beyond the receptive field.
        vocab: text tokens drawn uniformly (chance NLL ln(vocab)).
        dim, num_heads, layers, hidden_scale, context: the main transformer (context: the window, in frames).
        ttt_layers: layers that host TTT.
        chunk: In-Place chunk size and the TTT block's mini-batch size.
        inplace_lr: In-Place's eta. target: In-Place's target ("token_embeddings", or what `MoshiTTTConfig`
            accepts).
        block_base_lr, block_gate_init: the TTT block's eta base and tanh gate at init.
        steps, batch, lr, warmup: AdamW training (linear warm-up, then constant: a curve that flattens did so
            on its own, not because the learning rate went to zero).
        eval_sequences: fixed evaluation sequences (the same for every variant and seed).
        eval_seed: their generator seed.
    """

    seg: int = 16
    gap: int | None = None
    margin: int = 8
    tail: int = 8
    vocab: int = 32
    dim: int = 64
    num_heads: int = 4
    layers: int = 4
    hidden_scale: float = 2.0
    context: int = 8
    ttt_layers: tuple[int, ...] = (1, 3)
    chunk: int = 16
    inplace_lr: float = 1.0
    target: str = "token_embeddings"
    block_base_lr: float = 1.0
    block_gate_init: float = 0.1
    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 30
    eval_sequences: int = 256
    eval_seed: int = 10_000

    def __post_init__(self) -> None:
        self.ttt_layers = tuple(self.ttt_layers)
        for name in ("seg", "tail", "vocab", "layers", "context", "chunk", "steps", "batch", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"recall config: {name} must be >= 1, got {getattr(self, name)}")
        if self.seg < 2:
            raise ValueError(f"recall config: seg must be >= 2 (the copy's first token is not scored), got {self.seg}")
        rf = receptive_field(self.lm_kwargs("window"))
        if self.gap is None:
            self.gap = rf + self.margin
        if self.gap <= rf:
            raise ValueError(f"recall config: gap {self.gap} frames is inside the window model's receptive field "
                             f"({rf} frames = {self.layers} layers x (context {self.context} - 1) + delays); the "
                             f"window model could see S. Use gap > {rf}")

    @property
    def length(self) -> int:
        return 2 * self.seg + self.gap + self.tail

    @property
    def copy_start(self) -> int:
        return self.seg + self.gap

    @property
    def chance(self) -> float:
        return math.log(self.vocab)

    def lm_kwargs(self, variant: str) -> dict[str, Any]:
        """`LMModel` arguments: Moshi's structure at 2 + 2 codebooks (delays 0 / 1 as Moshi's first two)."""
        return tiny_lm_kwargs(dim=self.dim, num_heads=self.num_heads, num_layers=self.layers,
                              hidden_scale=self.hidden_scale, context=None if variant == "full" else self.context,
                              text_card=FIRST_TEXT_ID + self.vocab, card=FIRST_TEXT_ID + self.vocab + 4, n_q=4,
                              dep_q=2, delays=[0, 0, 1, 0, 1], depformer_num_layers=1)

    def ttt_config(self, variant: str) -> MoshiTTTConfig | None:
        layers = list(self.ttt_layers)
        if variant in ("window", "full"):
            return None
        if variant in ("inplace", "inplace_next"):
            conv = "centred" if variant == "inplace" else "next"
            return MoshiTTTConfig(kind="inplace", layers=layers, chunk_size=self.chunk, lr=self.inplace_lr, conv=conv,
                                  target=self.target)
        if variant in ("ttt_linear", "ttt_mlp"):
            return MoshiTTTConfig(kind="block", layers=layers, ttt_layer_type=variant.removeprefix("ttt_"),
                                  ttt_mini_batch_size=self.chunk, ttt_num_heads=self.num_heads,
                                  ttt_base_lr=self.block_base_lr, gate_init=self.block_gate_init,
                                  # ttt-lm-pytorch's layer (the reference preset), as these runs were made; the
                                  # block's recall preset is the ablation's (scripts/ablate_ttt_block.py)
                                  ttt_share_qk=False, ttt_options={})
        raise ValueError(f"unknown recall variant {variant!r}; known: {', '.join(VARIANTS)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ttt_layers"] = list(self.ttt_layers)
        return d

    def relevant(self, variant: str) -> dict[str, Any]:
        """`to_dict` without the fields that do not change `variant` (a cached window run serves every target)."""
        return relevant_fields(self.to_dict(), variant)


INPLACE_FIELDS = ("chunk", "inplace_lr", "target")
BLOCK_FIELDS = ("chunk", "block_base_lr", "block_gate_init")


def relevant_fields(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """`config` without the TTT fields `variant` does not use."""
    if variant in ("window", "full"):
        drop = {"ttt_layers", *INPLACE_FIELDS, *BLOCK_FIELDS}
    elif variant.startswith("inplace"):
        drop = set(BLOCK_FIELDS) - set(INPLACE_FIELDS)
    else:
        drop = set(INPLACE_FIELDS) - set(BLOCK_FIELDS)
    return {k: v for k, v in config.items() if k not in drop}


def receptive_field(lm_kwargs: dict[str, Any]) -> int:
    """Frames back from a predicted frame t to the earliest code frame that can reach its logits, for a moshi
    `LMModel` built with `lm_kwargs`: each of the L layers attends `context - 1` frames back, the input at
    position p holds frame p - 1 - delay (moshi prepends an initial token and delays the audio codebooks), and
    a codebook with delay d is predicted at position t + d. So frames before t - receptive_field cannot change
    any logit at frame t or later. Raises for unlimited attention (context None)."""
    context = lm_kwargs.get("context")
    if context is None:
        raise ValueError("unlimited attention (context None) has no finite receptive field")
    return lm_kwargs["num_layers"] * (context - 1) + 1 + max(lm_kwargs["delays"])


def make_batch(g: torch.Generator, cfg: RecallConfig, batch: int) -> torch.Tensor:
    """Codes of shape [batch, 5, length]: text, then 2 + 2 audio codebooks (text + k mod card)."""
    text = torch.randint(FIRST_TEXT_ID, FIRST_TEXT_ID + cfg.vocab, (batch, cfg.length), generator=g)
    text[:, cfg.copy_start:cfg.copy_start + cfg.seg] = text[:, :cfg.seg]
    card = FIRST_TEXT_ID + cfg.vocab + 4
    audio = (text[:, None, :] + torch.arange(4).view(1, -1, 1)) % card
    return torch.cat([text[:, None], audio], dim=1)


def copy_slice(cfg: RecallConfig) -> slice:
    """The scored frames of the copy (its first token announces the copy and cannot be predicted)."""
    return slice(cfg.copy_start + 1, cfg.copy_start + cfg.seg)


def filler_slice(cfg: RecallConfig) -> slice:
    return slice(cfg.seg, cfg.copy_start)


def build_variant(variant: str, cfg: RecallConfig, seed: int) -> torch.nn.Module:
    """The model of `variant`: the base model from `build_lm(seed)` (identical for every variant), plus TTT whose
    new parameters are initialised from `seed` too."""
    model = build_lm(cfg.lm_kwargs(variant), seed=seed)
    ttt = cfg.ttt_config(variant)
    if ttt is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            apply_ttt(model, ttt)
        finally:
            torch.random.set_rng_state(state)
    return model


def text_copy_nll(out, codes: torch.Tensor, cfg: RecallConfig) -> torch.Tensor:
    """Per-sequence mean text NLL on the scored copy frames, from an `LMOutput`: [B]."""
    sl = copy_slice(cfg)
    logits = out.text_logits[:, 0, sl].float()  # [B, seg - 1, V]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), codes[:, 0, sl], reduction="none").mean(1)


def train(model: torch.nn.Module, cfg: RecallConfig, seed: int, steps: int | None = None,
          progress: str | None = None) -> dict[str, list[float]]:
    """AdamW on fresh random sequences (the data order depends on `seed` only). Returns the per-step training loss
    and the text NLL on the copy of each step's batch (sequences never seen before: the curve is held-out)."""
    steps = cfg.steps if steps is None else steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    curve: dict[str, list[float]] = {"loss": [], "copy_nll": []}
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        codes = make_batch(g, cfg, cfg.batch)
        out = model(codes)
        loss, _ = moshi_loss(out, codes, text_padding_id=3, first_codebook_weight_multiplier=1.0,
                             text_padding_weight=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve["loss"].append(loss.item())
        curve["copy_nll"].append(text_copy_nll(out, codes, cfg).mean().item())
        if progress and (step + 1) % 100 == 0:
            print(f"  {progress} step {step + 1}/{steps}: copy NLL {np.mean(curve['copy_nll'][-50:]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return curve


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: RecallConfig, batch: int = 32) -> dict[str, list[float]]:
    """Per-sequence mean text NLL on the copy and on the filler, over the fixed evaluation sequences."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.eval_seed)
    copy, filler = [], []
    left = cfg.eval_sequences
    while left > 0:
        codes = make_batch(g, cfg, min(batch, left))
        left -= codes.shape[0]
        nll = frame_nll(model, codes, mode="parallel")[:, 0]  # text, [B, T]
        copy += nll[:, copy_slice(cfg)].mean(1).tolist()
        filler += nll[:, filler_slice(cfg)].nanmean(1).tolist()
    return {"copy_nll": copy, "filler_nll": filler}


def flattened(curve: Sequence[float], frac: float = 0.1, tol: float = 0.05) -> tuple[bool, float]:
    """Has a training curve flattened? The mean of its last `frac` of steps minus that of the `frac` before:
    (|change| <= tol, change)."""
    n = max(1, int(len(curve) * frac))
    if len(curve) < 2 * n:
        return False, math.nan
    change = float(np.mean(curve[-n:]) - np.mean(curve[-2 * n:-n]))
    return abs(change) <= tol, change


def run_one(variant: str, seed: int, cfg: RecallConfig, out: Path | None = None, threads: int | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Train and evaluate one (variant, seed); written to `out/runs/<variant>-s<seed>.json` when `out` is given
    (an existing file whose config agrees on every field the variant uses is reused, so an interrupted benchmark
    resumes, and window / full runs serve every TTT setting)."""
    path = None if out is None else Path(out) / "runs" / f"{variant}-s{seed}.json"
    if path is not None and path.is_file():
        done = json.loads(path.read_text())
        if relevant_fields(done.get("config", {}), variant) == cfg.relevant(variant):
            return done
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build_variant(variant, cfg, seed)
    curve = train(model, cfg, seed, progress=f"{variant} seed {seed}" if progress else None)
    train_s = time.perf_counter() - t0
    result = {"variant": variant, "seed": seed, "config": cfg.to_dict(), "train_seconds": round(train_s, 1),
              "curve": curve, **evaluate(model, cfg)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def _run_one_job(args: tuple) -> dict[str, Any]:
    variant, seed, cfg_dict, out, threads = args
    return run_one(variant, seed, RecallConfig(**cfg_dict), out, threads=threads, progress=True)


def run_benchmark(cfg: RecallConfig, variants: Sequence[str], seeds: Sequence[int], out: Path, jobs: int = 1,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """Every (variant, seed), in `jobs` processes; results in the order of `variants` then `seeds`."""
    for v in variants:
        cfg.ttt_config(v)  # unknown names fail before any training
    todo = [(v, s, cfg.to_dict(), out, threads) for s in seeds for v in variants]
    if jobs <= 1:
        results = [_run_one_job(t) for t in todo]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(_run_one_job, todo))
    order = {(v, s): i for i, (v, s) in enumerate((v, s) for v in variants for s in seeds)}
    return sorted(results, key=lambda r: order[r["variant"], r["seed"]])


def _est(e: Estimate) -> dict[str, Any]:
    return {"mean": e.mean, "ci95": e.ci95, "n": e.n}


def summarize(results: Sequence[dict[str, Any]], reference: str = "window", oracle: str = "full",
              metric: str = "copy_nll", curve: str = "copy_nll", extra: Sequence[str] = ("filler_nll",)
              ) -> dict[str, Any]:
    """Per variant: `metric` (mean over seeds, t CI), the paired difference against `reference` (per seed, then t
    over seeds), the gap closed `(reference - variant) / (reference - oracle)` (per seed, then t over seeds; only
    where the CI of the gap `reference - oracle` excludes 0, else its mean is None), the `extra` metrics, and
    whether each seed's training `curve` flattened. Seeds are paired by their seed number.
    Each result holds `variant`, `seed`, `train_seconds`, `curve`, and per evaluation item the values of `metric`
    and `extra` (means are taken over items within a seed)."""
    by: dict[str, dict[int, dict]] = {}
    for r in results:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    mean = {v: {s: float(np.nanmean(r[metric])) for s, r in runs.items()} for v, runs in by.items()}
    rows = {}
    for v, runs in by.items():
        seeds = sorted(runs)
        row: dict[str, Any] = {
            "seeds": seeds,
            metric: _est(t_interval([mean[v][s] for s in seeds])),
            f"{metric}_per_seed": [mean[v][s] for s in seeds],
            **{k: _est(t_interval([float(np.nanmean(runs[s][k])) for s in seeds])) for k in extra},
            "train_seconds": float(np.mean([runs[s]["train_seconds"] for s in seeds])),
            "flattened": [flattened(runs[s]["curve"][curve])[0] for s in seeds],
            "last_change": [flattened(runs[s]["curve"][curve])[1] for s in seeds],
        }
        if reference in mean and v != reference:
            paired = [s for s in seeds if s in mean[reference]]
            diff = [mean[v][s] - mean[reference][s] for s in paired]
            row["diff_vs_" + reference] = {**_est(t_interval(diff)), "per_seed": diff}
            if oracle in mean:
                both = [s for s in paired if s in mean[oracle]]
                gap = t_interval([mean[reference][s] - mean[oracle][s] for s in both])
                if gap.lo is not None and gap.lo > 0:
                    ratio = [(mean[reference][s] - mean[v][s]) / (mean[reference][s] - mean[oracle][s])
                             for s in both]
                    row["gap_closed"] = {**_est(t_interval(ratio)), "per_seed": ratio}
                else:  # a ratio over a gap that may be zero measures nothing
                    row["gap_closed"] = {"mean": None, "ci95": None, "n": len(both), "per_seed": None,
                                         "note": f"{oracle} does not beat {reference} (CI of the gap includes 0)"}
        rows[v] = row
    return rows


def format_table(summary: dict[str, Any], chance: float | None = None, metric: str = "copy_nll",
                 label: str = "copy NLL", extra: str | None = "filler_nll") -> str:
    def ci(e: dict) -> str:
        return "n/a" if e["ci95"] is None else f"[{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"

    lines = [f"{'variant':<13} {label:>12} {'95% CI':>17} {'vs window':>9} {'95% CI':>17} {'gap closed':>10} "
             f"{'95% CI':>17} {'' if extra is None else extra.split('_')[0]:>7} {'flat':>5} {'train s':>7}"]
    for v, row in summary.items():
        d, g = row.get("diff_vs_window"), row.get("gap_closed")
        lines.append(
            f"{v:<13} {row[metric]['mean']:>12.3f} {ci(row[metric]):>17} "
            f"{'' if d is None else format(d['mean'], '+.3f'):>9} {'' if d is None else ci(d):>17} "
            f"{'' if g is None else 'n/a' if g['mean'] is None else format(g['mean'], '.2f'):>10} "
            f"{'' if g is None else ci(g):>17} "
            f"{'' if extra is None else format(row[extra]['mean'], '.3f'):>7} "
            f"{sum(row['flattened'])}/{len(row['flattened']):<3} {row['train_seconds']:>7.0f}")
    if chance is not None:
        lines.append(f"chance: ln(vocab) = {chance:.3f} nats")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], summary: dict[str, Any], cfg: RecallConfig, path: Path,
         smooth: int = 20) -> Path:
    """Training curves (copy NLL per step, mean over seeds and each seed faint) and the final copy NLL with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    kernel = np.ones(smooth) / smooth
    for i, v in enumerate(summary):
        color = f"C{i}"
        curves = [np.convolve(r["curve"]["copy_nll"], kernel, mode="valid") for r in results if r["variant"] == v]
        for c in curves:
            a.plot(np.arange(len(c)) + smooth, c, color=color, alpha=0.25, lw=0.8)
        a.plot(np.arange(len(curves[0])) + smooth, np.mean(curves, axis=0), color=color, label=v)
    a.axhline(cfg.chance, ls=":", color="gray", label="chance")
    a.set_xlabel("training step")
    a.set_ylabel(f"copy NLL, training batches ({smooth}-step mean)")
    a.set_title("training curves (each seed faint)")
    a.legend(fontsize=8)
    names = list(summary)
    means = [summary[v]["copy_nll"]["mean"] for v in names]
    err = [[0, 0] if summary[v]["copy_nll"]["ci95"] is None else
           [summary[v]["copy_nll"]["mean"] - summary[v]["copy_nll"]["ci95"][0],
            summary[v]["copy_nll"]["ci95"][1] - summary[v]["copy_nll"]["mean"]] for v in names]
    b.bar(names, means, yerr=np.array(err).T, capsize=4, color=[f"C{i}" for i in range(len(names))])
    b.axhline(cfg.chance, ls=":", color="gray")
    b.set_ylabel("copy NLL, evaluation (nats), 95% CI over seeds")
    b.set_title(f"recall {cfg.gap} frames back; window receptive field "
                f"{receptive_field(cfg.lm_kwargs('window'))} frames")
    b.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_compact(report: dict[str, Any], path: Path) -> Path:
    """`report` without its training curves (kilobytes, not megabytes: the file docs/eval.md quotes)."""
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "curves"}, indent=1) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    defaults = RecallConfig()
    ap = argparse.ArgumentParser(prog="bench_recall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/recall"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="processes (each with --threads threads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    for f in dataclasses.fields(RecallConfig):
        default = getattr(defaults, f.name) if f.name != "gap" else None
        flag = "--" + f.name.replace("_", "-")
        if f.name == "ttt_layers":
            ap.add_argument(flag, type=int, nargs="+", default=list(default))
        elif f.name == "target":
            ap.add_argument(flag, default=default, help="In-Place target (e.g. token_embeddings, input_embeddings)")
        else:
            kind = float if isinstance(default, float) else int
            ap.add_argument(flag, type=kind, default=default)
    args = ap.parse_args(argv)
    cfg = RecallConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RecallConfig)})
    rf = receptive_field(cfg.lm_kwargs("window"))
    print(f"recall benchmark: S {cfg.seg} frames, gap {cfg.gap} (window receptive field {rf}), sequences of "
          f"{cfg.length} frames, vocab {cfg.vocab}; {cfg.steps} steps x {cfg.batch}; variants {args.variants}, "
          f"seeds {args.seeds}", flush=True)
    results = run_benchmark(cfg, args.variants, args.seeds, args.out, jobs=args.jobs, threads=args.threads)
    summary = summarize(results)
    print(format_table(summary, cfg.chance))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": cfg.to_dict(), "receptive_field": rf, "chance_nll": cfg.chance, "seeds": args.seeds,
              "ci_method": "per-seed means over the fixed evaluation sequences, then Student t over seeds; paired "
                           "differences and gap closed computed per seed first",
              "summary": summary,
              "curves": {f"{r['variant']}-s{r['seed']}": r["curve"] for r in results}}
    (args.out / "recall.json").write_text(json.dumps(report, indent=1) + "\n")
    write_compact(report, args.out / "summary.json")
    png = plot(results, summary, cfg, args.out / "recall.png")
    print(f"wrote {args.out / 'recall.json'}, {args.out / 'summary.json'} (without the curves) and {png}")
    return report


if __name__ == "__main__":
    main()
