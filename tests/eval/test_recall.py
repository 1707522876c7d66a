"""The fair recall benchmark (`ttt_speech.eval.recall`): the window baseline is provably blind to S, the receptive
field formula is exact, and the statistics equal hand-computed values."""

import math

import pytest
import torch

from ttt_speech.eval import recall
from ttt_speech.eval.stats import t975

# small enough for a test: receptive field 2 x (4 - 1) + 2 = 8 frames
TINY = dict(seg=6, vocab=8, dim=32, num_heads=4, layers=2, context=4, ttt_layers=(1,), chunk=4, batch=4, lr=1e-2,
            warmup=1, eval_sequences=8)


def replaced_s(cfg: recall.RecallConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch, and the same batch with S (frames 0..seg-1, every stream) replaced by other random content; the
    copy is left alone."""
    g = torch.Generator().manual_seed(seed)
    codes = recall.make_batch(g, cfg, 4)
    other = recall.make_batch(g, cfg, 4)
    swapped = codes.clone()
    swapped[..., :cfg.seg] = other[..., :cfg.seg]
    assert not torch.equal(swapped[..., :cfg.seg], codes[..., :cfg.seg])
    return codes, swapped


def copy_outputs(model, codes: torch.Tensor, cfg: recall.RecallConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and audio logits on every frame of the copy (its first frame included)."""
    sl = slice(cfg.copy_start, cfg.copy_start + cfg.seg)
    with torch.no_grad():
        out = model(codes)
    return out.text_logits[:, :, sl], out.logits[:, :, sl].nan_to_num(123.0)


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
def test_window_model_is_blind_to_s_and_full_attention_is_not(trained: bool) -> None:
    cfg = recall.RecallConfig(**TINY)
    assert cfg.gap > recall.receptive_field(cfg.lm_kwargs("window")) == 8
    codes, swapped = replaced_s(cfg)
    for variant in ("window", "full"):
        model = recall.build_variant(variant, cfg, seed=0)
        if trained:
            curve = recall.train(model, cfg, seed=0, steps=5)
            assert len(curve["copy_nll"]) == 5
        model.eval()
        text_a, audio_a = copy_outputs(model, codes, cfg)
        text_b, audio_b = copy_outputs(model, swapped, cfg)
        if variant == "window":  # bit-identical: S is out of reach of every layer's mask
            assert torch.equal(text_a, text_b) and torch.equal(audio_a, audio_b)
        else:  # the same check fails for a model that can see S: the test can fail
            assert (text_a - text_b).abs().max() > 1e-3


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
def test_the_benchmark_default_window_model_is_blind_to_s(trained: bool) -> None:
    """The same check on the configuration `scripts/bench_recall.py` runs (4 layers, context 8, the default gap),
    not only on the small one above."""
    cfg = recall.RecallConfig(batch=4)
    assert cfg.gap == recall.receptive_field(cfg.lm_kwargs("window")) + cfg.margin == 38
    codes, swapped = replaced_s(cfg)
    model = recall.build_variant("window", cfg, seed=0)
    if trained:
        recall.train(model, cfg, seed=0, steps=1)
    model.eval()
    text_a, audio_a = copy_outputs(model, codes, cfg)
    text_b, audio_b = copy_outputs(model, swapped, cfg)
    assert torch.equal(text_a, text_b) and torch.equal(audio_a, audio_b)
    # a frame of the filler just inside the receptive field does reach the copy: the check can fail
    inside = codes.clone()
    t = cfg.copy_start - recall.receptive_field(cfg.lm_kwargs("window"))
    inside[:, :, t] = (inside[:, :, t] + 1 - recall.FIRST_TEXT_ID) % cfg.vocab + recall.FIRST_TEXT_ID
    text_c, _ = copy_outputs(model, inside, cfg)
    assert not torch.equal(text_a, text_c)


def test_receptive_field_is_exact() -> None:
    """A change at frame t - receptive_field reaches frame t's logits; one frame earlier does not."""
    cfg = recall.RecallConfig(**TINY)
    rf = recall.receptive_field(cfg.lm_kwargs("window"))
    model = recall.build_variant("window", cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    codes = recall.make_batch(g, cfg, 2)
    t = cfg.length - 1
    base = model(codes)
    reached = {}
    for back in (rf, rf + 1):
        changed = codes.clone()
        first = recall.FIRST_TEXT_ID
        changed[:, :, t - back] = (changed[:, :, t - back] + 1 - first) % cfg.vocab + first
        with torch.no_grad():
            out = model(changed)
        reached[back] = not (torch.equal(out.text_logits[:, :, t], base.text_logits[:, :, t])
                             and torch.equal(out.logits[:, :, t].nan_to_num(), base.logits[:, :, t].nan_to_num()))
    assert reached == {rf: True, rf + 1: False}


def test_gap_inside_the_receptive_field_is_refused() -> None:
    with pytest.raises(ValueError, match="receptive field"):
        recall.RecallConfig(**{**TINY, "gap": 8})
    assert recall.RecallConfig(**{**TINY, "gap": 9}).gap == 9
    with pytest.raises(ValueError, match="no finite receptive field"):
        recall.receptive_field(recall.RecallConfig(**TINY).lm_kwargs("full"))


def test_batch_layout() -> None:
    cfg = recall.RecallConfig(**TINY)
    codes = recall.make_batch(torch.Generator().manual_seed(0), cfg, 3)
    assert codes.shape == (3, 5, cfg.length)
    assert torch.equal(codes[:, 0, cfg.copy_start:cfg.copy_start + cfg.seg], codes[:, 0, :cfg.seg])
    card = recall.FIRST_TEXT_ID + cfg.vocab + 4
    for k in range(4):
        assert torch.equal(codes[:, 1 + k], (codes[:, 0] + k) % card)
    assert codes[:, 0].min() >= recall.FIRST_TEXT_ID and codes[:, 0].max() < recall.FIRST_TEXT_ID + cfg.vocab


def test_variants_share_the_base_initialisation() -> None:
    cfg = recall.RecallConfig(**TINY)
    window = recall.build_variant("window", cfg, seed=3).state_dict()
    for variant in ("full", "inplace", "ttt_linear"):
        other = recall.build_variant(variant, cfg, seed=3).state_dict()
        assert all(torch.equal(other[k], v) for k, v in window.items() if k in other)
    a = recall.build_variant("inplace", cfg, seed=3).state_dict()
    b = recall.build_variant("inplace", cfg, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _result(variant: str, seed: int, copy: list[float], curve: list[float] | None = None) -> dict:
    return {"variant": variant, "seed": seed, "copy_nll": copy, "filler_nll": [3.0] * len(copy),
            "train_seconds": 1.0, "curve": {"copy_nll": curve or [1.0] * 20}}


def test_summary_statistics_by_hand() -> None:
    # per-seed means: window 4, 4, 4; full 1, 2, 0; variant 2, 3, 1 (each the mean of two sequences)
    results = [_result("window", s, [4.5, 3.5]) for s in range(3)]
    results += [_result("full", s, [m - 0.25, m + 0.25]) for s, m in enumerate([1.0, 2.0, 0.0])]
    results += [_result("v", s, [m + 1.0, m - 1.0]) for s, m in enumerate([2.0, 3.0, 1.0])]
    summary = recall.summarize(results)

    half = t975(2) * 1.0 / math.sqrt(3)  # differences -2, -1, -3: mean -2, sd 1
    d = summary["v"]["diff_vs_window"]
    assert d["per_seed"] == pytest.approx([-2.0, -1.0, -3.0])
    assert d["mean"] == pytest.approx(-2.0) and d["ci95"] == pytest.approx([-2.0 - half, -2.0 + half])

    ratios = [2 / 3, 1 / 2, 3 / 4]  # (4 - v) / (4 - full) per seed
    mean = sum(ratios) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    g = summary["v"]["gap_closed"]
    assert g["per_seed"] == pytest.approx(ratios)
    assert g["mean"] == pytest.approx(0.638889, abs=1e-6)
    assert g["ci95"] == pytest.approx([mean - t975(2) * sd / math.sqrt(3), mean + t975(2) * sd / math.sqrt(3)])
    assert g["ci95"] == pytest.approx([0.32264, 0.95514], abs=1e-4)

    assert summary["window"]["copy_nll"]["mean"] == 4.0 and summary["window"]["copy_nll"]["ci95"] == [4.0, 4.0]
    assert "diff_vs_window" not in summary["window"] and summary["full"]["gap_closed"]["per_seed"] == [1.0] * 3
    assert "n/a" not in recall.format_table(summary, chance=math.log(8))

    # no gap closed where the oracle does not beat the reference
    flat = [r for r in results if r["variant"] != "full"] + [_result("full", s, [4.0, 4.0]) for s in range(3)]
    g = recall.summarize(flat)["v"]["gap_closed"]
    assert g["mean"] is None and g["ci95"] is None and "does not beat" in g["note"]


def test_flattened() -> None:
    assert recall.flattened([5.0] * 80 + [1.0] * 20) == (True, 0.0)
    ok, change = recall.flattened([3.0] * 80 + [2.0] * 10 + [1.0] * 10)
    assert not ok and change == pytest.approx(-1.0)


def test_cached_runs_are_reused_only_by_variants_they_fit(tmp_path) -> None:
    cfg = recall.RecallConfig(**{**TINY, "steps": 1, "eval_sequences": 2})
    first = recall.run_one("window", 0, cfg, tmp_path)
    other_target = recall.RecallConfig(**{**TINY, "steps": 1, "eval_sequences": 2, "target": "input_embeddings"})
    assert recall.run_one("window", 0, other_target, tmp_path) == first  # the window model has no target
    assert cfg.relevant("inplace") != other_target.relevant("inplace")
    assert "target" not in cfg.relevant("ttt_linear") and "block_gate_init" not in cfg.relevant("inplace")
