"""Build the sample set for tests and the quickstart: real speech from espeak-ng, exact word alignments.

    python scripts/make_samples.py --out data/samples

Writes, in moshi-finetune's format (see docs/data.md):

- `dialogues/dialogue_<i>.wav` + `.json`: stereo 24 kHz, two voices taking turns (DailyTalk-shaped); the left
  channel is the main speaker (SPEAKER_MAIN), the right one the user (SPEAKER_OTHER); `dialogues.jsonl`.
- `audiobook/alice.wav` + `.json`: a mono 24 kHz reading of a few minutes (LibriLight-shaped); `audiobook.jsonl`.
- `tokenizer.model`: a SentencePiece model of 96 pieces trained on the text of the above (ids 0-3 as in Moshi's:
  unk, bos, eos, pad), and `text.txt`, its training text.
- `recall/{train,heldout}/doc_<i>.wav` + `.json`: the spoken-recall documents (mono 24 kHz), one speaker each:
  "Please remember <A>." / filler sentences (at least MIN_FILLER_SEC) / "Again, <A>." / "And now <B>.", where A and
  B are a name, a spoken digit string or a short phrase. `recall_train.jsonl`, `recall_heldout.jsonl`, and
  `recall.json`: per document its voice, rate, content, the four parts and the spans of A, its repeat and B, in
  seconds. The held-out documents use voices and content (names, phrase words, digit strings) that no training
  document uses. Each part starts on a Mimi frame boundary (80 ms) and is resampled on its own, so
  `ttt_speech.eval.recall_spoken` can encode the parts separately and nothing about A reaches the filler's codes
  through Mimi's own context.

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

VERSION = 1
MAIN_SPEAKER = "SPEAKER_MAIN"  # ttt_speech.data.manifest.MAIN_SPEAKER; imported lazily so a no-op run is instant
OTHER_SPEAKER = "SPEAKER_OTHER"
SAMPLE_RATE = 24000
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

# the spoken-recall documents
RECALL_TRAIN_VOICES = ["en-us", "en-us+f3", "en-gb+m3", "en-029+f2", "en-gb-scotland+m1"]
RECALL_HELDOUT_VOICES = ["en-gb-x-rp+f4", "en-us-nyc+m2", "en-gb-x-gbclan+f1"]
RECALL_RATES = [140, 185]  # words per minute
RECALL_DOCS_PER_VOICE_RATE = {"train": 6, "heldout": 3}
MIN_FILLER_SEC = 6.0  # > the recall model's receptive field (4 layers x (context 16 - 1) + 2 = 62 frames, 4.96 s)
FRAME_SEC = 0.08  # one Mimi frame: parts start on frame boundaries
PART_LEAD_SEC = 0.16
PART_TAIL_SEC = 0.16
RECALL_SEED = 1234
RECALL_CUES = {"first": "Please remember", "repeat": "Again,", "unrelated": "And now"}
# names and phrase words are split between training and held-out documents (no word in both); digit strings
# (four digits, no zero: the tokenizer lacks z) are drawn so that no held-out string occurs in training. Letters
# missing from the tokenizer's training text (q, z, and some capitals) are avoided: `build_recall` checks that
# every word encodes without <unk>.
RECALL_POOLS = {
    "train": {
        "first": ["Maria", "Oscar", "Hector", "Nadia", "Ramon", "Sofia", "Felix", "Ingrid", "Pablo", "Dora",
                  "Agnes", "Boris", "Carmen", "Edith", "Greta", "Hugo"],
        "last": ["Becker", "Moreno", "Moreau", "Novak", "Ferris", "Hansen", "Romero", "Castel", "Bishop", "Dalton",
                 "Weston", "Porter", "Garcia", "Sutton", "Harper", "Ibsen"],
        "adjective": ["purple", "silver", "hungry", "sleepy", "golden", "broken", "tiny", "rusty", "noisy",
                      "gentle"],
        "noun": ["tigers", "candles", "rockets", "violins", "pebbles", "lanterns", "turtles", "mirrors", "pencils",
                 "anchors"],
    },
    "heldout": {
        "first": ["Ivan", "Mila", "Nora", "Olga", "Petra", "Rosa", "Sven", "Tilda", "Wanda", "Bruno", "Celia",
                  "Emil"],
        "last": ["Brennan", "Eriksen", "Marsh", "Okafor", "Pereira", "Rossi", "Schmidt", "Tanaka", "Parsons",
                 "Whitlock", "Brandt", "Coleman"],
        "adjective": ["crimson", "wooden", "clever", "distant", "velvet", "hollow", "bitter", "swift"],
        "noun": ["dolphins", "kettles", "ladders", "parrots", "buttons", "wagons", "spiders", "trumpets"],
    },
}
DIGITS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FILLER_SENTENCES = [  # short, so a filler can end soon after MIN_FILLER_SEC
    "The weather was mild this week.",
    "We walked along the river after lunch.",
    "The train was late again today.",
    "The children played cards after dinner.",
    "The garden needs water every evening.",
    "My neighbour repairs old bicycles.",
    "The library closes early on Saturday.",
    "She painted the kitchen a pale colour.",
    "Farmers sell fresh bread at the market.",
    "The meeting took longer than planned.",
    "He reads the newspaper with a cup of tea.",
    "On the way home we saw a fox.",
    "It was a long and calm afternoon.",
    "The shop on the corner sells good coffee.",
]
FILLER_SENTENCES_PER_VOICE_RATE = 5  # each voice x rate draws its fillers from a few sentences (fewer espeak calls)

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
            "recall": [RECALL_TRAIN_VOICES, RECALL_HELDOUT_VOICES, RECALL_RATES, RECALL_DOCS_PER_VOICE_RATE,
                       MIN_FILLER_SEC, FRAME_SEC, PART_LEAD_SEC, PART_TAIL_SEC, RECALL_SEED, RECALL_CUES,
                       RECALL_POOLS, DIGITS, FILLER_SENTENCES, FILLER_SENTENCES_PER_VOICE_RATE]}
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


def recall_plan() -> list[dict]:
    """The spoken-recall documents without audio: split, voice, rate, kind, content A and B, and the filler's
    candidate sentences (layout takes as many as MIN_FILLER_SEC needs).

    Deterministic (RECALL_SEED). Every voice x rate of a split gets the same number of documents, the kinds take
    turns, and each digit string is used once over all documents, so no held-out string occurs in training.
    """
    import random

    rng = random.Random(RECALL_SEED)
    used_digits: set[str] = set()
    docs = []

    def draw(kind: str, pool: dict) -> str:
        if kind == "name":
            return f"{rng.choice(pool['first'])} {rng.choice(pool['last'])}"
        if kind == "phrase":
            return f"{rng.choice(pool['adjective'])} {rng.choice(pool['noun'])}"
        while True:
            digits = " ".join(rng.choice(DIGITS) for _ in range(4))
            if digits not in used_digits:
                used_digits.add(digits)
                return digits

    for split, voices in (("train", RECALL_TRAIN_VOICES), ("heldout", RECALL_HELDOUT_VOICES)):
        n = 0
        for rate in RECALL_RATES:
            for voice in voices:
                sentences = rng.sample(FILLER_SENTENCES, FILLER_SENTENCES_PER_VOICE_RATE)
                for _ in range(RECALL_DOCS_PER_VOICE_RATE[split]):
                    kind = ("name", "digits", "phrase")[n % 3]
                    a = draw(kind, RECALL_POOLS[split])
                    b = draw(kind, RECALL_POOLS[split])
                    while b == a:
                        b = draw(kind, RECALL_POOLS[split])
                    docs.append({"split": split, "name": f"doc_{n:03d}", "voice": voice, "rate": rate, "kind": kind,
                                 "content": a, "unrelated": b,
                                 "texts": {"first": f"{RECALL_CUES['first']} {a}.",
                                           "filler": rng.sample(sentences, len(sentences)),
                                           "repeat": f"{RECALL_CUES['repeat']} {a}.",
                                           "unrelated": f"{RECALL_CUES['unrelated']} {b}."}})
                    n += 1
    return docs


def lay_out_part(text: str, voice: str, rate: int, sounds: dict) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """One part of a recall document at ESPEAK_RATE: PART_LEAD_SEC of silence, the words, at least PART_TAIL_SEC
    of silence, padded to whole Mimi frames. Returns (audio, [(word, start sample, end sample)])."""
    frame = round(FRAME_SEC * ESPEAK_RATE)
    t, placed = PART_LEAD_SEC, []
    for word in text.split():
        sound = sounds[voice, rate, word]
        start = round(t * ESPEAK_RATE)
        placed.append((word, start, start + len(sound), sound))
        t = (start + len(sound)) / ESPEAK_RATE + gap_after(word)
    total = -(-(placed[-1][2] + round(PART_TAIL_SEC * ESPEAK_RATE)) // frame) * frame
    audio = np.zeros(total, np.float32)
    for _, start, end, sound in placed:
        audio[start:end] += sound
    return audio, [(w, a, b) for w, a, b, _ in placed]


def build_recall(out: Path, sounds: dict, tokenizer_path: Path) -> dict:
    """Write the spoken-recall documents, their manifests and `recall.json`; returns its content."""
    import sentencepiece

    from ttt_speech.data.audio import resample
    from ttt_speech.data.manifest import Word, write_alignments, write_manifest

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    plan = recall_plan()
    unknown = sorted({w for d in plan for w in _recall_words(d) if 0 in tokenizer.encode(w)})
    if unknown:
        raise RuntimeError(f"recall words with characters the tokenizer does not know (<unk>): {unknown}")
    listing: dict[str, list] = {"train": [], "heldout": []}
    documents = []
    for doc in plan:
        folder = out / "recall" / doc["split"]
        folder.mkdir(parents=True, exist_ok=True)
        chunks, words, parts, spans = [], [], {}, {}
        offset = 0.0  # seconds; parts are whole frames, so offsets are exact multiples of FRAME_SEC
        for part, text in doc["texts"].items():
            if part == "filler":  # the first sentences that last MIN_FILLER_SEC
                for k in range(1, len(text) + 1):
                    audio, placed = lay_out_part(" ".join(text[:k]), doc["voice"], doc["rate"], sounds)
                    if len(audio) >= MIN_FILLER_SEC * ESPEAK_RATE:
                        break
                else:
                    raise RuntimeError(f"recall {doc['split']}/{doc['name']}: all filler sentences last "
                                       f"{len(audio) / ESPEAK_RATE:.2f} s < MIN_FILLER_SEC {MIN_FILLER_SEC}")
            else:
                audio, placed = lay_out_part(text, doc["voice"], doc["rate"], sounds)
            chunks.append(resample(audio[None], ESPEAK_RATE, SAMPLE_RATE)[0].numpy())
            duration = len(audio) / ESPEAK_RATE
            parts[part] = [round(offset, 4), round(offset + duration, 4)]
            timed = [Word(w, round(offset + a / ESPEAK_RATE, 4), round(offset + b / ESPEAK_RATE, 4), MAIN_SPEAKER)
                     for w, a, b in placed]
            words += timed
            if part != "filler":
                n_content = len((doc["content"] if part != "unrelated" else doc["unrelated"]).split())
                spans[part] = [timed[-n_content].start, timed[-1].end]
            offset += duration
        wav = folder / f"{doc['name']}.wav"
        audio = np.concatenate(chunks)
        pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
        with wave.open(str(wav), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(SAMPLE_RATE)
            f.writeframes(pcm.tobytes())
        write_alignments(wav.with_suffix(".json"), words)
        duration = len(pcm) / SAMPLE_RATE
        listing[doc["split"]].append((wav, duration))
        documents.append({"path": wav.relative_to(out).as_posix(), "duration": duration,
                          **{k: doc[k] for k in ("split", "name", "voice", "rate", "kind", "content", "unrelated")},
                          "parts": parts, "spans": spans})
    for split, items in listing.items():
        write_manifest(out / f"recall_{split}.jsonl", items)
    meta = {"frame_sec": FRAME_SEC, "min_filler_sec": MIN_FILLER_SEC, "cues": RECALL_CUES,
            "voices": {"train": RECALL_TRAIN_VOICES, "heldout": RECALL_HELDOUT_VOICES}, "rates": RECALL_RATES,
            "documents": documents}
    (out / "recall.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _recall_words(doc: dict) -> list[str]:
    return [w for part, t in doc["texts"].items() for w in (" ".join(t) if part == "filler" else t).split()]


def recall_sounds_needed() -> list[tuple[str, int, str]]:
    return sorted({(d["voice"], d["rate"], w) for d in recall_plan() for w in _recall_words(d)})


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
            "recall": {split: round(sum(d["duration"] for d in recall["documents"] if d["split"] == split), 1)
                       for split in ("train", "heldout")}}


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
          f"{sum(durations['dialogues']):.0f} s, audiobook of {durations['audiobook']:.0f} s, spoken-recall documents "
          f"of {durations['recall']['train']:.0f} s (train) and {durations['recall']['heldout']:.0f} s (held out)) "
          f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
