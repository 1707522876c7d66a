"""`ttt:` is typed after load: a `MoshiTTTConfig` (or "from_checkpoint") with model.family: moshi, a
`LlamaTTTSection` with llama, resolved by family in the one checker (`config.from_dict`); the YAML surface and the
saved config round trip unchanged, and run folders saved before still load and resume."""

from __future__ import annotations

import dataclasses
import pickle
import typing
from pathlib import Path

import pytest
import yaml

from ttt_speech.config import ConfigError, from_dict, load_config, save_config, to_dict
from ttt_speech.integrations.llama_omni import LlamaTTTConfig
from ttt_speech.integrations.llama_ttt_section import LlamaTTTSection
from ttt_speech.integrations.moshi import MoshiTTTConfig
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.resume import check_resume_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
LLAMA = REPO / "configs" / "llama_tiny.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# how tests/fixtures/saved_config_*.yaml were made (on main before `ttt:` was typed; their header says so)
SAVED = {"moshi": (TINY, ["--run_dir=runs/saved", "--ttt.lr=1e-3", "--ttt.conv=next"]),
         "llama": (LLAMA, ["--run_dir=runs/saved", "--ttt.base_lr=1e-1"])}


def test_ttt_is_the_family_section_with_numbers_read_as_numbers(tmp_path) -> None:
    moshi = load_config(TrainConfig, TINY, [f"--run_dir={tmp_path}", "--ttt.lr=1e-3"])
    assert type(moshi.ttt) is MoshiTTTConfig and moshi.ttt.layers == [0, 2] and moshi.ttt.chunk_size == 8
    assert moshi.ttt.lr == 1e-3 and type(moshi.ttt.lr) is float  # PyYAML's "1e-3" (a string)
    llama = load_config(TrainConfig, LLAMA, [f"--run_dir={tmp_path}", "--ttt.base_lr=1e-1"])
    assert type(llama.ttt) is LlamaTTTSection and llama.ttt.base_lr == 0.1 and type(llama.ttt.base_lr) is float
    assert llama.ttt.model_config() == LlamaTTTConfig(use_ttt=True, ttt_layers=[3], ttt_mini_batch_size=16,
                                                      ttt_base_lr=0.1)
    assert load_config(TrainConfig, TINY, [f"--run_dir={tmp_path}", "--ttt=from_checkpoint"]).ttt == "from_checkpoint"
    assert load_config(TrainConfig, TINY, [f"--run_dir={tmp_path}", "--ttt=null"]).ttt is None


def test_the_same_mapping_is_typed_by_model_family(tmp_path) -> None:
    """`{layers: [1]}` fits both schemas: model.family picks, wherever `model:` stands in the file."""
    data = {"ttt": {"layers": [1]}, "run_dir": str(tmp_path), "duration_sec": 60.0}  # ttt before model
    assert type(from_dict(TrainConfig, data).ttt) is MoshiTTTConfig
    llama = {**data, "model": {"family": "llama"}, "llama": {"seq_len": 64}, "duration_sec": 10.0}
    assert type(from_dict(TrainConfig, llama).ttt) is LlamaTTTSection
    with pytest.raises(ConfigError, match=r"unknown key ttt\.chunk_size; LlamaTTTSection has layers, "):
        from_dict(TrainConfig, {**llama, "ttt": {"layers": [1], "chunk_size": 8}})
    with pytest.raises(ConfigError, match=r"unknown key ttt\.mode; MoshiTTTConfig has "):
        from_dict(TrainConfig, {**data, "ttt": {"mode": "replace"}})
    with pytest.raises(ConfigError, match=r"ttt must be a mapping \(LlamaTTTSection\) or null, got 'from_checkpoint'"):
        from_dict(TrainConfig, {**llama, "ttt": "from_checkpoint"})
    with pytest.raises(ConfigError, match=r"^x\.yaml: model\.family must be one of \['moshi', 'llama'\], got 'gpt'$"):
        from_dict(TrainConfig, {**data, "model": {"family": "gpt"}}, where="x.yaml")


