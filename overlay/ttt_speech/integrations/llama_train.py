"""Training-side pieces of the Llama / LLaMA-Omni integration: build the model (tiny random, a config, or a
checkpoint; transformers' `LlamaForCausalLM` or LLaMA-Omni's patched `OmniSpeechLlamaForCausalLM`), install TTT
while keeping the teacher's attention, run the teacher (TTT bypassed), LLaMA-Omni's speech input (log-mel features
as its own dataset makes them, its frozen Whisper encoder and projector placed at the speech positions), export, and
load a tokenizer.

The teacher of distillation is the same model with TTT bypassed: in `gated_residual` mode the residual TTT branch is
skipped; in `replace` mode the original attention modules of the TTT layers, kept frozen outside the module tree
(so they are neither in the state dict nor sharded), stand in for the TTT layers. Memory does not double: only the
replaced layers' attention weights are kept twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_speech.integrations.llama_omni import (
    LlamaTTTForCausalLM,
    LlamaTTTModelConfig,
    LlamaTTTSelfAttention,
    apply_ttt,
    ttt_modules,
    ttt_parameter_names,
)
from ttt_speech.nn.stats import ttt_layer_stats

OMNI_TYPES = ("omni_speech_llama", "omni_speech2s_llama")
SPEECH_ENCODER_PREFIX = "model.speech_encoder."  # LLaMA-Omni's Whisper encoder: frozen; its checkpoints leave it out
TEACHER_ATTR = "_ttt_teacher_attention"
# a tiny random Llama for CPU tests and the quickstart; init 0.1 so the teacher's next-token distributions are far
# from uniform and distillation has something to match
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=65536, initializer_range=0.1, bos_token_id=None,
            eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)


def resolve_llama_kwargs(spec: Any) -> dict[str, Any]:
    """`model.lm_kwargs` of a llama run: "tiny", a mapping of config fields, or a config.json path."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec == "tiny":
        return dict(TINY)
    path = Path(str(spec))
    if not path.is_file():
        raise ValueError(f"model.lm_kwargs: expected 'tiny', a mapping of LlamaConfig fields or a config.json path, "
                         f"got {spec!r}")
    return json.loads(path.read_text())


def model_classes(model_type: str) -> tuple[type, type]:
    """(config class, model class) for a `model_type`: "llama", or LLaMA-Omni's (its patched source on the path)."""
    if model_type in (None, "llama"):
        return LlamaConfig, LlamaForCausalLM
    if model_type in OMNI_TYPES:
        try:
            if model_type == "omni_speech_llama":
                from omni_speech.model.language_model.omni_speech_llama import (
                    OmniSpeechConfig as Config,
                )
                from omni_speech.model.language_model.omni_speech_llama import (
                    OmniSpeechLlamaForCausalLM as Model,
                )
            else:
                from omni_speech.model.language_model.omni_speech2s_llama import (
                    OmniSpeech2SConfig as Config,
                )
                from omni_speech.model.language_model.omni_speech2s_llama import (
                    OmniSpeech2SLlamaForCausalLM as Model,
                )
        except ImportError as e:
            raise ValueError(f"model_type {model_type!r} needs LLaMA-Omni's patched source importable (make "
                             f"apply-patches with LLAMA_OMNI_SRC set, then PYTHONPATH=upstream/llama-omni): {e}") from e
        return Config, Model
    raise ValueError(f"model_type {model_type!r}: model.family: llama trains 'llama' or {list(OMNI_TYPES)}")


