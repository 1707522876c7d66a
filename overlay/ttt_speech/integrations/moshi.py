"""Moshi: building models, installing TTT into them, saving and loading TTT checkpoints.

The only module (with its siblings in `integrations/`) that imports moshi. The patch series in
`patches/moshi/` opens the doors that the TTT code here uses:

- `StreamingTransformerLayer.layer_idx`: each layer of a `StreamingTransformer` knows its index;
- `StreamingTransformerLayer.ttt_block`: a module slot between self-attention and the FFN (`None`);
- `token_embeddings`: `LMModel.forward_text` threads the text-token embeddings to the FFN gating of
  every main-transformer layer whose gating sets `takes_token_embeddings = True`;
- `input_embeddings` (0005): likewise the full per-frame input embedding (text plus every audio codebook).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer
from torch import nn

from ttt_speech.errors import CheckpointMismatch
from ttt_speech.integrations.moshi_block import (
    DEFAULT_BLOCK_NUM_HEADS,
    DEFAULT_BLOCK_OPTIONS,
    OWN_BLOCK_FIELDS,
    MoshiTTTBlock,
    check_block_options,
)
from ttt_speech.integrations.moshi_inplace import InPlaceTTTConfig, InPlaceTTTGating
from ttt_speech.nn import TTTConfig

# Moshi 7B's LM architecture (moshi.models.loaders._lm_kwargs), scaled down to run in milliseconds on a CPU.
# Everything structural is kept: 8+8 audio codebooks plus text, acoustic delays, SiLU gating, RMSNorm,
# RoPE, a depformer with weights per step.
TINY_LM_KWARGS: dict[str, Any] = {
    "dim": 64,
    "text_card": 96,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 48,
    "num_heads": 4,
    "num_layers": 4,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 32,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_dim_feedforward": int(4.125 * 32),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


class PatchMissingError(RuntimeError):
    """The installed moshi lacks a hook of our series: `make apply-patches` was not run in this environment."""


def tiny_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """A copy of `TINY_LM_KWARGS` with `overrides` applied; unknown keys are refused."""
    unknown = set(overrides) - set(TINY_LM_KWARGS) - set(inspect.signature(LMModel.__init__).parameters)
    if unknown:
        raise ValueError(f"not LMModel arguments: {sorted(unknown)}")
    kwargs = copy.deepcopy(TINY_LM_KWARGS)
    kwargs.update(overrides)
    return kwargs


def build_lm(lm_kwargs: dict[str, Any] | None = None, *, seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LMModel:
    """A randomly initialised `LMModel` (tiny by default), built deterministically from `seed`."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LMModel(**(lm_kwargs or TINY_LM_KWARGS), device=device, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def check_patched() -> None:
    """Raise `PatchMissingError` naming the missing hook if the imported moshi is not our patched checkout."""
    import moshi

    layer_params = inspect.signature(StreamingTransformerLayer.forward).parameters
    forward_text_src = inspect.getsource(LMModel.forward_text)
    init_src = inspect.getsource(StreamingTransformer.__init__)
    missing = []
    if "layer_idx" not in init_src:
        missing.append("0001 layer index (StreamingTransformer sets layer.layer_idx)")
    if "token_embeddings" not in layer_params or "token_embeddings=" not in forward_text_src:
        missing.append("0002 token_embeddings (LMModel.forward_text -> layer -> gating)")
    if "input_embeddings" not in layer_params or "input_embeddings=" not in forward_text_src:
        missing.append("0005 input_embeddings (LMModel.forward_text -> layer -> gating)")
    if "ttt_block" not in inspect.getsource(StreamingTransformerLayer.__init__):
        missing.append("0003 ttt_block slot (StreamingTransformerLayer.ttt_block)")
    if StreamingModule.__bases__[0] is not nn.Module:
        missing.append("0004 compat (StreamingModule lists nn.Module first, for FSDP2)")
    if missing:
        raise PatchMissingError(
            f"moshi imported from {moshi.__file__} lacks our hooks: {'; '.join(missing)}. "
            "Run `make apply-patches` (it installs upstream/moshi editable into .venv).")


