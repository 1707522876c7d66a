"""The quickstart pipeline, shortened: patched-moshi check, sample encoding, submitit stop/resume, base run,
plots, the eval report and the summary."""

import json
from pathlib import Path

from ttt_speech import quickstart


def test_streaming_check_passes() -> None:
    assert quickstart.check_streaming(batch_size=1, frames=17) <= 1e-5


def test_quickstart_pipeline_end_to_end(tmp_path: Path) -> None:
    summary = quickstart.run(out=tmp_path / "qs", steps=6, window=2, eval_max_frames=120, eval_step=8)
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 3
    on_disk = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert {"steps", "resumed_from_step", "loss_first_window", "loss_last_window", "plots"} <= set(on_disk)
    assert all(Path(p).stat().st_size > 0 for p in on_disk["plots"])
    report = json.loads(Path(on_disk["eval_report"]).read_text())
    assert set(report["checkpoints"]) == {"base", "ttt"}
    assert report["checkpoints"]["ttt"]["ttt"]["kind"] == "inplace" and report["checkpoints"]["base"]["ttt"] is None
