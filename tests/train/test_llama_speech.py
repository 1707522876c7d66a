"""Fine-tuning LLaMA-Omni with speech: instruction JSON with `speech` paths and `<speech>` placeholders.

The loader tests run everywhere with a small speech front end of our own (the loader's `SpeechFrontend` protocol:
sample rate, positions per clip, `mel`). The model tests need LLaMA-Omni's patched source (`omni_speech`, made by
`LLAMA_OMNI_SRC=<checkout> make apply-patches`) and openai-whisper (installed by that same command) and skip
otherwise: a tiny random Whisper checkpoint in whisper's own format is written and named as `speech_encoder`."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch

from ttt_speech.config import ConfigError, load_config
from ttt_speech.errors import DataError
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.llama_data import IGNORE, SPEECH, SpeechBatch, TokenWindows, read_stream

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "llama_tiny.yaml"
HAVE_OMNI = importlib.util.find_spec("omni_speech") is not None
HAVE_WHISPER = importlib.util.find_spec("whisper") is not None
needs_omni = pytest.mark.skipif(
    not (HAVE_OMNI and HAVE_WHISPER),
    reason="needs LLaMA-Omni's patched source and openai-whisper: LLAMA_OMNI_SRC=<checkout or archive of the pin> "
           "make apply-patches installs both" + ("" if HAVE_OMNI else " (omni_speech not importable)")
           + ("" if HAVE_WHISPER else " (whisper not importable)"))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chars(text: str) -> list[int]:
    return [ord(c) % 32 for c in text]


class Frames:
    """A speech front end for loader tests: `positions` per clip; a clip's 'mel' is its first samples, so which
    clip a batch carries can be read back."""

    sample_rate = 16000

    def __init__(self, positions: int = 3) -> None:
        self.positions = positions

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(4, 2)
        out.view(-1)[:min(8, wav.numel())] = wav[:8]
        return out


def write_clips(folder: Path, n: int, seconds: float = 0.5) -> list[str]:
    """n mono 16 kHz clips of noise whose first sample is 0.01 * (index + 1)."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        wav = (0.1 * rng.standard_normal((1, int(16000 * seconds)))).astype(np.float32)
        wav[0, 0] = 0.01 * (i + 1)
        sphn.write_wav(str(folder / f"c{i}.wav"), wav, 16000)
        names.append(f"c{i}.wav")
    return names


def speech_json(folder: Path, n: int, name: str = "train.json") -> Path:
    clips = write_clips(folder, n)
    samples = [{"id": f"s{i}", "speech": clips[i], "conversations": [
        {"from": "human", "value": f"<speech>\nsay {i % 10}"}, {"from": "gpt", "value": f"number {i % 10} ok"}]}
        for i in range(n)]
    path = folder / name
    path.write_text(json.dumps(samples))
    return path


def test_speech_placeholders_become_the_clips_positions(tmp_path: Path) -> None:
    path = speech_json(tmp_path, 2)
    stream = read_stream(str(path), 32, chars, Frames(3))
    head, tail = chars("human: "), chars("\nsay 0\n")
    answer = chars("gpt: number 0 ok\n")
    first = len(head) + 3 + len(tail) + len(answer)
    assert stream.ids[:first].tolist() == head + [SPEECH] * 3 + tail + answer
    assert stream.labels[:first].tolist() == [IGNORE] * (len(head) + 3 + len(tail)) + answer
    assert stream.refs[:first].tolist() == [-1] * len(head) + [0, 1, 2] + [-1] * (len(tail) + len(answer))
    assert stream.refs[first + len(head):first + len(head) + 3].tolist() == [3, 4, 5]  # the second clip
    assert stream.clips == [tmp_path / "c0.wav", tmp_path / "c1.wav"]
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"}]}]))
    assert read_stream(str(text_only), 32, chars, Frames(3)).refs is None  # text-only data: plain batches


