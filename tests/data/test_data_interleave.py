from ttt_speech.data.interleave import TimedTokens, interleave_text, start_frame, tokenize_words
from ttt_speech.data.manifest import Word

W = TimedTokens


def test_hand_made_example() -> None:
    # frames of 80 ms; start frames: "the" 0.10 s -> 1, "cat" 0.40 s -> 5, "sat" 1.04 s -> 13 (an exact boundary)
    words = [W((7,), 0.10, 0.30), W((8, 9, 10), 0.40, 0.70), W((11, 12), 1.04, 1.20)]
    assert interleave_text(words, 18) == [
        0, 7, 3, 3, 0, 8, 9, 10, 3, 3, 3, 3, 0, 11, 12, 3, 3, 3,
    ]


def test_next_word_cuts_the_previous_one_and_takes_its_frame() -> None:
    # "a" has 4 tokens from frame 0; "b" starts at frame 2: a's last two tokens are dropped, no EPAD (frame 1 is a
    # token); "c" and "d" start in frame 6: only the later one, "d", is kept
    words = [W((20, 21, 22, 23), 0.0, 0.5), W((30,), 0.16, 0.3), W((40, 41), 0.48, 0.5), W((50,), 0.50, 0.6)]
    assert interleave_text(words, 9) == [20, 21, 30, 3, 3, 0, 50, 3, 3]


def test_order_duration_and_window() -> None:
    words = [W((5,), 0.40, 0.5), W((4,), 0.08, 0.3), W((6,), 0.2, 0.2), W((7,), 0.3, 0.1), W((8,), 0.64, 0.7),
             W((), 0.5, 0.6)]
    # unsorted input is sorted; zero/negative duration words and empty tokenizations are dropped; 8 at frame 8
    # is outside a 8-frame window
    assert interleave_text(words, 8) == [0, 4, 3, 3, 0, 5, 3, 3]
    assert interleave_text(words, 8, pad=-7, end_of_pad=-8) == [-8, 4, -7, -7, -8, 5, -7, -7]
    assert interleave_text([], 3) == [3, 3, 3]
    assert start_frame(0.08, 12.5) == 1 and start_frame(0.0799, 12.5) == 0


class CharTokenizer:
    def encode(self, text):
        return [ord(c) - 90 for c in text]


def test_tokenize_words_keeps_the_main_speaker() -> None:
    words = [Word(" ab ", 0.1, 0.2, "SPEAKER_MAIN"), Word("c", 0.3, 0.4, "OTHER"), Word("d", 0.5, 0.6, "SPEAKER_MAIN")]
    assert tokenize_words(CharTokenizer(), words, "SPEAKER_MAIN") == [W((7, 8), 0.1, 0.2), W((10,), 0.5, 0.6)]
    assert len(tokenize_words(CharTokenizer(), words, None)) == 3
