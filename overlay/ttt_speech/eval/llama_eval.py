"""Evaluations of a Llama TTT student against its teacher (the same model with TTT bypassed):

- `perplexity_by_position`: NLL per position bin, teacher vs student, with the paired difference per document and a
  cluster-bootstrap CI (`eval/stats.py`, as `eval-librilight`);
- `recall`: a fact (a key and its value) in turn 1, asked for after N filler turns; the answer tokens' NLL under
  the teacher and the student, paired per conversation.

Both run one forward per document (TTT layers scan it; attention sees all of it), the same semantics as a
`ConversationSession` fed turn by turn. With speech data (LLaMA-Omni with its Whisper encoder), the clips are
placed as in training and the perplexity counts the text tokens only.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ttt_speech.eval.stats import cluster_bootstrap, paired_differences, t_interval
from ttt_speech.integrations.llama_train import (
    SpeechInputs,
    build_llama,
    load_tokenizer,
    speech_frontend,
    trainable_names,
    ttt_bypassed,
)
from ttt_speech.train.llama_data import SPEECH, SpeechBatch, SyntheticTokens, build_llama_loader


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, teacher: bool,
              speech: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token NLL of `ids` [B, T] under the student (or the teacher), of shape [B, T - 1] float32. `speech`:
    (mels [S, frames, n_mels], refs [B, T]) of a `SpeechBatch`; the speech positions (SPEECH in `ids`) get the
    clips' features, and predicting them is not scored (NaN)."""
    was = model.training
    model.eval()
    placed = SpeechInputs(model, *speech).placed() if speech is not None else contextlib.nullcontext()
    try:
        with contextlib.ExitStack() as stack:
            if teacher:
                stack.enter_context(ttt_bypassed(model))
            stack.enter_context(placed)
            logits = model(input_ids=ids.clamp_min(0), use_cache=False).logits
    finally:
        model.train(was)
    target = ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
    return torch.where(target == SPEECH, float("nan"), nll)


def _estimate(e) -> dict[str, Any]:
    return {"mean": e.mean, "ci95": e.ci95, "n": e.n}


def perplexity_by_position(model, docs: torch.Tensor | SpeechBatch, bins: int = 4,
                           batch_size: int = 4) -> list[dict[str, Any]]:
    """Per position bin of `docs` [D, T] (or a `SpeechBatch` of D windows): teacher and student mean NLL and
    perplexity (text tokens only), and the paired per-document difference student - teacher with its 95% bootstrap
    CI (each document its own cluster)."""
    speech = isinstance(docs, SpeechBatch)
    ids = docs.tokens[:, 0] if speech else docs

    def nll(teacher: bool) -> torch.Tensor:
        return torch.cat([token_nll(model, ids[i:i + batch_size], teacher,
                                    (docs.mels, docs.tokens[i:i + batch_size, 2]) if speech else None)
                          for i in range(0, len(ids), batch_size)])

    teacher, student = nll(True), nll(False)
    T = teacher.shape[1]
    edges = np.linspace(0, T, bins + 1).astype(int)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        t = teacher[:, lo:hi].nanmean(1).double().numpy()
        s = student[:, lo:hi].nanmean(1).double().numpy()
        diff = cluster_bootstrap(paired_differences(s, t), list(range(len(t))))
        rows.append({"positions": [int(lo) + 1, int(hi)], "teacher_nll": float(t.mean()),
                     "student_nll": float(s.mean()), "teacher_ppl": math.exp(float(t.mean())),
                     "student_ppl": math.exp(float(s.mean())), "student_minus_teacher": _estimate(diff)})
    return rows


def recall_conversations(vocab_size: int, turns: int, n: int, *, turn_len: int = 32, seed: int = 0,
                         key_len: int = 2, value_len: int = 3) -> tuple[torch.Tensor, slice]:
    """`n` conversations [n, T] and the slice of their answer tokens: turn 1 states `A key B value`, then `turns`
    filler turns (walks of the training chain), then the question `A key B` and the answer `value`. Token 1 is A,
    token 2 is B; keys, values and fillers are drawn from the rest."""
    g = torch.Generator().manual_seed(seed)
    chain = SyntheticTokens(batch_size=n, seq_len=turn_len, vocab_size=vocab_size, seed=seed, rank=0, stream=7)
    key = torch.randint(3, vocab_size, (n, key_len), generator=g)
    value = torch.randint(3, vocab_size, (n, value_len), generator=g)
    a, b = torch.full((n, 1), 1), torch.full((n, 1), 2)
    parts = [a, key, b, value, next(chain)[:, 0]]
    parts += [next(chain)[:, 0] for _ in range(turns)]
    parts += [a, key, b, value]
    ids = torch.cat(parts, dim=1)
    return ids, slice(ids.shape[1] - value_len, ids.shape[1])


