"""LoRA for `model.family: llama`: peft adapters on the decoder layers' linears (not TTT's own), trained with the
TTT parameters; the distillation teacher is the base without them; the export merges them and still equals the
student; `eval llama` rebuilds the teacher from the base."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ttt_speech.config import ConfigError, load_config
from ttt_speech.integrations.llama_omni import LlamaTTTForCausalLM, from_pretrained_ttt
from ttt_speech.integrations.llama_train import build_llama, ttt_bypassed
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.llama import LlamaFamily
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "llama_tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [f"--run_dir={run_dir}", "--llama.seq_len=32", "--batch_size=2",
                                             "--ckpt_freq=100", "--lora.enable=true", "--lora.rank=4",
                                             "--llama.val_batches=1", *overrides])


def logged(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader((run_dir / "metrics.csv")
                                                                                        .open())]


@pytest.mark.parametrize("mode", ["replace", "gated_residual"])
def test_adapters_on_the_base_linears_and_the_teacher_is_the_base(tmp_path: Path, mode: str) -> None:
    cfg = tiny(tmp_path, f"--ttt.mode={mode}", "--parallel=none")
    family = LlamaFamily()
    model, groups = family.build(cfg, torch.device("cpu"), 1)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    expected = {f"model.layers.{i}.{m}" for i in range(4) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if mode == "replace":  # layer 3's attention is TTT: nothing to adapt there
        attention = {a for a in attention if not a.startswith("model.layers.3.")}
    assert adapted == expected | attention
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if ".lora_" in n or ".ttt." in n or "ttt_gate" in n}
    assert any(".ttt." in n for n in trained)
    base = build_llama(cfg.model.lm_kwargs, None, cfg.ttt, seed=cfg.seed, device=torch.device("cpu"),
                       dtype=torch.float32)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    loader = family.loader(cfg, cfg.stage_list()[0], 0, 1, torch.device("cpu"))
    for _ in range(2):  # lora_B leaves 0: the adapters change the student
        loss, _ = family.loss(model, next(loader), cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    ids = next(loader)[:, 0]
    with torch.no_grad(), ttt_bypassed(model), ttt_bypassed(base):
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with ttt_bypassed(model):
            teacher = model(input_ids=ids).logits
    assert not torch.allclose(student, teacher)
    assert not model.model.layers[0].mlp.up_proj.disable_adapters  # restored after the teacher's forward


def test_lora_distillation_resumes_exactly_and_the_merged_export_is_the_student(tmp_path: Path) -> None:
    from ttt_speech.eval.llama_eval import evaluate_run

    extra = ["--max_steps=4", "--llama.val_data=synthetic"]
    straight = train(tiny(tmp_path / "straight", *extra))
    train(tiny(tmp_path / "resumed", *extra, "--stop_after=2"))
    second = train(tiny(tmp_path / "resumed", *extra))
    assert second["losses"] == straight["losses"][2:] and logged(tmp_path / "straight") == logged(
        tmp_path / "resumed")  # tolerance: exact
    merged, _ = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path / "straight/export")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    cfg = tiny(tmp_path / "straight", *extra)
    unmerged = build_llama(cfg.model.lm_kwargs, None, cfg.ttt, seed=cfg.seed, device=torch.device("cpu"),
                           dtype=torch.float32)
    from ttt_speech.eval.llama_eval import load_lora_student

    load_lora_student(unmerged, cfg, tmp_path / "straight/export/lora.safetensors", "cpu")
    ids = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-5, rtol=0)
    result = evaluate_run(tmp_path / "straight", tokens=64, docs=2, bins=2, turns=[0])
    assert all(r["student_minus_teacher"]["n"] == 2 for r in result["perplexity_by_position"]["bins"])


def test_lora_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lora.enable with llama.trainable: all"):
        train(tiny(tmp_path / "a", "--llama.trainable=all"))
    with pytest.raises(ConfigError, match="lora.ft_embed with llama.objective: distill"):
        train(tiny(tmp_path / "b", "--lora.ft_embed=true"))
    with pytest.raises(ConfigError, match="lora.enable is false"):
        train(tiny(tmp_path / "c", "--lora.enable=false"))
