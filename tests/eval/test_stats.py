"""eval/stats.py against hand-computed values, brute-force enumeration, and synthetic NLL curves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ttt_speech.eval.stats import (
    cluster_bootstrap,
    contrast_spans,
    mean_ci95,
    paired_differences,
    slope_vs_log_position,
    small_sample_factor,
    span_mean,
    speaker_from_name,
    t_interval,
    window_contrast,
)


def test_t_interval_by_hand() -> None:
    m, half, n = mean_ci95([1.0, 2.0, 3.0, float("nan")])
    assert (m, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-9)
    est = t_interval([1.0, 2.0, 3.0])
    assert est.ci95 == pytest.approx([2.0 - 4.303 / math.sqrt(3), 2.0 + 4.303 / math.sqrt(3)])
    assert t_interval([1.0, 2.0]).ci95 is None  # fewer than 3: no CI


def test_paired_differences_and_spans_by_hand() -> None:
    diff = paired_differences([2.0, 3.0, 5.0, 1.0], [1.5, 3.5, 4.0, float("nan")])
    assert diff[:3].tolist() == [0.5, -0.5, 1.0] and math.isnan(diff[3])
    assert t_interval(diff).mean == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same documents"):
        paired_differences([1.0, 2.0], [1.0])
    nll = np.array([9.0, 9.0, 1.0, 3.0, 2.0, 4.0, 6.0])
    assert contrast_spans(4) == ((2, 4), (4, None))
    assert window_contrast(nll, 4) == pytest.approx((2 + 4 + 6) / 3 - (1 + 3) / 2)  # 4 - 2
    assert window_contrast(nll, 4, before_start=0) == pytest.approx(4 - 22 / 4)
    assert math.isnan(window_contrast(nll[:4], 4))  # the document ends at the window
    nll[5] = np.nan
    assert span_mean(nll, 4) == pytest.approx(4.0)  # (2 + 6) / 2: NaN frames are not frames


def test_cluster_bootstrap_matches_brute_force_enumeration() -> None:
    values = [1.0, 3.0, 4.0, 7.0, float("nan"), 2.0]
    speakers = ["a", "a", "b", "c", "c", "d"]  # the NaN document leaves speaker c one document
    # every equally likely draw of 4 clusters out of {a: [1, 3], b: [4], c: [7], d: [2]}, with replacement, in order
    docs = {"a": [1.0, 3.0], "b": [4.0], "c": [7.0], "d": [2.0]}
    exact = np.array([np.mean([x for c in draw for x in docs[c]]) for draw in itertools.product(docs, repeat=4)])
    assert exact.size == 256
    est = cluster_bootstrap(values, speakers, n_boot=100_000, seed=1, widen=False)
    assert est.mean == pytest.approx(3.4) and (est.n, est.n_clusters) == (5, 4)  # (1 + 3 + 4 + 7 + 2) / 5
    # exact percentiles: P(mean <= 2) = 16/256 > 2.5%; P(mean <= 5.5) = 0.965 < 97.5% < P(mean <= 5.75) = 0.980
    exact_lo, exact_hi = np.quantile(exact, [0.025, 0.975], method="inverted_cdf")
    assert (exact_lo, exact_hi) == (2.0, 5.75)  # 2.0: e.g. a, a, a, a; 5.75: c, c, c, d = (7 + 7 + 7 + 2) / 4
    assert est.ci95 == pytest.approx([exact_lo, exact_hi])
    again = cluster_bootstrap(values, speakers, n_boot=100_000, seed=1, widen=False)
    assert again == est  # deterministic given the seed
    # widened: each side stretched around the mean by t_3 / z * sqrt(4 / 3) = 3.182 / 1.96 * 1.1547 = 1.8747
    wide = cluster_bootstrap(values, speakers, n_boot=100_000, seed=1)
    assert small_sample_factor(4) == pytest.approx(3.182 / 1.959964 * math.sqrt(4 / 3))
    assert wide.ci95 == pytest.approx([3.4 - 1.8747 * (3.4 - 2.0), 3.4 + 1.8747 * (5.75 - 3.4)], rel=1e-4)


def test_cluster_bootstrap_covers_95_percent_with_few_clusters() -> None:
    """On null data (true mean 0), 400 draws of 4 speakers x 3 documents: the widened interval covers ~95%; the
    plain percentile interval ~78% (a test that fails without the correction)."""
    rng = np.random.default_rng(0)
    hits = {True: 0, False: 0}
    for i in range(400):
        values = np.repeat(rng.normal(0.0, 1.0, 4), 3) + rng.normal(0.0, 0.5, 12)
        speakers = np.repeat(np.arange(4), 3).tolist()
        for widen in (True, False):
            est = cluster_bootstrap(values, speakers, n_boot=1000, seed=i, widen=widen)
            hits[widen] += est.lo <= 0.0 <= est.hi
    assert hits[True] / 400 > 0.91 and hits[False] / 400 < 0.85


def test_fewer_than_three_clusters_has_no_ci() -> None:
    est = cluster_bootstrap([1.0, 2.0, 3.0, 4.0], ["a", "a", "b", "b"])
    assert est.mean == 2.5 and est.ci95 is None and (est.n, est.n_clusters) == (4, 2)
    assert not est.excludes_zero()
    assert cluster_bootstrap([float("nan")], ["a"]).n == 0


def test_documents_of_one_speaker_are_not_independent() -> None:
    rng = np.random.default_rng(0)
    effects = rng.normal(0.0, 1.0, 4)
    values = np.repeat(effects, 5) + rng.normal(0.0, 0.01, 20)  # 4 speakers x 5 near-identical documents
    speakers = np.repeat(["s0", "s1", "s2", "s3"], 5).tolist()
    naive = t_interval(values)  # treats the 20 documents as independent
    clustered = cluster_bootstrap(values, speakers)
    assert clustered.hi - clustered.lo > 1.5 * (naive.hi - naive.lo)


def synthetic_curves(step: float, n_speakers: int = 6, docs_per_speaker: int = 3, T: int = 1200, window: int = 300,
                     seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Per-frame NLL: a speaker level, a warm-up over the first frames, frame noise, and `step` nats from the
    window on."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    curves, speakers = [], []
    for s in range(n_speakers):
        level = 3.0 + rng.normal(0.0, 0.5)
        for _ in range(docs_per_speaker):
            curve = level + 1.5 * np.exp(-t / 30) + step * (t >= window) + rng.normal(0.0, 0.3, T)
            curves.append(curve)
            speakers.append(f"spk{s}")
    return curves, speakers


def test_a_step_at_the_window_is_seen_by_the_contrast_and_missed_by_the_all_frames_slope() -> None:
    W = 300
    curves, speakers = synthetic_curves(step=0.10, window=W)
    contrast = cluster_bootstrap([window_contrast(c, W) for c in curves], speakers)
    assert contrast.mean == pytest.approx(0.10, abs=0.02) and contrast.lo > 0.05
    past = cluster_bootstrap([slope_vs_log_position(c, start=W) for c in curves], speakers)
    assert abs(past.mean) < 0.02  # flat past the window: the warm-up does not leak into the fit
    old = cluster_bootstrap([slope_vs_log_position(c) for c in curves], speakers)
    assert old.hi < 0  # the old slope says "NLL falls with position": the warm-up hides the step entirely


def test_paired_contrast_sees_what_unpaired_cis_cannot() -> None:
    W = 300
    base, speakers = synthetic_curves(step=0.10, window=W, seed=0)
    rng = np.random.default_rng(5)
    ttt = [c - 0.10 * (np.arange(c.size) >= W) + rng.normal(0.0, 0.05, c.size) for c in base]  # no step
    past = lambda curves: [span_mean(c, W) for c in curves]
    b, t = cluster_bootstrap(past(base), speakers), cluster_bootstrap(past(ttt), speakers)
    assert b.lo < t.hi and t.lo < b.hi  # unpaired: the two CIs overlap (speaker levels vary by ~0.5 nats)
    diff = cluster_bootstrap(paired_differences(past(ttt), past(base)), speakers)
    assert diff.mean == pytest.approx(-0.10, abs=0.01) and diff.hi < 0


def test_slope_fit_recovers_a_known_slope_past_a_start() -> None:
    pos = np.arange(500, dtype=np.float64)
    nll = 3.0 - 0.25 * np.log1p(pos)
    nll[::7] = np.nan
    assert slope_vs_log_position(nll) == pytest.approx(-0.25, abs=1e-12)
    nll[:100] = 50.0  # anything before `start` is ignored
    assert slope_vs_log_position(nll, start=100) == pytest.approx(-0.25, abs=1e-12)
    assert math.isnan(slope_vs_log_position(nll, start=499))


def test_speaker_from_file_name() -> None:
    assert speaker_from_name("/x/long/1089_003.wav") == "1089"
    assert speaker_from_name("a_b_12.wav") == "a_b"
    assert speaker_from_name("alice.wav") is None