def test_windows_cut_through_clips_and_carry_the_clips_they_touch(tmp_path: Path) -> None:
    path = speech_json(tmp_path, 6)
    stream = read_stream(str(path), 32, chars, Frames(7))
    loader = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=16, seed=0, rank=0, world_size=1,
                          shuffle=False, where="x", speech=(stream, Frames(7)))
    seen: dict[float, list[int]] = {}  # clip (its first sample) -> frames placed, in stream order
    for _ in range(loader.windows):
        batch = next(loader)
        assert isinstance(batch, SpeechBatch) and batch.tokens.shape == (1, 3, 16) and batch.mels.shape[1:] == (4, 2)
        ids, labels, refs = batch.tokens[0]
        assert torch.equal(ids == SPEECH, refs >= 0) and (labels[refs >= 0] == IGNORE).all()
        for r in refs[refs >= 0].tolist():
            seen.setdefault(round(float(batch.mels[r // 7, 0, 0]), 4), []).append(r % 7)
    whole = stream.ids.numel() // 16 * 16
    complete = [c for c in range(6) if (stream.refs[:whole] // 7 == c).sum() == 7]
    assert len(complete) >= 4 and any((loader.refs[w] >= 0).sum() not in (0, 7) for w in range(loader.windows))
    for c in complete:  # every frame of a clip once, in order, also across a window boundary
        assert seen[round(0.01 * (c + 1), 4)] == list(range(7))
    again = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=16, seed=0, rank=0, world_size=1,
                         shuffle=True, where="x", speech=(stream, Frames(7)))
    first = [next(again) for _ in range(5)]
    resumed = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=16, seed=0, rank=0, world_size=1,
                           shuffle=True, where="x", speech=(stream, Frames(7)))
    resumed.load_state_dict({"index": 3})
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.mels, b.mels)
               for a, b in zip(first[3:], [next(resumed), next(resumed)], strict=True))


def test_a_window_without_speech_carries_one_silent_clip(tmp_path: Path) -> None:
    path = speech_json(tmp_path, 1)
    data = json.loads(path.read_text()) + [{"id": "t", "conversations": [{"from": "human", "value": "x" * 40}]}]
    path.write_text(json.dumps(data))
    stream = read_stream(str(path), 32, chars, Frames(3))
    loader = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=16, seed=0, rank=0, world_size=1,
                          shuffle=False, where="x", speech=(stream, Frames(3)))
    batches = [next(loader) for _ in range(loader.windows)]
    last = batches[-1]
    assert (last.tokens[0, 2] < 0).all() and last.mels.shape[0] == 1 and not last.mels.any()


def test_speech_samples_are_refused_clearly(tmp_path: Path) -> None:
    write_clips(tmp_path, 2)

    def write(samples: list) -> str:
        (tmp_path / "d.json").write_text(json.dumps(samples))
        return str(tmp_path / "d.json")

    ask = {"from": "human", "value": "<speech>\nwhat?"}
    answer = {"from": "gpt", "value": "yes"}
    path = write([{"id": "s1", "speech": "c0.wav", "conversations": [ask, answer]}])
    with pytest.raises(ConfigError, match=r"sample 0 \(id 's1'\): has speech 'c0.wav'; training with speech needs "
                                          r"LLaMA-Omni's model .* model_type omni_speech_llama .*speech_encoder .*"
                                          r"LLAMA_OMNI_SRC=<checkout> make apply-patches"):
        read_stream(path, 32, chars, None)  # the plain Llama class has no speech front end
    cases = [
        ({"id": "a", "speech": "c0.wav", "conversations": [{"from": "human", "value": "no placeholder"}, answer]},
         r"sample 0 \(id 'a'\): 0 <speech> placeholder\(s\) in its turns but 1 'speech' path"),
        ({"id": "b", "conversations": [ask, answer]}, r"1 <speech> placeholder\(s\) in its turns but 0 'speech'"),
        ({"id": "c", "speech": ["c0.wav", "c1.wav"], "conversations": [ask, answer]},
         r"1 <speech> placeholder\(s\) in its turns but 2 'speech' path"),
        ({"id": "d", "speech": "gone.wav", "conversations": [ask, answer]},
         r"sample 0 \(id 'd'\): speech file 'gone.wav' not found \(tried gone.wav, .*/gone.wav\)"),
        ({"id": "e", "speech": "c0.wav", "conversations": [{"from": "human", "value": "hi"},
                                                            {"from": "gpt", "value": "<speech>"}]},
         r"conversations\[1\] \(gpt\) has a <speech> placeholder; speech goes in the user's turns"),
        ({"id": "f", "speech": 3, "conversations": [ask, answer]}, r"'speech' must be an audio path or a list"),
    ]
    for sample, message in cases:
        with pytest.raises(ConfigError, match=message):
            read_stream(write([sample]), 32, chars, Frames(3))
    (tmp_path / "bad.wav").write_bytes(b"not audio")  # found, but unreadable: named when its batch is made
    stream = read_stream(write([{"id": "h", "speech": "bad.wav", "conversations": [ask, answer]}]), 32, chars,
                         Frames(3))
    loader = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=8, seed=0, rank=0, world_size=1,
                          shuffle=False, where="x", speech=(stream, Frames(3)))
    with pytest.raises(DataError, match=r"bad.wav: cannot read the audio"):
        [next(loader) for _ in range(loader.windows)]
    two = {"id": "g", "speech": ["c0.wav", "c1.wav"], "conversations": [
        {"from": "human", "value": "<speech> and <speech>"}, answer]}
    stream = read_stream(write([two]), 32, chars, Frames(3))
    assert stream.clips == [tmp_path / "c0.wav", tmp_path / "c1.wav"] and (stream.refs >= 0).sum() == 6