def recall(model, turns: list[int], n: int = 16, seed: int = 0, turn_len: int = 32) -> list[dict[str, Any]]:
    """Answer-token NLL, teacher vs student, after each number of filler `turns` (the same conversations for both,
    paired per conversation, Student-t CI over the `n` conversations)."""
    rows = []
    for k in turns:
        ids, answer = recall_conversations(model.config.vocab_size, k, n, turn_len=turn_len, seed=seed)
        # NLL of token t sits at index t - 1
        cols = slice(answer.start - 1, answer.stop - 1)
        t = token_nll(model, ids, True)[:, cols].mean(1).double().numpy()
        s = token_nll(model, ids, False)[:, cols].mean(1).double().numpy()
        rows.append({"turns": k, "tokens": ids.shape[1], "teacher_answer_nll": float(t.mean()),
                     "student_answer_nll": float(s.mean()),
                     "student_minus_teacher": _estimate(t_interval(paired_differences(s, t)))})
    return rows


def load_lora_student(model, cfg, path: Path, device: str) -> None:
    """The run's LoRA adapters on `model` (its base, with TTT), and the trained tensors of `path` (the export's
    `lora.safetensors`): exactly what trained, no more, no less."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a LoRA run's export holds its adapters there (exported before LoRA?)")
    from ttt_speech.train.llama import apply_run_lora

    apply_run_lora(model, cfg, trainable_names(model, cfg.llama.trainable))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = load_file(str(path), device=device)
    if set(state) != trained:
        missing, extra = sorted(trained - set(state)), sorted(set(state) - trained)
        raise ValueError(f"{path}: expected the run's trained tensors; missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)  # the rest is the base, as built: checked above


def evaluate_run(run_dir: str | Path, *, export: str | Path | None = None, tokens: int | None = None,
                 docs: int = 16, bins: int = 4, turns: Sequence[int] = (0, 2, 6), device: str = "cpu",
                 out: str | Path | None = None) -> dict[str, Any]:
    """Teacher vs student of a llama training run: perplexity by position on `docs` windows of `tokens` (default 4x
    the last stage's length) of the run's `llama.val_data` (else its `train_data`), and the recall test. The student
    is `export` (default `run_dir/export`); the teacher is the same model with TTT bypassed, its replaced attention
    rebuilt from the run's base (`model.checkpoint`, or the random init of its seed). Writes `out` (default
    `run_dir/eval_llama.json`)."""
    from ttt_speech.config import load_config
    from ttt_speech.train.config import TrainConfig
    from ttt_speech.train.llama import LORA_FILE
    from ttt_speech.train.llama_config import stage_seq_len

    run_dir = Path(run_dir)
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    if cfg.model.family != "llama":
        raise ValueError(f"{run_dir}: model.family is {cfg.model.family}, not llama")
    export = Path(export) if export is not None else run_dir / "export"
    weights = export / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no export (the run has not finished, or pass export=)")
    model = build_llama(cfg.model.lm_kwargs, cfg.model.checkpoint, cfg.ttt, seed=cfg.seed,
                        device=torch.device(device), dtype=torch.float32)
    if cfg.lora.enable:  # the student is the base + adapters + TTT; the teacher the base alone (adapters off)
        load_lora_student(model, cfg, export / LORA_FILE, device)
    else:
        model.load_state_dict(load_file(str(weights), device=device))  # every key: a misfit export raises
    tokens = tokens or 4 * stage_seq_len(cfg.stage_list()[-1], cfg)
    source = cfg.llama.val_data or cfg.llama.train_data
    tokenizer = None
    if cfg.llama.tokenizer:

        tokenizer = load_tokenizer(cfg.llama.tokenizer)
    loader = build_llama_loader(source, seq_len=tokens, batch_size=docs, vocab_size=model.config.vocab_size,
                                seed=cfg.seed, rank=0, world_size=1, tokenizer=tokenizer, shuffle=False, stream=2,
                                speech=speech_frontend(model))
    batch = next(loader).to(device)
    ids = batch if isinstance(batch, SpeechBatch) else batch[:, 0]
    result = {"run_dir": str(run_dir), "export": str(export), "data": source, "device": device,
              "perplexity_by_position": {"tokens": tokens, "bins": perplexity_by_position(model, ids, bins)},
              "recall": recall(model, turns=list(turns), n=docs, seed=cfg.seed)}
    out = Path(out) if out is not None else run_dir / "eval_llama.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result
