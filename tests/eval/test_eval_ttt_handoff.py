"""The stage hand-off check in evaluation: `eval librilight` and `eval generate --ttt [NAME=]SPEC` refuse a
checkpoint whose `ttt_config.json` differs from the given TTT config, naming the keys, before encoding anything;
`from_checkpoint` (the default) takes the checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_eval import tiny_checkpoints, tiny_corpus

from ttt_speech.cli import main
from ttt_speech.eval.librilight import parse_ttt_specs


def training_config(path: Path, ttt: str) -> Path:
    path.write_text(f"run_dir: runs/x\nmodel:\n  lm_kwargs: tiny\nttt: {ttt}\n")
    return path


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_eval_refuses_a_checkpoint_whose_ttt_config_differs(tmp_path: Path, tokenizer: Path, capsys) -> None:
    checkpoints = tiny_checkpoints(tmp_path / "ck")  # ttt: layers [1], chunk 4, lr 0.3
    manifest = tiny_corpus(tmp_path / "docs", seconds=4.0)
    other = training_config(tmp_path / "stage2.yaml", "{kind: inplace, layers: [1], chunk_size: 8, lr: 0.5}")
    librilight = ["eval", "librilight", *checkpoints, "--manifest", str(manifest), "--tokenizer", str(tokenizer),
                  "--bins", "10", "40", "--mode", "parallel", "--n-boot", "50"]

    assert main([*librilight, "--out", str(tmp_path / "bad"), "--ttt", f"ttt={other}"]) == 2
    [err] = errors(capsys)
    assert "ttt_config.json: the checkpoint's TTT config differs from the given one in chunk_size, lr " \
           "(chunk_size: config 8, checkpoint 4; lr: config 0.5, checkpoint 0.3)" in err
    assert "from_checkpoint" in err and not (tmp_path / "bad").exists()  # refused before any document or model
    assert main(["eval", "generate", *checkpoints, "--frames", "6", "--seeds", "0", "--out", str(tmp_path / "gen"),
                 "--ttt", f"ttt={other}"]) == 2
    [err] = errors(capsys)
    assert "differs from the given one in chunk_size, lr" in err and not (tmp_path / "gen").exists()

    # a checkpoint with TTT where the config has none; a name that is no checkpoint
    assert main([*librilight, "--out", str(tmp_path / "none"), "--ttt", "none"]) == 2
    [err] = errors(capsys)
    assert err.endswith("the given config has no TTT (ttt: null), but the checkpoint carries ttt_config.json; pass "
                        "its training config or --ttt from_checkpoint")
    assert main([*librilight, "--out", str(tmp_path / "x"), "--ttt", f"tt={other}"]) == 2
    assert errors(capsys) == [f"error: --ttt tt={other}: no checkpoint named 'tt' (checkpoints: base, ttt)"]

    # the matching config (the training config's partial ttt: block, defaults filled in), from_checkpoint, none
    same = training_config(tmp_path / "stage1.yaml", "{kind: inplace, layers: [1], chunk_size: 4}")
    assert main([*librilight, "--out", str(tmp_path / "ok"), "--ttt", f"ttt={same}", "--ttt", "base=none"]) == 0
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["checkpoints"]["ttt"]["ttt"]["chunk_size"] == 4 and report["checkpoints"]["base"]["ttt"] is None
    assert main(["eval", "generate", *checkpoints, "--frames", "6", "--seeds", "0", "--out", str(tmp_path / "gen"),
                 "--ttt", "ttt=from_checkpoint"]) == 0


def test_ttt_specs(tmp_path: Path) -> None:
    names = ["base", "ttt"]
    assert parse_ttt_specs(None, names) == {}
    assert parse_ttt_specs(["from_checkpoint"], names) == {"base": "from_checkpoint", "ttt": "from_checkpoint"}
    base_cfg = training_config(tmp_path / "base.yaml", "null")
    cfg = training_config(tmp_path / "t.yaml", "{chunk_size: 16}")
    specs = parse_ttt_specs([f"base={base_cfg}", str(cfg)], names)
    assert specs["base"] == "none" and specs["ttt"]["chunk_size"] == 16 and specs["ttt"]["kind"] == "inplace"
    ttt_json = tmp_path / "ttt_config.json"  # a TTT config as a checkpoint carries it
    ttt_json.write_text(json.dumps({"kind": "inplace", "chunk_size": 2, "decay": 0.9}))
    assert parse_ttt_specs([f"ttt={ttt_json}"], names)["ttt"]["decay"] == 0.9
    with pytest.raises(ValueError, match=r"unknown key ttt\.chunk;"):
        ttt_json.write_text(json.dumps({"chunk": 2}))
        parse_ttt_specs([str(ttt_json)], names)
    with pytest.raises(ValueError, match="given twice without a checkpoint name"):
        parse_ttt_specs(["none", "from_checkpoint"], names)
    with pytest.raises(ValueError, match="no such file"):
        parse_ttt_specs(["ttt=missing.yaml"], names)
