"""The fine-tuning loop on the tiny model: exact resume (1 and 2 gloo processes), checkpoints, export, LoRA,
curriculum, monitoring, configs, submitit."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttt_speech.config import ConfigError, from_dict, load_config
from ttt_speech.integrations.moshi import load_ttt_lm, ttt_modules
from ttt_speech.launch.submit import SlurmConfig, executor_parameters
from ttt_speech.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.monitor import plot_monitor
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, [f"--run_dir={run_dir}", "--duration_sec=1.2", "--log_freq=1",
                                           "--ckpt_freq=100", *overrides])


def logged_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in csv.DictReader((run_dir / "metrics.csv").open())}


def test_resume_gives_the_same_losses_as_straight(tmp_path: Path) -> None:
    straight = train(tiny(tmp_path / "straight", "--max_steps=8"))
    first = train(tiny(tmp_path / "resumed", "--max_steps=8", "--stop_after=4"))
    assert first["status"] == "stopped" and first["steps"] == 4
    second = train(tiny(tmp_path / "resumed", "--max_steps=8"))
    assert second["resumed_from_step"] == 4
    # tolerance: exact. Same process count, same kernels, restored RNG, data position and optimizer state.
    assert second["losses"] == straight["losses"][4:]
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")


@pytest.mark.slow
def test_resume_with_two_gloo_processes_and_fsdp2(tmp_path: Path) -> None:
    def run(run_dir: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "ttt_speech.cli", "finetune", str(TINY), f"--run_dir={run_dir}", "--duration_sec=1.2",
               "--log_freq=1", "--max_steps=6", "--export_safetensors=false", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--stop_after=3")
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000003"]
    assert {f.name for f in (tmp_path / "resumed/checkpoints/step_0000003").iterdir()} >= {"rank_0.pt", "rank_1.pt"}
    run(tmp_path / "resumed")
    # tolerance: exact, as in one process; the logged loss is the mean over both ranks
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")


def test_a_corrupted_checkpoint_is_detected(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "--max_steps=2", "--export_safetensors=false"))
    (ckpt,) = list_checkpoints(tmp_path / "run")
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupted"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="corrupted"):
        train(tiny(tmp_path / "run", "--max_steps=4"))


def test_export_loads_for_inference_and_matches(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(tiny(run, "--max_steps=3"))
    model = load_ttt_lm(result["export"]).eval()
    assert sorted(ttt_modules(model)) == [0, 2]
    ckpt_state = torch.load(list_checkpoints(run)[-1] / "rank_0.pt", weights_only=False)
    assert ckpt_state["stage"] == 0
    codes = torch.zeros(1, 17, 5, dtype=torch.long)
    assert torch.isfinite(model(codes).logits.nan_to_num(0.0)).all()


def test_lora_trains_adapters_and_ttt_and_exports_merged(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", "--max_steps=3", "--lora.enable=true", "--lora.rank=4"))
    model = load_ttt_lm(result["export"])  # strict: merged LoRA keys are the plain moshi names
    assert not any("lora" in n for n, _ in model.named_parameters())

    from ttt_speech.train.model import apply_lora, build_model, ttt_trainable_names

    m, _ = build_model(tiny(tmp_path / "x"), torch.device("cpu"))
    names = ttt_trainable_names(m)
    targets = apply_lora(m, tiny(tmp_path / "x").lora, keep_full=names)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names <= trainable
    assert all("lora_" in n for n in trainable - names)
    assert "transformer.layers.0.gating.linear_out" not in targets  # the In-Place fast weight stays plain


def test_curriculum_stages_change_duration_and_lr(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--max_steps=null",
               "--stages=[{duration_sec: 0.8, steps: 2}, {duration_sec: 1.6, steps: 2, lr: 1e-3}]")
    result = train(cfg)
    assert result["steps"] == 4
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["stage"]) for r in rows] == [0, 0, 1, 1]
    assert float(rows[2]["lr"]) < 1e-3 <= 3e-3


def test_monitor_writes_stats_and_plots(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "--max_steps=6", "--monitor_freq=2", "--export_safetensors=false"))
    rows = list(csv.DictReader((tmp_path / "run" / "ttt_stats.csv").open()))
    assert {(int(r["step"]), int(r["layer"])) for r in rows} == {(s, layer) for s in (0, 2, 4) for layer in (0, 2)}
    assert float(rows[-1]["update_norm"]) > 0  # the conv has moved off zero after a few steps
    paths = plot_monitor(tmp_path / "run")
    assert [p.name for p in paths] == ["training.png", "ttt_stats.png"] and all(p.stat().st_size > 0 for p in paths)


def test_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key optim\.learning_rate"):
        tiny(tmp_path, "--optim.learning_rate=1e-3")
    with pytest.raises(ConfigError, match=r"batch_size must be an integer"):
        tiny(tmp_path, "--batch_size=two")
    with pytest.raises(ConfigError, match="deepspeed"):
        from_dict(TrainConfig, {"run_dir": "x", "parallel": "deepspeed"})
    cfg = tiny(tmp_path, "--optim.lr=1e-4")
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.95]
    with pytest.raises(ConfigError, match=r"tiny.yaml: unknown key ttt\.chunk; MoshiTTTConfig has .*\bkind\b"):
        tiny(tmp_path / "bad", "--ttt={kind: inplace, chunk: 4}")  # at load time, before anything runs


def test_slurm_parameters() -> None:
    params = executor_parameters(SlurmConfig(partition="gpu", nodes=2, gpus_per_node=4, time_min=90,
                                             account="proj", constraint="h100"))
    assert params == {"timeout_min": 90, "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 10,
                      "slurm_signal_delay_s": 120, "slurm_max_num_timeout": 10, "slurm_partition": "gpu",
                      "slurm_account": "proj", "slurm_constraint": "h100"}
    assert executor_parameters(SlurmConfig(cluster="local", time_min=5)) == {"timeout_min": 5, "nodes": 1}


@pytest.mark.slow
def test_submitit_local_executor_runs_and_resumes(tmp_path: Path) -> None:
    from ttt_speech.launch.submit import submit

    overrides = [f"--run_dir={tmp_path / 'run'}", "--duration_sec=0.8", "--max_steps=4",
                 "--export_safetensors=false"]
    job = submit(str(TINY), [*overrides, "--stop_after=2"], SlurmConfig(cluster="local", time_min=5))
    assert job.result()["status"] == "stopped"
    job = submit(str(TINY), overrides, SlurmConfig(cluster="local", time_min=5))
    result = job.result()
    assert result == {"status": "done", "steps": 4, "resumed_from_step": 2, "export": None, "frames_per_sample": 10,
                      "skipped_steps": 0}


def test_loss_decreases_on_the_sample_set(tmp_path: Path) -> None:
    from ttt_speech.data.codes import pre_encode

    samples = REPO / "data" / "samples"
    assert (samples / "samples.json").is_file(), f"sample set missing at {samples}: run make samples"
    codes = tmp_path / "codes"
    pre_encode(samples / "dialogues.jsonl", codes, mimi="tiny-random")
    result = train(tiny(tmp_path / "run", "--max_steps=40", "--duration_sec=4.0", "--export_safetensors=false",
                        f"--data.train_data={samples / 'dialogues.jsonl'}",
                        f"--data.tokenizer={samples / 'tokenizer.model'}", f"--data.codes_dir={codes}"))
    losses = result["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10  # noisy per step: crops of speech or silence


def test_gradient_checkpointing_changes_nothing(tmp_path: Path) -> None:
    plain = train(tiny(tmp_path / "plain", "--max_steps=3", "--export_safetensors=false"))
    ckpt = train(tiny(tmp_path / "ckpt", "--max_steps=3", "--export_safetensors=false",
                      "--gradient_checkpointing=true"))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