def test_a_ttt_typo_or_wrong_type_names_the_key(tmp_path) -> None:
    def fails(config: Path, override: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, config, [f"--run_dir={tmp_path}", override])

    fails(TINY, "--ttt.chunk_sise=8", r"unknown key ttt\.chunk_sise; .*\(did you mean ttt\.chunk_size for "
                                      r"ttt\.chunk_sise\?\)$")
    fails(TINY, "--ttt.lr=fast", r"ttt\.lr must be a number, got 'fast'")
    fails(LLAMA, "--ttt.base_lr=fast", r"ttt\.base_lr must be a number, got 'fast'")
    fails(LLAMA, "--ttt.layers=[1, x]", r"ttt\.layers\[1\] must be an integer, got 'x'")
    fails(LLAMA, "--ttt.mode=both", r"llama_tiny\.yaml: ttt\.mode must be one of \('replace', 'gated_residual'\), "
                                    r"got 'both'$")
    fails(LLAMA, "--ttt.mini_batch_size=0", r"ttt\.mini_batch_size must be >= 1, got 0")
    fails(LLAMA, "--ttt.use_ttt=true", r"unknown key ttt\.use_ttt; .*; ttt\.use_ttt: implied by a ttt: section")
    # InPlaceTTTConfig's own checks name the key as the config does (was "ttt: conv must be ...")
    fails(TINY, "--ttt.conv=left", r"tiny\.yaml: ttt\.conv must be 'centred' or 'next', got 'left'$")
    fails(TINY, "--ttt.conv_kernel=4", r"tiny\.yaml: ttt\.conv_kernel must be odd with a centred conv, got 4$")
    fails(TINY, "--ttt.conv_kernel=0", r"tiny\.yaml: ttt\.conv_kernel must be >= 1, got 0$")
    # the TTT layer's own fields are checked at load (with stand-in dimensions), not first when the model is built
    fails(LLAMA, "--ttt.layer_type=foo", r"llama_tiny\.yaml: ttt\.layer_type must be one of \('linear', 'mlp'\), "
                                         r"got 'foo'$")
    fails(LLAMA, "--ttt.base_lr=-1", r"ttt\.base_lr must be finite and >= 0, got -1")
    fails(LLAMA, "--ttt.qk_norm=x", r"ttt\.qk_norm must be one of \('none', 'l2'\), got 'x'")
    fails(LLAMA, "--ttt.num_heads=0", r"ttt\.num_heads must be >= 1 or None \(the model's head count\), got 0")
    fails(LLAMA, "--ttt.gate_init=.nan", r"ttt\.gate_init must be a finite number, got nan")
    # a dotted override does not turn 'from_checkpoint' or null (off) into a default section
    for base in ("--ttt=from_checkpoint", "--ttt=null"):
        with pytest.raises(ConfigError, match=r"override '--ttt\.lr=0\.5': ttt is .*, not a section; set ttt itself"):
            load_config(TrainConfig, TINY, [f"--run_dir={tmp_path}", base, "--ttt.lr=0.5"])
    block = "--ttt={kind: block, layers: [1], ttt_layer_type: foo}"
    fails(TINY, block, r"tiny\.yaml: ttt\.ttt_layer_type must be one of \('linear', 'mlp'\), got 'foo'$")
    fails(TINY, "--ttt={kind: block, layers: [1], ttt_num_heads: 0}", r"ttt\.ttt_num_heads must be >= 1 or None")
    fails(TINY, "--ttt.decay=2", r"tiny\.yaml: ttt\.decay must be in \(0, 1\] or None, got 2\.0$")
    fails(TINY, "--ttt.target=x", r"tiny\.yaml: ttt\.target must be one of ")


def test_a_train_config_built_in_code_types_its_mapping(tmp_path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path), ttt={"layers": [0], "lr": "1e-3", "chunk_size": 8})
    assert cfg.ttt == MoshiTTTConfig(layers=[0], lr=1e-3, chunk_size=8)
    with pytest.raises(ConfigError, match=r"unknown key ttt\.chunk_sise"):
        TrainConfig(run_dir=str(tmp_path), ttt={"chunk_sise": 8})


def test_llama_section_is_llama_ttt_config_without_prefix_nothing_restated() -> None:
    """Every LlamaTTTConfig field but `use_ttt` is a section field of the same type and default, and nothing else."""
    hints, section_hints = typing.get_type_hints(LlamaTTTConfig), typing.get_type_hints(LlamaTTTSection)
    expected = [(f.name.removeprefix("ttt_"), hints[f.name], f.default) for f in dataclasses.fields(LlamaTTTConfig)
                if f.name != "use_ttt"]
    assert [(f.name, section_hints[f.name], f.default) for f in dataclasses.fields(LlamaTTTSection)] == expected
    assert LlamaTTTSection().model_config() == LlamaTTTConfig(use_ttt=True)


@pytest.mark.parametrize("family", ["moshi", "llama"])
def test_saved_config_round_trip(tmp_path, family) -> None:
    """What the trainer writes to run_dir/config.yaml (`save_config`) loads back to an equal config, and pickles
    (submitit, spawned processes)."""
    config, overrides = SAVED[family]
    cfg = load_config(TrainConfig, config, overrides)
    again = load_config(TrainConfig, save_config(cfg, tmp_path / "config.yaml"))
    assert again == cfg and type(again.ttt) is type(cfg.ttt)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["ttt"] == dataclasses.asdict(cfg.ttt)


@pytest.mark.parametrize("family", ["moshi", "llama"])
def test_a_config_saved_before_ttt_was_typed_still_loads_and_resumes(tmp_path, family) -> None:
    """A run folder from main before this change: its config.yaml (`ttt:` holding only the keys given) loads, and a
    resume with the config it was made from sees no change."""
    saved_path = FIXTURES / f"saved_config_{family}.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    assert set(saved["ttt"]) < {f.name for f in dataclasses.fields(type(load_config(TrainConfig, saved_path).ttt))}
    config, overrides = SAVED[family]
    cfg = load_config(TrainConfig, config, overrides)
    assert load_config(TrainConfig, saved_path) == cfg
    assert check_resume_config(saved, cfg, tmp_path / "checkpoint") == []
    changed = load_config(TrainConfig, config, [*overrides, "--ttt.layers=[1]"])
    with pytest.raises(ConfigError, match=r"ttt\.layers: \[.*\] -> \[1\]; ttt\.layers cannot change within a run"):
        check_resume_config(saved, changed, tmp_path / "checkpoint")
    assert to_dict(cfg)["ttt"] == dataclasses.asdict(cfg.ttt)
