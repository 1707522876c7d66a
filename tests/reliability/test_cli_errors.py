"""The CLI as a whole: a known error prints one line naming the file or key and exits 2 (`--debug` shows the
traceback); a warning is one line; and the bad-input sweep itself runs and classifies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ttt_speech.cli import main
from ttt_speech.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def test_a_known_error_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    rc = main(["finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--optim.betas=[0.9]"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [f"error: {TINY}: optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), "
                                "got [0.9]"]
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path) -> None:
    with pytest.raises(ConfigError, match="optim.betas"):
        main(["--debug", "finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="optim.betas"):  # also after the subcommand
        main(["finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--optim.betas=[0.9]", "--debug"])


def test_check_validates_without_running(tmp_path, capsys) -> None:
    assert main(["finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--check"]) == 0
    assert "tiny.yaml: ok (40 steps" in capsys.readouterr().out
    assert main(["finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--ttt.chunk_sise=3", "--check"]) == 2
    assert "unknown key ttt.chunk_sise" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_warning_is_one_line(tmp_path, capsys) -> None:
    assert main(["finetune", str(TINY), f"--run_dir={tmp_path / 'run'}", "--ttt.chunk_size=64", "--check"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert err == ["warning: ttt.chunk_size=64 frames is longer than a crop of 25 frames: In-Place TTT updates its "
                   "fast weights only after a complete chunk, so no update ever happens in training"]


def test_stray_arguments_and_allow_config_change(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", str(TINY), "max_steps=3"])
    assert "overrides look like --key.sub=value" in capsys.readouterr().err
    assert main(["finetune", str(TINY), f"--run_dir={tmp_path / 'r'}", "--allow-config-change", "max_steps",
                 "optim.lr", "--check"]) == 0


def test_the_data_command_prints_one_line_too(tmp_path, capsys) -> None:
    from ttt_speech.data.__main__ import main as data_main

    (tmp_path / "m.jsonl").write_text('{"path": "a.wav"}\n')
    assert data_main(["encode", str(tmp_path / "m.jsonl"), str(tmp_path / "codes")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {tmp_path / 'm.jsonl'}:1: missing ['duration']; "
                                                    'expected {"path": "<audio file>", "duration": <seconds>}']


def test_the_sweep_runs_and_counts_verdicts(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bad_input_sweep", REPO / "scripts" / "bad_input_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["bad_input_sweep"] = sweep
    spec.loader.exec_module(sweep)
    assert len(sweep.CASES) >= 55 and len({c.name for c in sweep.CASES}) == len(sweep.CASES)
    assert sweep.main(["--out", str(tmp_path / "sweep"), "--only", "ttt typo key", "hand-edited patch that still "
                       "applies: check"]) == 0
    out = capsys.readouterr().out
    assert "named error  config   ttt typo key: error:" in out and "named error   " in out.split("verdict")[1]
    # the classifier: a traceback, a silent run and a warning where an error was due
    case = sweep.Case("x", "config", "error", r"optim\.lr", lambda ws: None)
    assert sweep.verdict(case, sweep.Outcome(1, "Traceback (most recent call last):\n  ...\nValueError: x")) == \
        "traceback"
    assert sweep.verdict(case, sweep.Outcome(0, "finetune done: 2 steps")) == "silent"
    assert sweep.verdict(case, sweep.Outcome(2, "error: optim.lr must be ...")) == "named error"
    assert sweep.verdict(case, sweep.Outcome(2, "error: something else")) == "wrong"


def test_the_data_commands_are_one_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "data preparation: librilight, manifest, encode" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("librilight", "manifest", "encode"))
