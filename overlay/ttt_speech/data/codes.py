"""Mimi codes of whole recordings: encoding on the fly, and pre-encoding a manifest into code shards.

A recording's codes are `[16, F]`: 8 codebooks of the left channel (main speaker), then 8 of the right (user),
F = ceil(samples / 1920) frames at 12.5 Hz. Whole recordings are encoded (in streaming chunks), so a crop's codes
are what Moshi's own streaming Mimi would produce at that point of the conversation, and codes read from shards
equal codes encoded on the fly on the same kind of device (CPU and GPU rounding differ: ~0.5% of codes).

A codes folder holds `index.json` and safetensors shards `codes-00000.safetensors`, ... of int16 tensors:

    {"format": "ttt-speech-codes/1", "mimi": "<spec>", "num_codebooks": 8, "chunk_frames": 750,
     "files": {"<audio path relative to the folder>": {"shard": "codes-00000.safetensors", "key": "3",
                                                        "num_frames": 1234}}}

Pre-encoding is resumable: a second run over the same manifest encodes only the files not yet in the index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ttt_speech.data.audio import FRAME_RATE, SAMPLE_RATE, load_audio, num_frames
from ttt_speech.data.manifest import ManifestEntry, read_manifest
from ttt_speech.errors import DataError, DataFileNotFound

FORMAT = "ttt-speech-codes/1"
INDEX_FILE = "index.json"
# manifest durations may be rounded; beyond this the manifest is stale
DURATION_TOLERANCE_SEC = 0.5


def mimi_spec_id(spec: str | Path) -> str:
    """How a Mimi spec is recorded in an index: "tiny-random" as is, a weights path resolved."""
    from ttt_speech.integrations.mimi import TINY_RANDOM

    return TINY_RANDOM if str(spec) == TINY_RANDOM else str(Path(spec).resolve())


def encode_recording(mimi, entry: ManifestEntry) -> torch.Tensor:
    """The codes of one manifest entry, of shape [2 * K, F] (left codebooks, then right), dtype long.

    A mono file's right channel is silence, encoded by Mimi like any other audio.
    """
    from ttt_speech.integrations.mimi import encode

    wav = load_audio(entry.path, SAMPLE_RATE)  # [2, S]
    actual = wav.shape[-1] / SAMPLE_RATE
    if abs(actual - entry.duration) > DURATION_TOLERANCE_SEC:
        raise DataError(f"{entry.where}: duration {entry.duration} s but {entry.path} lasts {actual:.3f} s; "
                        "rebuild the manifest")
    codes = encode(mimi, wav)  # [2, K, F]
    return codes.reshape(-1, codes.shape[-1])


def _relative_key(audio: Path, codes_dir: Path) -> str:
    return Path(os.path.relpath(audio.resolve(), codes_dir.resolve())).as_posix()


class CodeStore:
    """Reads a codes folder written by `pre_encode`.

    Args:
        codes_dir: the folder.
        mimi: when given, the Mimi spec the codes must have been made with.
        num_codebooks: the codebooks per channel the codes must have.
    """

    def __init__(self, codes_dir: str | Path, mimi: str | Path | None = None, num_codebooks: int | None = None):
        self.root = Path(codes_dir)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise DataFileNotFound(f"no {INDEX_FILE} in {self.root}; pre-encode the manifest first")
        try:
            index = json.loads(index_path.read_text())
        except ValueError as e:
            raise DataError(f"{index_path}: not valid JSON ({e}); pre-encode again into an empty folder") from e
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format {index.get('format') if isinstance(index, dict) else None!r}, "
                            f"expected {FORMAT!r}")
        if mimi is not None and index["mimi"] != mimi_spec_id(mimi):
            raise DataError(f"{index_path}: codes made with Mimi {index['mimi']!r}, config asks for "
                            f"{mimi_spec_id(mimi)!r}")
        if num_codebooks is not None and index["num_codebooks"] != num_codebooks:
            raise DataError(f"{index_path}: {index['num_codebooks']} codebooks per channel, config asks for "
                            f"{num_codebooks}")
        self.index: dict[str, Any] = index
        self._shards: dict[str, Any] = {}

    def __contains__(self, audio: str | Path) -> bool:
        return _relative_key(Path(audio), self.root) in self.index["files"]

    def check_length(self, entry: ManifestEntry, frames: int | None = None) -> None:
        """Refuse codes whose length does not match the manifest's duration (a manifest edited after encoding:
        crops past the codes would be all padding). `frames`: the codes' length, else read from the index."""
        if frames is None:
            frames = self.index["files"][_relative_key(entry.path, self.root)]["num_frames"]
        expected = num_frames(entry.duration)
        if abs(frames - expected) > DURATION_TOLERANCE_SEC * FRAME_RATE:
            raise DataError(f"{entry.where}: duration {entry.duration} s is {expected} frames, but its codes in "
                            f"{self.root} hold {frames} frames ({frames / FRAME_RATE:.2f} s); the manifest or the "
                            "codes are stale: rebuild the manifest, or pre-encode it again into a new folder")

    def get(self, entry: ManifestEntry) -> torch.Tensor:
        """The codes of `entry`, of shape [2 * K, F], dtype long."""
        from safetensors import safe_open

        item = self.index["files"].get(_relative_key(entry.path, self.root))
        if item is None:
            raise DataError(f"{entry.where}: {entry.path} is not in {self.root / INDEX_FILE}; pre-encode this manifest")
        if item["shard"] not in self._shards:
            self._shards[item["shard"]] = safe_open(str(self.root / item["shard"]), framework="pt")
        return self._shards[item["shard"]].get_tensor(item["key"]).long()