# ---- with LLaMA-Omni's patched class and openai-whisper


@pytest.fixture(scope="module")
def whisper_ckpt(tmp_path_factory) -> Path:
    from ttt_speech.integrations.llama_train import write_tiny_whisper

    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper.pt")


def omni(whisper_ckpt: Path, ttt: dict | None = None, seed: int = 0):
    from ttt_speech.integrations.llama_train import build_llama, tiny_omni_kwargs

    return build_llama(tiny_omni_kwargs(whisper_ckpt), None, ttt, seed=seed, device=torch.device("cpu"),
                       dtype=torch.float32)


@needs_omni
def test_a_checkpoint_without_whisper_gets_it_from_speech_encoder(tmp_path: Path, whisper_ckpt: Path) -> None:
    """LLaMA-Omni's checkpoints leave the Whisper encoder out (its builder rebuilds it from `speech_encoder`): the
    encoder built from such a checkpoint equals whisper's own load, not the random init transformers would draw; a
    checkpoint missing any other tensor is refused, naming it."""
    import whisper
    from safetensors.torch import load_file, save_file

    from ttt_speech.integrations.llama_train import build_llama

    folder = tmp_path / "omni"
    omni(whisper_ckpt).save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not views of the file rewritten below
    save_file({k: v for k, v in state.items() if not k.startswith("model.speech_encoder.")}, weights,
              metadata={"format": "pt"})
    model = build_llama(None, str(folder), None, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    want = whisper.load_model(str(whisper_ckpt), device="cpu").encoder.state_dict()
    got = model.get_model().speech_encoder.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    other = tmp_path / "no_norm"  # a new folder: the model above may map the first file's memory
    shutil.copytree(folder, other)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, other / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensors of the model are not in it.*model\.norm\.weight"):
        build_llama(None, str(other), None, seed=1, device=torch.device("cpu"), dtype=torch.float32)


@needs_omni
def test_constants_and_front_end_agree_with_llama_omni(tmp_path: Path, whisper_ckpt: Path) -> None:
    import whisper
    from omni_speech.constants import DEFAULT_SPEECH_TOKEN, SPEECH_TOKEN_INDEX

    from ttt_speech.integrations.llama_train import speech_frontend, write_tiny_whisper
    from ttt_speech.train.llama_data import SPEECH_PLACEHOLDER

    assert (SPEECH, SPEECH_PLACEHOLDER) == (SPEECH_TOKEN_INDEX, DEFAULT_SPEECH_TOKEN)
    model = omni(whisper_ckpt)
    reference = whisper.load_model(str(whisper_ckpt)).encoder  # the encoder is the checkpoint's, not re-initialised
    for name, p in reference.state_dict().items():
        assert torch.equal(model.get_model().speech_encoder.state_dict()[name], p), name
    # Whisper's own window (n_audio_ctx 1500) gives LLaMA-Omni's dataset features and 300 positions per clip
    full = write_tiny_whisper(tmp_path / "w1500.pt", n_audio_ctx=1500)
    front = speech_frontend(omni(full))
    wav = torch.from_numpy(np.random.default_rng(0).standard_normal(40000).astype(np.float32)) * 0.1
    expected = whisper.log_mel_spectrogram(whisper.pad_or_trim(wav), n_mels=128).permute(1, 0)  # as its infer.py
    assert front.positions == 300 and torch.equal(front.mel(wav), expected)
    from transformers import LlamaForCausalLM

    from ttt_speech.integrations.llama_train import TINY
    assert speech_frontend(LlamaForCausalLM(__import__("transformers").LlamaConfig(**TINY))) is None


@needs_omni
@pytest.mark.parametrize("ttt", [None, {"layers": [3], "mode": "replace", "mini_batch_size": 8}])
def test_speech_inputs_equal_llama_omnis_own_placement(whisper_ckpt: Path, ttt: dict | None) -> None:
    """Our windows place the encoded clip at its positions through `embed_tokens`; LLaMA-Omni's
    `prepare_inputs_labels_for_speech_and_text` expands its placeholder: the same logits."""
    from ttt_speech.integrations.llama_train import SpeechInputs, speech_frontend

    model = omni(whisper_ckpt, ttt).eval()
    front = speech_frontend(model)
    wav = torch.from_numpy(np.random.default_rng(1).standard_normal(9000).astype(np.float32)) * 0.1
    mel = front.mel(wav)
    n = front.positions
    before, after = torch.tensor([5, 9, 11]), torch.tensor([7, 3, 2, 8, 1])
    ours = torch.cat([before, torch.full((n,), SPEECH), after])[None]
    refs = torch.where(ours == SPEECH, torch.arange(ours.shape[1]) - 3, -1)
    with torch.no_grad():
        with SpeechInputs(model, mel[None], refs).placed():
            mine = model(input_ids=ours.clamp_min(0), use_cache=False).logits
        theirs = model(input_ids=torch.cat([before, torch.tensor([SPEECH]), after])[None], speech=mel[None],
                       speech_lengths=torch.tensor([mel.shape[0]]), use_cache=False).logits
        text = model(input_ids=ours.clamp_min(0), use_cache=False).logits
    assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5, rtol=0)
    assert (mine - text).abs().max() > 1e-3  # the speech is seen