def make_lm_gen(model: LMModel, **kwargs: Any) -> LMGen:
    """An `LMGen` for streaming generation; `model` is switched to eval mode first, as LMGen requires."""
    model.eval()
    return LMGen(model, **kwargs)


TTT_CONFIG_FILE = "ttt_config.json"
LM_CONFIG_FILE = "lm_config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_FILE = "ttt_training.json"  # what the training saw: the longest crop, in frames and chunk updates
FROM_CHECKPOINT = "from_checkpoint"  # `ttt: from_checkpoint`: take the TTT config of the checkpoint


def _config_key(match: re.Match) -> str:
    """`TTTConfig.<field>` in a message as the `ttt:` section spells it (`ttt.ttt_layer_type`, `ttt.ttt_options.x`)."""
    own = OWN_BLOCK_FIELDS.get(match[1])
    return f"ttt.{own}" if own and own.startswith("ttt_") else f"ttt.ttt_options.{match[1]}"


@dataclasses.dataclass
class MoshiTTTConfig(InPlaceTTTConfig):
    """Which TTT goes where in a Moshi `LMModel`. The In-Place knobs are `InPlaceTTTConfig`'s fields, inherited.

    Args:
        kind: "inplace" (In-Place TTT: W_down of the FFN gating becomes a fast weight) or "block" (a gated
            TTT-Linear/MLP block between attention and FFN).
        layers: main-transformer layer indices; None means every `every`-th layer from 0 (Moshi 7B: 0, 6, ..., 30).
        every: the stride used when `layers` is None.
        chunk_size, lr, conv, conv_kernel, target, clip_tau, target_init_std, decay, max_delta, centre_update:
            In-Place TTT, inherited from `InPlaceTTTConfig` (`conv_kernel` None stays None here; `inplace_config`
            resolves it).
        ttt_layer_type, ttt_num_heads, ttt_mini_batch_size, ttt_base_lr, ttt_use_gate, ttt_share_qk: the block's
            TTT-Linear/MLP (see `ttt_speech.nn.TTTConfig`); `ttt_num_heads` None means the model's head count.
            The defaults (one head, `ttt_share_qk`) and `ttt_options`' default are the recall preset
            (`TTTConfig.recall`), the block ablation's winner (docs/eval.md, "TTT-Linear/MLP block ablation").
        ttt_options: any other `TTTConfig` field of the block's TTT layer, by its `TTTConfig` name; default
            `{"qk_norm": "l2", "use_rope": false, "eta_schedule": "sum", "centre": true}`. A mapping given replaces
            the default as a whole: `{}` with `ttt_share_qk: false` is ttt-lm-pytorch's layer (docs/ttt.md, "Options").
        gate_init: the block's tanh gate alpha at init.
        ttt_context: attention context (frames) of the layers that host a block; None keeps the model's.
    """

    kind: str = "inplace"
    layers: list[int] | None = None
    every: int = 6
    ttt_layer_type: str = "linear"
    ttt_num_heads: int | None = DEFAULT_BLOCK_NUM_HEADS
    ttt_mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    ttt_use_gate: bool = False
    ttt_share_qk: bool = True
    ttt_options: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_BLOCK_OPTIONS))
    gate_init: float = 0.1
    ttt_context: int | None = None

    def __post_init__(self) -> None:  # not InPlaceTTTConfig's: it fills conv_kernel in, and configs keep None
        if self.kind not in ("inplace", "block"):
            raise ValueError(f"ttt.kind must be 'inplace' or 'block', got {self.kind!r}")
        if self.every < 1:
            raise ValueError(f"ttt.every must be >= 1, got {self.every}")
        self.inplace_config()  # validates its fields
        check_block_options(self.ttt_options, share_qk=self.ttt_share_qk)
        if self.ttt_num_heads is not None and (isinstance(self.ttt_num_heads, bool) or self.ttt_num_heads < 1):
            raise ValueError(f"ttt.ttt_num_heads must be >= 1 or None (the model's head count), got "
                             f"{self.ttt_num_heads}")
        heads = self.ttt_num_heads or 1
        try:  # the block's own fields, checked now with stand-in dimensions (the model's come at build time)
            self.block_config(dim=64 * heads, num_heads=heads)
        except ValueError as e:
            raise ValueError(re.sub(r"TTTConfig\.(\w+)", _config_key, str(e))) from e

    def inplace_config(self) -> InPlaceTTTConfig:
        return InPlaceTTTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(InPlaceTTTConfig)})

    def block_config(self, dim: int, num_heads: int) -> TTTConfig:
        return TTTConfig(hidden_size=dim, num_heads=self.ttt_num_heads or num_heads, layer_type=self.ttt_layer_type,
                         mini_batch_size=self.ttt_mini_batch_size, ttt_base_lr=self.ttt_base_lr,
                         use_gate=self.ttt_use_gate, share_qk=self.ttt_share_qk, **self.ttt_options)

    def layer_indices(self, num_layers: int) -> list[int]:
        layers = list(range(0, num_layers, self.every)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"ttt.layers must be distinct indices in [0, {num_layers}), got {layers}")
        return sorted(layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ttt config") -> MoshiTTTConfig:
        """`data` checked by the one config checker (`ttt_speech.config.from_dict`, as the training config's `ttt:`):
        unknown keys, wrong types and YAML's string numbers, each named `ttt.<key>`; a `ConfigError`."""
        from ttt_speech.config import from_dict

        return from_dict(cls, data, where=where, prefix="ttt.")


def ttt_modules(model: LMModel) -> dict[int, nn.Module]:
    """The TTT modules installed in `model`, by layer index."""
    found: dict[int, nn.Module] = {}
    for layer in model.transformer.layers:
        if isinstance(layer.gating, InPlaceTTTGating):
            found[layer.layer_idx] = layer.gating
        elif isinstance(layer.ttt_block, MoshiTTTBlock):
            found[layer.layer_idx] = layer.ttt_block
    return found


def apply_ttt(model: LMModel, config: MoshiTTTConfig) -> LMModel:
    """Install TTT into `model` in place, keeping every existing parameter (and its loaded value).

    New parameters are initialised explicitly (In-Place: conv zero, W_target diagonal), so the model computes what
    it computed before up to the TTT update itself. Works on a model on the meta device too (the new parameters
    are then meta as well, to be loaded or initialised by `load_ttt_lm`).
    """
    check_patched()
    if ttt_modules(model):
        raise ValueError(f"model already has TTT in layers {sorted(ttt_modules(model))}")
    layers = config.layer_indices(len(model.transformer.layers))
    for idx in layers:
        layer = model.transformer.layers[idx]
        if config.kind == "inplace":
            layer.gating = InPlaceTTTGating.from_gating(layer.gating, config.inplace_config(), layer_idx=idx)
            continue
        ref = next(layer.parameters())
        norm = _norm_type(layer.norm2)
        layer.ttt_block = MoshiTTTBlock(model.dim, config.block_config(model.dim, layer.self_attn.num_heads),
                                        norm=norm, gate_init=config.gate_init, layer_idx=idx, device=ref.device,
                                        dtype=ref.dtype)
        if config.ttt_context is not None:
            layer.self_attn.context = config.ttt_context
    for module in model.modules():  # moshi caches each module's streaming children on first use
        if isinstance(module, StreamingModule):
            module._cached_children = None
    model.ttt_config = config
    return model


def _norm_type(norm: nn.Module) -> str:
    """The moshi norm type name that builds a module like `norm` (for the block's own pre-norm)."""
    from moshi.modules.transformer import LayerNormF32, RMSNorm

    if isinstance(norm, RMSNorm):
        return "rms_norm_f32" if norm.alpha.dtype == torch.float32 and norm.eps == 1e-8 else "rms_norm"
    if isinstance(norm, LayerNormF32):
        return "layer_norm_f32"
    return "layer_norm"


def ttt_parameter_names(model: LMModel) -> set[str]:
    """State-dict keys of the parameters TTT added (not the base weights it reuses, like linear_out)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, InPlaceTTTGating):
            names.update(f"{name}.{n}" for n, _ in module.named_parameters()
                         if not n.startswith(("linear_in.", "linear_out.")))
        elif isinstance(module, MoshiTTTBlock):
            names.update(f"{name}.{n}" for n in module.state_dict())
    return names


def save_ttt_checkpoint(model: LMModel, directory: str | Path, lm_kwargs: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors`, `ttt_config.json` and (if given) `lm_config.json` into `directory`."""
    from safetensors.torch import save_file

    config = getattr(model, "ttt_config", None)
    if config is None:
        raise ValueError("model has no ttt_config: build it with apply_ttt or load_ttt_lm")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / TTT_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if lm_kwargs is not None:
        (directory / LM_CONFIG_FILE).write_text(json.dumps(lm_kwargs, indent=2) + "\n")
    return directory


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def checkpoint_ttt_config(path: str | Path, required: bool = False) -> MoshiTTTConfig | None:
    """The `ttt_config.json` beside a checkpoint (a folder, or a file in it); None if there is none (an error with
    `required`)."""
    file = _checkpoint_dir(path) / TTT_CONFIG_FILE
    if not file.is_file():
        if required:
            raise FileNotFoundError(f"{file}: no TTT config beside the checkpoint {path}")
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return MoshiTTTConfig.from_dict(data, where=str(file))


# Fields that choose how the same function is computed (the rounding of a bf16 product), not what the checkpoint's
# fast weights compute: a config may set them differently from the checkpoint it continues or evaluates.
HANDOFF_FREE = frozenset({"split_product"})


def check_ttt_handoff(config: MoshiTTTConfig, path: str | Path) -> None:
    """Stage hand-off: `config` must equal the `ttt_config.json` beside checkpoint `path` (when there is one); any
    difference is a `CheckpointMismatch` (a ValueError) naming the differing keys and both values. A config that
    means to take the checkpoint's says `ttt: from_checkpoint` instead. The `HANDOFF_FREE` fields may differ."""
    saved = checkpoint_ttt_config(path)
    if saved is None:
        return
    mine, theirs = config.to_dict(), saved.to_dict()
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in HANDOFF_FREE)
    if diff:
        detail = "; ".join(f"{k}: config {mine.get(k)!r}, checkpoint {theirs.get(k)!r}" for k in diff)
        raise CheckpointMismatch(f"{_checkpoint_dir(path) / TTT_CONFIG_FILE}: the checkpoint's TTT config differs "
                                 f"from the given one in {', '.join(diff)} ({detail}). Restate the checkpoint's "
                                 f"values, or use `ttt: {FROM_CHECKPOINT}` to take them as they are")


