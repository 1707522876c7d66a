"""Mimi's rates are defined once (`ttt_speech.constants`): no number literal 12.5, 24000 / 24_000 or 1920 in the
package's code outside that module (docstrings and comments may say "12.5 Hz"; they are read as text, not code)."""

from __future__ import annotations

import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "overlay" / "ttt_speech"
LITERALS = {12.5: "FRAME_RATE", 24000: "SAMPLE_RATE", 1920: "FRAME_SIZE"}
# (file, line's code) that are these numbers by coincidence, not the rates; each says why
ALLOWED = {
    # LibriLight perplexity bins: positions in frames (24000 frames = 32 min), not a sample rate
    ("eval/librilight.py", "DEFAULT_BINS = [1000, 2000, 4000, 8000, 16000, 24000]"),
}


def rate_literals(source: str) -> list[tuple[int, str, str]]:
    """(line, number as written, the line) for each NUMBER token of `source` equal to one of LITERALS."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.NUMBER:
            continue
        try:
            value = float(tok.string.replace("_", ""))
        except ValueError:  # complex or hex
            continue
        if value in LITERALS:
            found.append((tok.start[0], tok.string, tok.line.strip()))
    return found


def test_the_scanner_sees_code_and_not_text() -> None:
    source = '"""At 12.5 Hz, 24000 samples."""\nx = 12.5  # 24000\ny = 24_000\nz = f(1920)\nw = 12.50\nv = 125\n'
    assert [(line, text) for line, text, _ in rate_literals(source)] == [(2, "12.5"), (3, "24_000"), (4, "1920"),
                                                                          (5, "12.50")]


def test_rates_are_defined_once() -> None:
    offenders, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "constants.py":
            continue
        for line, text, code in rate_literals(path.read_text()):
            if (rel, code) in ALLOWED:
                used.add((rel, code))
            else:
                offenders.append(f"overlay/ttt_speech/{rel}:{line}: {text} (use ttt_speech.constants."
                                 f"{LITERALS[float(text.replace('_', ''))]}): {code}")
    assert not offenders, "rate literals outside ttt_speech/constants.py:\n" + "\n".join(offenders)
    assert used == ALLOWED, f"allowed exceptions no longer present (remove them): {ALLOWED - used}"


def test_scripts_that_write_audio_take_the_sample_rate_from_constants() -> None:
    source = (ROOT / "scripts" / "make_samples.py").read_text()
    assert not rate_literals(source) and "from ttt_speech.constants import SAMPLE_RATE" in source


def test_constants_import_without_torch() -> None:
    """`scripts/make_samples.py` and `eval/recall_docs.py` import the rates; torch comes with `DTYPES` only."""
    import subprocess

    probe = ("import sys; from ttt_speech.constants import FRAME_RATE, SAMPLE_RATE, FRAME_SIZE; "
             "assert 'torch' not in sys.modules; assert SAMPLE_RATE == FRAME_RATE * FRAME_SIZE; "
             "from ttt_speech.constants import DTYPES; import torch; assert DTYPES['bfloat16'] is torch.bfloat16")
    subprocess.run([sys.executable, "-c", probe], check=True)
