"""The moshi series: without TTT, bit-identical to the pristine pin; with them, each hook does its job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ttt_speech.integrations import moshi as moshi_int

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = REPO / "upstream" / "moshi"
PROBE = Path(__file__).with_name("moshi_probe.py")


def run_probe(out: Path, pythonpath: Path | None = None) -> dict:
    env = {**os.environ, "NO_TORCH_COMPILE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    subprocess.run([sys.executable, str(PROBE), str(out)], check=True, env=env)
    return torch.load(out)


@pytest.fixture(scope="module")
def pristine_tree(tmp_path_factory) -> Path:
    assert (CHECKOUT / ".git").is_dir(), "upstream/moshi missing: run `make apply-patches` first (make test does)"
    dest = tmp_path_factory.mktemp("moshi-pristine")
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", "--format=tar", "pristine"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def test_patched_moshi_is_bit_identical_to_the_pin_without_ttt(pristine_tree: Path, tmp_path: Path) -> None:
    patched = run_probe(tmp_path / "patched.pt")
    pristine = run_probe(tmp_path / "pristine.pt", pythonpath=pristine_tree)
    assert Path(patched["moshi_file"]).is_relative_to(CHECKOUT)
    assert Path(pristine["moshi_file"]).is_relative_to(pristine_tree)
    for key in ("logits", "text_logits", "grads", "stream_tokens", "stream_text_logits"):
        a, b = patched[key], pristine[key]
        assert a.shape == b.shape and a.numel() > 0, key
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{key}: patched differs from pristine"


def test_installed_moshi_carries_the_hooks() -> None:
    moshi_int.check_patched()


class RecordingGating(nn.Module):
    takes_token_embeddings = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []
        self.seen_input: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, token_embeddings: torch.Tensor | None = None,
                input_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(token_embeddings)
        self.seen_input.append(input_embeddings)
        return self.inner(x)


def test_text_and_input_embeddings_reach_gatings_that_ask_for_them(random_codes) -> None:
    model = moshi_int.build_lm()
    main_layer = model.transformer.layers[1]
    main_layer.gating = RecordingGating(main_layer.gating)
    plain_depformer_gatings = [layer.gating for layer in model.depformer.layers]
    codes = random_codes(model, 2, 5)
    model(codes)
    (seen,) = main_layer.gating.seen
    assert seen.shape == (2, 5, model.dim)
    # forward_text's input: the initial token, then the delayed codes; its text row is what gets embedded
    from ttt_speech.integrations.moshi_lm import delay_codes

    initial = model._get_initial_token().expand(2, -1, -1)
    delayed = torch.cat([initial, delay_codes(model.delays, codes, initial)], dim=2)[:, :, :-1]
    torch.testing.assert_close(seen, model.text_emb(delayed[:, 0]), rtol=0, atol=0)
    # 0005: the full per-frame input embedding, text plus every audio codebook, as forward_text sums it
    (seen_input,) = main_layer.gating.seen_input
    audio = sum(model.emb[k](delayed[:, k + model.audio_offset]) for k in range(model.num_audio_codebooks))
    torch.testing.assert_close(seen_input, audio + model.text_emb(delayed[:, 0]), rtol=1e-6, atol=1e-6)
    assert (seen_input - seen).abs().amax() > 0
    assert all(layer.gating is g for layer, g in zip(model.depformer.layers, plain_depformer_gatings, strict=True))


def test_ttt_block_slot_runs_between_attention_and_ffn() -> None:
    model = moshi_int.build_lm()
    layer = model.transformer.layers[2]
    assert layer.ttt_block is None
    order: list[str] = []
    layer.self_attn.register_forward_hook(lambda *_: order.append("attn"))
    layer.gating.register_forward_hook(lambda *_: order.append("ffn"))

    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append("ttt")
            return x + 1.0

    codes = torch.zeros(1, model.num_codebooks, 3, dtype=torch.long)
    before = model(codes).logits
    layer.ttt_block = Block()
    after = model(codes).logits
    assert order == ["attn", "ffn", "attn", "ttt", "ffn"]
    assert not torch.allclose(before.nan_to_num(), after.nan_to_num())
    assert "ttt_block" not in "".join(model.state_dict())


def test_layers_know_their_index() -> None:
    model = moshi_int.build_lm()
    assert [layer.layer_idx for layer in model.transformer.layers] == list(range(len(model.transformer.layers)))
    assert [layer.layer_idx for layer in model.depformer.layers] == list(range(len(model.depformer.layers)))
