"""The quickstart pipeline, shortened: patched-moshi check, sample encoding, submitit stop/resume, base run,
plots, the eval report, the spoken-recall comparison and the summary."""

import json
from pathlib import Path

import pytest

from ttt_speech import quickstart


def test_streaming_check_passes() -> None:
    assert quickstart.check_streaming(batch_size=1, frames=17) <= 1e-5


def test_quickstart_pipeline_end_to_end(tmp_path: Path) -> None:
    from ttt_speech.eval import recall_docs

    heldout = recall_docs.fixed_documents("heldout")[:8]  # encode only the word banks these and training need
    banks = sorted({(d.voice, d.rate) for d in heldout} | {(recall_docs.VOICES["train"][0], recall_docs.RATES[0])})
    summary = quickstart.run(out=tmp_path / "qs", steps=6, window=2, eval_max_frames=120, eval_step=1,
                             recall_steps=2, recall_documents=8, recall_banks=banks)
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 3
    on_disk = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert {"steps", "resumed_from_step", "loss_first_window", "loss_last_window", "plots"} <= set(on_disk)
    assert list(on_disk["timing"]) == ["1", "2", "3", "4", "5", "6"] and on_disk["cpu_seconds"] > 0
    assert on_disk["last_bin"] == {"frames": [1200, 2000], "text": None, "audio": None}  # eval cut at 120 frames
    assert all(Path(p).stat().st_size > 0 for p in on_disk["plots"])
    report = json.loads(Path(on_disk["eval_report"]).read_text())
    assert set(report["checkpoints"]) == {"base", "ttt"}
    assert report["checkpoints"]["ttt"]["ttt"]["kind"] == "inplace" and report["checkpoints"]["base"]["ttt"] is None
    # the quickstart's bounded, chunk-centred update (docs/moshi_ttt.md, "Past the training length")
    assert report["checkpoints"]["ttt"]["ttt"]["decay"] == 0.9 and report["checkpoints"]["ttt"]["ttt"]["centre_update"]
    recall = on_disk["recall"]
    assert recall["n_documents"] == 8 and recall["n_voices"] == 4 and recall["ttt_variant"] == "inplace"
    assert {"window_nll", "ttt_nll", "diff_ci95", "full_nll", "gap_closed", "full_diff_ci95"} <= set(recall)
    lo, hi = recall["diff_ci95"]
    assert lo <= recall["diff"] <= hi and recall["diff"] == pytest.approx(recall["ttt_nll"] - recall["window_nll"])
    assert recall["receptive_field"] == 38 and recall["plot"] in on_disk["plots"]
