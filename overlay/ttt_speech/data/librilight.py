"""Long-form manifests from a LibriLight directory: a speaker's chapters, in order, concatenated into files of
at least N minutes.

LibriLight is laid out `<root>/<speaker>/<book>/<chapter>.flac`. For each speaker, chapters are taken in sorted
(book, file) order and appended (with `gap_sec` of silence between them) until the file reaches `min_minutes`; a
speaker's remainder shorter than that is dropped. LibriLight has no word alignments, so each output gets an empty
alignment file: the text stream is all padding, and only the audio streams' NLL is meaningful.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ttt_speech.data.audio import SAMPLE_RATE, load_audio
from ttt_speech.data.manifest import write_alignments, write_manifest


def build_librilight_long(root: str | Path, out_dir: str | Path, min_minutes: float = 30.0,
                          gap_sec: float = 0.5, pattern: str = "*/*/*.flac", max_files: int | None = None) -> Path:
    """Write `out_dir/<speaker>_<k>.wav` (mono, 24 kHz), empty alignments beside them, and `out_dir/long.jsonl`.

    Returns the manifest path.
    """
    import sphn

    root, out_dir = Path(root), Path(out_dir)
    chapters = sorted(root.glob(pattern))
    if not chapters:
        raise FileNotFoundError(f"{root}: no files match {pattern!r} (expected <speaker>/<book>/<chapter>.flac)")
    by_speaker: dict[str, list[Path]] = defaultdict(list)
    for path in chapters:
        by_speaker[path.relative_to(root).parts[0]].append(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = int(min_minutes * 60 * SAMPLE_RATE)
    gap = np.zeros(int(gap_sec * SAMPLE_RATE), dtype=np.float32)
    items: list[tuple[Path, float]] = []
    for speaker, paths in tqdm(sorted(by_speaker.items()), desc="librilight speakers", unit="speaker"):
        parts: list[np.ndarray] = []
        length, k = 0, 0
        for path in paths:
            wav = load_audio(path, SAMPLE_RATE)[0].numpy()  # mono: the left channel
            parts += [wav, gap]
            length += wav.shape[0] + gap.shape[0]
            if length >= target:
                out = out_dir / f"{speaker}_{k:03d}.wav"
                sphn.write_wav(str(out), np.concatenate(parts)[None], SAMPLE_RATE)
                write_alignments(out.with_suffix(".json"), [])
                items.append((out, length / SAMPLE_RATE))
                parts, length, k = [], 0, k + 1
                if max_files is not None and len(items) >= max_files:
                    break
        if max_files is not None and len(items) >= max_files:
            break
    if not items:
        raise ValueError(f"{root}: no speaker has {min_minutes} minutes of audio; lower min_minutes")
    manifest = out_dir / "long.jsonl"
    write_manifest(manifest, items)
    return manifest
