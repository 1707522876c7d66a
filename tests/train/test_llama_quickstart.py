"""`ttt-speech quickstart --llama` (reduced to 120 steps): distillation halves the KL to the teacher, the run
resumes half way, and summary.json holds what the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ttt_speech.cli import main
from ttt_speech.quickstart_llama import run


@pytest.mark.slow
def test_quickstart_llama_distils_and_resumes(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = run(tmp_path, steps=120)
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(path.read_text())
    assert summary["resumed_from_step"] == 60 and summary["steps"] == 120
    # the bar: the KL to the teacher falls by at least 50% from the start of training
    assert summary["kl_last_window"] <= 0.5 * summary["kl_first_window"], summary
    assert [r["step"] for r in summary["validation"]] == ["120"]
    assert len(summary["perplexity_by_position"]["bins"]) == 4
    assert [r["turns"] for r in summary["recall"]] == [0, 2, 6]
    assert all(r["teacher_answer_nll"] > 0 and r["student_answer_nll"] > 0 for r in summary["recall"])
    # the same evaluation from the command line, on the best export, shorter documents
    assert main(["eval", "llama", str(tmp_path / "run"), "--export", str(tmp_path / "run/best"), "--docs", "4",
                 "--tokens", "64", "--turns", "1", "--out", str(tmp_path / "best.json")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["perplexity_by_position"]["tokens"] == 64 and [r["turns"] for r in best["recall"]] == [1]
