"""The `llama:` section of the fine-tuning config (`model.family: llama`): objective, sequence length, data.

Kept apart from `train/config.py` so that the Moshi keys stay as they are; checked by the same strict loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ttt_speech.config import ConfigError


@dataclass
class LlamaTrainConfig:
    """Args:
        objective: "distill": the student (TTT layers) matches the teacher, the same weights with TTT bypassed
            (attention in every layer), by KL(teacher || student) on the logits, plus `hidden_mse_weight` times the
            MSE of the hidden states after each TTT layer. "finetune": next-token cross-entropy on the data.
        trainable: "ttt" (TTT parameters, residual gates and every norm; the default) or "all".
        seq_len: tokens per training sample (a stage's `seq_len` overrides it); a multiple of the TTT mini-batch.
        temperature: softmax temperature of both distributions in the KL (scaled back by temperature^2).
        hidden_mse_weight: weight of the hidden-state MSE at the TTT layers (0: KL only).
        train_data: "synthetic" (a fixed random Markov chain over the vocabulary, for plumbing and tests), a
            jsonl of token ids (`{"input_ids": [...]}` per line), or LLaMA-Omni's instruction JSON (a list of
            `{"id", "speech"?, "conversations": [{"from", "value"}, ...]}`; a sample's `speech` path(s) fill its
            `<speech>` placeholders, which needs LLaMA-Omni's model with its Whisper encoder, frozen; text-only
            samples train with any model).
        val_data: held-out data in the same formats; validation perplexity at each stage's end. None: none.
        tokenizer: SentencePiece `.model` file or a transformers tokenizer folder; needed for instruction JSON.
        val_batches: batches of `val_data` per validation.
        export_stages: export the student at the end of every curriculum stage but the last to
            `run_dir/stage_<i>` (the last stage's is `run_dir/export`).
        loss_chunk: compute lm_head and the losses this many positions at a time, recomputing each slice's logits
            in the backward (0: the whole sequence at once). The full logits are [T, vocab] per sequence for the
            student and the teacher (float32: 4 GiB each at 8k tokens for Llama-3's 128256 entries).
    """

    objective: Literal["distill", "finetune"] = "distill"
    trainable: Literal["ttt", "all"] = "ttt"
    seq_len: int = 256
    temperature: float = 1.0
    hidden_mse_weight: float = 0.0
    train_data: str = "synthetic"
    val_data: str | None = None
    tokenizer: str | None = None
    val_batches: int = 4
    loss_chunk: int = 0
    export_stages: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"llama.seq_len must be >= 2 tokens, got {self.seq_len}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"llama.temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.hidden_mse_weight) and self.hidden_mse_weight >= 0):
            raise ConfigError(f"llama.hidden_mse_weight must be a finite number >= 0, got {self.hidden_mse_weight}")
        if self.objective == "finetune" and self.hidden_mse_weight:
            raise ConfigError("llama.hidden_mse_weight is a distillation term; with llama.objective: finetune set it "
                              "to 0")
        if not self.train_data:
            raise ConfigError('llama.train_data must name a jsonl / instruction JSON file, or be "synthetic"')
        if self.loss_chunk < 0:
            raise ConfigError(f"llama.loss_chunk must be >= 0 positions (0: the whole sequence), got {self.loss_chunk}")
        if self.val_batches < 1:
            raise ConfigError(f"llama.val_batches must be >= 1, got {self.val_batches}")


def stage_seq_len(stage, cfg) -> int:
    """Tokens per sample in a curriculum stage of a llama run."""
    return stage.seq_len if stage.seq_len is not None else cfg.llama.seq_len


def check_llama_family(cfg) -> None:
    """What a `model.family: llama` run must not carry (Moshi's keys) and its stages' lengths: a whole number of TTT
    mini-batches, so every token of a sample is in a committed update when the next sample starts."""
    from ttt_speech.train.config import DataConfig, LoraConfig

    if cfg.data != DataConfig():
        raise ConfigError("data: configures Moshi's audio pipeline; with model.family: llama the data are "
                          "llama.train_data / llama.val_data / llama.tokenizer")
    if cfg.lora != LoraConfig() and not cfg.lora.enable:
        raise ConfigError("lora.rank / lora.scaling / lora.ft_embed are set but lora.enable is false")
    if cfg.lora.enable and cfg.llama.trainable == "all":
        raise ConfigError("lora.enable with llama.trainable: all: every weight would train fully anyway; use "
                          "llama.trainable: ttt (adapters on the base linears, the TTT parameters fully)")
    if cfg.lora.ft_embed and cfg.llama.objective == "distill":
        raise ConfigError("lora.ft_embed with llama.objective: distill: the embeddings feed the teacher too, so "
                          "training them moves it; use it with llama.objective: finetune")
    if cfg.model.context is not None:
        raise ConfigError("model.context is Moshi's attention window; with model.family: llama set the window in "
                          "the model's config (lm_kwargs)")
    if cfg.ttt is None and cfg.llama.objective == "distill":
        raise ConfigError("llama.objective: distill needs a ttt: section (without TTT the student is the teacher)")
    if cfg.ttt is None and cfg.llama.trainable == "ttt":
        raise ConfigError("llama.trainable: ttt with ttt: null trains nothing; use llama.trainable: all")
    mini = cfg.ttt.mini_batch_size if cfg.ttt is not None else 1  # a LlamaTTTSection
    for i, stage in enumerate(cfg.stage_list()):
        where = f"stages[{i}]." if cfg.stages else "llama."
        if stage.duration_sec is not None and cfg.stages:
            raise ConfigError(f"stages[{i}].duration_sec is Moshi's crop length; llama stages have seq_len (tokens)")
        n = stage_seq_len(stage, cfg)
        if n < 2:
            raise ConfigError(f"{where}seq_len must be >= 2 tokens, got {n}")
        if n % mini:
            raise ConfigError(f"{where}seq_len={n} is not a multiple of ttt.mini_batch_size={mini}: the last "
                              f"{n % mini} tokens would never update the fast weights; use {n - n % mini or mini}")
