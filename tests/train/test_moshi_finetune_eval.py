"""Evaluation during training (`do_eval`, `eval_freq`, `data.eval_data`): the loss per stream every `eval_freq`
steps, the `best` export at the lowest one (outside checkpoint rotation), and moshi-finetune's `ckpt_freq: 0` /
`do_ckpt: false`."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from ttt_speech.config import load_config
from ttt_speech.train.checkpoint import list_checkpoints
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def run(run_dir: Path, *overrides: str) -> dict:
    return train(load_config(TrainConfig, TINY, [f"--run_dir={run_dir}", "--duration_sec=1.2", "--log_freq=1",
                                                 "--max_steps=6", *overrides]))


def test_best_export_at_the_lowest_eval_loss_survives_rotation(tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = run(run_dir, "--do_eval=true", "--eval_freq=2", "--data.eval_data=synthetic", "--eval_batches=2",
                 "--ckpt_freq=2", "--keep_checkpoints=1", "--max_steps=4", "--monitor_freq=100")
    evals = [json.loads(line) for line in (run_dir / "metrics.eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["loss"] > 0 and e["text_loss"] > 0 and e["audio_loss"] > 0 for e in evals)
    for e in evals:  # the loss is the sum of the streams' losses, as in training
        assert abs(e["loss"] - e["text_loss"] - e["audio_loss"]) < 1e-4 * e["loss"]
    best = min(evals, key=lambda e: e["loss"])
    record = json.loads((run_dir / "best" / "best.json").read_text())
    assert record["step"] == best["step"] and record["loss"] == best["loss"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]  # rotation kept one; best is apart
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "best" / "ttt_config.json").is_file()
    if best["step"] == 4:  # the best is the final model: the same weights as the export
        final = load_file(str(run_dir / "export" / "model.safetensors"))
        assert all((v == final[k]).all() for k, v in load_file(str(run_dir / "best" / "model.safetensors")).items())
    assert result["status"] == "done"


def test_ckpt_freq_zero_saves_the_last_only_and_do_ckpt_false_none(tmp_path) -> None:
    run(tmp_path / "last", "--ckpt_freq=0", "--max_steps=3", "--export_safetensors=false", "--monitor_freq=100")
    assert [p.name for p in list_checkpoints(tmp_path / "last")] == ["step_0000003"]
    run(tmp_path / "none", "--do_ckpt=false", "--max_steps=3", "--export_safetensors=false")
    assert list_checkpoints(tmp_path / "none") == []
    stopped = run(tmp_path / "stop", "--do_ckpt=false", "--max_steps=3", "--stop_after=2",
                  "--export_safetensors=false")
    assert stopped["status"] == "stopped"  # a stop still saves, so a requeued job resumes
    assert [p.name for p in list_checkpoints(tmp_path / "stop")] == ["step_0000002"]
