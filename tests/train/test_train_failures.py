"""Nothing lost, nothing silent: resume checks, damaged and partial checkpoints, NaN rollback, Ctrl-C, log
truncation and config nonsense, on the tiny model. Each test reproduces a case that lost work or passed silently
before (see the bad-input sweep, scripts/bad_input_sweep.py)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from ttt_speech.config import load_config
from ttt_speech.errors import CheckpointError, CheckpointMismatch, ConfigError, TrainingDiverged
from ttt_speech.train.checkpoint import list_checkpoints, save_checkpoint
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.trainer import interrupt, request_stop, train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, [f"--run_dir={run_dir}", "--duration_sec=1.2", "--log_freq=1",
                                           "--ckpt_freq=100", "--export_safetensors=false", *overrides])


def steps_of(csv_path: Path, key: str = "step") -> list:
    return [int(r[key]) if key == "step" else r[key] for r in csv.DictReader(csv_path.open())]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 6-step run: checkpoints at steps 3 and 6, monitoring every step, an export."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(tiny(run_dir, "--max_steps=6", "--ckpt_freq=3", "--keep_checkpoints=3", "--monitor_freq=1",
               "--export_safetensors=true"))
    return run_dir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("overrides", "message"), [
    (["--ttt=null"], r"ttt: \{.*\} -> None; ttt cannot change within a run: use another run_dir"),
    (["--ttt.layers=[1]"], r"ttt\.layers: \[0, 2\] -> \[1\]"),
    (["--batch_size=3"], r"batch_size: 2 -> 3"),
    (["--duration_sec=0.8"], r"duration_sec: 1\.2 -> 0\.8"),
    (["--max_steps=8"], r"max_steps: 6 -> 8; to change max_steps on purpose, add --allow-config-change max_steps"),
    (["--max_steps=8", "--ttt=null", "--allow_config_change=[max_steps]"], r"ttt: .* -> None"),
    (["--allow_config_change=[ttt]", "--ttt=null"], r"--allow-config-change ttt: not a key a resume may change"),
], ids=["ttt-null", "ttt-layers", "batch", "crop", "max-steps", "allowed-and-not", "allow-fixed"])
def test_a_resume_with_another_config_is_refused_and_changes_nothing(run_copy, overrides, message) -> None:
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match=rf"step_0000006: .*{message}|{message}"):
        train(tiny(run_copy, "--max_steps=6", "--ckpt_freq=3", "--keep_checkpoints=3", "--monitor_freq=1",
                   *overrides))
    assert snapshot(run_copy) == before  # config.yaml and the checkpoints are untouched


def test_a_checkpoint_without_its_config_that_does_not_fit_is_named(run_copy) -> None:
    """Checkpoints written before configs were saved in them: DCP's "Missing key" becomes one line naming both."""
    import json

    (run_copy / "config.yaml").unlink()
    for ckpt in list_checkpoints(run_copy):
        (ckpt / "config.yaml").unlink()
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())
        del manifest["files"]["config.yaml"]
        (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step_0000006: does not fit the model this config builds \(.*Missing "
                                              r"key in checkpoint state_dict: model\.transformer\.layers\.1\..*\); "
                                              r"resume with the config it was saved with"):
        train(tiny(run_copy, "--max_steps=6", "--ckpt_freq=3", "--ttt.layers=[1]"))


def test_free_and_allowed_changes_resume(run_copy) -> None:
    result = train(tiny(run_copy, "--max_steps=8", "--allow_config_change=[max_steps]", "--log_freq=2",
                        "--keep_checkpoints=3", "--monitor_freq=1", "--optim.lr=3.0e-3"))
    assert result["resumed_from_step"] == 6 and result["steps"] == 8
    assert "max_steps: 8" in (run_copy / "config.yaml").read_text()


def test_partial_checkpoints_are_never_taken(run_copy) -> None:
    partial = run_copy / "checkpoints" / "step_0000009.partial"
    shutil.copytree(run_copy / "checkpoints" / "step_0000006", partial)
    (partial / "MANIFEST.json").write_text('{"step": 9, "fi')  # killed mid-write
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_0000003", "step_0000006"]
    result = train(tiny(run_copy, "--max_steps=7", "--allow_config_change=[max_steps]", "--keep_checkpoints=3",
                        "--monitor_freq=1"))
    assert result["resumed_from_step"] == 6
    assert not partial.exists()  # cleaned by the next save


def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(run_copy, capsys) -> None:
    shard = next((run_copy / "checkpoints" / "step_0000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    result = train(tiny(run_copy, "--max_steps=6", "--ckpt_freq=3", "--keep_checkpoints=3", "--monitor_freq=1"))
    err = capsys.readouterr().err
    assert "warning: skipping damaged checkpoint" in err and f"{shard.name} is corrupted" in err
    assert result["resumed_from_step"] == 3 and result["steps"] == 6
    assert (run_copy / "checkpoints" / "step_0000006.damaged").is_dir()  # kept aside, not deleted
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_0000003", "step_0000006"]
    assert steps_of(run_copy / "metrics.csv") == [1, 2, 3, 4, 5, 6]


def test_a_resume_truncates_the_logs_to_its_step(run_copy) -> None:
    """A kill after steps 4-6 were logged but before their checkpoint: the resume redoes 4-6, logging each once."""
    shutil.rmtree(run_copy / "checkpoints" / "step_0000006")
    train(tiny(run_copy, "--max_steps=6", "--ckpt_freq=3", "--keep_checkpoints=3", "--monitor_freq=1"))
    assert steps_of(run_copy / "metrics.csv") == [1, 2, 3, 4, 5, 6]
    stats = [(r["step"], r["layer"]) for r in csv.DictReader((run_copy / "ttt_stats.csv").open())]
    assert len(stats) == len(set(stats)) == 12


def test_a_fresh_run_starts_its_logs_empty(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,stage\n1,0\n2,0\n")  # from a run that never checkpointed
    (run_dir / "ttt_stats.csv").write_text("step,layer\n0,0\n")
    train(tiny(run_dir, "--max_steps=2", "--monitor_freq=1"))
    assert steps_of(run_dir / "metrics.csv") == [1, 2]
    assert steps_of(run_dir / "ttt_stats.csv") == [0, 0, 1, 1]


NAN_LR = ["--optim.lr=1.0e+4", "--optim.ttt_lr=1.0e+4", "--optim.max_norm=1.0e+9"]


def test_a_run_that_goes_nan_stops_with_a_named_reason_and_no_export(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite for 2 steps in a row \(steps 2-3\); run stopped, no "
                                               r"checkpoint was saved before it"):
        train(tiny(run_dir, "--max_steps=20", "--export_safetensors=true", "--max_nonfinite_steps=2", *NAN_LR))
    assert not (run_dir / "export").exists() and not list_checkpoints(run_dir)


def test_nan_rolls_back_to_the_last_good_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"steps 2-4\); run stopped, restored the last good checkpoint "
                                               r".*step_0000001; a resume continues from it"):
        train(tiny(run_dir, "--max_steps=20", "--ckpt_freq=1", "--keep_checkpoints=1", "--max_nonfinite_steps=3",
                   *NAN_LR))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001"]  # rotation kept the good one


def test_a_few_non_finite_steps_are_skipped(tmp_path, monkeypatch) -> None:
    """A NaN loss at steps 2 and 3 skips them (weights unchanged), the run goes on and ends with finite weights."""
    from ttt_speech.train import trainer

    real = trainer.moshi_loss
    calls = []

    def flaky(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) in (2, 3) else (loss, parts)

    monkeypatch.setattr(trainer, "moshi_loss", flaky)
    result = train(tiny(tmp_path / "run", "--max_steps=5", "--max_nonfinite_steps=3", "--export_safetensors=true"))
    assert result["status"] == "done" and result["skipped_steps"] == 2
    from ttt_speech.integrations.moshi import load_ttt_lm

    model = load_ttt_lm(result["export"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path) -> None:
    from ttt_speech.train.model import build_model
    from ttt_speech.train.schedule import Schedule

    cfg = tiny(tmp_path / "run")
    model, _ = build_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.transformer.layers[1].self_attn.out_projs[0].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"not saving step 1: non-finite weights in transformer\.layers\.1\."):
        save_checkpoint(tmp_path / "run", 1, model, optimizer, Schedule(cfg.stage_list(), 1e-3, 0.1),
                        {"step": 1, "world_size": 1}, {}, 0, 2)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_ctrl_c_saves_at_the_end_of_the_step_and_a_second_aborts(tmp_path) -> None:
    run_dir = tmp_path / "run"

    def press_ctrl_c() -> None:
        metrics, deadline = run_dir / "metrics.csv", time.time() + 120
        while time.time() < deadline and (not metrics.is_file() or len(steps_of(metrics)) < 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    result = train(tiny(run_dir, "--max_steps=500", "--duration_sec=0.8"))
    assert result["status"] == "stopped" and 2 <= result["steps"] < 500
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{result['steps']:07d}"]
    assert steps_of(run_dir / "metrics.csv")[-1] == result["steps"]
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    # the handler itself: a first Ctrl-C requests the stop, a second aborts at once
    from ttt_speech.train import trainer

    trainer._stop_requested = False
    interrupt()
    assert trainer._stop_requested
    with pytest.raises(KeyboardInterrupt):
        interrupt()
    trainer._stop_requested = False
    request_stop()
    request_stop()  # SIGTERM twice is still one stop
    trainer._stop_requested = False


def test_a_checkpoint_of_another_shape_names_the_file_and_keys(base_run, tmp_path) -> None:
    import json

    from ttt_speech.integrations.moshi import load_ttt_lm, tiny_lm_kwargs

    wide = {**tiny_lm_kwargs(), "dim": 96}
    with pytest.raises(CheckpointMismatch, match=r"export/model\.safetensors: does not fit .*size mismatch for \S+"):
        load_ttt_lm(base_run / "export", lm_kwargs=wide)
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    with pytest.raises(CheckpointMismatch, match=r"model\.safetensors: does not fit"):
        train(tiny(tmp_path / "run", "--max_steps=1", f"--model.lm_kwargs={tmp_path / 'wide.json'}",
                   f"--model.checkpoint={base_run / 'export' / 'model.safetensors'}"))
    with pytest.raises(CheckpointMismatch, match=r"model\.checkpoint .*model\.safetensors: does not fit"):
        train(tiny(tmp_path / "run2", "--max_steps=1", "--ttt=null",
                   f"--model.checkpoint={base_run / 'export' / 'model.safetensors'}"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["--optim.lr=-1e-3"], r"optim\.lr must be a finite number >= 0, got -0\.001"),
    (["--optim.lr=.nan"], r"optim\.lr must be a finite number >= 0, got nan"),
    (["--ttt.lr=-0.3"], r"ttt\.lr must be a finite number >= 0, got -0\.3"),
    (["--ttt.lr=.nan"], r"ttt\.lr must be a finite number >= 0, got nan"),
    (["--optim.pct_start=1.5"], r"optim\.pct_start .* got 1\.5"),
    (["--run_dir=''"], r"run_dir is empty"),
    (["--ttt.layers=[]"], r"ttt\.layers is empty: no layer would get TTT; set `ttt: null`"),
    (["--stages=[{duration_sec: 1.2, steps: 3}]"], r"max_steps=40 with stages"),
    (["--data.codes_dir=/tmp/codes"], r"data\.codes_dir='/tmp/codes' with data\.train_data=synthetic"),
    (["--data.train_data=x.jsonl"], r"data\.tokenizer is required"),
    (["--duration_sec=0"], r"duration_sec must be at least one frame"),
    (["--optim.betas=[0.9]"], r"optim\.betas must be two numbers in \[0, 1\)"),
    (["--optim.lr=0", "--max_steps=null", "--stages=[{duration_sec: 1.2, steps: 2, lr: 1e-3}]"],
     r"stages\[0\]\.lr: a stage's lr scales both groups by lr / optim\.lr, which is undefined with optim\.lr = 0"),
    (["--optim.lr=0", "--optim.ttt_lr=0"], r"no parameter would train"),
    (['--ttt.chunk_size="8"'], r"ttt\.chunk_size must be an integer, got '8'"),
    (["--ttt.chunk_size=8.5"], r"ttt\.chunk_size must be an integer, got 8\.5"),
    (["--ttt.layers=0,2"], r"ttt\.layers must be a list or null, got '0,2'"),
    (["--ttt.chunk_sise=8"], r"unknown key ttt\.chunk_sise; MoshiTTTConfig has .*\bkind, layers\b"),
    (["--ttt.kind=blocks"], r"ttt\.kind must be 'inplace' or 'block'"),
])
def test_nonsense_config_values_are_named_at_load(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=rf"tiny\.yaml: .*{message}"):
        tiny(tmp_path / "run", *overrides)


def test_yaml_strings_that_are_numbers_and_suspicious_values(tmp_path) -> None:
    cfg = tiny(tmp_path / "run", "--ttt.lr=1e-3")  # PyYAML reads 1e-3 (no dot) as a string
    assert cfg.ttt.lr == 0.001 and isinstance(cfg.ttt.lr, float)
    with pytest.warns(UserWarning, match=r"ttt\.chunk_size=64 frames is longer than a crop of 15 frames"):
        tiny(tmp_path / "run", "--ttt.chunk_size=64")
    stages = tiny(tmp_path / "run", "--max_steps=null", "--stages=[{duration_sec: 1.2, steps: 3}]")
    assert stages.total_steps == 3 and tiny(tmp_path / "run", "--max_steps=null").total_steps == 100
    with pytest.raises(ConfigError, match=r"ttt\.layers must be distinct indices in \[0, 4\), got \[0, 7\]"):
        train(tiny(tmp_path / "run", "--ttt.layers=[0, 7]"))


def test_parallel_none_with_two_processes_and_submit_check_before_anything_runs(tmp_path) -> None:
    from ttt_speech.launch.submit import SlurmConfig, run_local, submit

    with pytest.raises(ConfigError, match=r"parallel: none with 2 processes"):
        run_local(str(TINY), [f"--run_dir={tmp_path / 'run'}", "--parallel=none"], nproc=2)
    with pytest.raises(ConfigError, match=r"parallel: none with 16 processes"):
        submit(str(TINY), [f"--run_dir={tmp_path / 'run'}", "--parallel=none"], SlurmConfig(nodes=2))
    with pytest.raises(ConfigError, match=r"unknown key ttt\.chunk_sise"):
        submit(str(TINY), [f"--run_dir={tmp_path / 'run'}", "--ttt.chunk_sise=8"], SlurmConfig())
    assert not (tmp_path / "run").exists()  # nothing queued, no folder made
