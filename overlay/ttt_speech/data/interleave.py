"""Word alignments to a frame-level text stream, moshi-finetune's rules (Moshi's inner monologue).

At 12.5 frames per second, a text stream has one token per frame:

1. Words are sorted by start time; words with `end <= start` are dropped.
2. A word's SentencePiece tokens (`tokenizer.encode(word.strip())`, no BOS) go to consecutive frames, the first
   at its start frame `floor(start * 12.5)`.
3. When a word starts, the tokens of the previous word not yet placed are dropped (so of two words starting in
   the same frame, only the later one is kept).
4. The frame just before a word's first token, if it holds padding, becomes END_OF_TEXT_PAD (0).
5. Every other frame is TEXT_PAD (3).

Example, one token per frame: "hi" (tokens [7]) at 0.10-0.30 s and "there" (tokens [8, 9]) at 0.35-0.70 s give,
over 8 frames, start frames 1 and 4: `[0, 7, 3, 0, 8, 9, 3, 3]`.

ZERO_TOKEN (-1) is moshi's "no token" id (`LMModel.zero_token_id`): the loader puts it in frames past the end of a
recording, and moshi's model masks those frames out of its logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from ttt_speech.constants import FRAME_RATE
from ttt_speech.data.manifest import Word

TEXT_PAD = 3
END_OF_TEXT_PAD = 0
ZERO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class TimedTokens:
    """A word's text tokens and its time span in seconds."""

    tokens: tuple[int, ...]
    start: float
    end: float


def start_frame(start_sec: float, frame_rate: float) -> int:
    """The frame holding time `start_sec`; the epsilon keeps decimal boundaries (0.08 s at 12.5 Hz) exact."""
    return math.floor(start_sec * frame_rate + 1e-6)


def tokenize_words(tokenizer, words: Iterable[Word], main_speaker: str | None) -> list[TimedTokens]:
    """Tokenize each word on its own (a SentencePiece model: `tokenizer.encode(str) -> list[int]`).

    Args:
        main_speaker: keep only this speaker's words (moshi-finetune keeps the main speaker only); None keeps all.
    """
    return [TimedTokens(tuple(tokenizer.encode(w.text.strip())), w.start, w.end)
            for w in words if main_speaker is None or w.speaker == main_speaker]


def interleave_text(words: Sequence[TimedTokens], num_frames: int, frame_rate: float = FRAME_RATE,
                    pad: int = TEXT_PAD, end_of_pad: int = END_OF_TEXT_PAD) -> list[int]:
    """The text stream of `num_frames` frames for `words` (times relative to frame 0); see the module docstring."""
    kept = sorted((w for w in words if w.end > w.start and w.tokens), key=lambda w: w.start)
    stream = [pad] * num_frames
    pending: list[int] = []
    i = 0
    for t in range(num_frames):
        while i < len(kept) and start_frame(kept[i].start, frame_rate) <= t:
            pending = list(kept[i].tokens)
            i += 1
        if pending:
            if t > 0 and stream[t - 1] == pad:
                stream[t - 1] = end_of_pad
            stream[t] = pending.pop(0)
    return stream
