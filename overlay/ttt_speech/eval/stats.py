"""Statistics for evaluations: paired contrasts, cluster bootstrap, slopes past the attention window.

Pure numpy (no torch, no moshi), so benchmarks and tests can use it anywhere.

- `cluster_bootstrap`: the mean over documents with a CI from resampling *clusters* (documents of one speaker, or
  of one book) with replacement, widened for few clusters. Documents of a cluster are not independent; treating
  them as such gives intervals that are too narrow. Fewer than `min_clusters` clusters: no CI (None).
- `paired_differences`: per-document differences of two checkpoints on the same documents. Differences remove the
  between-document variance that unpaired CIs keep, so they see much smaller effects.
- `window_contrast`: per document, the mean NLL past the attention window minus the mean of the frames just before
  it. A model that forgets shows a step up (> 0); one that remembers, none or a step down.
- `slope_vs_log_position(nll, start=window)`: the slope fitted only past the window. Fitted from frame 0 instead,
  the warm-up (the first frames' high NLL, high leverage on a log axis) dominates and hides a step at the window.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

MIN_CLUSTERS = 3
DEFAULT_BOOTSTRAP = 10000

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t: a table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (error < 1e-3)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and the half-width of its 95% confidence interval (Student t), ignoring NaN; (nan, nan, 0) if empty,
    half-width nan for one value. For independent samples only (seeds, not documents of one speaker)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)), int(v.size)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with its 95% CI `[lo, hi]` (None where it is not given), over `n` values in `n_clusters` clusters."""

    mean: float
    lo: float | None
    hi: float | None
    n: int
    n_clusters: int

    @property
    def ci95(self) -> list[float] | None:
        return None if self.lo is None or self.hi is None else [self.lo, self.hi]

    def excludes_zero(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)


def t_interval(values: Sequence[float], min_n: int = MIN_CLUSTERS) -> Estimate:
    """Mean and Student-t 95% CI of independent values (NaN ignored); no CI for fewer than `min_n` values."""
    mean, half, n = mean_ci95(list(values))
    if n < min_n or math.isnan(half):
        return Estimate(mean, None, None, n, n)
    return Estimate(mean, mean - half, mean + half, n, n)


def small_sample_factor(n_clusters: int) -> float:
    """How much `cluster_bootstrap` widens the percentile interval around the mean with G clusters:
    t_{G-1, 0.975} / z_{0.975} * sqrt(G / (G - 1)), the small-sample correction of the cluster-robust variance
    (CR1, G - 1 degrees of freedom). 2.69 for G = 3, 1.87 for 4, 1.22 for 10, 1.05 for 40."""
    return t975(n_clusters - 1) / 1.959964 * math.sqrt(n_clusters / (n_clusters - 1))


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[Hashable], n_boot: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0, min_clusters: int = MIN_CLUSTERS, widen: bool = True) -> Estimate:
    """The mean of `values` over documents, with a 95% cluster-bootstrap CI.

    Each bootstrap replicate draws as many clusters as there are, with replacement, and takes the mean over all
    documents of the drawn clusters (a cluster drawn twice counts twice). NaN values are dropped first (with their
    document); a cluster left without documents is no longer a cluster.

    The plain percentile interval [q_2.5%, q_97.5%] of the replicates covers far less than 95% with few clusters
    (measured on null data, 3 documents per cluster: 78% with 4 clusters, 86% with 6, 92% with 10 and 20;
    `scripts/bench_cluster_ci.py`, docs/eval.md). With `widen` (default), its two sides are stretched around the
    mean by `small_sample_factor`, which keeps the bootstrap's asymmetry and restores the coverage of a t-interval
    over clusters (94-96% there).

    Args:
        values: one value per document, of shape [D].
        clusters: the cluster of each document (e.g. its speaker), of length D.
        n_boot: replicates.
        seed: the resampling seed (the CI is deterministic given it).
        min_clusters: below this many clusters, the CI is None.
        widen: apply the small-sample correction (False: the plain percentile interval).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(clusters) != v.shape[0]:
        raise ValueError(f"values must be [D] with one cluster each, got {list(v.shape)} and {len(clusters)} clusters")
    ok = ~np.isnan(v)
    v = v[ok]
    labels = [c for c, keep in zip(clusters, ok, strict=True) if keep]
    if v.size == 0:
        return Estimate(math.nan, None, None, 0, 0)
    names = sorted(set(labels), key=str)
    index = {c: i for i, c in enumerate(names)}
    ids = np.asarray([index[c] for c in labels])
    sums = np.bincount(ids, weights=v, minlength=len(names))  # [G]
    sizes = np.bincount(ids, minlength=len(names)).astype(np.float64)  # [G]
    mean = float(v.mean())
    G = len(names)
    if G < min_clusters:
        return Estimate(mean, None, None, int(v.size), G)
    counts = _draw_counts(G, n_boot, seed)  # [n_boot, G]: how often each cluster was drawn
    boot = (counts @ sums) / (counts @ sizes)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    if widen:
        c = small_sample_factor(G)
        lo, hi = mean + c * (lo - mean), mean + c * (hi - mean)
    return Estimate(mean, float(lo), float(hi), int(v.size), G)


@functools.lru_cache(maxsize=64)
def _draw_counts(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, G] float: per replicate, how often each of G clusters is drawn in G draws with replacement.

    Cached (read-only): a report makes hundreds of estimates over the same speakers."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)
    counts.flags.writeable = False
    return counts


def paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """a - b per document, of shape [D]; NaN where either is NaN (a document missing from one side)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two [D] arrays of the same documents, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    return a - b