def omni_cfg(tmp_path: Path, whisper_ckpt: Path, *overrides: str) -> TrainConfig:
    import sentencepiece

    from ttt_speech.integrations.llama_train import tiny_omni_kwargs

    if not (tmp_path / "sp.model").is_file():
        speech_json(tmp_path, 12)
        (tmp_path / "tok.txt").write_text("\n".join(f"human: say {i}\ngpt: number {i} ok" for i in range(10)))
        sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "tok.txt"), model_prefix=str(tmp_path / "sp"),
                                                 vocab_size=20, model_type="word", minloglevel=2,
                                                 hard_vocab_limit=False)
    return load_config(TrainConfig, CONFIG, [
        f"--run_dir={tmp_path / 'run'}", f"--model.lm_kwargs={json.dumps(tiny_omni_kwargs(whisper_ckpt))}",
        f"--llama.train_data={tmp_path / 'train.json'}", f"--llama.val_data={tmp_path / 'train.json'}",
        f"--llama.tokenizer={tmp_path / 'sp.model'}", "--llama.seq_len=32", "--batch_size=2", "--ckpt_freq=100",
        "--llama.val_batches=1", "--export_safetensors=false", "--ttt.mini_batch_size=8", *overrides])


def logged(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader((run_dir / "metrics.csv")
                                                                                        .open())]


