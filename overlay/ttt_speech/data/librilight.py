"""Long-form manifests from a LibriLight directory: a speaker's chapters, in order, concatenated into files of
at least N minutes, optionally with speakers held out for evaluation.

LibriLight is laid out `<root>/<speaker>/<book>/<chapter>.flac`. For each speaker, chapters are taken in sorted
(book, file) order and appended (with `gap_sec` of silence between them) until the file reaches `min_minutes`; a
speaker's remainder shorter than that is dropped. Files are named `<speaker>_<k>.wav`, which is how evaluation
knows a document's speaker (`eval.stats.speaker_from_name`). LibriLight has no word alignments, so each output
gets an empty alignment file: the text stream is all padding, and only the audio streams' NLL is meaningful.

Held-out speakers (`holdout_speakers`): a count (drawn with `holdout_seed` among the speakers that yielded a file)
or a list of speaker ids. Their files go to `heldout.jsonl`, the others' to `train.jsonl`, so that evaluation
speakers never appear in training. Without holdout, every file goes to `long.jsonl`. In both cases
`speakers.json` records each file's speaker, each speaker's books and files, and which speakers were held out.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ttt_speech.data.audio import SAMPLE_RATE, load_audio
from ttt_speech.data.manifest import write_alignments, write_manifest
from ttt_speech.errors import DataError

SPEAKERS_FILE = "speakers.json"


def parse_holdout(value: str) -> int | list[str]:
    """`--holdout-speakers`: an integer is a count; a comma-separated list (`1089,1188`, or `1089,` for one
    speaker) is speaker ids."""
    value = value.strip()
    if "," not in value:
        if not value.isdigit():
            raise DataError(f"--holdout-speakers: expected a count N or a comma-separated list of speakers "
                            f"(`{value},` for one speaker), got {value!r}")
        return int(value)
    speakers = [s.strip() for s in value.split(",") if s.strip()]
    if not speakers:
        raise DataError(f"--holdout-speakers: empty speaker list {value!r}")
    return speakers


def choose_holdout(speakers: list[str], holdout: int | list[str], seed: int = 0) -> list[str]:
    """The held-out speakers among `speakers` (those that have files), sorted."""
    available = sorted(speakers)
    if isinstance(holdout, int):
        if not 1 <= holdout < len(available):
            hint = f"; to hold out speaker {holdout}, write `{holdout},`" if str(holdout) in available else ""
            raise DataError(f"--holdout-speakers {holdout}: need between 1 and {len(available) - 1} (there are "
                            f"{len(available)} speakers with files, and training needs one){hint}")
        return sorted(random.Random(seed).sample(available, holdout))
    unknown = sorted(set(holdout) - set(available))
    if unknown:
        raise DataError(f"--holdout-speakers: {unknown} have no file (unknown, or less than min_minutes of audio); "
                        f"speakers with files: {available[:20]}{' ...' if len(available) > 20 else ''}")
    if set(holdout) >= set(available):
        raise DataError(f"--holdout-speakers holds out all {len(available)} speakers; training needs one")
    return sorted(set(holdout))


def build_librilight_long(root: str | Path, out_dir: str | Path, min_minutes: float = 30.0,
                          gap_sec: float = 0.5, pattern: str = "*/*/*.flac", max_files: int | None = None,
                          holdout_speakers: int | list[str] | None = None, holdout_seed: int = 0) -> Path:
    """Write `out_dir/<speaker>_<k>.wav` (mono, 24 kHz), empty alignments beside them, the manifests and
    `speakers.json`.

    Returns the manifest to train on: `long.jsonl` (every file) without holdout, else `train.jsonl`
    (`heldout.jsonl` beside it).
    """
    import sphn

    root, out_dir = Path(root), Path(out_dir)
    chapters = sorted(root.glob(pattern))
    if not chapters:
        raise DataError(f"{root}: no files match {pattern!r} (expected <speaker>/<book>/<chapter>.flac)")
    by_speaker: dict[str, list[Path]] = defaultdict(list)
    for path in chapters:
        by_speaker[path.relative_to(root).parts[0]].append(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = int(min_minutes * 60 * SAMPLE_RATE)
    gap = np.zeros(int(gap_sec * SAMPLE_RATE), dtype=np.float32)
    items: list[tuple[Path, float, str]] = []
    books: dict[str, set[str]] = defaultdict(set)
    for speaker, paths in tqdm(sorted(by_speaker.items()), desc="librilight speakers", unit="speaker"):
        parts: list[np.ndarray] = []
        used: set[str] = set()
        length, k = 0, 0
        for path in paths:
            wav = load_audio(path, SAMPLE_RATE)[0].numpy()  # mono: the left channel
            parts += [wav, gap]
            used.add(path.relative_to(root).parts[1] if len(path.relative_to(root).parts) > 2 else "")
            length += wav.shape[0] + gap.shape[0]
            if length >= target:
                out = out_dir / f"{speaker}_{k:03d}.wav"
                sphn.write_wav(str(out), np.concatenate(parts)[None], SAMPLE_RATE)
                write_alignments(out.with_suffix(".json"), [])
                items.append((out, length / SAMPLE_RATE, speaker))
                books[speaker] |= used
                parts, used, length, k = [], set(), 0, k + 1
                if max_files is not None and len(items) >= max_files:
                    break
        if max_files is not None and len(items) >= max_files:
            break
    if not items:
        raise DataError(f"{root}: no speaker has {min_minutes} minutes of audio; lower min_minutes")
    speakers = sorted({s for _, _, s in items})
    heldout = choose_holdout(speakers, holdout_speakers, holdout_seed) if holdout_speakers is not None else []
    record = {
        "root": str(root.resolve()), "min_minutes": min_minutes,
        "files": {p.name: s for p, _, s in items},
        "speakers": {s: {"books": sorted(books[s]), "files": [p.name for p, _, sp in items if sp == s],
                         "minutes": round(sum(d for _, d, sp in items if sp == s) / 60, 2)} for s in speakers},
        "holdout": None,
    }
    if holdout_speakers is None:
        manifest = out_dir / "long.jsonl"
        write_manifest(manifest, [(p, d) for p, d, _ in items])
    else:
        train = [s for s in speakers if s not in heldout]
        shared = sorted(set().union(*(books[s] for s in train)) & set().union(*(books[s] for s in heldout)))
        record["holdout"] = {"requested": holdout_speakers, "seed": holdout_seed, "heldout_speakers": heldout,
                             "train_speakers": train, "books_in_both": shared}
        manifest = out_dir / "train.jsonl"
        write_manifest(manifest, [(p, d) for p, d, s in items if s not in heldout])
        write_manifest(out_dir / "heldout.jsonl", [(p, d) for p, d, s in items if s in heldout])
    (out_dir / SPEAKERS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return manifest
