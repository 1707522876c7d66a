"""Spoken-recall documents: what they say, and how their words are laid out on Mimi frames. Pure Python.

A document is spoken by one voice at one rate, in four parts:

    "Please remember <A>."  |  filler sentences (>= MIN_FILLER_SEC)  |  "Again, <A>."  |  "And now <B>."

A and B are of one kind: a name ("Greta Novak"), a spoken digit string ("four seven one nine") or a short phrase
("purple tigers"). Names and phrase words are split between training and held-out content (no word in both); a
held-out digit string never occurs in training (`HELDOUT_DIGIT_STRINGS` are excluded when drawing training ones).

Layout: every word is a *unit* that starts on a Mimi frame boundary (80 ms): the word's sound (espeak-ng, trimmed
to its sound), then silence up to the next boundary; pauses are whole frames of silence (`GAP_FRAMES`). So the
Mimi codes of a document are the concatenation of the codes of its units, each unit encoded from a fresh Mimi
state: documents can be composed at the code level (`ttt_speech.eval.recall_spoken` draws a new training document
every step from the training voices and content), and nothing crosses from one word to the next through Mimi's own
context. `scripts/make_samples.py` synthesises the units of every voice and rate (the banks) and writes the fixed
documents; `layout` places the units identically in both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ttt_speech.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

FRAME_SEC = 1 / FRAME_RATE  # 0.08
FRAME_SAMPLES = FRAME_SIZE
MIN_FILLER_SEC = 4.0  # > the spoken-recall model's receptive field (4 layers x (context 10 - 1) + 2 = 38 frames)
PARTS = ("first", "filler", "repeat", "unrelated")
MENTIONS = ("first", "repeat", "unrelated")
CUES = {"first": "Please remember", "repeat": "Again,", "unrelated": "And now"}
GAP_FRAMES = {"lead": 2, "word": 0, "comma": 2, "sentence": 4, "tail": 2}
KINDS = ("name", "digits", "phrase")
VOICES = {"train": ["en-us", "en-us+f3", "en-gb+m3", "en-029+f2", "en-gb-scotland+m1"],
          "heldout": ["en-gb-x-rp+f4", "en-us-nyc+m2", "en-gb-x-gbclan+f1", "en-gb-x-gbcwmd+m4",
                      "en-gb-x-rp+m7", "en-us-nyc+f5"]}
RATES = [140, 185]  # words per minute
# Letters missing from the sample tokenizer's training text (q, z, and capitals J, K, L, U, V, Y, ...) are
# avoided; `scripts/make_samples.py` checks that every word encodes without <unk>.
POOLS = {
    "train": {
        "first": ["Maria", "Oscar", "Hector", "Nadia", "Ramon", "Sofia", "Felix", "Ingrid", "Pablo", "Dora",
                  "Agnes", "Boris", "Carmen", "Edith", "Greta", "Hugo", "Anton", "Bianca", "Cedric", "Dario",
                  "Elena", "Fabian", "Gloria", "Helga", "Irene", "Marco", "Nina", "Otto", "Paula", "Rita", "Stefan",
                  "Teresa", "Walter", "Amelia", "Chloe", "Daniel", "Esther", "Frida", "Gustav", "Hannah"],
        "last": ["Becker", "Moreno", "Moreau", "Novak", "Ferris", "Hansen", "Romero", "Castel", "Bishop", "Dalton",
                 "Weston", "Porter", "Garcia", "Sutton", "Harper", "Ibsen", "Fischer", "Bauer", "Hoffman", "Werner",
                 "Schubert", "Andersen", "Petersen", "Olsen", "Martens", "Dubois", "Fontaine", "Mercier", "Costa",
                 "Ferreira", "Santos", "Herrera", "Ortega", "Medina", "Castro", "Torres", "Flores", "Morales",
                 "Navarro", "Delgado"],
        "adjective": ["purple", "silver", "hungry", "sleepy", "golden", "broken", "tiny", "rusty", "noisy",
                      "gentle", "orange", "yellow", "shiny", "dusty", "fancy", "humble", "lonely", "lucky", "muddy",
                      "polite", "proud", "rapid", "sandy", "sticky", "happy"],
        "noun": ["tigers", "candles", "rockets", "violins", "pebbles", "lanterns", "turtles", "mirrors", "pencils",
                 "anchors", "apples", "baskets", "bottles", "carpets", "castles", "cookies", "drums", "feathers",
                 "forks", "guitars", "hammers", "helmets", "islands", "jackets", "lemons"],
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
DIGITS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # no "zero": no z
FILLER_SENTENCES = [  # short, so that a filler ends soon after MIN_FILLER_SEC
    "The weather was mild.",
    "We walked along the river.",
    "The train was late again.",
    "The children played cards.",
    "The garden needs water.",
    "My neighbour repairs bicycles.",
    "The library closes early.",
    "She painted the kitchen.",
    "Farmers sell fresh bread.",
    "The meeting took longer.",
    "He reads the newspaper.",
    "We saw a fox tonight.",
    "It was a calm afternoon.",
    "The shop sells good coffee.",
]
FILLERS_PER_VOICE_RATE = 6  # each voice and rate speaks a few of the sentences (fewer words to synthesise)
HELDOUT_DOCS_PER_VOICE_RATE = 2
TRAIN_EXAMPLE_DOCS_PER_VOICE_RATE = 2  # written as files too; training draws new documents from the banks
SEED = 1234


def spec() -> dict:
    """Everything that decides the documents (for the sample set's settings hash)."""
    return {"frame": FRAME_SEC, "min_filler": MIN_FILLER_SEC, "cues": CUES, "gaps": GAP_FRAMES, "voices": VOICES,
            "rates": RATES, "pools": POOLS, "digits": DIGITS, "fillers": FILLER_SENTENCES,
            "fillers_per": FILLERS_PER_VOICE_RATE, "docs": [HELDOUT_DOCS_PER_VOICE_RATE,
                                                            TRAIN_EXAMPLE_DOCS_PER_VOICE_RATE], "seed": SEED}


def filler_sentences(voice: str, rate: int) -> list[str]:
    """The filler sentences of one voice and rate (a fixed draw)."""
    return random.Random(f"{SEED}/{voice}/{rate}").sample(FILLER_SENTENCES, FILLERS_PER_VOICE_RATE)


def _digit_strings(rng: random.Random, exclude: set[str]) -> Iterator[str]:
    while True:
        s = " ".join(rng.choice(DIGITS) for _ in range(4))
        if s not in exclude:
            yield s


def heldout_digit_strings() -> set[str]:
    """The digit strings of the held-out documents (training never draws them)."""
    return {d.content for d in fixed_documents("heldout") if d.kind == "digits"} | \
        {d.unrelated for d in fixed_documents("heldout") if d.kind == "digits"}


def draw_content(rng: random.Random, kind: str, split: str, exclude: set[str] = frozenset()) -> str:
    pool = POOLS[split]
    if kind == "name":
        return f"{rng.choice(pool['first'])} {rng.choice(pool['last'])}"
    if kind == "phrase":
        return f"{rng.choice(pool['adjective'])} {rng.choice(pool['noun'])}"
    if kind == "digits":
        return next(_digit_strings(rng, set(exclude)))
    raise ValueError(f"unknown content kind {kind!r}; known: {KINDS}")


@dataclass(frozen=True)
class DocumentPlan:
    """What a document says: its voice, rate, content A, unrelated content B, and filler sentences (as many as
    the layout needs; it takes them in order until the filler lasts MIN_FILLER_SEC)."""

    name: str
    split: str
    voice: str
    rate: int
    kind: str
    content: str
    unrelated: str
    fillers: tuple[str, ...]

    def texts(self) -> dict[str, str]:
        return {"first": f"{CUES['first']} {self.content}.", "filler": " ".join(self.fillers),
                "repeat": f"{CUES['repeat']} {self.content}.", "unrelated": f"{CUES['unrelated']} {self.unrelated}."}


def draw_document(rng: random.Random, split: str, voice: str, rate: int, kind: str, name: str = "",
                  exclude: set[str] = frozenset()) -> DocumentPlan:
    """A random document of `split`'s content (digit strings in `exclude` are not drawn)."""
    a = draw_content(rng, kind, split, exclude)
    b = draw_content(rng, kind, split, exclude | {a})
    while b == a:
        b = draw_content(rng, kind, split, exclude | {a})
    fillers = filler_sentences(voice, rate)
    return DocumentPlan(name, split, voice, rate, kind, a, b, tuple(rng.sample(fillers, len(fillers))))


def fixed_documents(split: str) -> list[DocumentPlan]:
    """The documents written as files: all held-out ones, and a few training examples. Every voice x rate of the
    split gets the same number, and the kinds take turns."""
    rng = random.Random(f"{SEED}/{split}")
    per = HELDOUT_DOCS_PER_VOICE_RATE if split == "heldout" else TRAIN_EXAMPLE_DOCS_PER_VOICE_RATE
    docs, used = [], set()
    for rate in RATES:
        for voice in VOICES[split]:
            for _ in range(per):
                n = len(docs)
                doc = draw_document(rng, split, voice, rate, KINDS[n % len(KINDS)], f"doc_{n:03d}", used)
                used |= {doc.content, doc.unrelated}
                docs.append(doc)
    return docs


def words_of(doc: DocumentPlan) -> list[str]:
    """Every word a document may say (all its filler candidates included)."""
    return [w for t in doc.texts().values() for w in t.split()]


def bank_words(split: str) -> dict[tuple[str, int], set[str]]:
    """Per (voice, rate) of `split`, the words to synthesise: for training, every word any drawn document can
    say (all training content, cues, that voice's fillers); for held-out, the held-out documents' words."""
    banks: dict[tuple[str, int], set[str]] = {}
    for voice in VOICES[split]:
        for rate in RATES:
            words = {w for t in CUES.values() for w in t.split()}
            words |= {w for s in filler_sentences(voice, rate) for w in s.split()}
            if split == "train":
                pool = POOLS["train"]
                words |= set(pool["first"]) | {f"{w}." for w in pool["last"]} | set(pool["adjective"])
                words |= {f"{w}." for w in pool["noun"]} | set(DIGITS) | {f"{w}." for w in DIGITS}
            banks[voice, rate] = words
    if split == "heldout":
        for doc in fixed_documents("heldout"):
            banks[doc.voice, doc.rate] |= set(words_of(doc))
    return banks


def gap_after(word: str) -> int:
    """Silent frames after a word's unit."""
    if word[-1] in ".!?":
        return GAP_FRAMES["sentence"]
    if word[-1] in ",;:":
        return GAP_FRAMES["comma"]
    return GAP_FRAMES["word"]


@dataclass
class Layout:
    """A document on the frame grid.

    Args:
        units: ("word", text, start frame) or ("silence", frames, start frame), in order, tiling the document.
        words: (text, start sec, end sec) per word (the end is where its sound ends).
        parts: per part, (start frame, end frame).
        spans: per mention, (start sec, end sec) of the content's words.
        frames: the document's length.
    """

    units: list[tuple] = field(default_factory=list)
    words: list[tuple[str, float, float]] = field(default_factory=list)
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    frames: int = 0


def layout(doc: DocumentPlan, unit_frames: Mapping[str, int], sound_samples: Mapping[str, int]) -> Layout:
    """Place `doc` on the frame grid.

    Args:
        unit_frames: per word of the doc's voice and rate, its unit's length in frames.
        sound_samples: per word, the length of its sound in samples at 24 kHz (<= its unit's).
    """
    out = Layout()
    t = 0

    def silence(n: int) -> None:
        nonlocal t
        if n:
            out.units.append(("silence", n, t))
            t += n

    def say(words: Sequence[str]) -> list[tuple[str, float, float]]:
        nonlocal t
        said = []
        for i, w in enumerate(words):
            start = t
            out.units.append(("word", w, start))
            t += unit_frames[w]
            said.append((w, round(start * FRAME_SEC, 4), round(start * FRAME_SEC + sound_samples[w] / SAMPLE_RATE, 4)))
            if i < len(words) - 1:
                silence(gap_after(w))
        out.words.extend(said)
        return said

    texts = doc.texts()
    for part in PARTS:
        start = t
        silence(GAP_FRAMES["lead"])
        if part == "filler":
            sentences = list(doc.fillers)
            while True:
                say(sentences.pop(0).split())
                if (t + GAP_FRAMES["tail"] - start) * FRAME_SEC >= MIN_FILLER_SEC - 1e-9 or not sentences:
                    break
                silence(GAP_FRAMES["sentence"])
            if (t + GAP_FRAMES["tail"] - start) * FRAME_SEC < MIN_FILLER_SEC - 1e-9:
                raise ValueError(f"{doc.split}/{doc.name}: the filler sentences of {doc.voice} at {doc.rate} wpm "
                                 f"last less than MIN_FILLER_SEC {MIN_FILLER_SEC} s")
        else:
            said = say(texts[part].split())
            n = len((doc.unrelated if part == "unrelated" else doc.content).split())
            out.spans[part] = (said[-n][1], said[-1][2])
        silence(GAP_FRAMES["tail"])
        out.parts[part] = (start, t)
    out.frames = t
    return out