def span_mean(nll: np.ndarray, lo: int, hi: int | None = None) -> float:
    """Mean of the valid (non-NaN) frames lo <= t < hi of a [T] curve; NaN if there are none."""
    seg = np.asarray(nll, dtype=np.float64)[lo:hi]
    seg = seg[~np.isnan(seg)]
    return float(seg.mean()) if seg.size else math.nan


def contrast_spans(window: int, before_start: int | None = None) -> tuple[tuple[int, int], tuple[int, None]]:
    """The spans of `window_contrast`: before = [before_start, window) (default [window // 2, window)), after =
    [window, end). The first half of the window is left out: it holds the warm-up, whose high NLL would make any
    model look as if it improved past the window."""
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    start = window // 2 if before_start is None else before_start
    if not 0 <= start < window:
        raise ValueError(f"before_start must be in [0, {window}), got {start}")
    return (start, window), (window, None)


def window_contrast(nll: np.ndarray, window: int, before_start: int | None = None) -> float:
    """Mean NLL past the window minus mean NLL just before it, for one document's [T] curve; NaN if either span
    has no valid frame (e.g. the document ends before the window)."""
    (b0, b1), (a0, _) = contrast_spans(window, before_start)
    return span_mean(nll, a0) - span_mean(nll, b0, b1)


def slope_vs_log_position(nll: np.ndarray, start: int = 0) -> float:
    """Least-squares slope of NLL against log(position + 1), fitted on the valid frames t >= `start` of a [T]
    curve (positions stay absolute); NaN with fewer than 2 such frames."""
    nll = np.asarray(nll, dtype=np.float64)
    pos = np.arange(nll.shape[0], dtype=np.float64)
    ok = ~np.isnan(nll) & (pos >= start)
    if ok.sum() < 2:
        return math.nan
    x, y = np.log1p(pos[ok]), nll[ok]
    x = x - x.mean()
    denom = (x * x).sum()
    return float((x * (y - y.mean())).sum() / denom) if denom > 0 else math.nan


_SPEAKER_FILE = re.compile(r"^(?P<speaker>.+)_(?P<k>\d+)$")


def speaker_from_name(path: str | Path) -> str | None:
    """The speaker of a `<speaker>_<k>.<ext>` file (the naming of `ttt-speech data librilight`), else None."""
    m = _SPEAKER_FILE.match(Path(path).stem)
    return m.group("speaker") if m else None


def nan_mean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """np.nanmean without the all-NaN RuntimeWarning (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)
