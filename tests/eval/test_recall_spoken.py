"""The spoken-recall benchmark (`ttt_speech.eval.recall_spoken`, documents by `make samples`): the window model
cannot hear the first mention from the repeat, documents composed from word units equal the files `make samples`
wrote, training never draws held-out voices or content, and the paired statistics."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_speech.data.interleave import interleave_text, tokenize_words
from ttt_speech.data.manifest import MAIN_SPEAKER, read_alignments
from ttt_speech.eval import recall_docs as rd
from ttt_speech.eval import recall_spoken as rs
from ttt_speech.eval.recall import receptive_field

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
# small model: receptive field 4 x (10 - 1) + 2 = 38 frames, as the benchmark's
SMALL = dict(dim=32, batch=2, steps=2, lr=1e-2, warmup=1)


@pytest.fixture(scope="module")
def banks() -> rs.Banks:
    if not (SAMPLES / "recall.json").is_file():
        pytest.fail(f"sample set missing at {SAMPLES}: run `make samples`", pytrace=False)
    first = rd.fixed_documents("heldout")[0]
    torch.set_num_threads(1)
    return rs.Banks(SAMPLES, only=[(first.voice, first.rate), (rd.VOICES["train"][0], rd.RATES[0])])


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
def test_window_model_cannot_hear_the_first_mention(banks, trained: bool) -> None:
    cfg = rs.SpokenRecallConfig(**SMALL)
    rf = receptive_field(cfg.lm_kwargs("window"))
    doc = banks.heldout(rf, limit=1)[0]
    assert doc.distance > rf == 38
    g = torch.Generator().manual_seed(0)
    swapped = doc.stream.clone()  # every stream of the first mention replaced by other tokens
    swapped[0, :doc.first_info_end] = torch.randint(4, 96, (doc.first_info_end,), generator=g)
    swapped[1:, :doc.first_info_end] = torch.randint(0, 48, (16, doc.first_info_end), generator=g)
    lo, hi = doc.audio_frames["repeat"]
    frames = sorted(set(doc.text_frames["repeat"]) | set(range(lo, hi)))
    for variant in ("window", "full"):
        model = rs.build_variant(variant, cfg, seed=0)
        if trained:
            rs.train(model, rs.TrainingDocuments(banks, seed=0, receptive=rf), cfg)
        with torch.no_grad():
            a, b = model(doc.stream[None]), model(swapped[None])
        same = (torch.equal(a.text_logits[..., frames, :], b.text_logits[..., frames, :])
                and torch.equal(a.logits[..., frames, :].nan_to_num(), b.logits[..., frames, :].nan_to_num()))
        assert same == (variant == "window")


def test_documents_equal_the_files_make_samples_wrote(banks) -> None:
    """The text stream composed from word units equals the one the data pipeline builds from the written
    alignments, and the parts are those of recall.json."""
    meta = rs._recall_meta(SAMPLES)
    written = {d["name"]: d for d in meta["documents"] if d["split"] == "heldout"}
    plan = rd.fixed_documents("heldout")[0]
    doc = banks.document(plan)
    lay = banks.layout(plan)
    entry = written[plan.name]
    assert {p: [round(a * rd.FRAME_SEC, 4), round(b * rd.FRAME_SEC, 4)] for p, (a, b) in lay.parts.items()} \
        == entry["parts"]
    assert lay.frames * rd.FRAME_SEC == pytest.approx(entry["duration"])
    words = read_alignments((SAMPLES / entry["path"]).with_suffix(".json"))
    text = interleave_text(tokenize_words(banks.tokenizer, words, MAIN_SPEAKER), lay.frames)
    assert doc.stream[0].tolist() == text
    assert doc.stream.shape == (17, lay.frames)
    # the scored text frames hold the content's tokens: the same tokens in the first mention and the repeat
    first = doc.stream[0, doc.text_frames["first"]].tolist()
    assert first == doc.stream[0, doc.text_frames["repeat"]].tolist() and len(first) >= 4
    assert first == [t for w in plan.content.split()[:-1] + [plan.content.split()[-1] + "."]
                     for t in banks.tokenizer.encode(w)]
    # the user channel is silence, and so are the silent units of the main channel
    assert (doc.stream[9:] == banks.silence[:, :lay.frames]).all()


def test_training_draws_no_heldout_voice_or_content(banks) -> None:
    heldout = rd.fixed_documents("heldout")
    words = {w for d in heldout if d.kind != "digits" for c in (d.content, d.unrelated) for w in c.split()}
    strings = rd.heldout_digit_strings()
    assert len(strings) == 2 * sum(d.kind == "digits" for d in heldout)
    rng = random.Random(0)
    for _ in range(300):
        plan = rd.draw_document(rng, "train", rd.VOICES["train"][0], 140, rng.choice(rd.KINDS), exclude=strings)
        assert plan.content not in strings and plan.unrelated not in strings and plan.content != plan.unrelated
        assert not {w.rstrip(".") for c in (plan.content, plan.unrelated) for w in c.split()} & words
    assert all(v in rd.VOICES["train"] for v, _ in banks.train_keys)
    drawn = [[d.draw() for _ in range(4)] for d in (rs.TrainingDocuments(banks, 0), rs.TrainingDocuments(banks, 0))]
    assert all(d.voice in rd.VOICES["train"] for d in drawn[0])
    assert all(torch.equal(a.stream, b.stream) for a, b in zip(*drawn, strict=True))  # seeded


def test_paired_by_document() -> None:
    docs, voices = ["a", "b", "c", "d"], ["v1", "v1", "v2", "v3"]
    ttt = {"documents": docs, "voices": voices, "text_repeat": [1.0, 2.0, 3.0, 4.0]}
    window = {"documents": docs, "voices": voices, "text_repeat": [2.0, 2.5, 3.5, 4.0]}
    est = rs.paired_by_document(ttt, window)
    assert est.mean == pytest.approx(np.mean([-1.0, -0.5, -0.5, 0.0])) and est.n == 4 and est.n_clusters == 3
    with pytest.raises(ValueError, match="same documents"):
        rs.paired_by_document(ttt, {**window, "documents": docs[::-1]})


def test_summary_over_seeds_by_hand() -> None:
    """Two documents (two voices), three seeds; the window model has no recall (first = repeat), In-Place's
    repeat is lower by 0.5, 1.0 and 1.5 nats in seeds 0, 1, 2."""
    docs, voices = ["a", "b"], ["v1", "v2"]
    curve = {"eval_steps": [0, 1], "eval_text_first": [3.0, 3.0], "eval_text_repeat": [3.0, 3.0]}

    def result(variant, seed, first, repeat):
        scores = {f"{s}_{m}": [0.0, 0.0] for s in ("text", "audio") for m in rs.MENTIONS}
        scores.update(text_first=first, text_repeat=repeat)
        return {"variant": variant, "seed": seed, "documents": docs, "voices": voices, "train_seconds": 1.0,
                "curve": curve, **scores}

    results = [result("window", s, [3.0, 2.0], [3.0, 2.0]) for s in range(3)]
    results += [result("inplace", s, [3.0, 2.0], [3.0 - g, 2.0 - g]) for s, g in enumerate([0.5, 1.0, 1.5])]
    summary = rs.summarize(results)
    row = summary["text_repeat"]["inplace"]
    assert row["diff_vs_window"]["per_seed"] == pytest.approx([-0.5, -1.0, -1.5])
    half = 4.303 * 0.5 / np.sqrt(3)  # t_{0.975, 2} x sd 0.5 / sqrt(3)
    assert row["diff_vs_window"]["ci95"] == pytest.approx([-1.0 - half, -1.0 + half], abs=1e-3)
    gain = summary["text_recall_gain"]
    assert gain["window"]["text_recall_gain"]["mean"] == 0.0
    assert gain["inplace"]["text_recall_gain"]["mean"] == pytest.approx(1.0)
    assert [c["mean"] for c in row["per_seed_document_ci"]] == pytest.approx([-0.5, -1.0, -1.5])
    assert all(c["ci95"] is None and c["n_clusters"] == 2 for c in row["per_seed_document_ci"])  # < 3 voices
    assert row["document_ci"]["mean"] == pytest.approx(-1.0) and row["document_ci"]["ci95"] is None
    assert row["document_ci"]["seeds"] == [0, 1, 2]
    assert "first - repeat" in rs.format_tables(summary)


def test_pooled_by_document_averages_each_document_over_seeds_first() -> None:
    """Three documents (three voices): In-Place - window is -1, -2, -3 in seed 0, -3, -2, -1 in seed 1 and -2 for
    every document in seed 2, so each document's mean over seeds is -2 and the CI over voices collapses to [-2, -2]
    (treating the 9 (seed, document) differences as independent observations would not)."""
    docs, voices = ["a", "b", "c"], ["v1", "v2", "v3"]
    window = {s: {"variant": "window", "seed": s, "documents": docs, "voices": voices, "text_repeat": [3.0] * 3}
              for s in range(3)}
    diffs = [[-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0], [-2.0, -2.0, -2.0]]
    runs = [{"variant": "inplace", "seed": s, "documents": docs, "voices": voices,
             "text_repeat": [3.0 + d for d in diffs[s]]} for s in range(3)]
    est = rs.pooled_by_document(runs, window)
    assert est.mean == pytest.approx(-2.0) and est.ci95 == pytest.approx([-2.0, -2.0])
    assert (est.n, est.n_clusters) == (3, 3)
    per_seed = [rs.paired_by_document(r, window[r["seed"]]) for r in runs[:2]]
    assert all(e.hi - e.lo > 1.0 for e in per_seed)  # the seeds alone do vary by document
    with pytest.raises(ValueError, match="same documents"):
        rs.pooled_by_document([runs[0], {**runs[1], "documents": docs[::-1]}], window)


def test_training_curve_and_progress_line_show_the_step_they_name(banks, capsys) -> None:
    """Held-out scores at step 0, every `eval_every` steps and at the end; the progress line of step N prints
    the scores after step N (it once printed those of the evaluation before), and the last equals `evaluate`."""
    cfg = rs.SpokenRecallConfig(**{**SMALL, "steps": 3, "eval_every": 2})
    rf = receptive_field(cfg.lm_kwargs("window"))
    docs = banks.heldout(rf, limit=1)
    model = rs.build_variant("inplace", cfg, seed=0)
    curve = rs.train(model, rs.TrainingDocuments(banks, seed=0, receptive=rf), cfg, docs, progress="inplace")
    assert curve["eval_steps"] == [0, 2, 3] and len(curve["loss"]) == 3
    assert curve["eval_text_repeat"][-1] == rs.evaluate(model, docs)["text_repeat"][0]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["inplace step 2/3", "inplace step 3/3"]
    for line, i in zip(lines, (1, 2), strict=True):
        assert f"held-out first {curve['eval_text_first'][i]:.3f} repeat {curve['eval_text_repeat'][i]:.3f}" in line
