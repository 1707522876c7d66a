"""Metrics sinks: TensorBoard event files and jsonl in the run folder, with the train, eval and TTT monitor
records; a resumed run holds each step once, as a straight run does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ttt_speech.config import load_config
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.metrics import truncate_jsonl
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def run(run_dir: Path, *overrides: str) -> dict:
    cfg = load_config(TrainConfig, TINY, [f"--run_dir={run_dir}", "--duration_sec=1.2", "--log_freq=1",
                                          "--monitor_freq=2", "--max_steps=4", "--ckpt_freq=100", "--do_eval=true",
                                          "--eval_freq=2", "--data.eval_data=synthetic", "--eval_batches=1",
                                          "--export_safetensors=false", *overrides])
    return train(cfg)


def records(run_dir: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"metrics.{tag}.jsonl").read_text().splitlines()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_and_jsonl_in_the_run_dir(tmp_path) -> None:
    result = run(tmp_path / "run")
    files = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    tb = scalars(tmp_path / "run")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    for (_, logged), loss in zip(tb["train/loss"], result["losses"], strict=True):
        assert abs(logged - loss) <= 1e-6 * abs(loss)  # float32 in the event file
    assert [s for s, _ in tb["eval/loss"]] == [2, 4] and "eval/text_loss" in tb and "eval/audio_loss" in tb
    assert [s for s, _ in tb["ttt/layer0/w_max_abs"]] == [0, 2]  # the TTT monitor's steps (monitor_freq 2)
    train_rows = records(tmp_path / "run", "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert set(train_rows[0]) >= {"loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens_per_s"}
    assert {r["step"] for r in records(tmp_path / "run", "ttt")} == {0, 2}


def test_a_resumed_run_logs_each_step_once(tmp_path) -> None:
    run(tmp_path / "straight")
    assert run(tmp_path / "resumed", "--stop_after=3", "--ckpt_freq=2")["status"] == "stopped"
    # as a kill after step 3 (its records written) before its checkpoint: the resume from step 2 redoes step 3
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000003")
    assert run(tmp_path / "resumed", "--ckpt_freq=2")["resumed_from_step"] == 2
    for tag in ("train", "eval", "ttt"):
        straight, resumed = records(tmp_path / "straight", tag), records(tmp_path / "resumed", tag)
        assert [r["step"] for r in resumed] == [r["step"] for r in straight], tag
        for a, b in zip(straight, resumed, strict=True):
            assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
                k: v for k, v in b.items() if k != "tokens_per_s"}, tag
    assert [s for s, _ in scalars(tmp_path / "resumed")["train/loss"]] == [1, 2, 3, 4]


def test_truncate_jsonl_drops_later_steps_and_a_torn_line(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    assert truncate_jsonl(path, 2) == 2
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


def test_wandb_gets_the_same_records_when_configured(tmp_path, monkeypatch) -> None:
    import sys
    import types

    from ttt_speech.train.metrics import MetricsSinks
    from ttt_speech.train.moshi_finetune import WandbConfig

    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.login = lambda key: calls.append(("login", key))
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")  # restored after the test; the sink sets "offline"
    sinks = MetricsSinks(tmp_path, True, None, WandbConfig(project="p", key="k", offline=True), {"seed": 0})
    sinks.log("eval", 4, {"loss": 2.5, "kind": "inplace"})
    sinks.log_ttt([{"step": 2, "layer": 0, "w_max_abs": 0.5}])  # the TTT monitor's rows reach wandb too
    sinks.close()
    assert calls[0] == ("login", "k") and calls[1][1]["project"] == "p" and calls[1][1]["name"] == tmp_path.name
    assert calls[2] == ("log", 4, {"eval/loss": 2.5}) and calls[3] == ("log", 2, {"ttt/layer0/w_max_abs": 0.5})
    assert calls[4] == ("finish",)
    assert records(tmp_path, "eval") == [{"step": 4, "loss": 2.5, "kind": "inplace"}]
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_project_without_wandb_installed_is_refused_at_load(tmp_path, monkeypatch) -> None:
    import sys

    import pytest

    from ttt_speech.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    with pytest.raises(ConfigError, match=r"wandb\.project='p' but wandb is not installed"):
        load_config(TrainConfig, TINY, [f"--run_dir={tmp_path / 'run'}", "--wandb.project=p"])
    assert not (tmp_path / "run").exists()
