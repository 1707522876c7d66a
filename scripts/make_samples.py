"""Build the sample set for tests and the quickstart: real speech from espeak-ng, exact word alignments.

    python scripts/make_samples.py --out data/samples

Writes, in moshi-finetune's format (see docs/data.md):

- `dialogues/dialogue_<i>.wav` + `.json`: stereo 24 kHz, two voices taking turns (DailyTalk-shaped); the left
  channel is the main speaker (SPEAKER_MAIN), the right one the user (SPEAKER_OTHER); `dialogues.jsonl`.
- `audiobook/alice.wav` + `.json`: a mono 24 kHz reading of a few minutes (LibriLight-shaped); `audiobook.jsonl`.
- `tokenizer.model`: a SentencePiece model of 96 pieces trained on the text of the above (ids 0-3 as in Moshi's:
  unk, bos, eos, pad), and `text.txt`, its training text.
- the spoken-recall benchmark (`ttt_speech.eval.recall_docs` says what its documents say and how they are laid
  out): `recall/banks/<voice>_<rate>.wav`, every word unit of one voice and rate (each word on Mimi frame
  boundaries); `recall/{train,heldout}/doc_<i>.wav` + `.json`, the held-out documents and a few training examples
  (mono 24 kHz); `recall_train.jsonl`, `recall_heldout.jsonl`; `recall.json` with the banks' unit index and, per
  document, its voice, rate, content, parts and the spans of A, its repeat and B. Held-out voices and content
  are never in the training banks.

Word timings are exact by construction: every word is synthesised on its own, its leading and trailing silence
trimmed, and the words are laid out with fixed gaps. Idempotent: a folder whose `samples.json` matches this
script's settings is left alone (`--force` rebuilds). Needs `espeak-ng` (scripts/install_system_deps.sh).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from ttt_speech.constants import SAMPLE_RATE  # pure Python: a no-op run stays instant

VERSION = 1
MAIN_SPEAKER = "SPEAKER_MAIN"  # ttt_speech.data.manifest.MAIN_SPEAKER; imported lazily so a no-op run is instant
OTHER_SPEAKER = "SPEAKER_OTHER"
ESPEAK_RATE = 22050
VOICES = {"main": "en-us+f3", "other": "en-gb+m3", "reader": "en-us"}
WORDS_PER_MINUTE = 165
LEAD_SEC = 0.4  # silence before the first word
WORD_GAP_SEC = 0.06
COMMA_GAP_SEC = 0.2
SENTENCE_GAP_SEC = 0.4
TURN_GAP_SEC = 0.55
TAIL_SEC = 0.5
TRIM_THRESHOLD = 0.01  # of full scale: where a word's sound starts and ends
VOCAB_SIZE = 96  # the tiny LM's text_card (ttt_speech.integrations.moshi.TINY_LM_KWARGS)
RECALL_VERSION = 1  # of the files `build_recall` writes (what they say: ttt_speech.eval.recall_docs)
WORD_UNIT_GAP_SEC = 0.04  # a recall word's unit: its sound, then at least this much silence up to a frame boundary


AUDIOBOOK = """\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do. Once or
twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it, and what
is the use of a book, thought Alice, without pictures or conversations? So she was considering in her own mind, as
well as she could, for the hot day made her feel very sleepy and stupid, whether the pleasure of making a daisy
chain would be worth the trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes
ran close by her. There was nothing so very remarkable in that; nor did Alice think it so very much out of the way
to hear the Rabbit say to itself, Oh dear! Oh dear! I shall be late! But when the Rabbit actually took a watch out
of its waistcoat pocket, and looked at it, and then hurried on, Alice started to her feet, for it flashed across her
mind that she had never before seen a rabbit with either a waistcoat pocket, or a watch to take out of it. Burning
with curiosity, she ran across the field after it, and was just in time to see it pop down a large rabbit hole
under the hedge. In another moment down went Alice after it, never once considering how in the world she was to
get out again. The rabbit hole went straight on like a tunnel for some way, and then dipped suddenly down, so
suddenly that Alice had not a moment to think about stopping herself before she found herself falling down what
seemed to be a very deep well. Either the well was very deep, or she fell very slowly, for she had plenty of time
as she went down to look about her and to wonder what was going to happen next. First, she tried to look down and
make out what she was coming to, but it was too dark to see anything; then she looked at the sides of the well,
and noticed that they were filled with cupboards and book shelves; here and there she saw maps and pictures hung
upon pegs. She took down a jar from one of the shelves as she passed; it was labelled Orange Marmalade, but to her
great disappointment it was empty. She did not like to drop the jar for fear of killing somebody underneath, so
managed to put it into one of the cupboards as she fell past it. Well! thought Alice to herself, after such a fall
as this, I shall think nothing of tumbling down stairs! How brave they will all think me at home! Down, down, down.
Would the fall never come to an end? I wonder how many miles I have fallen by this time? she said aloud.
"""

# (speaker, turn) with speaker "main" (left channel) or "other" (right channel); turns alternate
DIALOGUES = [
    [("other", "Good morning! Did you sleep well last night?"),
     ("main", "Not really, the neighbours were playing music until two."),
     ("other", "Oh no. Did you ask them to turn it down?"),
     ("main", "I knocked on their door, but nobody answered."),
     ("other", "Maybe you should leave them a friendly note."),
     ("main", "That is a good idea. I will write one after breakfast.")],
    [("main", "Excuse me, how much are these apples?"),
     ("other", "They are two dollars a kilo, and the pears are three."),
     ("main", "I will take one kilo of apples, please."),
     ("other", "Here you are. Would you like a bag for them?"),
     ("main", "No thanks, I brought my own bag."),
     ("other", "Great, that will be two dollars then.")],
    [("other", "Are you coming to the football match on Saturday?"),
     ("main", "I would love to, but I have to work until five."),
     ("other", "The match starts at six, so you still have time."),
     ("main", "Then I will meet you at the stadium gate."),
     ("other", "Perfect. Do not forget to bring your ticket!"),
     ("main", "I will put it in my wallet right now.")],
    [("main", "What are you cooking? It smells wonderful."),
     ("other", "It is a vegetable soup with ginger and a little garlic."),
     ("main", "Can you teach me how to make it?"),
     ("other", "Of course. First you chop the onions and the carrots."),
     ("main", "And how long does it need to cook?"),
     ("other", "About forty minutes, then you add salt and pepper.")],
]


def settings_hash() -> str:
    spec = {"version": VERSION, "voices": VOICES, "wpm": WORDS_PER_MINUTE, "audiobook": AUDIOBOOK,
            "dialogues": DIALOGUES, "gaps": [LEAD_SEC, WORD_GAP_SEC, COMMA_GAP_SEC, SENTENCE_GAP_SEC,
                                              TURN_GAP_SEC, TAIL_SEC, TRIM_THRESHOLD], "vocab": VOCAB_SIZE,
            "recall": [RECALL_VERSION, WORD_UNIT_GAP_SEC, recall_docs().spec()]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def espeak_version() -> str:
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("make_samples: espeak-ng is not installed; run `bash scripts/install_system_deps.sh` (as root)")


def synthesise(voice: str, word: str, scratch: Path, rate: int = WORDS_PER_MINUTE) -> np.ndarray:
    """One word spoken by `voice` at `rate` words per minute, trimmed to its sound, float32 at ESPEAK_RATE."""
    path = scratch / (hashlib.sha256(f"{voice}/{rate}/{word}".encode()).hexdigest()[:20] + ".wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), word], check=True)
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (ESPEAK_RATE, 2, 1), path
        audio = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(audio) > TRIM_THRESHOLD)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {word!r} ({voice})")
    return audio[loud[0]:loud[-1] + 1]


def gap_after(word: str) -> float:
    if word[-1] in ".!?":
        return SENTENCE_GAP_SEC
    if word[-1] in ",;:":
        return COMMA_GAP_SEC
    return WORD_GAP_SEC


def lay_out(turns: list[tuple[str, str]], sounds: dict[tuple[str, str], np.ndarray]):
    """Place the words of `turns` on one timeline at ESPEAK_RATE: (per-channel audio, words)."""
    from ttt_speech.data.manifest import Word

    channels = sorted({VOICES[speaker] for speaker, _ in turns})
    placed: list[tuple[str, int, np.ndarray, str, str]] = []  # (word, start sample, sound, voice, label)
    t = LEAD_SEC
    for n, (speaker, text) in enumerate(turns):
        if n:
            t += TURN_GAP_SEC - SENTENCE_GAP_SEC
        for word in text.split():
            sound = sounds[VOICES[speaker], word]
            start = round(t * ESPEAK_RATE)
            placed.append((word, start, sound, VOICES[speaker], MAIN_SPEAKER if speaker != "other" else OTHER_SPEAKER))
            t = (start + len(sound)) / ESPEAK_RATE + gap_after(word)
    total = round((t + TAIL_SEC) * ESPEAK_RATE)
    audio = {voice: np.zeros(total, np.float32) for voice in channels}
    words = []
    for word, start, sound, voice, label in placed:
        audio[voice][start:start + len(sound)] += sound
        words.append(Word(word, round(start / ESPEAK_RATE, 4), round((start + len(sound)) / ESPEAK_RATE, 4), label))
    return audio, words


def write_wav(path: Path, channels: list[np.ndarray]) -> float:
    """Resample to 24 kHz and write 16-bit PCM; returns the duration in seconds."""
    from ttt_speech.data.audio import resample

    audio = resample(np.stack(channels), ESPEAK_RATE, SAMPLE_RATE).numpy()
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(len(channels))
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.T.tobytes())
    return pcm.shape[1] / SAMPLE_RATE


def train_tokenizer(lines: list[str], path: Path) -> None:
    import sentencepiece

    model = io.BytesIO()  # in memory, so the model holds no temporary paths and is byte-identical across runs
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB_SIZE, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    path.write_bytes(model.getvalue())


def recall_docs():
    """`ttt_speech.eval.recall_docs`: what the spoken-recall documents say and how they are laid out (pure Python,
    imported lazily like the rest of ttt_speech)."""
    from ttt_speech.eval import recall_docs

    return recall_docs


def recall_sounds_needed() -> list[tuple[str, int, str]]:
    rd = recall_docs()
    return sorted({(v, r, w) for split in ("train", "heldout") for (v, r), words in rd.bank_words(split).items()
                   for w in words})


def word_unit(sound: np.ndarray) -> np.ndarray:
    """A word's unit at 24 kHz: its sound, resampled on its own, then at least WORD_UNIT_GAP_SEC of silence up to
    the next Mimi frame boundary."""
    from ttt_speech.data.audio import resample

    rd = recall_docs()
    audio = resample(sound[None], ESPEAK_RATE, SAMPLE_RATE)[0].numpy()
    frames = -(-(len(audio) + round(WORD_UNIT_GAP_SEC * SAMPLE_RATE)) // rd.FRAME_SAMPLES)
    return np.pad(audio, (0, frames * rd.FRAME_SAMPLES - len(audio))), len(audio)


def write_mono(path: Path, audio: np.ndarray) -> float:
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())
    return len(pcm) / SAMPLE_RATE


def build_recall(out: Path, sounds: dict, tokenizer_path: Path) -> dict:
    """The spoken-recall banks (every word unit of a voice and rate, in one file), the fixed documents (all
    held-out ones, a few training examples), their manifests, and `recall.json`; returns its content."""
    import sentencepiece

    from ttt_speech.data.manifest import Word, write_alignments, write_manifest

    rd = recall_docs()
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    unknown = sorted({w for _, _, w in sounds if 0 in tokenizer.encode(w)})
    if unknown:
        raise RuntimeError(f"recall words with characters the tokenizer does not know (<unk>): {unknown}")
    (out / "recall" / "banks").mkdir(parents=True)
    banks, units = {}, {}
    for split in ("train", "heldout"):
        for (voice, rate), words in sorted(rd.bank_words(split).items()):
            name = f"{voice}_{rate}"
            index, chunks, frame = {}, [], 0
            for w in sorted(words):
                audio, sound = word_unit(sounds[voice, rate, w])
                units[voice, rate, w] = (audio, sound)
                index[w] = [frame, len(audio) // rd.FRAME_SAMPLES, sound]
                frame += len(audio) // rd.FRAME_SAMPLES
                chunks.append(audio)
            path = out / "recall" / "banks" / f"{name}.wav"
            write_mono(path, np.concatenate(chunks))
            banks[name] = {"path": path.relative_to(out).as_posix(), "split": split, "voice": voice, "rate": rate,
                           "units": index}
    listing: dict[str, list] = {"train": [], "heldout": []}
    documents = []
    for split in ("train", "heldout"):
        (out / "recall" / split).mkdir(parents=True)
        for doc in rd.fixed_documents(split):
            index = banks[f"{doc.voice}_{doc.rate}"]["units"]
            lay = rd.layout(doc, {w: u[1] for w, u in index.items()}, {w: u[2] for w, u in index.items()})
            audio = np.zeros(lay.frames * rd.FRAME_SAMPLES, np.float32)
            for kind, what, start in lay.units:
                if kind == "word":
                    unit = units[doc.voice, doc.rate, what][0]
                    audio[start * rd.FRAME_SAMPLES:start * rd.FRAME_SAMPLES + len(unit)] = unit
            wav = out / "recall" / split / f"{doc.name}.wav"
            duration = write_mono(wav, audio)
            write_alignments(wav.with_suffix(".json"), [Word(w, a, b, MAIN_SPEAKER) for w, a, b in lay.words])
            listing[split].append((wav, duration))
            documents.append({"path": wav.relative_to(out).as_posix(), "duration": duration, "split": split,
                              "name": doc.name, "voice": doc.voice, "rate": doc.rate, "kind": doc.kind,
                              "content": doc.content, "unrelated": doc.unrelated, "fillers": list(doc.fillers),
                              "parts": {p: [round(a * rd.FRAME_SEC, 4), round(b * rd.FRAME_SEC, 4)]
                                        for p, (a, b) in lay.parts.items()},
                              "spans": {m: list(span) for m, span in lay.spans.items()}})
        write_manifest(out / f"recall_{split}.jsonl", listing[split])
    meta = {"version": RECALL_VERSION, "spec": rd.spec(), "banks": banks, "documents": documents}
    (out / "recall.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build(out: Path) -> dict:
    from ttt_speech.data.manifest import write_alignments, write_manifest

    dialogues = [[(speaker, " ".join(text.split())) for speaker, text in turns] for turns in DIALOGUES]
    book = [("reader", " ".join(AUDIOBOOK.split()))]
    needed = sorted({(VOICES[s], w) for turns in [*dialogues, book] for s, text in turns for w in text.split()})
    recall_needed = recall_sounds_needed()
    scratch = out / "espeak"
    scratch.mkdir()
    # espeak-ng calls mostly wait on process start-up: more workers than cores
    with concurrent.futures.ThreadPoolExecutor(max_workers=4 * (os.cpu_count() or 2)) as pool:
        sounds = dict(zip(needed, pool.map(lambda vw: synthesise(*vw, scratch), needed), strict=True))
        recall_sounds = dict(zip(recall_needed, pool.map(lambda vrw: synthesise(vrw[0], vrw[2], scratch, vrw[1]),
                                                         recall_needed), strict=True))
    shutil.rmtree(scratch)

    (out / "dialogues").mkdir(parents=True)
    (out / "audiobook").mkdir()
    listing = []
    for i, turns in enumerate(dialogues):
        audio, words = lay_out(turns, sounds)
        wav = out / "dialogues" / f"dialogue_{i}.wav"
        listing.append((wav, write_wav(wav, [audio[VOICES["main"]], audio[VOICES["other"]]])))
        write_alignments(wav.with_suffix(".json"), words)
    write_manifest(out / "dialogues.jsonl", listing)
    audio, words = lay_out(book, sounds)
    wav = out / "audiobook" / "alice.wav"
    book_duration = write_wav(wav, [audio[VOICES["reader"]]])
    write_alignments(wav.with_suffix(".json"), words)
    write_manifest(out / "audiobook.jsonl", [(wav, book_duration)])

    lines = [text for turns in [*dialogues, book] for _, text in turns]
    (out / "text.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer(lines, out / "tokenizer.model")
    recall = build_recall(out, recall_sounds, out / "tokenizer.model")
    return {"dialogues": [d for _, d in listing], "audiobook": book_duration,
            "recall": {"banks": len(recall["banks"]), **{split: sum(d["split"] == split for d in recall["documents"])
                                                         for split in ("train", "heldout")}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/samples"))
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    out: Path = args.out
    stamp = out / "samples.json"
    version = espeak_version()
    wanted = {"settings": settings_hash(), "espeak": version}
    if not args.force and stamp.is_file():
        old = json.loads(stamp.read_text())
        if {k: old.get(k) for k in wanted} == wanted and all((out / f).is_file() for f in old.get("files", [])):
            print(f"samples: {out} is up to date")
            return 0
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        durations = build(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / "samples.json").write_text(
            json.dumps({**wanted, "durations_sec": durations, "files": files}, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"samples: wrote {out} ({size / 2**20:.1f} MiB, {len(durations['dialogues'])} dialogues of "
          f"{sum(durations['dialogues']):.0f} s, audiobook of {durations['audiobook']:.0f} s, spoken recall: "
          f"{durations['recall']['banks']} word banks, {durations['recall']['heldout']} held-out and "
          f"{durations['recall']['train']} example training documents) "
          f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
