"""`eval generate`: free-running LMGen on tiny real models (random weights), its metrics and its report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_speech.eval.generate import (
    empirical_entropy,
    generate,
    metric_names,
    repeated_ngram_rate,
    time_windows,
    window_metrics,
)
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, ttt_modules
from ttt_speech.integrations.moshi_gen import free_run, user_stream_frames


def test_metrics_by_hand() -> None:
    assert empirical_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert empirical_entropy([5, 5, 5]) == 0.0 and math.isnan(empirical_entropy([]))
    # bigrams of 1 2 1 2 1 2: (1,2) (2,1) (1,2) (2,1) (1,2): 2 distinct of 5
    assert repeated_ngram_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert repeated_ngram_rate([1, 2, 3, 4], 2) == 0.0 and math.isnan(repeated_ngram_rate([1, 2], 3))
    assert time_windows(25, 10) == [(0, 10), (10, 20), (20, 25)] and time_windows(23, 10) == [(0, 10), (10, 20)]
    # text: pads 3 and 0 around words 7 7 8; two codebooks
    tokens = np.array([[3, 7, 0, 7, 8, 3],
                       [1, 1, 1, 2, 2, 2],
                       [4, 5, 6, 7, 8, 9]])
    m = window_metrics(tokens, np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [(0, 6)], pad_ids=(3, 0), ngram=2)
    assert set(m) == set(metric_names(2))
    assert m["text_pad_rate"] == [0.5] and m["text_pred_entropy"] == [3.5]
    assert m["text_entropy"][0] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert m["text_repeat_rate"] == [0.0]  # words 7 7 8: bigrams (7,7) (7,8)
    assert m["audio0_entropy"][0] == pytest.approx(math.log(2))
    assert m["audio1_entropy"][0] == pytest.approx(math.log(6))
    assert m["audio_entropy"][0] == pytest.approx((math.log(2) + math.log(6)) / 2)
    assert m["audio0_repeat_rate"][0] == pytest.approx(1 - 3 / 5)  # (1,1) (1,1) (1,2) (2,2) (2,2)


def tiny_inputs(model, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, model.card, (user_stream_frames(model), frames), generator=g)
    prompt = torch.randint(0, model.card, (1 + model.dep_q, frames), generator=g)
    prompt[0] = torch.randint(0, model.text_card, (frames,), generator=g)
    return user, prompt


def ttt_model(seed: int = 0):
    model = build_lm(seed=seed)
    apply_ttt(model, MoshiTTTConfig(kind="inplace", layers=[1], chunk_size=4))
    with torch.no_grad():  # off the zero init, so TTT changes what is generated
        for m in ttt_modules(model).values():
            m.ttt_conv.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def test_prompt_is_forced_and_seeds_reproduce() -> None:
    model = ttt_model()
    user, prompt = tiny_inputs(model, 20)
    P = 7
    run = lambda seed: free_run(model, user[None].expand(2, -1, -1), 20, prompt=prompt[None, :, :P].expand(2, -1, -1),
                                seed=seed, temp=1.0, temp_text=1.0)
    a, b, c = run(0), run(0), run(1)
    assert a.tokens.shape == (2, 1 + model.dep_q, 20) and a.text_entropy.shape == (2, 20)
    for k, d in enumerate(model.delays[:1 + model.dep_q]):
        assert torch.equal(a.tokens[:, k, :P - d], prompt[None, k, :P - d].expand(2, -1)), k
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.text_entropy, b.text_entropy)
    assert not torch.equal(a.tokens[:, :, P:], c.tokens[:, :, P:])  # another seed samples something else
    assert not torch.equal(a.tokens[0, :, P:], a.tokens[1, :, P:])  # rows sample independently
    assert (a.text_entropy > 0).all() and a.pad_ids == (3, 0)


def test_report_pairs_checkpoints_by_seed(tmp_path: Path) -> None:
    base = build_lm(seed=0).eval()
    twin = build_lm(seed=0).eval()
    user, prompt = tiny_inputs(base, 30)
    models = {"ttt": ("ttt_dir", ttt_model()), "base": ("base_dir", base), "twin": ("twin_dir", twin)}
    report = generate(models, user, 30, tmp_path, prompt=prompt[:, :6], seeds=(0, 1), batch_size=2, window_frames=10,
                      ngram=2)
    on_disk = json.loads((tmp_path / "generate.json").read_text())
    assert on_disk == report and report["reference"] == "base" and report["prompt_frames"] == 6
    assert [(w["start"], w["end"], w["in_prompt"]) for w in report["windows"]] == [
        (0, 10, True), (10, 20, False), (20, 30, False)]
    names = metric_names(base.dep_q)
    assert report["metrics"] == names
    ck = report["checkpoints"]
    assert ck["base"]["paired"] is None and ck["ttt"]["ttt"]["chunk_size"] == 4 and ck["base"]["ttt"] is None
    for name in ("ttt", "twin"):
        assert set(ck[name]["paired"]["metrics"]) == set(names) and ck[name]["paired"]["reference"] == "base"
    est = ck["base"]["metrics"]["audio_entropy"][1]
    assert est["n"] == 4 and est["ci95"][0] <= est["mean"] <= est["ci95"][1]  # 2 seeds x 2 rows
    # the same weights with the same seeds generate the same streams: paired differences are exactly 0
    for metric in names:
        for e in ck["twin"]["paired"]["metrics"][metric]:
            assert e["mean"] in (0.0, None) and e["ci95"] in ([0.0, 0.0], None), metric
    tokens = {n: np.load(tmp_path / f"tokens_{n}.npy") for n in models}
    assert tokens["base"].shape == (4, 1 + base.dep_q, 30) and np.array_equal(tokens["base"], tokens["twin"])
    assert not np.array_equal(tokens["ttt"][:, :, 6:], tokens["base"][:, :, 6:])
    assert np.array_equal(tokens["ttt"][:, 0, :6], tokens["base"][:, 0, :6])  # the shared prompt
    rows = list(csv.DictReader((tmp_path / "generate.csv").open()))
    assert len(rows) == 3 * 4 * 3 * len(names)  # checkpoints x samples x windows x metrics
    assert (tmp_path / "generate.png").stat().st_size > 0