def pre_encode(manifest: str | Path, codes_dir: str | Path, mimi: str | Path = "tiny-random",
               device: str = "cpu", num_codebooks: int = 8, shard_mb: float = 256.0,
               entries: Sequence[ManifestEntry] | None = None, model: Any = None, verbose: bool = False) -> Path:
    """Encode every recording of `manifest` with Mimi into `codes_dir`; returns the index path.

    Args:
        mimi: weights path or "tiny-random" (see `ttt_speech.integrations.mimi.load_mimi`).
        shard_mb: a shard is closed once its codes reach this size.
        entries: the manifest's entries when already read.
        model: the Mimi built from `mimi` when already loaded.
    """
    from safetensors.torch import save_file

    from ttt_speech.integrations.mimi import ENCODE_CHUNK_FRAMES, load_mimi

    root = Path(codes_dir)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_FILE
    header = {"format": FORMAT, "mimi": mimi_spec_id(mimi), "num_codebooks": num_codebooks,
              "chunk_frames": ENCODE_CHUNK_FRAMES}
    index = {**header, "files": {}}
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if {k: old.get(k) for k in header} != header:
            raise DataError(f"{index_path} was made with {({k: old.get(k) for k in header})}, not {header}; "
                            "use another folder")
        index = old
    entries = list(entries) if entries is not None else read_manifest(manifest)
    todo = [e for e in entries if _relative_key(e.path, root) not in index["files"]]
    if not todo:
        return index_path
    model = model if model is not None else load_mimi(mimi, device=device, num_codebooks=num_codebooks)
    shard_id = len({item["shard"] for item in index["files"].values()})
    tensors: dict[str, torch.Tensor] = {}
    pending: dict[str, Any] = {}

    def flush() -> None:
        nonlocal shard_id, tensors, pending
        if not tensors:
            return
        name = f"codes-{shard_id:05d}.safetensors"
        save_file(tensors, str(root / name))
        for key, item in pending.items():
            index["files"][key] = {**item, "shard": name}
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        tmp.replace(index_path)
        shard_id, tensors, pending = shard_id + 1, {}, {}

    size = 0
    for n, entry in enumerate(todo):
        codes = encode_recording(model, entry)
        key = str(len(tensors))
        tensors[key] = codes.to(torch.int16)
        pending[_relative_key(entry.path, root)] = {"key": key, "num_frames": codes.shape[-1]}
        size += codes.numel() * 2
        if verbose:
            print(f"[{n + 1}/{len(todo)}] {entry.path} {codes.shape[-1]} frames", flush=True)
        if size >= shard_mb * 2**20:
            flush()
            size = 0
    flush()
    return index_path