@needs_omni
def test_distillation_with_speech_resumes_exactly_and_whisper_stays_frozen(tmp_path: Path,
                                                                           whisper_ckpt: Path) -> None:
    from ttt_speech.integrations.llama_train import trainable_names
    from ttt_speech.train.trainer import train

    base = omni(whisper_ckpt, {"layers": [3], "mode": "replace", "mini_batch_size": 8})
    names = trainable_names(base, "all")
    assert not any(n.startswith("model.speech_encoder.") for n in names)
    assert any(n.startswith("model.speech_projector.") for n in names)
    assert not any("speech" in n for n in trainable_names(base, "ttt"))
    extra = ["--max_steps=4", "--num_microbatches=2"]
    straight = train(omni_cfg(tmp_path, whisper_ckpt, "--run_dir=" + str(tmp_path / "straight"), *extra))
    train(omni_cfg(tmp_path, whisper_ckpt, "--run_dir=" + str(tmp_path / "resumed"), *extra, "--stop_after=2"))
    second = train(omni_cfg(tmp_path, whisper_ckpt, "--run_dir=" + str(tmp_path / "resumed"), *extra))
    assert second["resumed_from_step"] == 2 and second["losses"] == straight["losses"][2:]  # tolerance: exact
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")
    assert all(float(r["kl"]) >= 0 for r in logged(tmp_path / "straight"))


@needs_omni
def test_finetuning_all_trains_the_projector_never_whisper(tmp_path: Path, whisper_ckpt: Path) -> None:
    """trainable: all moves the speech projector with the language model; the Whisper encoder is frozen (no grad,
    unchanged); trainable: ttt leaves the projector too (it feeds the teacher as well)."""
    from ttt_speech.integrations.llama_train import speech_modules
    from ttt_speech.train.llama import LlamaFamily

    for what, projector_moves in (("all", True), ("ttt", False)):
        cfg = omni_cfg(tmp_path, whisper_ckpt, "--llama.objective=finetune", f"--llama.trainable={what}",
                       "--parallel=none")
        family = LlamaFamily()
        model, groups = family.build(cfg, torch.device("cpu"), 1)
        encoder, projector = speech_modules(model)
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (encoder, projector)]
        opt = torch.optim.AdamW(groups, lr=1e-2)
        loader = family.loader(cfg, cfg.stage_list()[0], 0, 1, torch.device("cpu"))
        for _ in range(2):
            batch = next(loader)
            assert isinstance(batch, SpeechBatch) and (batch.tokens[:, 2] >= 0).any()
            loss, _ = family.loss(model, batch, cfg)
            loss.backward()
            assert all(p.grad is None for p in encoder.parameters())
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before[0].items())
        moved = any(not torch.equal(v, projector.state_dict()[k]) for k, v in before[1].items())
        assert moved == projector_moves, what