def training_record(path: str | Path | None) -> dict[str, Any] | None:
    """The `ttt_training.json` beside a checkpoint (written by the trainer's export), or None."""
    if not path:
        return None
    file = _checkpoint_dir(path) / TRAINING_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def write_training_record(directory: str | Path, config: MoshiTTTConfig, max_frames: int,
                          previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record in `directory` the longest sequence training saw (frames, and the In-Place chunk updates whose result
    reached the loss, (frames - 1) // chunk_size), kept at least at a `previous` stage's record."""
    if previous:
        max_frames = max(max_frames, int(previous.get("max_frames", 0)))
    record = {"max_frames": max_frames, "chunk_size": config.chunk_size,
              "trained_chunks": (max_frames - 1) // config.chunk_size}
    Path(directory, TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def set_trained_chunks(model: LMModel, trained_chunks: int | None) -> None:
    """Arm the warning of an inference stream that runs past the chunk updates seen in training; one In-Place layer
    (the first) carries it, so a stream warns once."""
    inplace = [m for _, m in sorted(ttt_modules(model).items()) if isinstance(m, InPlaceTTTGating)]
    for i, m in enumerate(inplace):
        m.trained_chunks = trained_chunks if i == 0 else None


def load_ttt_lm(weights: str | Path, config: MoshiTTTConfig | None = None, lm_kwargs: dict[str, Any] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LMModel:
    """A TTT Moshi from a safetensors checkpoint: ours (with TTT keys) or a base moshi one (without).

    The model is built on the meta device through moshi's `get_moshi_lm`, TTT is installed, and the checkpoint is
    loaded with `assign=True`. A base checkpoint may lack exactly the new TTT keys, which are then initialised
    (W0 = the loaded `linear_out`); any other missing or unexpected key is an error that lists them.

    Args:
        weights: a `.safetensors` file, or a directory holding `model.safetensors`, `ttt_config.json` and
            optionally `lm_config.json` and `ttt_training.json`.
        config: the TTT config; default: `ttt_config.json` beside the weights. When both exist they must be equal
            (`check_ttt_handoff`): a TTT checkpoint is never silently loaded with another TTT setting.
        lm_kwargs: LMModel arguments; default: `lm_config.json` beside the weights, else moshi 7B's.
    """
    from moshi.models.loaders import get_moshi_lm
    from safetensors.torch import load_file

    weights = Path(weights)
    directory = weights if weights.is_dir() else weights.parent
    if weights.is_dir():
        weights = weights / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    if config is None:
        if not (directory / TTT_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no TTT config given and none beside the weights ({directory / TTT_CONFIG_FILE})")
        config = checkpoint_ttt_config(directory, required=True)
    else:
        check_ttt_handoff(config, directory)
    if lm_kwargs is None and (directory / LM_CONFIG_FILE).is_file():
        lm_kwargs = json.loads((directory / LM_CONFIG_FILE).read_text())
    model = get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=dtype)
    apply_ttt(model, config)

    state = load_file(str(weights), device=str(device))
    for key, value in state.items():
        if value.dtype.is_floating_point:
            keep_fp32 = key.startswith(("condition_provider.", "fuser."))  # as moshi's loader does
            state[key] = value.float() if keep_fp32 else value.to(dtype)
    expected = set(model.state_dict())
    ttt_keys = ttt_parameter_names(model)
    missing, unexpected = expected - set(state), set(state) - expected
    if unexpected or missing - ttt_keys:
        raise CheckpointMismatch(f"{weights}: does not fit the TTT model ({config.kind}, layers "
                                 f"{config.layer_indices(len(model.transformer.layers))}): missing keys "
                                 f"{sorted(missing - ttt_keys)}, unexpected keys {sorted(unexpected)}")
    if missing:
        # a base checkpoint: materialise and initialise exactly the new TTT parameters
        for module in ttt_modules(model).values():
            module.materialize(device)
        state.update({k: v for k, v in model.state_dict().items() if k in missing})
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # torch names the keys and shapes; name the file and the model too
        raise CheckpointMismatch(f"{weights}: does not fit the model built from its lm_kwargs and TTT config: "
                                 f"{' '.join(str(e).split())}") from e
    record = training_record(directory)
    set_trained_chunks(model, record["trained_chunks"] if record and record.get("chunk_size") == config.chunk_size
                       else None)
    return model


def load_any_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                lm_kwargs: dict[str, Any] | None = None,
                ttt: MoshiTTTConfig | dict[str, Any] | str | None = None) -> LMModel:
    """A model for evaluation: a folder or file with `ttt_config.json` beside it loads with `load_ttt_lm`; otherwise
    moshi's own `get_moshi_lm` (strict) with `lm_config.json` beside the weights, or `lm_kwargs`, or moshi 7B's.

    `ttt`: the TTT config the caller expects (a `MoshiTTTConfig` or its dict). With a `ttt_config.json` beside the
    weights, any difference is an error naming the keys (the stage hand-off check); without one, the base
    checkpoint gets this TTT installed. None or "from_checkpoint": whatever the checkpoint carries."""
    from moshi.models.loaders import get_moshi_lm

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if isinstance(ttt, str) and ttt != FROM_CHECKPOINT:
        raise ValueError(f"ttt must be a TTT config, None or {FROM_CHECKPOINT!r}, got {ttt!r}")
    config = MoshiTTTConfig.from_dict(ttt, where="ttt") if isinstance(ttt, dict) else ttt
    if config == FROM_CHECKPOINT:
        config = None
    if (directory / TTT_CONFIG_FILE).is_file() or config is not None:
        return load_ttt_lm(weights, config, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    if lm_kwargs is None and (directory / LM_CONFIG_FILE).is_file():
        lm_kwargs = json.loads((directory / LM_CONFIG_FILE).read_text())
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    return get_moshi_lm(str(weights), lm_kwargs=lm_kwargs, device=device, dtype=dtype)
