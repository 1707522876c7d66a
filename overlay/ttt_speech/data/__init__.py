"""Fine-tuning data: moshi-finetune manifests, audio, Mimi codes, text interleaving, the stateful loader.

`build_loader(DataConfig(...), rank, world_size)` yields LongTensor batches [B, 17, T] (text, 8 main-speaker
codebooks, 8 user codebooks); see `ttt_speech.data.loader` for its contract and docs/data.md for the formats.
Nothing here imports moshi at module level: Mimi is reached through `ttt_speech.integrations.mimi` when needed.
"""

from ttt_speech.data.audio import FRAME_RATE, SAMPLE_RATE, load_audio, num_frames, resample
from ttt_speech.data.codes import CodeStore, encode_recording, pre_encode
from ttt_speech.data.interleave import (
    END_OF_TEXT_PAD,
    TEXT_PAD,
    ZERO_TOKEN,
    TimedTokens,
    interleave_text,
    tokenize_words,
)
from ttt_speech.data.loader import CropSampler, DataConfig, StatefulLoader, build_loader
from ttt_speech.data.manifest import (
    MAIN_SPEAKER,
    ManifestEntry,
    Word,
    alignment_path,
    build_manifest,
    read_alignments,
    read_manifest,
    write_alignments,
    write_manifest,
)

__all__ = [
    "END_OF_TEXT_PAD", "FRAME_RATE", "MAIN_SPEAKER", "SAMPLE_RATE", "TEXT_PAD", "ZERO_TOKEN", "CodeStore",
    "CropSampler", "DataConfig", "ManifestEntry", "StatefulLoader", "TimedTokens", "Word", "alignment_path",
    "build_loader", "build_manifest", "encode_recording", "interleave_text", "load_audio", "num_frames",
    "pre_encode", "read_alignments", "read_manifest", "resample", "tokenize_words", "write_alignments",
    "write_manifest",
]
