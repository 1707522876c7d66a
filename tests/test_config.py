"""ttt_speech/config.py: a value that fits no member of a Union is reported with the reason, not just the types.

An alternative that failed deeper than the key itself (a typo'd nested key, a wrong list item, a dataclass's own
check) is the message; otherwise the message lists what the key may be, Literal values spelled out."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ttt_speech.config import from_dict, load_config
from ttt_speech.errors import ConfigError
from ttt_speech.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@dataclasses.dataclass
class Inner:
    size: int = 1
    rate: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}")
        if self.rate >= 1:
            raise ValueError(f"inner.rate must be < 1, got {self.rate}")


@dataclasses.dataclass
class Other:
    name: str = "x"


@dataclasses.dataclass
class Outer:
    inner: Inner | Literal["auto"] | None = None
    layers: list[int] | None = None
    either: Inner | Other | None = None
    lr: float | None = None


@pytest.mark.parametrize("data, message", [
    # the nested typo / wrong type / check is the reason, named by its dotted key (was: "inner must be Inner or
    # Literal or None, got {...}")
    ({"inner": {"sise": 2}}, r"^cfg\.yaml: unknown key inner\.sise; Inner has size, rate "
                             r"\(did you mean inner\.size for inner\.sise\?\)$"),
    ({"inner": {"rate": "fast"}}, r"^cfg\.yaml: inner\.rate must be a number, got 'fast'$"),
    ({"inner": {"size": 0}}, r"^cfg\.yaml: inner: size must be >= 1, got 0$"),  # the section named once
    ({"inner": {"rate": 2}}, r"^cfg\.yaml: inner\.rate must be < 1, got 2\.0$"),
    ({"layers": [0, "x"]}, r"^cfg\.yaml: layers\[1\] must be an integer, got 'x'$"),
    # the value matches no alternative's shape: what the key may be, Literal values spelled out
    ({"inner": "autp"}, r"^cfg\.yaml: inner must be a mapping \(Inner\), 'auto' or null, got 'autp'$"),
    ({"inner": [1]}, r"^cfg\.yaml: inner must be a mapping \(Inner\), 'auto' or null, got \[1\]$"),
    ({"layers": "0,2"}, r"^cfg\.yaml: layers must be a list or null, got '0,2'$"),
    ({"lr": "fast"}, r"^cfg\.yaml: lr must be a number or null, got 'fast'$"),
    # several alternatives failed deeper: each reason, with its alternative
    ({"either": {"size": 2, "name": "y"}},
     r"^cfg\.yaml: either fits none of a mapping \(Inner\), a mapping \(Other\) or null: as a mapping \(Inner\): "
     r"unknown key either\.name; Inner has size, rate; as a mapping \(Other\): unknown key either\.size; "
     r"Other has name$"),
])
def test_union_errors_give_the_reason(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data, where="cfg.yaml")


def test_union_members_still_parse():
    cfg = from_dict(Outer, {"inner": {"size": 2, "rate": "1e-3"}, "layers": [0, 2], "either": {"name": "y"},
                            "lr": "2e-6"}, where="cfg.yaml")
    assert cfg.inner == Inner(2, 1e-3) and cfg.layers == [0, 2] and cfg.either == Other("y") and cfg.lr == 2e-6
    assert from_dict(Outer, {"inner": "auto", "layers": None}).inner == "auto"


def _tiny_with(tmp_path: Path, **top) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.update(run_dir=str(tmp_path / "run"), **top)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ttt_typo_named_by_check_and_submit(tmp_path, capsys):
    """`ttt: {chunk_sise: 8}` in the file: `ttt-speech finetune CONFIG --check` and `submit()` both stop naming
    `ttt.chunk_sise`, before a run folder or a job exists; a ttt: that is no mapping lists what ttt may be."""
    from ttt_speech.cli import main
    from ttt_speech.launch.submit import SlurmConfig, submit

    config = _tiny_with(tmp_path, ttt={"kind": "inplace", "chunk_sise": 8})
    assert main(["finetune", str(config), "--check"]) == 2
    assert f"error: {config}: unknown key ttt.chunk_sise;" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"unknown key ttt\.chunk_sise"):
        submit(str(config), [], SlurmConfig(cluster="local"))
    config = _tiny_with(tmp_path, ttt="from_chekpoint")
    with pytest.raises(ConfigError, match=r"ttt must be a mapping \(MoshiTTTConfig\), 'from_checkpoint' or null, "
                                          r"got 'from_chekpoint'"):
        submit(str(config), [], SlurmConfig(cluster="local"))
    assert not (tmp_path / "run").exists()
    assert load_config(TrainConfig, _tiny_with(tmp_path)).ttt.chunk_size == 8  # the file itself is fine


def test_moshi_ttt_config_inherits_the_in_place_fields_without_restating_them():
    """`ttt:` (MoshiTTTConfig) takes every InPlaceTTTConfig field, with its type and default, by inheritance: a
    field restated in MoshiTTTConfig's own body (a second default to keep in sync) fails here."""
    from ttt_speech.integrations.moshi import MoshiTTTConfig
    from ttt_speech.integrations.moshi_inplace import InPlaceTTTConfig

    inplace = {f.name: f for f in dataclasses.fields(InPlaceTTTConfig)}
    moshi = {f.name: f for f in dataclasses.fields(MoshiTTTConfig)}
    assert set(inplace) <= set(moshi) and "chunk_size" in inplace
    for name, f in inplace.items():
        assert (moshi[name].type, moshi[name].default) == (f.type, f.default), name
    restated = sorted(set(MoshiTTTConfig.__dict__.get("__annotations__", {})) & set(inplace))
    assert not restated, f"MoshiTTTConfig restates InPlaceTTTConfig's fields {restated}"


