"""Manifests and word alignments in moshi-finetune's format.

A manifest is a jsonl file, one recording per line: `{"path": "dialogues/a.wav", "duration": 24.52}`. A relative
`path` is relative to the manifest's folder. Next to each recording lies its alignment file, same stem, `.json`:
`{"alignments": [["Hello,", [0.46, 0.81], "SPEAKER_MAIN"], ...]}`, one `[word, [start_sec, end_sec], speaker]`
per word. Other top-level keys are ignored. Malformed input raises `DataError("<file>:<line>: ...")` (a
`ValueError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ttt_speech.errors import DataError, DataFileNotFound

MAIN_SPEAKER = "SPEAKER_MAIN"
_ENTRY_FORM = '{"path": "<audio file>", "duration": <seconds>}'
_WORD_FORM = "[word, [start_sec, end_sec], speaker]"


@dataclasses.dataclass(frozen=True)
class Word:
    """One aligned word: `text` spoken from `start` to `end` seconds by `speaker`."""

    text: str
    start: float
    end: float
    speaker: str


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: the audio file (absolute), its duration in seconds, and where the line is."""

    path: Path
    duration: float
    manifest: Path
    line: int

    @property
    def alignment_path(self) -> Path:
        return alignment_path(self.path)

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def alignment_path(audio_path: str | Path) -> Path:
    """The alignment file of a recording: same folder and stem, `.json`."""
    return Path(audio_path).with_suffix(".json")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_manifest(path: str | Path, check_files: bool = True) -> list[ManifestEntry]:
    """Read a jsonl manifest; blank lines are skipped.

    Args:
        path: the manifest.
        check_files: also require every audio file and its alignment file to exist.

    Returns:
        the entries in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"manifest not found: {path}")
    entries = []
    root = path.resolve().parent
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected {_ENTRY_FORM}") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected {_ENTRY_FORM}, got {type(item).__name__}")
            missing = [key for key in ("path", "duration") if key not in item]
            if missing:
                raise DataError(f"{where}: missing {missing}; expected {_ENTRY_FORM}")
            audio, duration = item["path"], item["duration"]
            if not isinstance(audio, str) or not audio:
                raise DataError(f"{where}: 'path' must be a non-empty string, got {audio!r}")
            if not _is_number(duration) or duration <= 0:
                raise DataError(f"{where}: 'duration' must be a positive number of seconds, got {duration!r}")
            entry = ManifestEntry(root / audio, float(duration), path, lineno)
            if check_files:
                for needed in (entry.path, entry.alignment_path):
                    if not needed.is_file():
                        raise DataError(f"{where}: file not found: {needed}")
            entries.append(entry)
    if not entries:
        raise DataError(f"{path}: manifest has no entries; expected one {_ENTRY_FORM} per line")
    return entries


def _top_level_array_lines(text: str, key: str) -> list[int]:
    """Line numbers (1-based) of the elements of the top-level array `key` of a valid JSON object `text`."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def past_comma(pos: int) -> int:
        pos = skip(pos)
        return skip(pos + 1) if text[pos] == "," else pos

    found: list[int] = []  # the last occurrence wins, as in json.loads
    pos = skip(skip(0) + 1)  # past "{"
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = skip(skip(pos) + 1)  # past ":"
        if name != key or text[pos] != "[":
            _, pos = decoder.raw_decode(text, pos)
            pos = past_comma(pos)
            continue
        found = []
        pos = skip(pos + 1)  # past "["
        while text[pos] != "]":
            found.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
            pos = past_comma(pos)
        pos = past_comma(pos + 1)
    return found


def read_alignments(path: str | Path) -> list[Word]:
    """Read an alignment file; words come back in file order.

    Words with `end <= start` are kept here (the interleaver drops them, as moshi-finetune does).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"alignment file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise DataError(f'{path}:1: expected an object {{"alignments": [{_WORD_FORM}, ...]}}')
    words = []
    for i, item in enumerate(data["alignments"]):
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and isinstance(item[1], list) and len(item[1]) == 2 and all(_is_number(t) for t in item[1])
              and isinstance(item[2], str))
        problem = f"expected {_WORD_FORM} with finite times"
        if ok and item[1][0] < 0:
            ok, problem = False, "start time must be >= 0"
        if not ok:
            line = _top_level_array_lines(text, "alignments")[i]
            raise DataError(f"{path}:{line}: alignments[{i}]: {problem}, got {json.dumps(item)}")
        words.append(Word(item[0], float(item[1][0]), float(item[1][1]), item[2]))
    return words


def write_alignments(path: str | Path, words: Iterable[Word]) -> None:
    """Write an alignment file, one word per line."""
    rows = [json.dumps([w.text, [w.start, w.end], w.speaker], ensure_ascii=False) for w in words]
    body = ",\n    ".join(rows)
    Path(path).write_text('{"alignments": [\n    ' + body + "\n]}\n" if rows else '{"alignments": []}\n',
                          encoding="utf-8")


def write_manifest(path: str | Path, items: Iterable[tuple[str | Path, float]]) -> None:
    """Write a jsonl manifest of (audio path, duration) pairs; paths are stored relative to the manifest's folder."""
    path = Path(path)
    root = path.resolve().parent
    lines = []
    for audio, duration in items:
        rel = os.path.relpath(Path(audio).resolve(), root)
        lines.append(json.dumps({"path": Path(rel).as_posix(), "duration": duration}) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


def build_manifest(audio_dir: str | Path, out: str | Path, pattern: str = "**/*.wav") -> int:
    """Write a manifest of every `pattern` file under `audio_dir` that has an alignment file beside it.

    Durations are read with sphn. Returns how many files were listed; files without alignments are skipped.
    """
    import sphn

    files = sorted(p for p in Path(audio_dir).glob(pattern) if alignment_path(p).is_file())
    if not files:
        raise DataError(f"no {pattern} files with a .json alignment beside them under {audio_dir}")
    durations = sphn.durations([str(p) for p in files])
    unreadable = [str(p) for p, d in zip(files, durations, strict=True) if d is None]
    if unreadable:
        raise DataError(f"cannot read audio: {unreadable[:5]}{' ...' if len(unreadable) > 5 else ''}")
    empty = [str(p) for p, d in zip(files, durations, strict=True) if not d > 0]
    if empty:
        raise DataError(f"audio files with no samples: {empty[:5]}{' ...' if len(empty) > 5 else ''}")
    write_manifest(out, zip(files, durations, strict=True))
    return len(files)
