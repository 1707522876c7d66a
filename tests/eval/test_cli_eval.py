"""The `ttt-speech eval librilight`, `eval generate` and `data librilight` commands, end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from ttt_speech.cli import main
from ttt_speech.data.manifest import write_alignments, write_manifest
from ttt_speech.eval.librilight import paired_line
from ttt_speech.integrations.moshi import TINY_LM_KWARGS, MoshiTTTConfig, apply_ttt, build_lm, save_ttt_checkpoint


def write_wav(path: Path, seconds: float, seed: int) -> Path:
    import sphn

    path.parent.mkdir(parents=True, exist_ok=True)
    wav = 0.1 * np.random.default_rng(seed).standard_normal((1, int(24000 * seconds))).astype(np.float32)
    sphn.write_wav(str(path), wav, 24000)
    return path


def tiny_corpus(root: Path, seconds: float = 2.0) -> Path:
    files = [write_wav(root / f"{spk}_000.wav", seconds, i) for i, spk in enumerate(["11", "22"])]
    for f in files:
        write_alignments(f.with_suffix(".json"), [])
    write_manifest(root / "long.jsonl", [(f, seconds) for f in files])
    return root / "long.jsonl"


def tiny_checkpoints(root: Path) -> list[str]:
    base = build_lm(seed=0)
    (root / "base").mkdir(parents=True)
    save_file(base.state_dict(), str(root / "base" / "model.safetensors"))
    (root / "base" / "lm_config.json").write_text(json.dumps(TINY_LM_KWARGS))
    ttt = apply_ttt(build_lm(seed=0), MoshiTTTConfig(layers=[1], chunk_size=4))
    save_ttt_checkpoint(ttt, root / "ttt", lm_kwargs=TINY_LM_KWARGS)
    return ["--checkpoint", f"base={root / 'base'}", "--checkpoint", f"ttt={root / 'ttt'}"]


def test_eval_librilight_on_documents_shorter_than_every_bin_exits_2(tmp_path: Path, tokenizer: Path, capsys) -> None:
    manifest = tiny_corpus(tmp_path / "docs")  # 2 s = 25 frames; the default bins start at frame 750
    code = main(["eval", "librilight", *tiny_checkpoints(tmp_path / "ck"), "--manifest", str(manifest),
                 "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("encoding documents")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "long.jsonl: all 2 documents are shorter than every bin" in err[0] and "has 25 frames" in err[0]
    assert not (tmp_path / "out" / "report.json").exists()


def test_eval_librilight_and_generate_end_to_end(tmp_path: Path, tokenizer: Path, capsys) -> None:
    manifest = tiny_corpus(tmp_path / "docs", seconds=4.0)  # 50 frames
    checkpoints = tiny_checkpoints(tmp_path / "ck")
    assert main(["eval", "librilight", *checkpoints, "--manifest", str(manifest), "--tokenizer", str(tokenizer),
                 "--out", str(tmp_path / "ll"), "--bins", "10", "40", "--mode", "parallel", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "2 documents, 2 speakers; window 32 frames; no CI: 2 speakers (< 3)" in out
    assert "paired difference ttt - base" in out and "95% CI" in out and "[" not in out.split("paired")[1]
    report = json.loads((tmp_path / "ll" / "report.json").read_text())
    assert report["checkpoints"]["ttt"]["paired"]["past_window"]["audio"]["n_speakers"] == 2
    assert paired_line(report, "ttt").endswith("paired on 2 documents: text +0.000, audio +0.000 (no CI with 2 "
                                               "speakers)")  # TTT at init (conv zero) computes what base does

    assert main(["eval", "generate", *checkpoints, "--frames", "24", "--window-sec", "0.8", "--manifest",
                 str(manifest), "--index", "1", "--prompt-frames", "5", "--tokenizer", str(tokenizer), "--seeds", "0",
                 "--out", str(tmp_path / "gen")]) == 0
    report = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert report["prompt_frames"] == 5 and "22_000.wav: first 5 frames" in report["prompt"]
    assert len(report["windows"]) == 2 and set(report["checkpoints"]) == {"base", "ttt"}
    assert main(["eval", "generate", *checkpoints, "--frames", "12", "--window-sec", "0.8", "--seeds", "3",
                 "--out", str(tmp_path / "silence")]) == 0
    report = json.loads((tmp_path / "silence" / "generate.json").read_text())
    assert report["prompt"] is None and report["user_stream"].startswith("silence encoded by Mimi")
    capsys.readouterr()
    assert main(["eval", "generate", *checkpoints, "--frames", "12", "--prompt-frames", "3",
                 "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --prompt-frames needs --manifest")


def test_data_librilight_holds_out_speakers(tmp_path: Path, capsys) -> None:
    for spk in ("7", "8", "9"):
        write_wav(tmp_path / "ll" / spk / "book" / "00.flac", 1.0, int(spk))  # wav content, probed by sphn
    assert main(["data", "librilight", str(tmp_path / "ll"), str(tmp_path / "out"), "--min-minutes", "0.01",
                 "--holdout-speakers", "8,"]) == 0
    assert "train.jsonl" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "speakers.json").read_text())
    assert record["holdout"]["heldout_speakers"] == ["8"] and record["holdout"]["train_speakers"] == ["7", "9"]
    assert main(["data", "librilight", str(tmp_path / "ll"), str(tmp_path / "out2"), "--min-minutes", "0.01",
                 "--holdout-speakers", "x"]) == 2
