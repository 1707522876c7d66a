"""`model.family: llama` in the one trainer, on a tiny random Llama: the teacher is the model without TTT, exact
resume (1 and 2 gloo processes, stages and microbatches included), validation and the best export, the export
loads, config and data errors name what is wrong."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from ttt_speech.config import ConfigError, load_config
from ttt_speech.integrations.llama_omni import LlamaTTTForCausalLM, from_pretrained_ttt, ttt_modules
from ttt_speech.integrations.llama_train import TINY, build_llama, trainable_names, ttt_bypassed
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.llama import LlamaFamily
from ttt_speech.train.llama_data import IGNORE, SyntheticTokens, TokenWindows, read_tokens
from ttt_speech.train.monitor import plot_monitor
from ttt_speech.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "llama_tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [f"--run_dir={run_dir}", "--llama.seq_len=32", "--batch_size=2",
                                             "--ckpt_freq=100", *overrides])


def logged(run_dir: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    """The rows of a run's CSV, without the timings."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader((run_dir / name).open())]


@pytest.mark.parametrize("mode", ["replace", "gated_residual"])
def test_the_teacher_is_the_model_without_ttt(mode: str) -> None:
    ids = torch.randint(1, TINY["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    plain = build_llama("tiny", None, None, seed=3, device=torch.device("cpu"), dtype=torch.float32).eval()
    assert type(plain) is LlamaForCausalLM
    model = build_llama("tiny", None, {"layers": [1, 3], "mode": mode, "mini_batch_size": 16,
                                       **({"gate_init": 1.0} if mode == "gated_residual" else {})},
                        seed=3, device=torch.device("cpu"), dtype=torch.float32).eval()
    assert sorted(ttt_modules(model)) == [1, 3]
    with torch.no_grad():
        want = plain(ids).logits
        student = model(ids).logits
        with ttt_bypassed(model):
            teacher = model(ids).logits
        again = model(ids).logits
    assert torch.equal(teacher, want)  # the same weights, attention in every layer
    assert not torch.allclose(student, want, atol=1e-3)  # TTT is on outside the context ...
    assert torch.equal(again, student)  # ... and comes back after it
    assert not any(k.startswith("_ttt_teacher") or "teacher" in k for k in model.state_dict())


def test_only_ttt_parameters_gates_and_ttt_norms_train_by_default() -> None:
    model = build_llama("tiny", None, {"layers": [1], "mode": "gated_residual", "mini_batch_size": 16}, seed=0,
                        device=torch.device("cpu"), dtype=torch.float32)
    names = trainable_names(model, "ttt")
    assert "model.layers.1.self_attn.ttt_gate" in names
    assert {"model.layers.1.self_attn.ttt.ttt_norm_weight", "model.layers.1.self_attn.ttt.post_norm.weight"} <= names
    assert all(".self_attn.ttt" in n for n in names)  # the teacher's weights (its RMSNorms too) stay frozen


def test_the_teacher_does_not_move_while_the_student_learns(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--max_steps=3")
    train(cfg)
    trained, _ = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path / "run/export")
    model = build_llama("tiny", None, cfg.ttt, seed=0, device=torch.device("cpu"), dtype=torch.float32).eval()
    ids = torch.randint(1, TINY["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ttt_bypassed(model):
        before = model(ids).logits
    student_before = model(ids).logits
    model.load_state_dict(trained.state_dict())
    with torch.no_grad(), ttt_bypassed(model):
        assert torch.equal(model(ids).logits, before)
    assert not torch.allclose(model(ids).logits, student_before)


def test_the_export_comes_back_through_auto_with_its_ttt_weights(tmp_path: Path) -> None:
    """A trained plain-Llama export is saved as `llama-ttt`, so AutoModelForCausalLM does not drop its TTT layers."""
    from transformers import AutoModelForCausalLM

    train(tiny(tmp_path / "run", "--max_steps=1"))
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama-ttt", ["LlamaTTTForCausalLM"])
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "run/export")
    ours, _ = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path / "run/export")
    assert type(auto) is LlamaTTTForCausalLM and ttt_modules(auto)
    assert auto.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in auto.state_dict().items())


def test_resume_gives_the_same_losses_stages_microbatches_and_validation(tmp_path: Path) -> None:
    # two stages (32 then 48 tokens), two microbatches per step, validation at each stage's end
    extra = ["--num_microbatches=2", "--max_steps=null", "--llama.val_batches=1",
             "--stages=[{steps: 4, seq_len: 32}, {steps: 4, seq_len: 48}]"]
    straight = train(tiny(tmp_path / "straight", *extra))
    first = train(tiny(tmp_path / "resumed", *extra, "--stop_after=5"))
    assert first["status"] == "stopped"
    second = train(tiny(tmp_path / "resumed", *extra))
    assert second["resumed_from_step"] == 5 and straight["seq_len"] == [32, 48]
    # tolerance: exact
    assert second["losses"] == straight["losses"][5:]
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")
    assert logged(tmp_path / "resumed", "val.csv") == logged(tmp_path / "straight", "val.csv")
    assert [r["step"] for r in logged(tmp_path / "straight", "val.csv")] == ["4", "8"]
    assert sorted(p.name for p in (tmp_path / "straight").glob("stage_*")) == ["stage_0"]  # stage 1's is export/
    staged, _ = from_pretrained_ttt(LlamaTTTForCausalLM, tmp_path / "straight/stage_0")
    assert sorted(ttt_modules(staged)) == [3]
    best = json.loads((tmp_path / "straight/best/best.json").read_text())
    val = {int(r["step"]): float(r["ppl_student"]) for r in logged(tmp_path / "straight", "val.csv")}
    assert best["step"] == min(val, key=val.get)
    # a fresh run in a folder without checkpoints starts its validation log and best afresh
    for ckpt in (tmp_path / "straight/checkpoints").iterdir():
        shutil.rmtree(ckpt)
    train(tiny(tmp_path / "straight", *extra[:-1], "--max_steps=2"))
    assert [r["step"] for r in logged(tmp_path / "straight", "val.csv")] == ["2"]
    assert json.loads((tmp_path / "straight/best/best.json").read_text())["step"] == 2


def test_gated_residual_with_hidden_mse_resumes_exactly(tmp_path: Path) -> None:
    extra = ["--ttt.mode=gated_residual", "--llama.hidden_mse_weight=0.5", "--max_steps=4", "--llama.val_data=null",
             "--export_safetensors=false"]
    straight = train(tiny(tmp_path / "straight", *extra))
    train(tiny(tmp_path / "resumed", *extra, "--stop_after=2"))
    second = train(tiny(tmp_path / "resumed", *extra))
    assert second["losses"] == straight["losses"][2:]  # tolerance: exact
    rows = logged(tmp_path / "straight")
    assert all(float(r["hidden_mse"]) > 0 for r in rows) and rows == logged(tmp_path / "resumed")


@pytest.mark.parametrize("objective", ["distill", "finetune"])
def test_the_loss_in_slices_equals_the_whole_sequence_loss(tmp_path: Path, objective: str) -> None:
    extra = [f"--llama.objective={objective}", "--llama.seq_len=48", "--llama.trainable=all"]
    extra += ["--llama.hidden_mse_weight=0.5"] if objective == "distill" else []
    whole, sliced = tiny(tmp_path, *extra), tiny(tmp_path, *extra, "--llama.loss_chunk=20")  # uneven slices
    family = LlamaFamily()
    model, _ = family.build(whole, torch.device("cpu"), 1)
    batch = next(family.loader(whole, whole.stage_list()[0], 0, 1, torch.device("cpu")))
    batch[:, 1, :7] = IGNORE  # some unlabelled positions
    results = []
    for cfg in (whole, sliced):
        model.zero_grad()
        loss, parts = family.loss(model, batch, cfg)
        loss.backward()
        results.append((loss.detach(), torch.stack(parts), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, p0, g0), (l1, p1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7, equal_nan=True)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert g0["model.layers.3.self_attn.ttt.W1"].abs().sum() > 0
    if objective == "distill":  # validation too
        with torch.no_grad():
            torch.testing.assert_close(family._val_sums(model, batch, 20), family._val_sums(model, batch, 0),
                                       rtol=1e-6, atol=1e-6)


def test_a_resume_may_change_llama_loss_keys_on_request_only(tmp_path: Path) -> None:
    train(tiny(tmp_path, "--max_steps=2", "--stop_after=1", "--export_safetensors=false"))
    with pytest.raises(ConfigError, match="add --allow-config-change llama.loss_chunk"):
        train(tiny(tmp_path, "--max_steps=2", "--llama.loss_chunk=16", "--export_safetensors=false"))
    with pytest.raises(ConfigError, match="ttt.mode cannot change within a run"):
        train(tiny(tmp_path, "--max_steps=2", "--ttt.mode=gated_residual", "--export_safetensors=false"))
    result = train(tiny(tmp_path, "--max_steps=2", "--llama.loss_chunk=16", "--llama.val_batches=1",
                        "--allow_config_change=[llama.loss_chunk]", "--export_safetensors=false"))
    assert result["resumed_from_step"] == 1


def test_gradient_checkpointing_changes_nothing(tmp_path: Path) -> None:
    results = []
    for on in ("false", "true"):
        cfg = tiny(tmp_path, f"--gradient_checkpointing={on}")
        torch.manual_seed(0)
        family = LlamaFamily()
        model, _ = family.build(cfg, torch.device("cpu"), 1)
        loss, _ = family.loss(model, next(family.loader(cfg, cfg.stage_list()[0], 0, 1, torch.device("cpu"))), cfg)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert model.is_gradient_checkpointing
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(g, results[1][1][n]) for n, g in results[0][1].items()) and results[0][1]


def test_export_loads_with_its_ttt_weights(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", "--max_steps=3")
    result = train(cfg)
    with pytest.raises(ValueError, match="has use_ttt .a TTT export.; training starts from the base model"):
        build_llama("tiny", result["export"], cfg.ttt, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    model, report = from_pretrained_ttt(LlamaTTTForCausalLM, result["export"])
    assert report.initialised == [] and sorted(ttt_modules(model)) == [3]
    ids = torch.randint(1, TINY["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    rebuilt = build_llama("tiny", None, cfg.ttt, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, rebuilt.eval()(ids).logits)


@pytest.mark.parametrize("mode", ["replace", "gated_residual"])
def test_the_monitor_records_the_ttt_layers_and_plots(tmp_path: Path, mode: str) -> None:
    train(tiny(tmp_path, f"--ttt.mode={mode}", "--max_steps=2", "--monitor_freq=1", "--export_safetensors=false"))
    rows = logged(tmp_path, "ttt_stats.csv")
    assert [(r["step"], r["layer"], r["kind"]) for r in rows] == [("0", "3", "ttt_linear"), ("1", "3", "ttt_linear")]
    assert all(float(r["update_norm"]) > 0 and float(r["eta_mean"]) > 0 for r in rows)
    assert all((r["gate"] != "") == (mode == "gated_residual") for r in rows)
    assert {p.name for p in plot_monitor(tmp_path)} == {"training.png", "ttt_stats.png"}


def test_finetune_objective_trains_cross_entropy(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", "--llama.objective=finetune", "--llama.trainable=all", "--max_steps=3",
                        "--export_safetensors=false"))
    rows = logged(tmp_path / "run")
    assert rows[0]["kl"] == "nan" and float(rows[0]["ce"]) == pytest.approx(result["losses"][0], rel=1e-5)


@pytest.mark.slow
def test_resume_with_two_gloo_processes_and_fsdp2(tmp_path: Path) -> None:
    def run(run_dir: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "ttt_speech.cli", "finetune", str(CONFIG), f"--run_dir={run_dir}", "--llama.seq_len=32",
               "--batch_size=2", "--max_steps=6", "--export_safetensors=false", "--llama.val_batches=1",
               "--num_microbatches=2", "--llama.loss_chunk=16", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--stop_after=3")
    assert {f.name for f in (tmp_path / "resumed/checkpoints/step_0000003").iterdir()} >= {"rank_0.pt", "rank_1.pt"}
    run(tmp_path / "resumed")
    # tolerance: exact, as in one process; the logged loss is the mean over both ranks
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")
    assert logged(tmp_path / "resumed", "val.csv") == logged(tmp_path / "straight", "val.csv")


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    def fails(match: str, *overrides: str) -> None:
        with pytest.raises(ConfigError, match=match):
            tiny(tmp_path, *overrides)

    fails(r"llama.seq_len=40 is not a multiple of ttt.mini_batch_size=16", "--llama.seq_len=40")
    fails(r"stages\[1\].seq_len=20 is not a multiple", "--max_steps=null",
          "--stages=[{steps: 2}, {steps: 2, seq_len: 20}]")
    fails(r"unknown key ttt.layer; LlamaTTTSection has layers, ", "--ttt.layer=[1]")
    fails(r"unknown key ttt.ttt_mode; .* \(did you mean ttt.mode for ttt.ttt_mode\?\)", "--ttt.ttt_mode=replace")
    fails(r"data: configures Moshi's audio pipeline", "--data.train_data=x.jsonl", "--data.tokenizer=t.model")
    fails(r"distill needs a ttt: section", "--ttt=null")
    fails(r"num_microbatches must be >= 1", "--num_microbatches=0")
    with pytest.raises(ConfigError, match="llama: configures model.family: llama"):
        load_config(TrainConfig, REPO / "configs" / "tiny.yaml", [f"--run_dir={tmp_path}", "--llama.seq_len=64"])
    assert tiny(tmp_path, "--ttt.base_lr=1e-1").ttt.base_lr == 0.1  # YAML's 1e-1 (a string) read as a number
    recipe = load_config(TrainConfig, REPO / "configs" / "llama_omni_distill.yaml")
    assert [s.seq_len for s in recipe.stages] == [8192, 16384, 32768, 65536] and recipe.ttt.layers[0] == 24


def test_data_files_and_their_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "tokens.jsonl"
    jsonl.write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [4, 5]}\n')
    ids, labels = read_tokens(str(jsonl), 16, None)
    assert ids.tolist() == [1, 2, 3, 4, 5] and torch.equal(ids, labels)
    jsonl.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 99]}\n')
    with pytest.raises(ConfigError, match=r"tokens.jsonl:2: token id 99 outside the model's vocabulary \[0, 16\)"):
        read_tokens(str(jsonl), 16, None)
    jsonl.write_text('{"ids": [1]}\n')
    with pytest.raises(ConfigError, match=r"tokens.jsonl:1: expected \{\"input_ids\""):
        read_tokens(str(jsonl), 16, None)

    def chars(text: str) -> list[int]:
        return [ord(c) % 32 for c in text]

    conv = tmp_path / "instruct.json"
    conv.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yo"}]}]))
    ids, labels = read_tokens(str(conv), 32, chars)
    human, gpt = chars("human: hi\n"), chars("gpt: yo\n")
    assert ids.tolist() == human + gpt and labels.tolist() == [IGNORE] * len(human) + gpt
    with pytest.raises(ConfigError, match="set llama.tokenizer"):
        read_tokens(str(conv), 32, None)
    conv.write_text(json.dumps([{"id": "s1", "speech": "a.wav", "conversations": [
        {"from": "human", "value": "<speech>\nwhat?"}, {"from": "gpt", "value": "yes"}]}]))
    with pytest.raises(ConfigError, match=r"sample 0 \(id 's1'\): has speech 'a.wav'; training with speech needs "
                                          r"LLaMA-Omni's model"):
        read_tokens(str(conv), 32, chars)


def test_finetune_on_instruction_json_with_a_sentencepiece_tokenizer(tmp_path: Path) -> None:
    import sentencepiece

    lines = [f"the {w} said {v} times to the {u}" for w in ("cat", "dog", "bird") for v in ("two", "nine")
             for u in ("moon", "sea", "hill")]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=15, model_type="word", minloglevel=2)
    samples = [{"id": f"s{i}", "conversations": [{"from": "human", "value": lines[i]},
                                                 {"from": "gpt", "value": lines[-1 - i]}]} for i in range(len(lines))]
    (tmp_path / "train.json").write_text(json.dumps(samples * 4))
    result = train(tiny(tmp_path / "run", "--llama.objective=finetune", "--llama.trainable=all",
                        f"--llama.train_data={tmp_path / 'train.json'}", f"--llama.val_data={tmp_path / 'train.json'}",
                        f"--llama.tokenizer={tmp_path / 'sp.model'}", "--llama.seq_len=16", "--max_steps=4",
                        "--llama.val_batches=1", "--export_safetensors=false"))
    assert result["status"] == "done" and all(torch.isfinite(torch.tensor(result["losses"])))
    assert [r["step"] for r in logged(tmp_path / "run", "val.csv")] == ["4"]
    (tmp_path / "small.json").write_text(json.dumps(samples[:1]))
    with pytest.raises(ConfigError, match=r"small.json: 18 tokens make 1 window\(s\) of 16, fewer than one batch"):
        train(tiny(tmp_path / "run2", "--llama.objective=finetune", "--llama.trainable=all",
                   f"--llama.train_data={tmp_path / 'train.json'}", f"--llama.val_data={tmp_path / 'small.json'}",
                   f"--llama.tokenizer={tmp_path / 'sp.model'}", "--llama.seq_len=16", "--max_steps=4"))
    assert not (tmp_path / "run2/metrics.csv").exists()  # refused before the first step


def test_loaders_resume_exactly() -> None:
    for make in (lambda: SyntheticTokens(batch_size=2, seq_len=8, vocab_size=32, seed=1, rank=0),
                 lambda: TokenWindows(torch.arange(400) % 31, torch.arange(400) % 31, batch_size=2, seq_len=8, seed=1,
                                      rank=1, world_size=2, shuffle=True, where="x")):
        a = make()
        full = [next(a) for _ in range(30)]  # past an epoch of the windows
        b = make()
        [next(b) for _ in range(11)]
        c = make()
        c.load_state_dict(b.state_dict())
        assert all(torch.equal(x, y) for x, y in zip(full[11:], [next(c) for _ in range(19)], strict=True))


@pytest.mark.skipif(not os.environ.get("LLAMA_OMNI_SRC"),
                    reason="LLaMA-Omni is only on GitHub: set LLAMA_OMNI_SRC to a checkout or archive of the pin")
def test_the_patched_omni_speech_class_trains(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "upstream.py"), "apply", "llama-omni",
                           "--lock", str(_lock_copy(tmp_path)), "--no-install"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    checkout = tmp_path / "upstream" / "llama-omni"
    kwargs = json.dumps({**TINY, "model_type": "omni_speech_llama"})
    cmd = [sys.executable, "-m", "ttt_speech.cli", "finetune", str(CONFIG), f"--run_dir={tmp_path / 'run'}",
           f"--model.lm_kwargs={kwargs}", "--llama.seq_len=32", "--batch_size=2", "--max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(checkout), str(REPO / "overlay")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "run/export/config.json").read_text())
    assert config["architectures"] == ["OmniSpeechLlamaForCausalLM"] and config["use_ttt"] is True
    rows = logged(tmp_path / "run")
    assert len(rows) == 4 and all(float(r["kl"]) >= 0 for r in rows)


def _lock_copy(tmp_path: Path) -> Path:
    import shutil

    shutil.copy(REPO / "upstream.lock", tmp_path / "upstream.lock")
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    return tmp_path / "upstream.lock"
