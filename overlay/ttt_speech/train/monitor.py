"""Per-TTT-layer monitoring to CSV, warnings on NaN or explosion, and plots of the CSV."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ttt_speech.integrations.moshi import ttt_modules

FIELDS = ["step", "layer", "kind", "w_mean", "w_std", "w_max_abs", "update_norm", "inner_loss", "eta_mean",
          "eta_max", "gate", "update_top_share", "update_eff_rank", "update_probe"]
DEGENERATE_SHARE = 0.95


class Monitor:
    """Asks each TTT module to record statistics of its next forward, and appends them to `ttt_stats.csv`.

    Warns when a statistic is not finite, when max |W| exceeds `explode` (default 1e3), and when an In-Place chunk
    update is degenerate: more than `degenerate` (95%) of its energy in one direction (`update_top_share`), i.e. the
    target has no content and the fast weight only sums activations. The first collection (training start) also
    prints each layer's top-direction share and effective rank, through `echo` (default `tqdm.write`: on a line of
    its own above the trainer's progress bar, which is cleared and redrawn around it).
    """

    def __init__(self, model, path: Path | None, explode: float = 1e3, degenerate: float = DEGENERATE_SHARE,
                 echo=None, modules: dict | None = None) -> None:
        self.modules = ttt_modules(model) if modules is None else modules  # by layer index; default: Moshi's
        self.path = path
        self.explode = explode
        self.degenerate = degenerate
        self.echo = echo or tqdm.write
        self.started = False
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(FIELDS)

    def arm(self) -> None:
        for m in self.modules.values():
            m.record_stats = True

    def collect(self, step: int) -> list[dict]:
        rows = []
        for idx, m in sorted(self.modules.items()):
            stats = getattr(m, "stats", None)
            m.record_stats, m.stats = False, None
            if not stats:
                continue
            row = {"step": step, "layer": idx, **{k: float(v) for k, v in stats.items() if k != "kind"},
                   "kind": stats["kind"]}
            bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                warnings.warn(f"step {step}: TTT layer {idx}: non-finite {', '.join(bad)}", stacklevel=2)
            if row.get("w_max_abs", 0.0) > self.explode:
                warnings.warn(f"step {step}: TTT layer {idx}: fast weights exploding (max |W| "
                              f"{row['w_max_abs']:.3g} > {self.explode:g}); lower ttt.lr or set ttt.clip_tau",
                              stacklevel=2)
            if row.get("update_top_share", 0.0) > self.degenerate:
                what = ("the target source has no content within a chunk (ttt.target: token_embeddings is all "
                        "padding on untranscribed audio; use input_embeddings)" if row.get("update_probe") else
                        "the fast weight mostly adds one fixed direction (expected for the first steps, while the "
                        "conv learns to remove the chunk mean; persistent, it means the target carries no content)")
                warnings.warn(f"step {step}: TTT layer {idx}: degenerate chunk update, {row['update_top_share']:.1%} "
                              f"of its energy in one direction (effective rank {row['update_eff_rank']:.2f}): {what}",
                              stacklevel=2)
            rows.append(row)
        spectra = [r for r in rows if "update_top_share" in r]
        if not self.started and spectra:
            self.started = True
            self.echo(f"TTT chunk updates at step {step}" + (" (probe, conv still zero)" if spectra[0].get(
                "update_probe") else "") + ": " + "; ".join(
                f"layer {r['layer']} top-direction share {r['update_top_share']:.1%}, effective rank "
                f"{r['update_eff_rank']:.1f}" for r in spectra))
        if self.path is not None and rows:
            with self.path.open("a", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in FIELDS})
        return rows


def plot_monitor(run_dir: str | Path) -> list[Path]:
    """PNG plots of `metrics.csv` (losses, lr, grad norm) and `ttt_stats.csv` (per layer) in `run_dir/plots/`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics to plot (has the run logged a step?)")
    rows = list(csv.DictReader(metrics.open()))
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "text_loss", "audio_loss", "kl", "hidden_mse", "ce"):  # Moshi's, then Llama's parts
        if key in rows[0] and not all(r[key] == "nan" for r in rows):
            axes[0].plot(steps, [float(r[key]) for r in rows], label=key)
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [float(r["lr"]) for r in rows])
    axes[1].set_title("lr (base group)")
    axes[2].plot(steps, [float(r["grad_norm"]) for r in rows])
    axes[2].set_title("grad norm (before clipping)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)
    written.append(out / "training.png")
    stats = run_dir / "ttt_stats.csv"
    if stats.is_file():
        srows = list(csv.DictReader(stats.open()))
        if srows:
            keys = ["w_max_abs", "update_norm", "inner_loss", "eta_mean", "gate", "update_top_share"]
            keys = [k for k in keys if any(r[k] for r in srows)]
            fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
            for ax, key in zip(axes[0], keys, strict=True):
                for layer in sorted({r["layer"] for r in srows}, key=int):
                    pts = [(int(r["step"]), float(r[key])) for r in srows if r["layer"] == layer and r[key]]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), label=f"layer {layer}")
                ax.set_title(key)
                ax.set_xlabel("step")
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "ttt_stats.png", dpi=100)
            plt.close(fig)
            written.append(out / "ttt_stats.png")
    return written
