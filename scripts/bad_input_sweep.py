#!/usr/bin/env python3
"""The bad-input sweep: every case of "Nothing lost, nothing silent" tried as a careless or unlucky user would,
through the commands a user runs (`ttt-speech finetune`, `python -m ttt_speech.data`, `scripts/upstream.py`), on
the tiny Moshi. It prints one line per case and a count by verdict:

    named error   refused with one `error:` line naming the key, file or checkpoint (exit status != 0)
    warning       legal but suspicious: it ran, and a `warning:` line named the problem
    OK            legal input, or a recovery, that did the right thing (checked after the run)
    silent        it ran and named nothing, where it should have refused or warned
    traceback     a raw Python traceback
    wrong         anything else: another message, exit status or a failed check after the run

    python scripts/bad_input_sweep.py [--out runs/bad_input_sweep] [--only NAME ...] [--list]

Writes `sweep.json` (every case, its verdict, the command and the tail of its output) into --out. Exit status 1
when any case is silent, a traceback or wrong. It takes about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SAMPLES = ROOT / "data" / "samples"
SDIST = ROOT / ".cache" / "upstream" / "moshi-0.2.13.tar.gz"
PY = sys.executable
BAD = ("silent", "traceback", "wrong")
WORDS = "the cat sat on the mat a dog ran to the park hello there how are you good morning".split()


@dataclasses.dataclass
class Outcome:
    rc: int
    output: str
    check: str | None = None  # None: the check after the run passed; else what failed
    command: str = ""


@dataclasses.dataclass
class Case:
    name: str
    group: str
    expect: str  # "error", "warning" or "ok"
    pattern: str  # what the error / warning line must say (regex); for "ok", what the output must say
    run: Callable[[Path], Outcome]
    rc: int = 0  # the exit status an "ok" case must have


CASES: list[Case] = []


def case(name: str, group: str, expect: str, pattern: str, rc: int = 0):
    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        CASES.append(Case(name, group, expect, pattern, fn, rc))
        return fn
    return register


def verdict(c: Case, out: Outcome) -> str:
    text = out.output.replace("\r", "\n")
    if "Traceback (most recent call last)" in text:
        return "traceback"
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    warns = [ln for ln in lines if ln.startswith("warning:")]
    if c.expect == "error":
        # ttt-speech's errors are one line; the patch tool's go on with indented details
        last = max(i for i, ln in enumerate(lines) if ln.startswith("error:")) if errors else len(lines)
        block = " ".join(lines[last:])
        if out.rc != 0 and errors and re.search(c.pattern, block) and out.check is None:
            return "named error"
        return "silent" if out.rc == 0 and not errors and not any(re.search(c.pattern, w) for w in warns) else "wrong"
    if c.expect == "warning":
        if out.rc == 0 and any(re.search(c.pattern, w) for w in warns) and out.check is None:
            return "warning"
        return "silent" if out.rc == 0 and not warns and not errors else "wrong"
    if out.rc == c.rc and re.search(c.pattern, text) and out.check is None:
        return "OK"
    return "wrong"


def run(cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None) -> Outcome:
    full_env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = -9, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    return Outcome(rc, output, command=" ".join(str(x) for x in cmd))


def finetune_cmd(run_dir: Path, *overrides: str, config: Path = TINY) -> list[str]:
    return [PY, "-m", "ttt_speech.cli", "finetune", str(config), f"--run_dir={run_dir}", "--duration_sec=1.2",
            "--log_freq=1", *overrides]


def finetune(run_dir: Path, *overrides: str, config: Path = TINY, timeout: float = 600) -> Outcome:
    return run(finetune_cmd(run_dir, *overrides, config=config), timeout=timeout)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    return [int(r["step"]) for r in csv.DictReader(path.open())] if path.is_file() else []


def checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ shared inputs

_base: dict[str, Path] = {}


def base_run(ws: Path) -> Path:
    """A finished 6-step TTT run with checkpoints at steps 3 and 6 and an export (made once, copied per case)."""
    if "run" not in _base:
        out = finetune(ws / "shared" / "base", "--max_steps=6", "--ckpt_freq=3", "--keep_checkpoints=3")
        if out.rc != 0:
            raise RuntimeError(f"the base run failed:\n{out.output[-3000:]}")
        _base["run"] = ws / "shared" / "base"
    return _base["run"]


def copy_base(ws: Path, name: str) -> Path:
    dest = ws / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base_run(ws), dest)
    return dest


def write_float_wav(path: Path, data, rate: int = 24000) -> None:
    """A 32-bit float WAV (sphn writes 16-bit PCM, which cannot hold NaN)."""
    import numpy as np

    data = np.asarray(data, dtype="<f4")
    body = data.T.tobytes()
    channels = data.shape[0]
    fmt = struct.pack("<IHHIIHH", 16, 3, channels, rate, rate * channels * 4, channels * 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVE" + b"fmt " + fmt + b"data"
                     + struct.pack("<I", len(body)) + body)


def recording(folder: Path, name: str, seconds: float, seed: int, *, scale: float = 1.0,
              speaker: str = "SPEAKER_MAIN", stretch: float = 0.0) -> tuple[Path, float]:
    """A speech-like stereo wav with word alignments beside it; times multiplied by `scale`, shifted by
    `stretch` seconds."""
    import numpy as np
    import sphn

    rng = np.random.default_rng(seed)
    n = round(seconds * 24000)
    audio = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / f"{name}.wav"
    sphn.write_wav(str(wav), audio, 24000)
    words, t = [], 0.3
    while t + 0.5 < seconds:
        words.append([str(rng.choice(WORDS)), [round((t + stretch) * scale, 3), round((t + 0.3 + stretch) * scale, 3)],
                      speaker])
        t += 0.45
    (folder / f"{name}.json").write_text(json.dumps({"alignments": words}))
    return wav, n / 24000


def manifest(path: Path, items: list[tuple[Path, float]]) -> Path:
    path.write_text("".join(json.dumps({"path": os.path.relpath(w, path.parent), "duration": d}) + "\n"
                            for w, d in items))
    return path


def data_overrides(manifest_path: Path, codes: Path | None = None, tokenizer: Path | None = None) -> list[str]:
    out = [f"--data.train_data={manifest_path}", f"--data.tokenizer={tokenizer or SAMPLES / 'tokenizer.model'}"]
    return out + ([f"--data.codes_dir={codes}"] if codes else [])


def encode(manifest_path: Path, codes: Path) -> Outcome:
    return run([PY, "-m", "ttt_speech.data", "encode", str(manifest_path), str(codes)])


def good_data(ws: Path) -> tuple[Path, Path]:
    """Four 3 s recordings: manifest A holds two, B the two others (same sample count); codes of all four."""
    if "data" not in _base:
        folder = ws / "shared" / "data"
        recs = [recording(folder, f"rec{i}", 3.0, seed=i) for i in range(4)]
        manifest(folder / "a.jsonl", recs[:2])
        manifest(folder / "b.jsonl", recs[2:])
        manifest(folder / "all.jsonl", recs)
        out = encode(folder / "all.jsonl", folder / "codes")
        if out.rc != 0:
            raise RuntimeError(f"encoding the sweep's data failed:\n{out.output[-3000:]}")
        _base["data"] = folder
    return _base["data"], _base["data"] / "codes"


def one_file_run(ws: Path, name: str, *extra: str, **rec) -> Outcome:
    """A 2-step run on one recording, encoded on the fly (so its audio is read)."""
    folder = ws / name
    wav = recording(folder, "rec", 3.0, seed=7, **rec)
    m = manifest(folder / "m.jsonl", [wav])
    return finetune(folder / "run", "--max_steps=2", "--export_safetensors=false", *data_overrides(m), *extra)


# ------------------------------------------------------------------------------------------- resume, work lost

@case("resume without TTT", "resume", "error", r"ttt.*cannot change within a run")
def _(ws: Path) -> Outcome:
    run_dir = copy_base(ws, "resume_no_ttt")
    before = tree_digest(run_dir)
    out = finetune(run_dir, "--max_steps=6", "--ttt=null")
    if tree_digest(run_dir) != before:
        out.check = "the run folder changed (config.yaml or checkpoints)"
    return out


@case("resume with other ttt.layers", "resume", "error", r"ttt\.layers: \[0, 2\] -> \[1\]")
def _(ws: Path) -> Outcome:
    return finetune(copy_base(ws, "resume_layers"), "--max_steps=6", "--ttt.layers=[1]")


@case("resume with another batch_size", "resume", "error", r"batch_size: 2 -> 3")
def _(ws: Path) -> Outcome:
    return finetune(copy_base(ws, "resume_batch"), "--max_steps=6", "--batch_size=3")


@case("resume with more max_steps, not allowed", "resume", "error", r"--allow-config-change max_steps")
def _(ws: Path) -> Outcome:
    return finetune(copy_base(ws, "resume_longer"), "--max_steps=8")


@case("resume with more max_steps, allowed", "resume", "ok", r"finetune done: 8 steps, resumed from 6")
def _(ws: Path) -> Outcome:
    run_dir = copy_base(ws, "resume_longer_ok")
    out = finetune(run_dir, "--max_steps=8", "--allow-config-change", "max_steps")
    if metric_steps(run_dir) != list(range(1, 9)):
        out.check = f"metrics.csv steps {metric_steps(run_dir)}"
    return out


@case("resume with --allow-config-change of a fixed key", "resume", "error", r"allow-config-change ttt")
def _(ws: Path) -> Outcome:
    return finetune(copy_base(ws, "resume_allow_fixed"), "--max_steps=6", "--ttt=null", "--allow-config-change",
                    "ttt")


@case("step_N.partial folder with a truncated manifest", "resume", "ok", r"resumed from 6")
def _(ws: Path) -> Outcome:
    run_dir = copy_base(ws, "partial")
    partial = run_dir / "checkpoints" / "step_0000009.partial"
    shutil.copytree(run_dir / "checkpoints" / "step_0000006", partial)
    (partial / "MANIFEST.json").write_text('{"step": 9, "fil')
    return finetune(run_dir, "--max_steps=8", "--allow-config-change", "max_steps")


@case("damaged latest checkpoint", "resume", "warning", r"skipping damaged checkpoint .*step_0000006.*corrupted")
def _(ws: Path) -> Outcome:
    run_dir = copy_base(ws, "damaged")
    shard = next((run_dir / "checkpoints" / "step_0000006").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = finetune(run_dir, "--max_steps=8", "--allow-config-change", "max_steps")
    if "resumed from 3" not in out.output:
        out.check = "did not resume from step 3"
    return out


@case("all checkpoints damaged", "resume", "error", r"no usable checkpoint.*step_0000006.*step_0000003")
def _(ws: Path) -> Outcome:
    run_dir = copy_base(ws, "all_damaged")
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "rank_0.pt").write_bytes(b"garbage")
    return finetune(run_dir, "--max_steps=8", "--allow-config-change", "max_steps")


@case("loss goes NaN (lr 1e4, max_norm 1e9)", "resume", "error", r"non-finite for 5 steps in a row")
def _(ws: Path) -> Outcome:
    run_dir = ws / "nan"
    out = finetune(run_dir, "--max_steps=20", "--optim.lr=1.0e+4", "--optim.ttt_lr=1.0e+4", "--optim.max_norm=1.0e+9")
    if (run_dir / "export").exists():
        out.check = "an export was written"
    return out


@case("loss goes NaN after a checkpoint", "resume", "error", r"restored the last good checkpoint .*step_0000001")
def _(ws: Path) -> Outcome:
    run_dir = ws / "nan_ckpt"
    out = finetune(run_dir, "--max_steps=20", "--ckpt_freq=1", "--optim.lr=1.0e+4", "--optim.ttt_lr=1.0e+4",
                   "--optim.max_norm=1.0e+9", "--max_nonfinite_steps=3")
    if checkpoints(run_dir) != ["step_0000001"]:
        out.check = f"checkpoints {checkpoints(run_dir)}"
    return out


def _signal_run(ws: Path, name: str, signals: list[int], gap: float = 0.05) -> tuple[Outcome, Path]:
    run_dir = ws / name
    cmd = finetune_cmd(run_dir, "--max_steps=400", "--ckpt_freq=1000", "--export_safetensors=false")
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(metric_steps(run_dir)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap)
        proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return Outcome(proc.returncode, output, command=" ".join(cmd)), run_dir


@case("Ctrl-C once", "resume", "ok", r"finetune stopped: \d+ steps")
def _(ws: Path) -> Outcome:
    out, run_dir = _signal_run(ws, "sigint", [signal.SIGINT])
    steps = metric_steps(run_dir)
    if not steps or checkpoints(run_dir) != [f"step_{steps[-1]:07d}"]:
        out.check = f"checkpoints {checkpoints(run_dir)} after logged steps {steps[-1:]}"
    return out


@case("Ctrl-C twice", "resume", "ok", r"aborted", rc=130)
def _(ws: Path) -> Outcome:
    return _signal_run(ws, "sigint2", [signal.SIGINT, signal.SIGINT])[0]


@case("SIGTERM", "resume", "ok", r"finetune stopped: \d+ steps")
def _(ws: Path) -> Outcome:
    out, run_dir = _signal_run(ws, "sigterm", [signal.SIGTERM])
    if not checkpoints(run_dir):
        out.check = "no checkpoint"
    return out


@case("kill -9 then resume: no duplicate log rows", "resume", "ok", r"resumed from [3-6]")
def _(ws: Path) -> Outcome:
    run_dir = ws / "kill9"
    cmd = finetune_cmd(run_dir, "--max_steps=8", "--ckpt_freq=3", "--monitor_freq=1", "--export_safetensors=false")
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(metric_steps(run_dir)) < 5 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    out = finetune(run_dir, "--max_steps=8", "--ckpt_freq=3", "--monitor_freq=1", "--export_safetensors=false")
    stats = [(r["step"], r["layer"]) for r in csv.DictReader((run_dir / "ttt_stats.csv").open())]
    if metric_steps(run_dir) != list(range(1, 9)) or len(stats) != len(set(stats)):
        out.check = f"metrics.csv steps {metric_steps(run_dir)}, {len(stats) - len(set(stats))} duplicate stats rows"
    return out


# -------------------------------------------------------------------------------------------------------- data

@case("wav with zero samples", "data", "error", r"zero\.wav: the file holds no audio samples")
def _(ws: Path) -> Outcome:
    import numpy as np

    folder = ws / "zero_samples"
    folder.mkdir(parents=True, exist_ok=True)
    write_float_wav(folder / "zero.wav", np.zeros((2, 0)))
    (folder / "zero.json").write_text('{"alignments": []}')
    m = manifest(folder / "m.jsonl", [(folder / "zero.wav", 2.0)])
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("wav of zero bytes", "data", "error", r"empty\.wav: cannot read the audio")
def _(ws: Path) -> Outcome:
    folder = ws / "zero_bytes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "empty.json").write_text('{"alignments": []}')
    m = manifest(folder / "m.jsonl", [(folder / "empty.wav", 2.0)])
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("NaN and Inf samples in a float wav", "data", "error", r"nan\.wav: 2 NaN or Inf samples")
def _(ws: Path) -> Outcome:
    import numpy as np

    folder = ws / "nan_wav"
    folder.mkdir(parents=True, exist_ok=True)
    audio = np.full((2, 48000), 0.01, dtype=np.float32)
    audio[0, 1000], audio[1, 2000] = np.nan, np.inf
    write_float_wav(folder / "nan.wav", audio)
    (folder / "nan.json").write_text('{"alignments": [["hello", [0.5, 0.9], "SPEAKER_MAIN"]]}')
    m = manifest(folder / "m.jsonl", [(folder / "nan.wav", 2.0)])
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("NaN wav, pre-encoding", "data", "error", r"nan\.wav: 2 NaN or Inf samples")
def _(ws: Path) -> Outcome:
    folder = ws / "nan_wav"
    if not (folder / "m.jsonl").is_file():
        CASES_BY_NAME["NaN and Inf samples in a float wav"].run(ws)
    return encode(folder / "m.jsonl", folder / "codes")


@case("manifest duration 0", "data", "error", r"m\.jsonl:1: 'duration' must be a positive number")
def _(ws: Path) -> Outcome:
    folder = ws / "duration0"
    wav, _ = recording(folder, "rec", 3.0, seed=1)
    m = manifest(folder / "m.jsonl", [(wav, 0)])
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("manifest line not JSON", "data", "error", r"m\.jsonl:2: invalid JSON")
def _(ws: Path) -> Outcome:
    folder = ws / "bad_json"
    wav, d = recording(folder, "rec", 3.0, seed=1)
    m = manifest(folder / "m.jsonl", [(wav, d)])
    m.write_text(m.read_text() + '{"path": "rec.wav", duration: 3}\n')
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("alignment entry malformed", "data", "error", r"rec\.json:1: alignments\[0\]")
def _(ws: Path) -> Outcome:
    folder = ws / "bad_alignment"
    wav, d = recording(folder, "rec", 3.0, seed=1)
    (folder / "rec.json").write_text('{"alignments": [["hello", [0.5], "SPEAKER_MAIN"]]}')
    m = manifest(folder / "m.jsonl", [(wav, d)])
    return finetune(folder / "run", "--max_steps=2", *data_overrides(m))


@case("alignment times in milliseconds", "data", "warning", r"rec\.json: word times reach .*milliseconds")
def _(ws: Path) -> Outcome:
    return one_file_run(ws, "align_ms", scale=1000.0)


@case("alignment times past the end", "data", "warning",
      r"rec\.json: word times reach 12\.4 s but the recording lasts 3\.04 s")
def _(ws: Path) -> Outcome:
    return one_file_run(ws, "align_late", stretch=10.0)


@case("alignment with a wrong speaker label", "data", "warning", r"rec\.json: no word is spoken by 'SPEAKER_MAIN'")
def _(ws: Path) -> Outcome:
    return one_file_run(ws, "align_speaker", speaker="SPEAKER_0")


@case("codes with a stale manifest duration", "data", "error", r"a\.jsonl:1: duration 9\.0 s .* stale")
def _(ws: Path) -> Outcome:
    folder, codes = good_data(ws)
    stale = ws / "stale"
    stale.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(ln) for ln in (folder / "a.jsonl").read_text().splitlines()]
    lines[0]["duration"] = 9.0
    m = stale / "a.jsonl"
    m.write_text("".join(json.dumps({**x, "path": str(folder / x["path"])}) + "\n" for x in lines))
    return finetune(stale / "run", "--max_steps=2", *data_overrides(m, codes))


@case("codes missing a recording", "data", "error", r"is not in .*codes_a.*pre-encode")
def _(ws: Path) -> Outcome:
    folder, _ = good_data(ws)
    codes_a = ws / "codes_a"
    if not (codes_a / "index.json").is_file():
        encode(folder / "a.jsonl", codes_a)
    return finetune(ws / "codes_missing", "--max_steps=2", *data_overrides(folder / "all.jsonl", codes_a))


@case("another manifest, same sample count, on resume", "data", "error",
      r"is not the manifest this run started with")
def _(ws: Path) -> Outcome:
    folder, codes = good_data(ws)
    m = ws / "swap" / "m.jsonl"
    m.parent.mkdir(parents=True, exist_ok=True)
    def absolute(name: str) -> str:
        return "".join(json.dumps({**x, "path": str(folder / x["path"])}) + "\n"
                       for x in map(json.loads, (folder / name).read_text().splitlines()))
    m.write_text(absolute("a.jsonl"))
    first = finetune(ws / "swap" / "run", "--max_steps=4", "--stop_after=2", *data_overrides(m, codes))
    if first.rc != 0:
        return first
    m.write_text(absolute("b.jsonl"))
    return finetune(ws / "swap" / "run", "--max_steps=4", *data_overrides(m, codes))


@case("tokenizer larger than text_card", "data", "error", r"big\.model: \d+ pieces, but .*text_card\) has 96")
def _(ws: Path) -> Outcome:
    import sentencepiece

    folder, codes = good_data(ws)
    model = io.BytesIO()
    text = (SAMPLES / "text.txt").read_text().split(".")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=200,
                                             hard_vocab_limit=False, minloglevel=2)
    big = ws / "big.model"
    big.write_bytes(model.getvalue())
    return finetune(ws / "big_tok", "--max_steps=2", *data_overrides(folder / "a.jsonl", codes, tokenizer=big))


@case("tokenizer that is not SentencePiece", "data", "error", r"rec0\.wav: not a SentencePiece model")
def _(ws: Path) -> Outcome:
    folder, codes = good_data(ws)
    return finetune(ws / "not_spm", "--max_steps=2",
                    *data_overrides(folder / "a.jsonl", codes, tokenizer=folder / "rec0.wav"))


@case("data.codes_dir with synthetic data", "data", "error", r"data\.codes_dir=.* with data\.train_data=synthetic")
def _(ws: Path) -> Outcome:
    return finetune(ws / "codes_synthetic", "--max_steps=2", "--data.codes_dir=/tmp/codes")


@case("eval librilight on documents shorter than every bin", "data", "error", r"bin")
def _(ws: Path) -> Outcome:
    folder, codes = good_data(ws)
    return run([PY, "-m", "ttt_speech.cli", "eval", "librilight", "--checkpoint", f"ttt={base_run(ws) / 'export'}",
                "--manifest", str(folder / "a.jsonl"), "--tokenizer", str(SAMPLES / "tokenizer.model"),
                "--codes-dir", str(codes), "--out", str(ws / "eval_short"), "--bins", "500", "1000"])


# ------------------------------------------------------------------------------------------------------ config

def config_case(name: str, pattern: str, *overrides: str, expect: str = "error") -> None:
    @case(name, "config", expect, pattern)
    def _(ws: Path) -> Outcome:
        slug = re.sub(r"\W+", "_", name)
        return finetune(ws / "config" / slug, "--max_steps=2", "--export_safetensors=false", *overrides)


config_case("optim.lr negative", r"optim\.lr must be a finite number >= 0, got -0\.001", "--optim.lr=-1e-3")
config_case("optim.lr NaN", r"optim\.lr must be a finite number >= 0, got nan", "--optim.lr=.nan")
config_case("ttt.lr negative", r"ttt\.lr must be a finite number >= 0, got -0\.3", "--ttt.lr=-0.3")
config_case("ttt.lr NaN", r"ttt\.lr must be a finite number >= 0, got nan", "--ttt.lr=.nan")
config_case("optim.pct_start > 1", r"optim\.pct_start .* in \[0, 1\], got 2\.0", "--optim.pct_start=2")
config_case("run_dir empty", r"run_dir is empty", "--run_dir=''")
config_case("ttt.layers []", r"ttt\.layers is empty", "--ttt.layers=[]")
config_case("ttt.layers out of range", r"ttt\.layers must be distinct indices in \[0, 4\)", "--ttt.layers=[0, 7]")
config_case("ttt.chunk_size longer than a crop", r"ttt\.chunk_size=64 frames is longer than a crop of 15 frames",
            "--ttt.chunk_size=64", expect="warning")
config_case("stages with max_steps", r"max_steps=2 with stages",
            "--stages=[{duration_sec: 1.2, steps: 3}]")
config_case("duration_sec 0", r"duration_sec must be at least one frame", "--duration_sec=0")
config_case("optim.betas of length 1", r"optim\.betas must be two numbers", "--optim.betas=[0.9]")
config_case("optim.lr 0 with a staged lr", r"stages\[0\]\.lr: .*optim\.lr = 0", "--optim.lr=0", "--max_steps=null",
            "--stages=[{duration_sec: 1.2, steps: 2, lr: 1e-3}]")
config_case('ttt.chunk_size "8"', r"ttt\.chunk_size must be an integer, got '8'", '--ttt.chunk_size="8"')
config_case("ttt.chunk_size 8.5", r"ttt\.chunk_size must be an integer, got 8\.5", "--ttt.chunk_size=8.5")
config_case("ttt.layers 0,2", r"ttt\.layers must be a list or null, got '0,2'", "--ttt.layers=0,2")
config_case("ttt typo key", r"unknown key ttt\.chunk_sise", "--ttt.chunk_sise=8")
config_case("unknown top-level key", r"unknown key max_step;", "--max_step=3")


@case("ttt.lr: 1e-3 (a string to PyYAML)", "config", "ok", r"finetune done: 2 steps")
def _(ws: Path) -> Outcome:
    cfg = ws / "config" / "lr_string.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(TINY.read_text().replace("lr: 0.3", "lr: 1e-3"))
    run_dir = ws / "config" / "lr_string"
    out = finetune(run_dir, "--max_steps=2", "--export_safetensors=false", config=cfg)
    if "lr: 0.001" not in (run_dir / "config.yaml").read_text():
        out.check = "config.yaml does not record ttt.lr 0.001"
    return out


@case("parallel: none with --nproc 2", "config", "error", r"parallel: none with 2 processes")
def _(ws: Path) -> Outcome:
    return run([*finetune_cmd(ws / "config" / "none2", "--max_steps=2", "--parallel=none"), "--nproc", "2"])


@case("submitit job with a ttt typo", "config", "error", r"unknown key ttt\.chunk_sise")
def _(ws: Path) -> Outcome:
    out = run([*finetune_cmd(ws / "config" / "submit_typo", "--ttt.chunk_sise=8"), "--submitit", "slurm"])
    if (ws / "config" / "submit_typo").exists():
        out.check = "the run folder was created"
    return out


@case("finetune --check", "config", "ok", r"tiny\.yaml: ok \(40 steps")
def _(ws: Path) -> Outcome:
    out = run([PY, "-m", "ttt_speech.cli", "finetune", str(TINY), "--run_dir=" + str(ws / "never"), "--check"])
    if (ws / "never").exists():
        out.check = "--check created the run folder"
    return out


@case("export with a wrong shape as model.checkpoint", "config", "error",
      r"model\.safetensors: does not fit .*size mismatch")
def _(ws: Path) -> Outcome:
    from ttt_speech.integrations.moshi import tiny_lm_kwargs

    lm = ws / "config" / "lm_wide.json"
    lm.parent.mkdir(parents=True, exist_ok=True)
    lm.write_text(json.dumps({**tiny_lm_kwargs(), "dim": 96}))
    return finetune(ws / "config" / "wrong_shape", "--max_steps=2", f"--model.lm_kwargs={lm}",
                    f"--model.checkpoint={base_run(ws) / 'export' / 'model.safetensors'}")


@case("base checkpoint that does not fit, without TTT", "config", "error",
      r"model\.checkpoint .*model\.safetensors: does not fit")
def _(ws: Path) -> Outcome:
    return finetune(ws / "config" / "wrong_base", "--max_steps=2", "--ttt=null",
                    f"--model.checkpoint={base_run(ws) / 'export' / 'model.safetensors'}")


# ------------------------------------------------------------------------------------------------- patch tool

def patch_root(ws: Path, name: str) -> Path:
    root = ws / "patches" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy(ROOT / "upstream.lock", root / "upstream.lock")
    shutil.copytree(ROOT / "patches", root / "patches")
    return root


def tool(root: Path, *args: str) -> Outcome:
    return run([PY, str(ROOT / "scripts" / "upstream.py"), *args, "--lock", str(root / "upstream.lock"),
                "--no-install"], env={"MOSHI_SRC": str(SDIST), "TTT_SPEECH_OFFLINE": "1"})


def moshi_patches(root: Path) -> list[Path]:
    lines = (root / "patches" / "moshi" / "series").read_text().splitlines()
    return [root / "patches" / "moshi" / ln.split(" ")[0] for ln in lines if ln and not ln.startswith("#")]


def hand_edit_layer_idx(root: Path) -> None:
    patch = moshi_patches(root)[0]
    patch.write_text(patch.read_text().replace("layer_idx = layer_idx\n", "layer_idx = layer_idx + 1\n"))


@case("hand-edited patch that still applies: check-patches", "patches", "error", r"0001-.*edited by hand")
def _(ws: Path) -> Outcome:
    root = patch_root(ws, "hand_check")
    hand_edit_layer_idx(root)
    return tool(root, "check", "moshi")


@case("hand-edited patch that still applies: apply-patches", "patches", "error", r"0001-.*edited by hand")
def _(ws: Path) -> Outcome:
    root = patch_root(ws, "hand_apply")
    if tool(root, "apply", "moshi").rc != 0:
        return Outcome(1, "the first apply failed")
    hand_edit_layer_idx(root)
    return tool(root, "apply", "moshi")


def _broken_apply(ws: Path, name: str) -> tuple[Path, str, str, Outcome]:
    """Apply, then break patch 0003 as the issue does, recording its hash as a pulled series would."""
    root = patch_root(ws, name)
    tool(root, "apply", "moshi")
    patch, series_file = moshi_patches(root)[2], root / "patches" / "moshi" / "series"
    good_patch, good_series = patch.read_text(), series_file.read_text()
    lines = good_patch.splitlines(keepends=True)
    lines[29] = lines[29].replace("weights_per_step = weights_per_step", "weights_per_step = None")
    patch.write_text("".join(lines))
    digest = hashlib.sha256(patch.read_bytes()).hexdigest()
    series_file.write_text(re.sub(rf"^({re.escape(patch.name)}  # sha256:)\w+", rf"\g<1>{digest}", good_series,
                                  flags=re.M))
    return root, good_patch, good_series, tool(root, "apply", "moshi")


@case("a patch that does not apply", "patches", "error", r"0003-.*does not apply")
def _(ws: Path) -> Outcome:
    return _broken_apply(ws, "broken")[3]


@case("after a failed apply, 'keep them' (export)", "patches", "error", r"would delete all \d+ patches")
def _(ws: Path) -> Outcome:
    root, _, _, _ = _broken_apply(ws, "keep")
    out = tool(root, "export", "moshi")
    if not all(p.is_file() for p in moshi_patches(root)) or len(moshi_patches(root)) < 4:
        out.check = "patch files were deleted"
    return out


@case("after a failed apply, restore the patch and apply", "patches", "ok", r"series changed: re-applied")
def _(ws: Path) -> Outcome:
    root, good_patch, good_series, _ = _broken_apply(ws, "restore")
    moshi_patches(root)[2].write_text(good_patch)
    (root / "patches" / "moshi" / "series").write_text(good_series)
    return tool(root, "apply", "moshi")


@case("local commits: the 'drop them' advice", "patches", "ok", r"series changed: re-applied")
def _(ws: Path) -> Outcome:
    root = patch_root(ws, "drop")
    tool(root, "apply", "moshi")
    repo = root / "upstream" / "moshi"
    target = repo / "moshi" / "modules" / "gating.py"
    target.write_text(target.read_text() + "\n# an experiment\n")
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "wip"],
                   check=True)
    refused = tool(root, "apply", "moshi")
    advice = re.search(r"drop them: `(git -C \S+ reset --hard pristine)`", refused.output)
    if not advice:
        return Outcome(1, refused.output, "no drop-them advice")
    subprocess.run(advice.group(1).split(), cwd=root, check=True, capture_output=True)
    return tool(root, "apply", "moshi")


@case("export after dropping a commit by accident", "patches", "error", r"with no replacement")
def _(ws: Path) -> Outcome:
    root = patch_root(ws, "dropped")
    tool(root, "apply", "moshi")
    subprocess.run(["git", "-C", str(root / "upstream" / "moshi"), "reset", "-q", "--hard", "HEAD~1"], check=True)
    return tool(root, "export", "moshi")


CASES_BY_NAME = {c.name: c for c in CASES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bad_input_sweep")
    ap.add_argument("--only", nargs="+", help="case names (substrings) to run")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    selected = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    if args.list:
        for c in selected:
            print(f"{c.group:<8} {c.expect:<8} {c.name}")
        return 0
    ws = args.out.resolve()
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    results = []
    for i, c in enumerate(selected, 1):
        t0 = time.time()
        try:
            out = c.run(ws)
        except Exception as e:  # a broken case is reported, the sweep goes on
            out = Outcome(-1, f"the case itself failed: {type(e).__name__}: {e}", "case error")
        v = verdict(c, out)
        lines = [ln.strip() for ln in out.output.replace("\r", "\n").splitlines() if ln.strip()]
        said = next((ln for ln in reversed(lines) if ln.startswith(("error:", "warning:"))), lines[-1] if lines else "")
        results.append({"name": c.name, "group": c.group, "expect": c.expect, "verdict": v, "rc": out.rc,
                        "check": out.check, "said": said, "command": out.command, "seconds": round(time.time() - t0),
                        "output_tail": "\n".join(lines[-15:])})
        print(f"[{i:>2}/{len(selected)}] {v:<12} {c.group:<8} {c.name}: {said[:150]}"
              + (f" [check: {out.check}]" if out.check else ""), flush=True)
    counts = Counter(r["verdict"] for r in results)
    print("\nverdict       cases")
    for v in ("named error", "warning", "OK", "silent", "traceback", "wrong"):
        print(f"{v:<13} {counts.get(v, 0):>5}")
    print(f"{'total':<13} {len(results):>5}")
    (ws / "sweep.json").write_text(json.dumps({"counts": dict(counts), "cases": results}, indent=1) + "\n")
    print(f"wrote {ws / 'sweep.json'}")
    return 1 if any(counts.get(v) for v in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