@needs_omni
def test_the_teacher_gets_the_same_speech_inputs(tmp_path: Path, whisper_ckpt: Path) -> None:
    """Gated residual with the gate at 0: the student is the teacher, so the KL is 0 exactly when both see the same
    speech, and not when the teacher's speech positions get the token embeddings instead."""
    from ttt_speech.integrations import llama_train
    from ttt_speech.train.llama import LlamaFamily, kl_teacher_student

    cfg = omni_cfg(tmp_path, whisper_ckpt, "--ttt.mode=gated_residual", "--ttt.gate_init=0.0", "--parallel=none")
    family = LlamaFamily()
    model, _ = family.build(cfg, torch.device("cpu"), 1)
    batch = next(family.loader(cfg, cfg.stage_list()[0], 0, 1, torch.device("cpu")))
    with torch.no_grad():
        loss, (kl, _, _) = family.loss(model, batch, cfg)
        ids = batch.tokens[:, 0].clamp_min(0)
        with llama_train.SpeechInputs(model, batch.mels, batch.tokens[:, 2]).placed():
            student = model(input_ids=ids, use_cache=False).logits
        with llama_train.ttt_bypassed(model):
            deaf = model(input_ids=ids, use_cache=False).logits
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_teacher_student(deaf, student)) > 1e-4


@needs_omni
@pytest.mark.slow
def test_speech_with_two_gloo_processes_and_fsdp2_resumes_exactly(tmp_path: Path, whisper_ckpt: Path) -> None:
    """The Whisper encoder and the projector are FSDP2 units of their own, run inside the model's forward; with
    trainable: all the projector's gradients are reduced across the processes."""
    import os
    import subprocess
    import sys

    cfg = omni_cfg(tmp_path, whisper_ckpt)  # writes the data and the tokenizer
    kwargs = json.dumps(cfg.model.lm_kwargs)

    def run(run_dir: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "ttt_speech.cli", "finetune", str(CONFIG), f"--run_dir={run_dir}", f"--model.lm_kwargs={kwargs}",
               f"--llama.train_data={tmp_path / 'train.json'}", f"--llama.val_data={tmp_path / 'train.json'}",
               f"--llama.tokenizer={tmp_path / 'sp.model'}", "--llama.seq_len=32", "--batch_size=2",
               "--max_steps=4", "--export_safetensors=false", "--llama.val_batches=1", "--ttt.mini_batch_size=8",
               "--llama.objective=finetune", "--llama.trainable=all", "--llama.loss_chunk=16", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--stop_after=2")
    run(tmp_path / "resumed")
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")  # tolerance: exact


@needs_omni
def test_eval_llama_places_the_speech_and_scores_text_only(tmp_path: Path, whisper_ckpt: Path) -> None:
    from ttt_speech.eval.llama_eval import evaluate_run, token_nll
    from ttt_speech.integrations.llama_train import load_tokenizer, speech_frontend
    from ttt_speech.train.trainer import train

    train(omni_cfg(tmp_path, whisper_ckpt, "--max_steps=2", "--export_safetensors=true"))
    result = evaluate_run(tmp_path / "run", tokens=64, docs=2, bins=2, turns=[0])
    bins = result["perplexity_by_position"]["bins"]
    assert len(bins) == 2 and all(np.isfinite(r["teacher_nll"]) and np.isfinite(r["student_nll"]) for r in bins)
    model = omni(whisper_ckpt)
    front = speech_frontend(model)
    stream = read_stream(str(tmp_path / "train.json"), model.config.vocab_size,
                         load_tokenizer(str(tmp_path / "sp.model")), front)
    loader = TokenWindows(stream.ids, stream.labels, batch_size=1, seq_len=32, seed=0, rank=0, world_size=1,
                          shuffle=False, where="x", speech=(stream, front))
    batch = next(loader)
    ids = batch.tokens[:, 0]
    nll = token_nll(model, ids, False, (batch.mels, batch.tokens[:, 2]))
    assert torch.equal(nll.isnan(), ids[:, 1:] == SPEECH) and (ids == SPEECH).any()
    deaf = token_nll(model, ids.clamp_min(0), False)
    assert not torch.allclose(nll[~nll.isnan()], deaf[~nll.isnan()])  # the clips are seen