def build_llama(lm_kwargs: Any, checkpoint: str | None, ttt: Any, *, seed: int,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model (random from `seed`, or `checkpoint`: a transformers folder), then TTT from the `ttt:` section
    (a `LlamaTTTSection`, or a mapping of `LlamaTTTConfig` fields without the `ttt_` prefix; None: no TTT), with the
    replaced attention kept as the teacher's.

    A checkpoint is loaded as the base model (its config's `use_ttt` is turned off for the load): distillation starts
    from a pretrained Llama / LLaMA-Omni, the TTT layers from their init.
    """
    if checkpoint:
        config_file = Path(checkpoint) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model.checkpoint {checkpoint}: no config.json (expected a transformers folder)")
        raw = json.loads(config_file.read_text())
        if raw.get("use_ttt"):
            raise ValueError(f"model.checkpoint {checkpoint}: its config.json has use_ttt (a TTT export); training "
                             "starts from the base model, whose attention is the teacher: name the base checkpoint "
                             "(a later curriculum stage is a stage of the same run, or a resume of its run_dir)")
        config_cls, model_cls = model_classes(raw.get("model_type"))
        config = config_cls.from_pretrained(checkpoint)
        config.use_ttt = False
        model, info = model_cls.from_pretrained(checkpoint, config=config, torch_dtype=dtype,
                                                output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not k.startswith(SPEECH_ENCODER_PREFIX)]
        if missing:
            raise ValueError(f"model.checkpoint {checkpoint}: {len(missing)} tensors of the model are not in it, "
                             f"so they would train from a random init: {missing[:8]}")
        if speech_modules(model) and len(info["missing_keys"]) > len(missing):
            # LLaMA-Omni leaves Whisper out of its checkpoints and rebuilds it from `speech_encoder` after loading
            # (its builder.load_pretrained_model); transformers drew the absent tensors at random
            _reload_speech_encoder(model)
        model = model.to(device)
    else:
        kwargs = resolve_llama_kwargs(lm_kwargs)
        config_cls, model_cls = model_classes(kwargs.get("model_type"))
        config = config_cls(**{k: v for k, v in kwargs.items() if k != "model_type"})
        torch.manual_seed(seed)
        model = model_cls(config)
        if speech_modules(model):
            _reload_speech_encoder(model)
        model = model.to(device=device, dtype=dtype)
    if ttt is not None:
        originals = {i: layer.self_attn for i, layer in enumerate(model.model.layers)}
        model.config.use_ttt = True
        for key, value in (ttt if isinstance(ttt, dict) else dataclasses.asdict(ttt)).items():
            setattr(model.config, f"ttt_{key}", value)
        apply_ttt(model, model.config)
        teacher = {}
        for idx in ttt_modules(model):
            if isinstance(model.model.layers[idx].self_attn, LlamaTTTSelfAttention):
                teacher[idx] = originals[idx].requires_grad_(False)
        object.__setattr__(model, TEACHER_ATTR, teacher)  # not a submodule: out of state dict, FSDP and optimizer
    return model


def _reload_speech_encoder(model: nn.Module) -> None:
    """The Whisper encoder as `whisper.load_model(config.speech_encoder)` gives it: transformers' `post_init` of a
    randomly initialised model re-initialises every `nn.Linear` in the module tree, Whisper's included."""
    from omni_speech.model.speech_encoder.builder import build_speech_encoder

    model.get_model().speech_encoder.load_state_dict(build_speech_encoder(model.config).state_dict())


class SpeechFrontend:
    """LLaMA-Omni's speech input for `model` (which has a Whisper speech encoder): 16 kHz mono audio is padded or
    trimmed to the encoder's window (30 s for Whisper) and turned into `whisper.log_mel_spectrogram` features with
    the encoder's number of mel bins (128 for large-v3), [frames, n_mels] as LLaMA-Omni's dataset gives them
    (`speech_lengths` = frames). A clip takes `positions` places in the language model's sequence: the encoder
    halves the frames, the projector concatenates `speech_encoder_ds_rate` of them (300 for Whisper large-v3 and
    rate 5).

    Args:
        model: an `OmniSpeechLlamaForCausalLM` / `OmniSpeech2SLlamaForCausalLM` built with `speech_encoder`.
    """

    def __init__(self, model: nn.Module) -> None:
        import whisper

        encoder = model.get_model().speech_encoder
        self.n_mels = encoder.conv1.in_channels
        self.encoder_ctx = encoder.positional_embedding.shape[0]
        self.frames = 2 * self.encoder_ctx  # conv2 has stride 2
        self.sample_rate = whisper.audio.SAMPLE_RATE
        self.samples = self.frames * whisper.audio.HOP_LENGTH
        self.positions = self.encoder_ctx // model.get_model().speech_projector.k

    def mel(self, wav: Tensor) -> Tensor:
        """Features of shape [frames, n_mels] of a float32 clip of shape [S] at `sample_rate`."""
        import whisper

        wav = whisper.pad_or_trim(wav.float(), self.samples)
        return whisper.log_mel_spectrogram(wav, n_mels=self.n_mels).T.contiguous()


def speech_frontend(model: nn.Module) -> SpeechFrontend | None:
    """The model's `SpeechFrontend`, or None when it has no speech encoder (transformers' Llama, or LLaMA-Omni's
    class without `speech_encoder` in its config)."""
    return SpeechFrontend(model) if speech_modules(model) else None


def speech_features(model: nn.Module, mels: Tensor) -> Tensor:
    """LLaMA-Omni's `encode_speech` of clips `mels` [S, frames, n_mels] (all of the encoder's full window):
    [S, positions, hidden]. The Whisper encoder is frozen: nothing of it is kept for the backward."""
    lengths = torch.full((mels.shape[0],), mels.shape[1], dtype=torch.long, device=mels.device)
    dtype = next(model.get_model().speech_projector.parameters()).dtype
    return torch.stack(model.encode_speech(mels.to(dtype), lengths))


class SpeechInputs:
    """A batch's speech for the model's forwards: `with speech.placed(): model(input_ids=...)` replaces the token
    embeddings [B, T, C] at the speech positions (`refs` [B, T] >= 0: frame `refs % positions` of clip
    `refs // positions` of `mels` [S, frames, n_mels]) by the clips' features, as LLaMA-Omni's
    `prepare_inputs_labels_for_speech_and_text` places them (any valid id may stand at those positions).

    The clips are encoded inside `embed_tokens`' forward, so the encoder runs within the model's forward (FSDP2's
    root runs first and its units unshard as usual), once per batch: the teacher's forward (under no_grad) reuses
    the student's features; a forward with grad after features made without grad encodes again.
    """

    def __init__(self, model: nn.Module, mels: Tensor, refs: Tensor) -> None:
        self.model, self.mels, self.refs = model, mels, refs
        self._features: Tensor | None = None
        self._with_grad = False

    def features(self) -> Tensor:
        """[S, positions, C]."""
        if self._features is None or (torch.is_grad_enabled() and not self._with_grad):
            self._features = speech_features(self.model, self.mels)
            self._with_grad = torch.is_grad_enabled()
        return self._features

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        mask = (self.refs >= 0)[..., None]

        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            features = self.features()
            return torch.where(mask, features.flatten(0, 1)[self.refs.clamp_min(0)].to(out.dtype), out)

        handle = self.model.get_model().embed_tokens.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def write_tiny_whisper(path: Path, *, n_mels: int = 128, n_audio_ctx: int = 40, n_audio_state: int = 32,
                       seed: int = 0) -> Path:
    """A tiny random Whisper checkpoint in whisper's own format (`{"dims", "model_state_dict"}`, what
    `whisper.load_model(path)` reads), for tests and CPU runs: one encoder layer, a window of `2 * n_audio_ctx`
    mel frames (`n_audio_ctx / 50` s)."""
    import whisper

    dims = whisper.ModelDimensions(n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=n_audio_state,
                                   n_audio_head=2, n_audio_layer=1, n_vocab=64, n_text_ctx=8, n_text_state=16,
                                   n_text_head=2, n_text_layer=1)
    torch.manual_seed(seed)
    model = whisper.Whisper(dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def tiny_omni_kwargs(whisper_checkpoint: Path, n_audio_state: int = 32) -> dict[str, Any]:
    """`model.lm_kwargs` of a tiny random `OmniSpeechLlamaForCausalLM` with a Whisper speech encoder."""
    return {**TINY, "model_type": "omni_speech_llama", "speech_encoder": str(whisper_checkpoint),
            "speech_encoder_type": "whisper", "speech_projector_type": "linear", "speech_encoder_ds_rate": 5,
            "speech_encoder_hidden_size": n_audio_state}


@contextlib.contextmanager
def ttt_bypassed(model: nn.Module) -> Iterator[None]:
    """Run `model` as its teacher: TTT layers skipped (gated_residual) or replaced back by their original attention
    (replace). Use under `torch.no_grad()`."""
    layers = model.model.layers
    teacher: dict[int, nn.Module] = getattr(model, TEACHER_ATTR, {})
    swapped, flagged = {}, []
    adapters = [m for m in model.modules() if _is_lora_layer(m) and not m.disable_adapters]
    try:
        for m in adapters:  # LoRA is the student's: the teacher is the base model
            m.enable_adapters(False)
        for idx in ttt_modules(model):
            attn = layers[idx].self_attn
            if isinstance(attn, LlamaTTTSelfAttention):
                if idx not in teacher:
                    raise ValueError(f"layer {idx}: TTT replaced its attention and the original was not kept; build "
                                     "the model with build_llama to distil")
                swapped[idx] = attn
                layers[idx].self_attn = teacher[idx]
            else:
                attn.ttt_bypass = True
                flagged.append(attn)
        yield
    finally:
        for idx, attn in swapped.items():
            layers[idx].self_attn = attn
        for attn in flagged:
            attn.ttt_bypass = False
        for m in adapters:
            m.enable_adapters(True)


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "enable_adapters")


LORA_TARGETS = re.compile(r"\blayers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|"
                          r"mlp\.(gate_proj|up_proj|down_proj))$")


def apply_lora(model: nn.Module, rank: int, scaling: float, keep_full: set[str]) -> list[str]:
    """peft LoRA (rank `rank`, alpha = scaling * rank, as the Moshi family) on the decoder layers' attention
    projections and MLP linears: TTT's own projections (`self_attn.ttt.*`), lm_head, the embeddings and
    LLaMA-Omni's speech modules get none. Every weight is then frozen but the adapters and `keep_full` (the TTT
    parameters). The distillation teacher runs with the adapters disabled (`ttt_bypassed`). Returns the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and LORA_TARGETS.search(n)]
    if not targets:
        raise ValueError("lora.enable: no decoder-layer linear (q/k/v/o_proj, gate/up/down_proj) matched")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=scaling * rank, target_modules=targets, lora_dropout=0.0,
                                       bias="none"), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name in keep_full)
    return targets


def install_monitor_hooks(model: nn.Module) -> dict[int, nn.Module]:
    """Let the trainer's `Monitor` read the TTT layers: while a TTT module's `record_stats` is set, its next forward
    fills `stats` (fast weights after the sequence against W0, the inner learning rate, the residual gate). Returns
    the TTT modules by layer index."""
    modules = ttt_modules(model)
    for idx, ttt in modules.items():
        attn = model.model.layers[idx].self_attn
        ttt.record_stats, ttt.stats = False, None
        ttt.register_forward_hook(functools.partial(_record_stats, gate=getattr(attn, "ttt_gate", None)))
    return modules


def _record_stats(module: nn.Module, args: tuple, output: tuple, gate: Tensor | None) -> None:
    if not module.record_stats:
        return
    module.record_stats = False
    module.stats = {"kind": f"ttt_{module.config.layer_type}", **ttt_layer_stats(module, args[0], output[1])}
    if gate is not None:
        module.stats["gate"] = torch.tanh(gate.detach().float()).mean().item()


class FinalHidden:
    """`with FinalHidden(model) as final: out = model(...)`: the forward skips `lm_head` (it sees an empty slice, so
    `out.logits` is [B, 0, V]) and `final.hidden` holds its input [B, T, C], for a loss computed in slices of the
    sequence (`weight()` is lm_head's full weight, also under FSDP2)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.hidden, self._handle = model, None, None

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        self.hidden = args[0]
        return (args[0][:, :0],)

    def __enter__(self) -> FinalHidden:
        self._handle = self.model.lm_head.register_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def weight(self) -> Tensor:
        w = self.model.lm_head.weight
        return w.full_tensor() if hasattr(w, "full_tensor") else w  # a sharded DTensor outside FSDP's forward


def trainable_names(model: nn.Module, what: str) -> set[str]:
    """Parameter names to train: "ttt" (what TTT added: its projections, inner-loop lr, its own norms `ttt_norm` and
    `post_norm`, W0, and the residual gates) or "all" (every weight but LLaMA-Omni's Whisper encoder, which stays
    frozen, as LLaMA-Omni's tune_speech_encoder defaults to; its speech projector trains with "all" only).

    The model's RMSNorms stay frozen under "ttt": the teacher runs through them too, so training them would move
    the teacher that distillation matches (a moving target the student could chase towards flat distributions)."""
    names = {n for n, _ in model.named_parameters() if not n.startswith(SPEECH_ENCODER_PREFIX)}  # Whisper: frozen
    if what == "all":
        return names
    ttt = set(ttt_parameter_names(model))
    return {n for n in names if n in ttt}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """FSDP2's wrap unit: the decoder layers."""
    return model.model.layers


def speech_modules(model: nn.Module) -> list[nn.Module]:
    """LLaMA-Omni's speech encoder and projector (empty without them): FSDP2 units of their own (`SpeechInputs`
    runs them from `embed_tokens`' forward hook, so that they need not be part of the root's unit)."""
    if not hasattr(model, "get_model") or getattr(model.get_model(), "speech_encoder", None) is None:
        return []
    return [model.get_model().speech_encoder, model.get_model().speech_projector]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_export(model: nn.Module, state: dict[str, Tensor], out_dir: Path) -> None:
    """config.json (with the resolved TTT fields) and model.safetensors from a full `state` dict, loadable with
    `from_pretrained_ttt(LlamaTTTForCausalLM, out_dir)` (or the LLaMA-Omni class for its model types)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    base = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # FSDP2 subclasses the model
    if base is LlamaForCausalLM:
        # A plain Llama with TTT installed is, on disk, a `LlamaTTTForCausalLM` (model_type `llama-ttt`), so that
        # AutoModelForCausalLM brings it back with its TTT weights instead of a plain Llama that drops them.
        config = LlamaTTTModelConfig.from_llama_config(config)
        base = LlamaTTTForCausalLM
    config.architectures = [base.__name__]
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})


def load_tokenizer(path: str):
    """encode(text) -> list[int]: a SentencePiece `.model` file, or a transformers tokenizer folder."""
    if str(path).endswith(".model"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return lambda text: list(sp.encode(text))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return lambda text: list(tok(text, add_special_tokens=False)["input_ids"])
