import collections
import json

import numpy as np
import pytest
import torch

from ttt_speech.data.codes import CodeStore, pre_encode
from ttt_speech.data.interleave import ZERO_TOKEN, interleave_text, tokenize_words
from ttt_speech.data.loader import CropSampler, DataConfig, build_loader
from ttt_speech.data.manifest import read_alignments, read_manifest
from ttt_speech.integrations.mimi import encode as mimi_encode


def config(corpus, tokenizer_path, **overrides) -> DataConfig:
    fields = {"train_manifest": str(corpus), "duration_sec": 2.0, "batch_size": 3, "seed": 7,
              "tokenizer": str(tokenizer_path), **overrides}
    return DataConfig(**fields)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharding_covers_every_sample_exactly_once_per_epoch(world_size, shuffle) -> None:
    frames = [3, 300, 25, 24, 26, 100, 49, 51]  # 1 + 12 + 1 + 1 + 1 + 4 + 1 + 2 = 23 crops of 25 frames
    samplers = [CropSampler(frames, 25, seed=3, shuffle=shuffle, random_crop=True, rank=r, world_size=world_size)
                for r in range(world_size)]
    assert samplers[0].num_samples == 23
    assert sum(s.shard_size for s in samplers) == 23
    orders = []
    for epoch in range(3):
        seen = np.concatenate([s.shard(epoch) for s in samplers])
        assert sorted(seen.tolist()) == list(range(23))
        crops = collections.Counter(samplers[0].crop(int(k), epoch) for k in seen)
        assert len(crops) == 23  # distinct (file, first frame)
        for (i, first), n in crops.items():
            assert first + 25 <= max(frames[i], 25) and n == 1
        orders.append(samplers[0].epoch_order(epoch).tolist())
    assert (orders[0] != orders[1]) == shuffle
    # a rank's stream runs through the epochs in order
    s = samplers[-1]
    stream = [s.locate(p) for p in range(2 * s.shard_size)]
    assert stream == [(e, int(k)) for e in range(2) for k in s.shard(e)]


def test_crops_are_deterministic_and_move_between_epochs() -> None:
    sampler = CropSampler([1050], 100, seed=0, shuffle=False, random_crop=True, rank=0, world_size=1)
    firsts = [[sampler.crop(k, epoch)[1] for k in range(10)] for epoch in range(4)]
    for row in firsts:
        assert row == [row[0] + 100 * k for k in range(10)]  # end to end
    assert len({row[0] for row in firsts}) > 1
    again = CropSampler([1050], 100, seed=0, shuffle=False, random_crop=True, rank=0, world_size=1)
    assert [again.crop(3, 2)] == [sampler.crop(3, 2)]
    fixed = CropSampler([1050], 100, seed=0, shuffle=False, random_crop=False, rank=0, world_size=1)
    assert [fixed.crop(k, 5)[1] for k in range(10)] == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        CropSampler([100, 100], 100, seed=0, shuffle=True, random_crop=True, rank=0, world_size=4)


