"""Per-frame NLL and the eval-librilight report on tiny models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi_codes import random_codes as codes_for

from ttt_speech.errors import DataError, TTTSpeechError
from ttt_speech.eval.librilight import (
    ALL_STREAMS,
    CSV_COLUMNS,
    PAIRED_KEYS,
    DocumentsTooShortError,
    bin_edges,
    curve_edges,
    estimates,
    evaluate,
    load_speakers,
    paired_line,
    per_document,
    resolve_speakers,
)
from ttt_speech.eval.nll import _nll, frame_nll
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm


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


def test_multi_frame_streaming_past_the_context_is_refused() -> None:
    model = build_lm().eval()
    for layer in model.transformer.layers:
        layer.self_attn.context = 6
    codes = codes_for(model, 1, 15)
    parallel = frame_nll(model, codes, "parallel")
    # frame by frame stays exact past the window; 3 frames per call would not be, so it is refused
    torch.testing.assert_close(frame_nll(model, codes, "streaming", step=1), parallel, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    with pytest.raises(ValueError, match="streaming step 3 on 15 frames: the attention context is 6 frames"):
        frame_nll(model, codes, "streaming", step=3)


def test_bins_average_documents_then_frames() -> None:
    doc_a = np.full((9, 100), 1.0)
    doc_b = np.full((9, 60), 3.0)
    edges = bin_edges([40, 80], rel_width=0.25)
    stats = per_document([doc_a, doc_b], edges, window=20, curve=curve_edges(100))
    out = estimates(stats, ["s0", "s1"], edges, curve_edges(100))
    first, second = out["bins"]
    assert (first["lo"], first["hi"]) == (30, 50)
    assert first["streams"]["text"]["mean"] == pytest.approx(2.0) and first["streams"]["text"]["n_docs"] == 2
    assert (second["n_docs"], second["n_speakers"]) == (1, 1)
    assert second["streams"]["audio"]["mean"] == pytest.approx(1.0) and second["streams"]["audio"]["ci95"] is None


def test_per_document_statistics_by_hand() -> None:
    # frames 0..9 at 1.0, 10..19 at 2.0, 20..39 at 4.0; window 20: before = [10, 20), after = [20, 40)
    doc = np.concatenate([np.full(10, 1.0), np.full(10, 2.0), np.full(20, 4.0)])
    doc = np.tile(doc, (9, 1))
    doc[3, 25] = np.nan  # a masked frame of one codebook
    stats = per_document([doc], bin_edges([16, 24]), window=20, curve=curve_edges(40))
    s = ALL_STREAMS.index("audio")
    assert stats["bins"][0, s, 0] == 2.0  # [12, 20)
    assert stats["bins"][1, s, 0] == pytest.approx((2 * 2.0 + 10 * 4.0) / 12)  # [18, 30)
    assert stats["past_window"][s, 0] == 4.0 and stats["window_contrast"][s, 0] == 2.0
    assert stats["slope_past_window"][s, 0] == pytest.approx(0.0, abs=1e-12)
    assert stats["slope_all_frames"][s, 0] > 0.5


def codes_doc(model, T: int, seed: int) -> torch.Tensor:
    return codes_for(model, 1, T, seed)[0]


def test_report_follows_the_schema(tmp_path: Path) -> None:
    base = build_lm(seed=0).eval()
    ttt = build_lm(seed=0).eval()
    apply_ttt(ttt, MoshiTTTConfig(layers=[0], chunk_size=4))
    docs = [(f"/x/{spk}_{k}.wav", codes_doc(base, 30 + 8 * k, 10 * i + k))
            for i, spk in enumerate(["s1", "s2", "s3"]) for k in range(2)]
    report = evaluate({"ttt": ("ttt", ttt), "base": ("base.safetensors", base)}, docs, tmp_path, bins=[8, 16, 60],
                      mode="parallel", n_boot=500)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert on_disk["version"] == 2 and on_disk["bins"] == [[6, 10], [12, 20], [45, 75]]
    assert (on_disk["n_documents"], on_disk["n_speakers"], on_disk["reference"]) == (6, 3, "base")
    assert on_disk["window"] == base.context and on_disk["contrast_spans"] == {"before": [16, 32], "after": [32, None]}
    assert [d["speaker"] for d in on_disk["documents"]] == ["s1", "s1", "s2", "s2", "s3", "s3"]
    est_keys = {"mean", "ci95", "n_docs", "n_speakers"}
    for name in ("base", "ttt"):
        ck = on_disk["checkpoints"][name]
        assert set(ck) == {"path", "attention_context", "ttt", "bins", "past_window", "window_contrast",
                           "slope_past_window", "slope_all_frames", "curve", "paired"}
        assert set(ck["bins"][0]["streams"]) == set(ALL_STREAMS)
        assert set(ck["bins"][0]["streams"]["text"]) == est_keys
        assert (ck["bins"][0]["n_docs"], ck["bins"][0]["n_speakers"]) == (6, 3)
        lo, hi = ck["bins"][0]["streams"]["audio"]["ci95"]
        assert lo <= ck["bins"][0]["streams"]["audio"]["mean"] <= hi
        assert ck["bins"][2]["streams"]["text"] == {"mean": None, "ci95": None, "n_docs": 0, "n_speakers": 0}
        assert ck["past_window"]["audio"]["n_docs"] == 3  # the 30-frame documents end before frame 32
    assert on_disk["checkpoints"]["base"]["paired"] is None
    paired = on_disk["checkpoints"]["ttt"]["paired"]
    assert paired["reference"] == "base" and set(paired) == {"reference", *PAIRED_KEYS}
    # paired means are means of per-document differences: with every document in the bin, the difference of means
    diff = paired["bins"][1]["streams"]["audio"]["mean"]
    absolute = [on_disk["checkpoints"][n]["bins"][1]["streams"]["audio"]["mean"] for n in ("ttt", "base")]
    assert diff == pytest.approx(absolute[0] - absolute[1])
    assert on_disk["checkpoints"]["ttt"]["ttt"]["chunk_size"] == 4 and on_disk["checkpoints"]["base"]["ttt"] is None
    line = paired_line(report, "ttt")
    assert line.startswith("ttt - base past the window (frames >= 32), paired on 3 documents: text ")
    assert line.endswith("(95% CI over speakers)") and line.count("[") == 2
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert list(rows[0]) == CSV_COLUMNS
    # absolute: 3 bins + 4 statistics; paired: 3 bins + 3 statistics (no all-frames slope)
    assert len(rows) == len(ALL_STREAMS) * (7 + 7 + 6)
    assert (tmp_path / "nll_vs_position.png").stat().st_size > 0


def test_a_checkpoint_paired_with_itself_differs_by_exactly_zero(tmp_path: Path) -> None:
    model = build_lm(seed=0).eval()
    twin = build_lm(seed=0).eval()
    docs = [(f"{spk}_0.wav", codes_doc(model, 40, i)) for i, spk in enumerate("abc")]
    report = evaluate({"base": ("a", model), "twin": ("b", twin)}, docs, tmp_path, bins=[8, 30], mode="parallel",
                      n_boot=200)
    paired = report["checkpoints"]["twin"]["paired"]
    for b in paired["bins"]:
        assert b["streams"]["audio"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n_docs": 3, "n_speakers": 3}


def test_documents_shorter_than_every_bin_are_refused(tmp_path: Path) -> None:
    model = build_lm(seed=0).eval()
    docs = [("a_0.wav", codes_doc(model, 20, 0)), ("b_0.wav", codes_doc(model, 25, 1))]
    with pytest.raises(DocumentsTooShortError, match=r"longest, b_0.wav, has 25 frames .* starts at frame 30"):
        evaluate({"base": ("x", model)}, docs, tmp_path, bins=[40, 80])
    assert not (tmp_path / "report.json").exists()
    assert issubclass(DocumentsTooShortError, TTTSpeechError)


def test_speakers_from_names_or_a_file(tmp_path: Path) -> None:
    ids = ["/d/1089_000.wav", "/d/1089_001.wav", "/d/alice.wav", "/d/bob.wav"]
    speakers, unknown = resolve_speakers(ids)
    assert speakers[:2] == ["1089", "1089"] and unknown == ["/d/alice.wav", "/d/bob.wav"]
    assert len(set(speakers)) == 3  # an unknown document is its own cluster
    path = tmp_path / "speakers.json"
    path.write_text(json.dumps({"files": {"alice.wav": "narrator", "bob": "narrator"}}))
    speakers, unknown = resolve_speakers(ids, load_speakers(path))
    assert speakers == ["1089", "1089", "narrator", "narrator"] and unknown == []
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="speakers.json: expected"):
        load_speakers(path)


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


def fake_librilight(root: Path, speakers: dict[str, list[str]], seconds: float = 1.0) -> Path:
    """`root/<speaker>/<book>/<chapter>.wav`, one 1-second chapter per listed book."""
    import sphn

    for speaker, books in speakers.items():
        for c, book in enumerate(books):
            path = root / speaker / book / f"{c:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sphn.write_wav(str(path), np.full((1, int(24000 * seconds)), 0.01, dtype=np.float32), 24000)
    return root


@pytest.mark.parametrize("holdout", [2, ["103", "101"]])
def test_librilight_holdout_speakers_are_disjoint_from_training(tmp_path: Path, holdout) -> None:
    from ttt_speech.data.librilight import build_librilight_long
    from ttt_speech.data.manifest import read_manifest

    books = {"101": ["b1", "b1"], "102": ["b2", "b2"], "103": ["b3", "b1"], "104": ["b4", "b4"], "105": ["b5"]}
    root = fake_librilight(tmp_path / "ll", books)
    train = build_librilight_long(root, tmp_path / "out", min_minutes=1.5 / 60, gap_sec=0.0, pattern="*/*/*.wav",
                                  holdout_speakers=holdout, holdout_seed=3)
    assert train.name == "train.jsonl" and not (tmp_path / "out" / "long.jsonl").exists()
    speaker = lambda entries: {Path(e.path).name.split("_")[0] for e in entries}
    train_speakers = speaker(read_manifest(train))
    heldout_speakers = speaker(read_manifest(tmp_path / "out" / "heldout.jsonl"))
    record = json.loads((tmp_path / "out" / "speakers.json").read_text())
    assert train_speakers.isdisjoint(heldout_speakers)
    assert train_speakers | heldout_speakers == {"101", "102", "103", "104"}  # 105 has 1 s < 1.5 s: no file
    assert sorted(heldout_speakers) == record["holdout"]["heldout_speakers"]
    assert sorted(train_speakers) == record["holdout"]["train_speakers"]
    assert len(heldout_speakers) == 2 and record["files"]["101_000.wav"] == "101"
    if isinstance(holdout, list):
        assert heldout_speakers == {"101", "103"} and record["holdout"]["books_in_both"] == []
    # the evaluation side reads the same speakers from the file names and from speakers.json
    ids = [str(e.path) for e in read_manifest(tmp_path / "out" / "heldout.jsonl")]
    assert resolve_speakers(ids)[0] == resolve_speakers(ids, load_speakers(tmp_path / "out" / "speakers.json"))[0]


def test_librilight_holdout_refuses_bad_requests(tmp_path: Path) -> None:
    from ttt_speech.data.librilight import build_librilight_long, parse_holdout

    assert parse_holdout("3") == 3 and parse_holdout("1089,") == ["1089"] and parse_holdout("1, 2") == ["1", "2"]
    with pytest.raises(DataError, match="count N or a comma-separated list"):
        parse_holdout("abc")
    root = fake_librilight(tmp_path / "ll", {"1": ["b"], "2": ["b"]})
    build = lambda holdout: build_librilight_long(root, tmp_path / "out", min_minutes=0.5 / 60, pattern="*/*/*.wav",
                                                  holdout_speakers=holdout)
    with pytest.raises(DataError, match="between 1 and 1 .* to hold out speaker 2, write `2,`"):
        build(2)
    with pytest.raises(DataError, match=r"\['9'\] have no file"):
        build(["9"])
    with pytest.raises(DataError, match="holds out all 2 speakers"):
        build(["1", "2"])
