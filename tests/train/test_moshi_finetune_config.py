"""moshi-finetune's configs: every key of its TrainArgs accepted (its meaning, a note, or a reasoned refusal), its
example's shape trains the tiny model, `moshi_paths` resolves through moshi's own CheckpointInfo, and a typo or a
wrong type under `ttt:` stops `submit()` before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ttt_speech.config import ConfigError, load_config
from ttt_speech.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "moshi_finetune_example.yaml"
TINY = REPO / "configs" / "tiny.yaml"
SAMPLES = REPO / "data" / "samples"

# moshi-finetune's TrainArgs (finetune/args.py, data/args.py), key by key (world_size is init=False: not a key)
MOSHI_FINETUNE_KEYS = {
    "data": {"train_data", "shuffle", "eval_data"},
    "run_dir": None, "first_codebook_weight_multiplier": None, "text_padding_weight": None,
    "optim": {"lr", "weight_decay", "pct_start"},
    "moshi_paths": {"hf_repo_id", "mimi_path", "moshi_path", "tokenizer_path", "config_path"},
    "seed": None, "num_microbatches": None, "duration_sec": None, "batch_size": None, "max_norm": None,
    "max_steps": None, "log_freq": None, "ckpt_freq": None, "save_adapters": None, "do_ckpt": None,
    "num_ckpt_keep": None, "eval_freq": None, "do_eval": None, "gradient_checkpointing": None,
    "wandb": {"project", "offline", "key", "run_name"},
    "lora": {"enable", "rank", "scaling", "ft_embed"},
    "full_finetuning": None, "param_dtype": None, "overwrite_run_dir": None,
}


def tiny_base(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny base Moshi (no TTT) and its config.json in moshi's format (LM keys plus keys CheckpointInfo pops)."""
    from safetensors.torch import save_file

    from ttt_speech.integrations.moshi import build_lm, tiny_lm_kwargs

    weights = tmp_path / "base" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_lm(seed=3).state_dict().items()}, str(weights))
    config = tmp_path / "base" / "config.json"
    config.write_text(json.dumps({**tiny_lm_kwargs(), "model_type": "moshi", "lm_gen_config": {"temp": 0.7},
                                  "moshi_name": "model.safetensors"}))
    return weights, config


def example(tmp_path: Path, *overrides: str) -> TrainConfig:
    weights, config = tiny_base(tmp_path)
    return load_config(TrainConfig, EXAMPLE, [
        f"--run_dir={tmp_path / 'run'}", f"--moshi_paths.moshi_path={weights}", f"--moshi_paths.config_path={config}",
        f"--moshi_paths.tokenizer_path={SAMPLES / 'tokenizer.model'}",
        f"--data.train_data={SAMPLES / 'dialogues.jsonl'}", f"--data.eval_data={SAMPLES / 'dialogues.jsonl'}",
        *overrides])


def test_the_example_has_moshi_finetunes_full_key_set() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert set(data) == set(MOSHI_FINETUNE_KEYS)
    for key, sub in MOSHI_FINETUNE_KEYS.items():
        if sub is not None:
            assert set(data[key]) == sub, key
    assert isinstance(data["optim"]["lr"], str)  # PyYAML's reading of 2e-3, as moshi-finetune's own `lr: 2e-6`


def test_moshi_finetune_names_are_moved_with_a_note(tmp_path, capsys) -> None:
    cfg = example(tmp_path, "--max_norm=0.5", "--num_ckpt_keep=4")
    assert (cfg.optim.max_norm, cfg.keep_checkpoints, cfg.model.dtype) == (0.5, 4, "float32")
    assert cfg.optim.lr == 2e-3 and cfg.max_norm is None and cfg.num_ckpt_keep is None and cfg.param_dtype is None
    err = capsys.readouterr().err
    for line in ("note: max_norm: 0.5 is optim.max_norm here", "note: num_ckpt_keep: 4 is keep_checkpoints here",
                 "note: param_dtype: bfloat16 is model.dtype: float32 here",
                 "note: overwrite_run_dir: false: an existing run_dir is resumed here"):
        assert line in err
    assert cfg.lora.enable and cfg.full_finetuning is False and cfg.do_eval and cfg.eval_freq == 10