def test_model_lm_kwargs_errors_name_the_key_and_file(tmp_path):
    from ttt_speech.train.model import resolve_lm_kwargs

    bad, listed = tmp_path / "bad.json", tmp_path / "list.json"
    bad.write_text("{dim: 64")
    listed.write_text("[64]")
    with pytest.raises(ConfigError, match=r"model\.lm_kwargs: expected 'tiny', 'moshi-7b', a mapping or a JSON file, "
                                          r"got 3"):
        resolve_lm_kwargs(3)
    with pytest.raises(ConfigError, match=rf"model\.lm_kwargs: {bad}: not a readable JSON file .*line 1"):
        resolve_lm_kwargs(str(bad))
    with pytest.raises(ConfigError, match=rf"model\.lm_kwargs: {listed}: expected a JSON object .*got list"):
        resolve_lm_kwargs(str(listed))
    assert resolve_lm_kwargs("moshi-7b")["dim"] == 4096


def test_check_covers_model_lm_kwargs(tmp_path, capsys):
    """`--check` (and `submit()`) read `model.lm_kwargs` as the model build will: a wrong type at load, an unknown
    name, a missing file, a file that does not parse or holds no object, each naming the key; no model built."""
    from ttt_speech.cli import main
    from ttt_speech.launch.submit import SlurmConfig, submit

    bad, listed, good = tmp_path / "bad.json", tmp_path / "list.json", tmp_path / "lm.json"
    bad.write_text("{dim: 64")
    listed.write_text("[64]")
    good.write_text('{"dim": 64}')
    config = _tiny_with(tmp_path)
    for value, message in ((3, "model.lm_kwargs must be a string or a mapping, got 3"),
                           ("tiniest", "model.lm_kwargs: expected 'tiny', 'moshi-7b', a mapping or a JSON file, "
                                       "got 'tiniest'"),
                           (bad, f"model.lm_kwargs: {bad}: not a readable JSON file"),
                           (listed, f"model.lm_kwargs: {listed}: expected a JSON object of model arguments, got list")):
        assert main(["finetune", str(config), "--check", f"--model.lm_kwargs={value}"]) == 2
        assert f"error: {config}: {message}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"model\.lm_kwargs: expected 'tiny', 'moshi-7b'"):
        submit(str(config), ["--model.lm_kwargs=tiniest"], SlurmConfig(cluster="local"))
    for value in ("tiny", "moshi-7b", good, "{dim: 64}"):
        assert main(["finetune", str(config), "--check", f"--model.lm_kwargs={value}"]) == 0
    llama = REPO / "configs" / "llama_tiny.yaml"
    assert main(["finetune", str(llama), "--check", f"--run_dir={tmp_path / 'run'}",
                 "--model.lm_kwargs=moshi-7b"]) == 2
    assert "model.lm_kwargs: expected 'tiny', a mapping or a JSON file, got 'moshi-7b'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
