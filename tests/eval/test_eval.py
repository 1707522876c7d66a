"""Per-frame NLL and the eval-librilight report on tiny models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_speech.eval.librilight import (
    ALL_STREAMS,
    Aggregates,
    bin_edges,
    evaluate,
    mean_ci95,
    slope_vs_log_position,
    summarize,
)
from ttt_speech.eval.nll import _nll, frame_nll
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm


def codes_for(model, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (B, model.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, model.text_card, (B, T), generator=g)
    return codes


def test_nll_matches_a_hand_computed_example() -> None:
    logits = torch.tensor([[[[0.0, math.log(3.0)], [2.0, 2.0]]]])  # [B=1, K=1, T=2, V=2]
    target = torch.tensor([[[1, 0]]])
    mask = torch.tensor([[[True, False]]])
    nll = _nll(logits, target, mask)
    assert nll[0, 0, 0].item() == pytest.approx(-math.log(3 / 4))
    assert math.isnan(nll[0, 0, 1].item())


def test_delays_are_honoured() -> None:
    model = build_lm().eval()
    assert model.delays[0] == 0 and model.delays[2] == 1  # text undelayed, audio codebook 1 delayed by one frame
    codes = codes_for(model, 1, 12)
    base = frame_nll(model, codes, "parallel")
    # the last frame of a delayed codebook has no prediction inside the sequence
    assert torch.isnan(base[0, 2, -1]) and not torch.isnan(base[0, 0, -1])
    t = 5
    for shift, changes in ((1, True), (2, False)):
        perturbed = codes.clone()
        perturbed[0, 0, t + shift] = (perturbed[0, 0, t + shift] + 1) % model.text_card
        after = frame_nll(model, perturbed, "parallel")
        # audio codebook 1 at frame t is predicted after the text of frame t + 1, not later
        assert (not torch.allclose(after[0, 2, t], base[0, 2, t])) == changes, shift


@pytest.mark.parametrize("kind", ["inplace", "block"])
def test_streaming_equals_parallel(kind: str) -> None:
    model = build_lm().eval()
    apply_ttt(model, MoshiTTTConfig(kind=kind, layers=[1], chunk_size=4, ttt_mini_batch_size=4, ttt_num_heads=2))
    if kind == "inplace":
        torch.nn.init.normal_(model.transformer.layers[1].gating.ttt_conv.weight, std=0.3)
    codes = codes_for(model, 2, 23)
    parallel = frame_nll(model, codes, "parallel")
    for step in (1, 5):
        streamed = frame_nll(model, codes, "streaming", step=step, depformer_window=7)
        assert torch.equal(torch.isnan(parallel), torch.isnan(streamed))
        torch.testing.assert_close(streamed, parallel, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_slope_fit_recovers_a_known_slope() -> None:
    pos = np.arange(500, dtype=np.float64)
    nll = 3.0 - 0.25 * np.log1p(pos)
    nll[::7] = np.nan
    assert slope_vs_log_position(nll) == pytest.approx(-0.25, abs=1e-12)
    assert math.isnan(slope_vs_log_position(np.full(5, np.nan)))


def test_ci_across_documents() -> None:
    m, ci, n = mean_ci95([1.0, 2.0, 3.0, float("nan")])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci95([1.0])[1])


def test_bins_average_documents_then_frames() -> None:
    doc_a = np.full((9, 100), 1.0)
    doc_b = np.full((9, 60), 3.0)
    out = summarize(Aggregates([doc_a, doc_b]), bin_edges([40, 80], rel_width=0.25))
    first, second = out["bins"]
    assert (first["lo"], first["hi"]) == (30, 50)
    assert first["streams"]["text"]["mean"] == pytest.approx(2.0) and first["streams"]["text"]["n_docs"] == 2
    assert second["streams"]["audio"]["mean"] == pytest.approx(1.0) and second["streams"]["audio"]["n_docs"] == 1


def test_report_follows_the_schema(tmp_path: Path) -> None:
    base = build_lm(seed=0).eval()
    ttt = build_lm(seed=0).eval()
    apply_ttt(ttt, MoshiTTTConfig(layers=[0], chunk_size=4))
    docs = [("a", codes_for(base, 1, 30, 1)[0]), ("b", codes_for(base, 1, 22, 2)[0])]
    report = evaluate({"base": ("base.safetensors", base), "ttt": ("ttt", ttt)}, docs, tmp_path, bins=[8, 16, 40])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["version"] == 1 and on_disk["n_documents"] == 2 and on_disk["bins"] == [[6, 10], [12, 20], [30, 50]]
    for name in ("base", "ttt"):
        ck = on_disk["checkpoints"][name]
        assert set(ck) == {"path", "attention_context", "ttt", "bins", "slope_vs_log_pos", "curve"}
        assert set(ck["bins"][0]["streams"]) == set(ALL_STREAMS)
        assert set(ck["bins"][0]["streams"]["text"]) == {"mean", "ci95", "n_docs"}
        assert ck["bins"][2]["streams"]["text"]["mean"] is None  # past both documents: null, not NaN
    assert on_disk["checkpoints"]["ttt"]["ttt"]["chunk_size"] == 4 and on_disk["checkpoints"]["base"]["ttt"] is None
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 2 * len(ALL_STREAMS) * 3
    assert (tmp_path / "nll_vs_position.png").stat().st_size > 0
    assert report["checkpoints"]["base"]["attention_context"] == base.context


def test_librilight_long_manifest_concatenates_a_speakers_chapters(tmp_path: Path) -> None:
    import sphn

    from ttt_speech.data.librilight import build_librilight_long
    from ttt_speech.data.manifest import read_alignments, read_manifest

    for speaker, chapters in (("101", 3), ("202", 1)):
        for c in range(chapters):
            path = tmp_path / "ll" / speaker / "book" / f"{c:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sphn.write_wav(str(path), np.full((1, 24000 * 20), 0.01 * (c + 1), dtype=np.float32), 24000)
    manifest = build_librilight_long(tmp_path / "ll", tmp_path / "out", min_minutes=0.9, gap_sec=0.5,
                                     pattern="*/*/*.wav")
    (entry,) = read_manifest(manifest)  # speaker 101: 3 x 20 s + gaps >= 54 s; speaker 202's 20 s is dropped
    assert Path(entry.path).name == "101_000.wav" and entry.duration == pytest.approx(61.5)
    assert read_alignments(entry.alignment_path) == []
