"""The fine-tuning config. Keys follow moshi-finetune's where they mean the same (`run_dir`, `duration_sec`,
`batch_size`, `max_steps`, `first_codebook_weight_multiplier`, `text_padding_weight`, `gradient_checkpointing`,
`optim.{lr, weight_decay, pct_start}`, `lora.{enable, rank, scaling, ft_embed}`, `data.{train_data, shuffle,
eval_data}`, `seed`, `num_microbatches`, `log_freq`, `ckpt_freq`, `do_eval`, `eval_freq`, `do_ckpt`, `save_adapters`,
`wandb`); its other keys are moved, resolved or refused by `ttt_speech.train.moshi_finetune`."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ttt_speech.config import ConfigError, check_value
from ttt_speech.constants import FRAME_RATE
from ttt_speech.train.llama_config import LlamaTrainConfig, check_llama_family
from ttt_speech.train.moshi_finetune import MoshiPathsConfig, WandbConfig, fold_moshi_finetune

if TYPE_CHECKING:
    from ttt_speech.integrations.llama_ttt_section import LlamaTTTSection
    from ttt_speech.integrations.moshi import MoshiTTTConfig

    TTTSection = MoshiTTTConfig | LlamaTTTSection
else:
    TTTSection = Any  # the family's class: `ttt_schema`, which imports only that family's integration

# max_steps when neither it nor `stages` is given
DEFAULT_MAX_STEPS = 100
# `model.lm_kwargs` names, by model.family (otherwise: a mapping or a JSON file)
LM_KWARGS_NAMES = {"moshi": ("tiny", "moshi-7b"), "llama": ("tiny",)}


@dataclass
class ModelConfig:
    """Args:
        family: "moshi" (moshi's LMModel, the default) or "llama" (transformers' LlamaForCausalLM, or LLaMA-Omni's
            patched OmniSpeechLlamaForCausalLM when `lm_kwargs` / the checkpoint's config names it; the `llama:`
            section and docs/llama_omni.md, "Training").
        lm_kwargs: "tiny" (the embedded tiny Moshi), "moshi-7b" (moshi's own `_lm_kwargs`), a path to a JSON file
            of LMModel arguments, or a mapping.
        checkpoint: safetensors to start from: a base moshi checkpoint (TTT keys missing, then initialised, W_down
            from `linear_out`) or one of ours. None: random init from `seed` (tiny runs only).
        dtype: parameter dtype: float32, the master weights (on GPU the compute runs in bf16 under autocast; fast
            weights stay float32). "bfloat16" only with `optim.bf16_params: true`.
        context: attention context (frames) of the main transformer, for training and, through the export's
            `lm_config.json`, inference. None keeps `lm_kwargs`' (Moshi 7B: 3000). A window shorter than the crops
            is what makes TTT carry information past it (the paper's SWA + TTT setting).
    """

    family: Literal["moshi", "llama"] = "moshi"
    lm_kwargs: str | dict[str, Any] = "tiny"
    checkpoint: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    context: int | None = None

    def __post_init__(self) -> None:
        if self.context is not None and self.context < 1:
            raise ConfigError(f"model.context must be >= 1 frame or None, got {self.context}")


@dataclass
class DataConfig:
    """Args:
        train_data: a jsonl manifest (`{"path", "duration"}` per line, alignment json beside each wav), or
            "synthetic" (random codes, for plumbing tests only).
        shuffle: shuffle files every epoch (deterministic from `seed`).
        tokenizer: SentencePiece model for the text stream.
        mimi: Mimi weights (a local path) or "tiny-random".
        codes_dir: pre-encoded code shards of `train_data` (`ttt-speech data encode`); None encodes on the fly.
        eval_data: a jsonl manifest evaluated every `eval_freq` steps when `do_eval` (its crops in order, from
            their start), or "synthetic" (with synthetic training data); "" none.
    """

    train_data: str = "synthetic"
    shuffle: bool = True
    tokenizer: str | None = None
    mimi: str = "tiny-random"
    codes_dir: str | None = None
    eval_data: str = ""

    def __post_init__(self) -> None:
        if not self.train_data:
            raise ConfigError('data.train_data must name a jsonl manifest, or be "synthetic"')
        if self.eval_data == "synthetic" and self.train_data != "synthetic":
            raise ConfigError(f"data.eval_data: synthetic with data.train_data={self.train_data!r}: evaluate on a "
                              "held-out manifest of the same kind")
        if self.train_data == "synthetic" and self.codes_dir is not None:
            raise ConfigError(f"data.codes_dir={self.codes_dir!r} with data.train_data=synthetic: synthetic codes "
                              "are generated, never read; drop codes_dir or name the manifest it was encoded from")


@dataclass
class OptimConfig:
    """AdamW with a OneCycle schedule per stage. `ttt_lr` is the lr of the TTT parameters (None: `lr`).
    `w_down_lr`: the group of In-Place W_down (the pretrained weight that is also W0): "base" (`lr`, as in a
    base-model run, so base vs TTT compare cleanly) or "ttt" (`ttt_lr`). `bf16_params`: allow `model.dtype:
    bfloat16` (parameters and optimizer state without an fp32 master copy)."""

    lr: float = 3e-4
    ttt_lr: float | None = None
    weight_decay: float = 0.1
    pct_start: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_norm: float = 1.0
    w_down_lr: Literal["base", "ttt"] = "base"
    bf16_params: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "ttt_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{name} must be a finite number >= 0, got {value}")
        if self.lr == 0 and not self.ttt_lr:
            raise ConfigError("optim.lr = 0 and optim.ttt_lr unset or 0: no parameter would train")
        if not 0 <= self.pct_start <= 1:
            raise ConfigError(f"optim.pct_start is the warm-up's fraction of a stage, in [0, 1], got {self.pct_start}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        for name in ("eps", "max_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"optim.{name} must be a finite number > 0, got {value}")


@dataclass
class LoraConfig:
    """LoRA (peft) on the base model's linears; the TTT parameters, and W_down of In-Place layers, stay fully
    trained."""

    enable: bool = False
    rank: int = 16
    scaling: float = 2.0
    # moshi-finetune's: the text and audio embeddings train fully too (and go into the adapter export)
    ft_embed: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.scaling):
            raise ConfigError(f"lora.scaling must be finite, got {self.scaling}")


@dataclass
class StageConfig:
    """One curriculum stage: `steps` steps on crops of `duration_sec` (Moshi) or of `seq_len` tokens (llama; None:
    llama.seq_len), one OneCycle per stage. `lr` (None: optim.lr) is the base group's peak; the TTT group's peak
    scales by the same factor (lr / optim.lr)."""

    duration_sec: float | None = None
    steps: int = 0
    lr: float | None = None
    seq_len: int | None = None


@dataclass
class TrainConfig:
    run_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    # MoshiTTTConfig or "from_checkpoint" with model.family: moshi, LlamaTTTSection with llama (`ttt_schema`)
    ttt: TTTSection | Literal["from_checkpoint"] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    llama: LlamaTrainConfig = field(default_factory=LlamaTrainConfig)
    duration_sec: float = 10.0
    batch_size: int = 1
    # gradient accumulation: each optimizer step averages the gradients of this many batches of `batch_size`
    num_microbatches: int = 1
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS, or with `stages` the sum of their steps
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
    # a non-finite loss or gradient skips its step; this many in a row stop the run (last good checkpoint restored)
    max_nonfinite_steps: int = 5
    # keys that may differ from the checkpoint's config on resume (`ttt-speech finetune --allow-config-change`)
    allow_config_change: list[str] = field(default_factory=list)
    # evaluation on data.eval_data every eval_freq steps (0: at the last step only); the best goes to run_dir/best
    do_eval: bool = False
    eval_freq: int = 0
    eval_batches: int = 40  # per evaluation, split over the processes (moshi-finetune's 40)
    # do_ckpt: false saves no checkpoint except on a stop signal (SIGTERM/SIGUSR1), so a requeue still resumes
    do_ckpt: bool = True
    # with lora.enable, the export also holds lora.safetensors: the adapters and what trains fully, for moshi's
    # get_moshi_lm(lora_weights=...) (no TTT) or ttt_speech.train.adapters.load_adapters (docs/finetune.md)
    save_adapters: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # moshi-finetune's keys (train/moshi_finetune.py): resolved through moshi's CheckpointInfo when the run starts
    moshi_paths: MoshiPathsConfig = field(default_factory=MoshiPathsConfig)
    full_finetuning: bool | None = None  # when given: must be `not lora.enable`
    overwrite_run_dir: bool | None = None  # true refused: run_dir holds the checkpoints a resume needs
    # moshi-finetune's names of optim.max_norm, keep_checkpoints, model.dtype: moved there with a note
    max_norm: float | None = None
    num_ckpt_keep: int | None = None
    param_dtype: str | None = None

    # config.from_dict checks `ttt:` after the other keys, against the schema of the run's model.family
    __config_types__: ClassVar[dict[str, Callable[[dict[str, Any]], Any]]] = {
        "ttt": lambda checked: ttt_schema(checked.get("model", ModelConfig()).family)}

    def __post_init__(self) -> None:
        fold_moshi_finetune(self)
        if self.parallel not in ("fsdp2", "none"):
            raise ConfigError(f"parallel: {self.parallel!r} is not supported; use 'fsdp2' (sharded, any number of "
                              "processes) or 'none' (one process). DeepSpeed/DDP are not offered: FSDP2 with DCP "
                              "checkpoints is the one tested path.")
        if not self.run_dir.strip():
            raise ConfigError("run_dir is empty; name the folder that receives checkpoints, logs and the export")
        if self.data.train_data != "synthetic" and not self.data.tokenizer and not self.moshi_paths.active:
            raise ConfigError(f"data.tokenizer is required with data.train_data={self.data.train_data!r}: the "
                              "SentencePiece model of the text stream (or moshi_paths.tokenizer_path / hf_repo_id)")
        for name in ("ckpt_freq", "eval_freq"):  # 0: at the last step only (moshi-finetune's meaning)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: at the last step only), got {getattr(self, name)}")
        if self.eval_batches < 1:
            raise ConfigError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if self.do_eval and not self.data.eval_data:
            raise ConfigError("do_eval: true without data.eval_data; name the held-out manifest to evaluate on")
        for name in ("batch_size", "num_microbatches", "max_steps", "log_freq", "monitor_freq",
                     "keep_checkpoints", "stop_after", "max_nonfinite_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for name in ("first_codebook_weight_multiplier", "text_padding_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.model.family == "moshi" and self.llama != LlamaTrainConfig():
            raise ConfigError("llama: configures model.family: llama; this run is model.family: moshi")
        for i, stage in enumerate(self.stage_list()):
            where = f"stages[{i}]." if self.stages else ""
            if stage.steps < 1:
                raise ConfigError(f"{where}steps must be >= 1, got {stage.steps}")
            if self.model.family == "llama":
                pass  # seq_len: check_llama_family
            elif stage.duration_sec is None:
                raise ConfigError(f"{where}duration_sec is required with model.family: moshi")
            elif stage.seq_len is not None:
                raise ConfigError(f"{where}seq_len is for model.family: llama; Moshi crops are duration_sec long")
            elif not (math.isfinite(stage.duration_sec) and round(stage.duration_sec * FRAME_RATE) >= 1):
                raise ConfigError(f"{where}duration_sec must be at least one frame ({1 / FRAME_RATE} s), got "
                                  f"{stage.duration_sec}")
            if stage.lr is not None and not (math.isfinite(stage.lr) and stage.lr >= 0):
                raise ConfigError(f"{where}lr must be a finite number >= 0, got {stage.lr}")
            if stage.lr is not None and self.optim.lr == 0:
                raise ConfigError(f"{where}lr: a stage's lr scales both groups by lr / optim.lr, which is undefined "
                                  "with optim.lr = 0; set optim.lr to the base peak and the stage lr relative to it")
        if self.stages and self.max_steps is not None and self.max_steps != self.total_steps:
            raise ConfigError(f"max_steps={self.max_steps} with stages: the stages' steps ({self.total_steps} in all) "
                              "set the run's length; drop max_steps or change the stages")
        # typed by config.from_dict already; a TrainConfig built in code may pass the mapping
        self.ttt = check_value(self.ttt, ttt_schema(self.model.family), "ttt")
        if self.model.family == "llama":
            check_llama_family(self)  # the stages' seq_len against the TTT mini-batch, what llama runs lack
        elif self.ttt is not None and self.ttt != "from_checkpoint":
            check_ttt(self.ttt, [s.duration_sec for s in self.stage_list()])
        if self.model.dtype != "float32" and not self.optim.bf16_params:
            raise ConfigError(f"model.dtype: {self.model.dtype} trains bf16 parameters with no fp32 master copy, "
                              "where most AdamW updates at lr ~1e-5 round away. Use model.dtype: float32 (on GPU the "
                              "compute runs in bf16 under autocast), or set optim.bf16_params: true to accept it")

    def stage_list(self) -> list[StageConfig]:
        """The curriculum; without `stages`, one stage of `max_steps` at `duration_sec`."""
        steps = self.max_steps if self.max_steps is not None else DEFAULT_MAX_STEPS
        return self.stages or [StageConfig(self.duration_sec, steps, None)]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stage_list())


def ttt_schema(family: str) -> Any:
    """The type of `ttt:` with `model.family` `family`; imports only that family's integration (moshi or
    transformers)."""
    if family == "llama":
        from ttt_speech.integrations.llama_ttt_section import LlamaTTTSection

        return LlamaTTTSection | None
    from ttt_speech.integrations.moshi import MoshiTTTConfig

    return MoshiTTTConfig | Literal["from_checkpoint"] | None


def check_ttt(ttt: MoshiTTTConfig, durations: list[float]) -> None:
    """What `MoshiTTTConfig`'s own checks cannot see: an empty layer list, and a chunk longer than every crop."""
    if ttt.layers is not None and not ttt.layers:
        raise ConfigError("ttt.layers is empty: no layer would get TTT; set `ttt: null` to train without TTT")
    if not (math.isfinite(ttt.lr) and ttt.lr >= 0):
        raise ConfigError(f"ttt.lr must be a finite number >= 0, got {ttt.lr}")
    if ttt.kind == "inplace":
        frames = min(round(d * FRAME_RATE) for d in durations)
        if ttt.chunk_size > frames:
            warnings.warn(f"ttt.chunk_size={ttt.chunk_size} frames is longer than a crop of {frames} frames: "
                          "In-Place TTT updates its fast weights only after a complete chunk, so no update ever "
                          "happens in training", stacklevel=3)


def read_lm_kwargs_file(spec: str, family: str = "moshi") -> dict[str, Any]:
    """`model.lm_kwargs` naming a JSON file: the object it holds (LMModel / LlamaConfig arguments); a
    `ConfigError` naming the key when it is no file, does not parse, or is no object."""
    path = Path(str(spec))
    if not path.is_file():
        names = ", ".join(repr(n) for n in LM_KWARGS_NAMES[family])
        raise ConfigError(f"model.lm_kwargs: expected {names}, a mapping or a JSON file, got {spec!r}")
    try:
        kwargs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.lm_kwargs: {path}: not a readable JSON file of model arguments: {e}") from e
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.lm_kwargs: {path}: expected a JSON object of model arguments, got "
                          f"{type(kwargs).__name__}")
    return kwargs


def check_lm_kwargs(model: ModelConfig) -> None:
    """`model.lm_kwargs` as building the model reads it, without building or importing it: a name of the family
    (`LM_KWARGS_NAMES`), a mapping, or a JSON file that holds an object. Run by `--check` and `submit()`; not at
    load, where a saved config's file may be on another machine."""
    if not isinstance(model.lm_kwargs, dict) and model.lm_kwargs not in LM_KWARGS_NAMES[model.family]:
        read_lm_kwargs_file(model.lm_kwargs, model.family)