def test_batches_have_the_moshi_layout(corpus, corpus_codes, tokenizer_path) -> None:
    cfg = config(corpus, tokenizer_path, duration_sec=2.0, batch_size=4, codes_dir=str(corpus_codes))
    loader = build_loader(cfg)
    batch = next(loader)
    assert batch.shape == (4, 17, 25) and batch.dtype == torch.long
    assert loader.sampler.num_samples == 2 + 2 + 1 + 1 + 4
    for index, entry in enumerate(loader.entries):
        stream = loader.recording_stream(index)
        codes = CodeStore(corpus_codes).get(entry)
        assert codes.shape == (16, -(-round(entry.duration * 24000) // 1920))
        assert torch.equal(stream[1:].long(), codes)
        words = tokenize_words(loader.tokenizer, read_alignments(entry.alignment_path), "SPEAKER_MAIN")
        assert stream[0].tolist() == interleave_text(words, codes.shape[-1])
    # the short recording (1.3 s = 17 frames) is padded with ZERO_TOKEN in every row
    short = [i for i, e in enumerate(loader.entries) if e.path.name == "short.wav"][0]
    sample = int(loader.sampler.first_sample[short])
    row = loader.sample(sample, epoch=0)
    assert torch.equal(row[:, :17], loader.recording_stream(short)[:, :17].long())
    assert (row[:, 17:] == ZERO_TOKEN).all()


def test_mono_recordings_get_mimi_silence_on_the_user_stream(corpus, tokenizer_path, mimi) -> None:
    loader = build_loader(config(corpus, tokenizer_path), mimi=mimi)
    mono = [i for i, e in enumerate(loader.entries) if e.path.name == "mono.wav"][0]
    stream = loader.recording_stream(mono)
    frames = stream.shape[-1]
    silence = mimi_encode(mimi, torch.zeros(1, frames * 1920))[0]
    assert torch.equal(stream[9:].long(), silence)
    assert not torch.equal(stream[1:9], stream[9:])


def test_other_speakers_stay_out_of_the_text_stream(corpus, corpus_codes, tokenizer_path) -> None:
    main_only = build_loader(config(corpus, tokenizer_path, codes_dir=str(corpus_codes)))
    everyone = build_loader(config(corpus, tokenizer_path, main_speaker=None, codes_dir=str(corpus_codes)))
    talk = [i for i, e in enumerate(main_only.entries) if e.path.name == "talk.wav"][0]
    a, b = main_only.recording_stream(talk), everyone.recording_stream(talk)
    assert torch.equal(a[1:], b[1:])
    assert (a[0] > 3).sum() < (b[0] > 3).sum()


@pytest.mark.parametrize("world_size", [1, 2])
def test_resumed_loader_yields_the_same_batches(corpus, corpus_codes, tokenizer_path, world_size) -> None:
    cfg = config(corpus, tokenizer_path, duration_sec=1.0, batch_size=3, codes_dir=str(corpus_codes))
    rank = world_size - 1
    straight = build_loader(cfg, rank, world_size)
    expected = [next(straight) for _ in range(9)]  # several epochs: 22 crops, 11 or 22 per rank
    first = build_loader(cfg, rank, world_size)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints: survives any checkpoint format
    resumed = build_loader(cfg, rank, world_size)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        assert torch.equal(next(resumed), want)
    assert resumed.state_dict() == straight.state_dict()
    assert straight.epoch >= 1
    as_tensors = build_loader(cfg, rank, world_size)
    as_tensors.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    assert torch.equal(next(as_tensors), expected[4])


def test_resume_refuses_another_configuration(corpus, tokenizer_path, mimi) -> None:
    state = build_loader(config(corpus, tokenizer_path), 0, 2, mimi=mimi).state_dict()
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 1.*seed: saved 7, now 8|seed: saved 7, now 8"):
        build_loader(config(corpus, tokenizer_path, seed=8), 0, 1, mimi=mimi).load_state_dict(state)
    with pytest.raises(ValueError, match="crop_frames: saved 25, now 12"):
        build_loader(config(corpus, tokenizer_path, duration_sec=1.0), 0, 2, mimi=mimi).load_state_dict(state)
    loader = build_loader(config(corpus, tokenizer_path), 0, 2, mimi=mimi)
    with pytest.raises(ValueError, match="samples_seen must be an int"):
        loader.load_state_dict({**state, "samples_seen": -1})


def test_pre_encoded_codes_give_the_same_batches(corpus, tokenizer_path, mimi, tmp_path) -> None:
    entries = read_manifest(corpus)
    codes_dir = tmp_path / "codes"
    pre_encode(corpus, codes_dir, shard_mb=0.001, entries=entries[:2], model=mimi)  # an interrupted run
    first = json.loads((codes_dir / "index.json").read_text())["files"]
    index = pre_encode(corpus, codes_dir, mimi="tiny-random", shard_mb=0.001)  # resumes: encodes the rest
    files = json.loads(index.read_text())["files"]
    assert len(first) == 2 and len(files) == len(entries) and first.items() <= files.items()
    assert len({f["shard"] for f in files.values()}) > 2
    mtime = index.stat().st_mtime_ns
    pre_encode(corpus, codes_dir, mimi="tiny-random")
    assert index.stat().st_mtime_ns == mtime  # nothing left to do

    cfg = config(corpus, tokenizer_path, duration_sec=1.0)
    on_the_fly = build_loader(cfg, mimi=mimi)
    from_codes = build_loader(config(corpus, tokenizer_path, duration_sec=1.0, codes_dir=str(codes_dir)))
    for _ in range(8):
        assert torch.equal(next(from_codes), next(on_the_fly))
    assert from_codes._mimi is None  # never loaded

    with pytest.raises(ValueError, match="codes made with Mimi 'tiny-random'"):
        CodeStore(codes_dir, mimi=tmp_path / "mimi.safetensors")
    with pytest.raises(ValueError, match="was made with"):
        pre_encode(corpus, codes_dir, mimi="tiny-random", num_codebooks=4)
    ghost = corpus.parent / "ghost.jsonl"
    ghost.write_text(json.dumps({"path": str(tmp_path / "x.wav"), "duration": 1.0}) + "\n")
    (tmp_path / "x.wav").write_bytes((corpus.parent / "b" / "short.wav").read_bytes())
    (tmp_path / "x.json").write_text('{"alignments": []}')
    with pytest.raises(ValueError, match=f"{ghost}:1: .*x.wav is not in {codes_dir}"):
        build_loader(config(ghost, tokenizer_path, codes_dir=str(codes_dir)))


def test_stale_manifest_duration_is_named(corpus, tokenizer_path, mimi, tmp_path) -> None:
    entry = read_manifest(corpus)[0]
    stale = tmp_path / "stale.jsonl"
    stale.write_text(json.dumps({"path": str(entry.path), "duration": entry.duration + 3}) + "\n")
    loader = build_loader(config(stale, tokenizer_path), mimi=mimi)
    with pytest.raises(ValueError, match=f"{stale}:1: duration .* but .*talk.wav lasts 5.300 s"):
        next(loader)


def test_config_validation(corpus, tokenizer_path) -> None:
    with pytest.raises(ValueError, match="train_manifest"):
        DataConfig(tokenizer="x")
    with pytest.raises(ValueError, match="duration_sec"):
        config(corpus, tokenizer_path, duration_sec=0.01)
    with pytest.raises(ValueError, match="batch_size"):
        config(corpus, tokenizer_path, batch_size=0)
    assert config(corpus, tokenizer_path, duration_sec=160).crop_frames == 2000
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        build_loader(config(corpus, tokenizer_path.parent / "nope.model"))