@pytest.mark.parametrize(("overrides", "message"), [
    (["--overwrite_run_dir=true"], r"overwrite_run_dir: true is refused: an existing run_dir is resumed"),
    (["--full_finetuning=true"], r"full_finetuning: true with lora\.enable: true"),
    (["--max_norm=0.5", "--optim.max_norm=2.0"], r"max_norm: 0\.5 \(moshi-finetune's name for optim\.max_norm\) and "
                                                  r"optim\.max_norm: 2\.0 differ"),
    (["--param_dtype=float16"], r"param_dtype must be bfloat16 or float32"),
    (["--do_eval=true", "--data.eval_data=''"], r"do_eval: true without data\.eval_data"),
    (["--model.checkpoint=/x.safetensors"], r"model\.checkpoint: '/x\.safetensors' with moshi_paths set: "
                                            r"moshi_paths\.moshi_path supplies it"),
    (["--moshi_paths.moshi_path=null"], r"moshi_paths: without hf_repo_id, moshi_paths\.moshi_path must name"),
    (["--wandb.project=''"], r"wandb\.project is empty"),
    (["--eval_freq=-1"], r"eval_freq must be >= 0"),
    (["--lora.ft_embed=maybe"], r"lora\.ft_embed must be bool, got 'maybe'"),
])
def test_moshi_finetune_keys_refused_with_the_reason(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        example(tmp_path, *overrides)


def test_moshi_paths_resolve_through_moshis_checkpoint_info(tmp_path) -> None:
    from ttt_speech.integrations.moshi import tiny_lm_kwargs
    from ttt_speech.train.moshi_finetune import resolve_moshi_paths

    cfg = example(tmp_path)
    resolved = resolve_moshi_paths(cfg)
    assert resolved.model.checkpoint == cfg.moshi_paths.moshi_path
    assert resolved.data.tokenizer == str(SAMPLES / "tokenizer.model") and resolved.data.mimi == "tiny-random"
    # CheckpointInfo dropped the keys that are not LMModel arguments (model_type, lm_gen_config, moshi_name)
    assert resolved.model.lm_kwargs == tiny_lm_kwargs()
    assert not resolved.moshi_paths.active and cfg.moshi_paths.active  # the input is left as it was
    # without config_path (and hf_repo_id): moshi's CheckpointInfo built from the files, Moshi 7B's LM config
    plain = resolve_moshi_paths(example(tmp_path / "3", "--moshi_paths.config_path=null"))
    assert plain.model.lm_kwargs == "moshi-7b" and plain.model.checkpoint == str(tmp_path / "3/base/model.safetensors")
    with pytest.raises(ConfigError, match=r"moshi_paths\.tokenizer_path: no file at .*none\.model"):
        example(tmp_path / "2", f"--moshi_paths.tokenizer_path={tmp_path / 'none.model'}")  # at load: --check too


def test_hf_repo_id_resolves_through_moshis_checkpoint_info_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """`moshi_paths.hf_repo_id` as a Hugging Face repository, offline: moshi's `CheckpointInfo.from_hf_repo` reads
    its `config.json` (file names, LM config) and weights from the hub cache (huggingface_hub's real lookup,
    pointed at a local cache), and the base model loads from what it resolved."""
    import shutil

    import torch
    from huggingface_hub import constants

    from ttt_speech.integrations.moshi import build_lm, tiny_lm_kwargs
    from ttt_speech.train.model import build_model
    from ttt_speech.train.moshi_finetune import resolve_moshi_paths

    weights, config = tiny_base(tmp_path)
    repo = tmp_path / "hub" / "models--test--tiny-moshi"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copy(weights, snapshot / "weights.safetensors")
    shutil.copy(SAMPLES / "tokenizer.model", snapshot / "spm.model")
    (snapshot / "config.json").write_text(json.dumps({**json.loads(config.read_text()), "moshi_name":
                                                      "weights.safetensors", "tokenizer_name": "spm.model"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    cfg = example(tmp_path / "cfg", "--moshi_paths.hf_repo_id=test/tiny-moshi", "--moshi_paths.moshi_path=null",
                  "--moshi_paths.tokenizer_path=null", "--moshi_paths.config_path=null",
                  "--moshi_paths.mimi_path=tiny-random")
    resolved = resolve_moshi_paths(cfg)
    assert Path(resolved.model.checkpoint) == snapshot / "weights.safetensors"
    assert Path(resolved.data.tokenizer) == snapshot / "spm.model" and resolved.data.mimi == "tiny-random"
    assert resolved.model.lm_kwargs == tiny_lm_kwargs()
    model, _ = build_model(resolved, torch.device("cpu"))  # no ttt: moshi's own loader, strict
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in build_lm(seed=3).state_dict().items())
    with pytest.raises(ConfigError, match=r"moshi_paths \(hf_repo_id='test/absent'\): "), \
            pytest.warns(UserWarning, match="no config.json"):  # moshi's: then it looks for Moshi 7B's files
        resolve_moshi_paths(example(tmp_path / "cfg2", "--moshi_paths.hf_repo_id=test/absent",
                                    "--moshi_paths.config_path=null", "--moshi_paths.moshi_path=null"))


@pytest.mark.slow
def test_the_moshi_finetune_shaped_config_trains_the_tiny_model(tmp_path) -> None:
    from ttt_speech.train.trainer import train

    # data.shuffle false: the crops come from the first recording only, so only it is encoded (time)
    cfg = example(tmp_path, "--max_steps=4", "--eval_freq=2", "--ckpt_freq=4", "--eval_batches=2",
                  "--duration_sec=1.2", "--log_freq=1", "--data.shuffle=false")
    result = train(cfg)
    run = tmp_path / "run"
    assert result["status"] == "done" and result["steps"] == 4
    assert all(loss == loss for loss in result["losses"])
    evals = [json.loads(line) for line in (run / "metrics.eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(e["text_loss"] > 0 and e["audio_loss"] > 0 for e in evals)
    assert (run / "best" / "model.safetensors").is_file() and (run / "export" / "lora.safetensors").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["checkpoint"] == cfg.moshi_paths.moshi_path and saved["moshi_paths"]["moshi_path"] is None


def test_a_typo_or_wrong_type_under_ttt_stops_submit_before_anything_is_queued(tmp_path) -> None:
    from ttt_speech.launch.submit import SlurmConfig, submit

    run = tmp_path / "run"
    for override, message in (("--ttt.chunk_sise=8", r"unknown key ttt\.chunk_sise"),
                              ("--ttt.lr=fast", r"ttt\.lr must be a number, got 'fast'"),
                              ("--ttt.layers=[0, x]", r"ttt\.layers\[1\] must be an integer, got 'x'"),
                              ("--ttt.conv=left", r"conv must be 'centred' or 'next'")):
        with pytest.raises(ConfigError, match=message):
            submit(str(TINY), [f"--run_dir={run}", override], SlurmConfig(cluster="local"))
    assert not run.exists()  # no submitit folder, nothing queued
    cfg = load_config(TrainConfig, TINY, [f"--run_dir={run}", "--ttt.lr=1e-3"])
    assert cfg.ttt.lr == 1e-3 and isinstance(cfg.ttt.lr, float)


def test_check_with_hf_repo_id_downloads_nothing(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from ttt_speech.integrations import moshi_paths
    from ttt_speech.launch.submit import check

    def no_network(*args, **kwargs):
        raise AssertionError(f"--check tried to resolve or download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(moshi_paths, "checkpoint_info", no_network)
    cfg = check(str(EXAMPLE), [f"--run_dir={tmp_path / 'run'}", "--moshi_paths.hf_repo_id=kyutai/moshiko-pytorch-bf16",
                               "--moshi_paths.moshi_path=null", "--moshi_paths.mimi_path=null",
                               "--moshi_paths.tokenizer_path=null", "--moshi_paths.config_path=null"])
    assert cfg.moshi_paths.hf_repo_id == "kyutai/moshiko-pytorch-bf16" and cfg.model.checkpoint is None
    assert not (tmp_path / "run").exists()
