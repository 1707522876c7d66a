"""The fine-tuning config. Keys follow moshi-finetune's where they mean the same (`run_dir`, `duration_sec`,
`batch_size`, `max_steps`, `first_codebook_weight_multiplier`, `text_padding_weight`, `gradient_checkpointing`,
`optim.{lr, weight_decay, pct_start}`, `lora.{enable, rank, scaling}`, `data.{train_data, shuffle}`, `seed`,
`log_freq`, `ckpt_freq`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ttt_speech.config import ConfigError


@dataclass
class ModelConfig:
    """Args:
        lm_kwargs: "tiny" (the embedded tiny Moshi), "moshi-7b" (moshi's own `_lm_kwargs`), a path to a JSON file
            of LMModel arguments, or a mapping.
        checkpoint: safetensors to start from: a base moshi checkpoint (TTT keys missing, then initialised, W_down
            from `linear_out`) or one of ours. None: random init from `seed` (tiny runs only).
        dtype: parameter dtype. On GPU, training also runs under bf16 autocast; fast weights stay float32.
    """

    lm_kwargs: Any = "tiny"
    checkpoint: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataConfig:
    """Args:
        train_data: a jsonl manifest (`{"path", "duration"}` per line, alignment json beside each wav), or
            "synthetic" (random codes, for plumbing tests only).
        shuffle: shuffle files every epoch (deterministic from `seed`).
        tokenizer: SentencePiece model for the text stream.
        mimi: Mimi weights (a local path) or "tiny-random".
        codes_dir: pre-encoded code shards of `train_data` (see `ttt-speech encode`); None encodes on the fly.
    """

    train_data: str = "synthetic"
    shuffle: bool = True
    tokenizer: str | None = None
    mimi: str = "tiny-random"
    codes_dir: str | None = None


@dataclass
class OptimConfig:
    """AdamW with a OneCycle schedule per stage. `ttt_lr` is the lr of the TTT parameters (None: `lr`)."""

    lr: float = 3e-4
    ttt_lr: float | None = None
    weight_decay: float = 0.1
    pct_start: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_norm: float = 1.0


@dataclass
class LoraConfig:
    """LoRA (peft) on the base model's linears; the TTT parameters, and W_down of In-Place layers, stay fully
    trained."""

    enable: bool = False
    rank: int = 16
    scaling: float = 2.0


@dataclass
class StageConfig:
    """One curriculum stage: `steps` steps on crops of `duration_sec`, one OneCycle per stage. `lr` (None:
    optim.lr) is the base group's peak; the TTT group's peak scales by the same factor (lr / optim.lr)."""

    duration_sec: float
    steps: int
    lr: float | None = None


@dataclass
class TrainConfig:
    run_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    duration_sec: float = 10.0
    batch_size: int = 1
    max_steps: int = 100
    stages: list[StageConfig] = field(default_factory=list)
    first_codebook_weight_multiplier: float = 100.0
    text_padding_weight: float = 0.5
    gradient_checkpointing: bool = False
    autocast: Literal["auto", "bf16", "none"] = "auto"
    parallel: str = "fsdp2"
    seed: int = 0
    log_freq: int = 10
    monitor_freq: int = 10
    ckpt_freq: int = 100
    keep_checkpoints: int = 2
    stop_after: int | None = None
    export_safetensors: bool = True

    def __post_init__(self) -> None:
        if self.parallel not in ("fsdp2", "none"):
            raise ConfigError(f"parallel: {self.parallel!r} is not supported; use 'fsdp2' (sharded, any number of "
                              "processes) or 'none' (one process). DeepSpeed/DDP are not offered: FSDP2 with DCP "
                              "checkpoints is the one tested path.")
        for name in ("batch_size", "max_steps", "log_freq", "monitor_freq", "ckpt_freq", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(s.steps < 1 or s.duration_sec <= 0 for s in self.stages):
            raise ConfigError("every stage needs steps >= 1 and duration_sec > 0")

    def stage_list(self) -> list[StageConfig]:
        """The curriculum; without `stages`, one stage of `max_steps` at `duration_sec`."""
        return self.stages or [StageConfig(self.duration_sec, self.max_steps, None)]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stage_list())
