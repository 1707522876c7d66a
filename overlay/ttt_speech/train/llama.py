"""What is Llama's in a run (`model.family: llama`): the model (`integrations.llama_train.build_llama`), FSDP2 per
decoder layer, token batches, the distillation / fine-tuning loss, validation perplexity at each stage's end with a
`best` export, and the export. The loop, checkpoints, resume, NaN handling and stages are the trainer's."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ttt_speech.integrations import llama_train
from ttt_speech.integrations.llama_omni import ttt_modules, ttt_parameter_names
from ttt_speech.train.adapters import embedding_names
from ttt_speech.train.checkpoint import CheckpointError, list_checkpoints, nonfinite_parameters
from ttt_speech.train.config import TrainConfig
from ttt_speech.train.llama_config import stage_seq_len
from ttt_speech.train.llama_data import IGNORE, SpeechBatch, build_llama_loader
from ttt_speech.train.model import check_precision
from ttt_speech.train.parallel import all_mean, barrier
from ttt_speech.train.resume import truncate_log

METRICS = ["step", "stage", "loss", "kl", "hidden_mse", "ce", "lr", "grad_norm", "tokens_per_s"]
VAL_FIELDS = ["step", "stage", "seq_len", "ppl_student", "ppl_teacher", "kl"]
BEST = "best"
LORA_FILE = "lora.safetensors"


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of softmax(logits / temperature), times temperature^2 (Hinton's
    scaling, so gradients keep their size across temperatures). Logits [B, T, V]; float32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL, number of tokens) over positions whose label is not IGNORE. batch [B, 2, T]."""
    labels = batch[:, 1, 1:]
    keep = labels != IGNORE
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), torch.where(keep, labels, 0).flatten(),
                          reduction="none")
    return (nll * keep.flatten()).sum(), keep.sum()


def _chunk_terms(h_student: torch.Tensor, h_teacher: torch.Tensor | None, weight: torch.Tensor,
                 labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """[KL summed over the slice's tokens, NLL summed over its labelled tokens, their count]; labels [B, <= t]."""
    s = F.linear(h_student, weight).float()  # [B, t, V]
    keep = labels != IGNORE
    nll = F.cross_entropy(s[:, :labels.shape[1]].flatten(0, 1), torch.where(keep, labels, 0).flatten(),
                          reduction="none")
    nll_sum = (nll * keep.flatten()).sum()
    if h_teacher is None:
        kl_sum = torch.zeros((), device=s.device)
    else:
        t = F.log_softmax(F.linear(h_teacher, weight.detach()).float() / temperature, dim=-1)  # the teacher: no grad
        kl_sum = (t.exp() * (t - F.log_softmax(s / temperature, dim=-1))).sum()
    return torch.stack([kl_sum, nll_sum, keep.sum().float()])


def chunked_losses(h_student: torch.Tensor, h_teacher: torch.Tensor | None, weight: torch.Tensor, batch: torch.Tensor,
                   temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kl_teacher_student` and the next-token CE from the final hidden states [B, T, C] through `weight` [V, C],
    `chunk` positions at a time; each slice's logits are recomputed in the backward (activation checkpointing)
    rather than kept, so memory holds one slice's [B, chunk, V] instead of the sequence's."""
    from torch.utils.checkpoint import checkpoint

    B, T = batch.shape[0], batch.shape[-1]
    labels = batch[:, 1]
    sums = torch.zeros(3, device=h_student.device)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        sums = sums + checkpoint(_chunk_terms, h_student[:, a:b], None if h_teacher is None else h_teacher[:, a:b],
                                 weight, labels[:, a + 1:b + 1], temperature, use_reentrant=False)
    return sums[0] / (B * T) * temperature ** 2, sums[1] / sums[2].clamp_min(1)


class _Speech:
    """A batch's tokens [B, >= 2, T] and, with speech, `placed()`: a context in which the model's forwards
    see the speech (LLaMA-Omni's frozen Whisper encoder and its projector, run once for the student and the teacher
    alike); without speech, a context that changes nothing."""

    def __init__(self, model, batch: torch.Tensor | SpeechBatch) -> None:
        speech = isinstance(batch, SpeechBatch)
        self.tokens = batch.tokens if speech else batch
        self.inputs = llama_train.SpeechInputs(model, batch.mels, batch.tokens[:, 2]) if speech else None

    def placed(self):
        return contextlib.nullcontext() if self.inputs is None else self.inputs.placed()


def apply_run_lora(model, cfg: TrainConfig, train: set[str]) -> None:
    """The run's LoRA adapters on the base linears; `train` (what `llama.trainable` names) and, with
    `lora.ft_embed`, the embeddings train fully. The trainer and `eval llama` build the student alike."""
    keep = train | (embedding_names(model) if cfg.lora.ft_embed else set())
    llama_train.apply_lora(model, cfg.lora.rank, cfg.lora.scaling, keep_full=keep)


class LlamaFamily:
    metrics = METRICS

    def build(self, cfg: TrainConfig, device: torch.device, world: int) -> tuple[Any, list[dict[str, Any]]]:
        model = llama_train.build_llama(cfg.model.lm_kwargs, cfg.model.checkpoint, cfg.ttt, seed=cfg.seed,
                                        device=device, dtype=check_precision(cfg)).train()
        train = llama_train.trainable_names(model, cfg.llama.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in train)
        if cfg.lora.enable:
            apply_run_lora(model, cfg, train)
        self.ttt_layers = sorted(llama_train.install_monitor_hooks(model))
        self.vocab_size = model.config.vocab_size
        self.speech = llama_train.speech_frontend(model)
        self.tokenizer = llama_train.load_tokenizer(cfg.llama.tokenizer) if cfg.llama.tokenizer else None
        self.run_dir = Path(cfg.run_dir)
        if cfg.llama.val_data:  # read and check now, not after the first stage
            longest = max(stage_seq_len(s, cfg) for s in cfg.stage_list())
            build_llama_loader(cfg.llama.val_data, seq_len=longest, batch_size=cfg.batch_size,
                               vocab_size=self.vocab_size, seed=cfg.seed, rank=0, world_size=world,
                               tokenizer=self.tokenizer, shuffle=False, stream=1, speech=self.speech)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if not list_checkpoints(self.run_dir) and rank == 0:  # a fresh run: no stale validation or best
            (self.run_dir / "val.csv").unlink(missing_ok=True)
            for stale in (self.run_dir / BEST, *self.run_dir.glob("stage_*")):
                shutil.rmtree(stale, ignore_errors=True)
        if cfg.gradient_checkpointing:
            llama_train.enable_gradient_checkpointing(model)
        if cfg.parallel == "fsdp2" and world > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in [*llama_train.decoder_layers(model), *llama_train.speech_modules(model)]:
                fully_shard(layer)  # the speech encoder and projector: units of their own
            fully_shard(model)
        ttt = set(ttt_parameter_names(model))  # optim.ttt_lr; the model's norms (and all, if trained) take optim.lr
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(("ttt" if name in ttt else "base", p.dim() > 1), []).append(p)
        lrs = {"ttt": cfg.optim.ttt_lr if cfg.optim.ttt_lr is not None else cfg.optim.lr, "base": cfg.optim.lr}
        return model, [{"params": ps, "name": f"{kind}{'' if decay else '_no_decay'}", "peak_lr": lrs[kind],
                        "lr": lrs[kind], "weight_decay": cfg.optim.weight_decay if decay else 0.0}
                       for (kind, decay), ps in sorted(groups.items())]

    def ttt_modules(self, model) -> dict[int, Any]:
        return ttt_modules(model)

    def loader(self, cfg: TrainConfig, stage, rank: int, world: int, device: torch.device):
        return build_llama_loader(cfg.llama.train_data, seq_len=stage_seq_len(stage, cfg), batch_size=cfg.batch_size,
                                  vocab_size=self.vocab_size, seed=cfg.seed, rank=rank, world_size=world,
                                  tokenizer=self.tokenizer, speech=self.speech)

    def loss(self, model, batch: torch.Tensor | SpeechBatch,
             cfg: TrainConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
        speech = _Speech(model, batch)
        batch = speech.tokens
        student_in, teacher_in = speech.placed(), speech.placed()  # the teacher (no grad): the same speech
        ids = batch[:, 0].clamp_min(0)  # speech positions: any valid id, their embeddings are replaced
        distill = cfg.llama.objective == "distill"
        hidden = distill and cfg.llama.hidden_mse_weight > 0
        nan = torch.tensor(float("nan"), device=ids.device)
        if cfg.llama.loss_chunk:  # lm_head and the losses per slice of the sequence: no [T, V] logits kept
            with student_in, llama_train.FinalHidden(model) as final:
                student = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            teacher_h = None
            if distill:
                with (torch.no_grad(), llama_train.ttt_bypassed(model), teacher_in,
                      llama_train.FinalHidden(model) as final_t):
                    teacher = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                teacher_h = final_t.hidden
            kl, ce = chunked_losses(final.hidden, teacher_h, final.weight(), batch, cfg.llama.temperature,
                                    cfg.llama.loss_chunk)
        else:
            with student_in:
                student = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            total, count = next_token_nll(student.logits, batch)
            ce = total / count.clamp_min(1)
            if distill:
                with torch.no_grad(), llama_train.ttt_bypassed(model), teacher_in:
                    teacher = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                kl = kl_teacher_student(teacher.logits, student.logits, cfg.llama.temperature)
        if not distill:
            return ce, [nan, nan, ce.detach()]
        loss, mse = kl, nan
        if hidden:  # hidden_states[i + 1] is the output of decoder layer i
            mse = torch.stack([F.mse_loss(student.hidden_states[i + 1].float(), teacher.hidden_states[i + 1].float())
                               for i in self.ttt_layers]).mean()
            loss = kl + cfg.llama.hidden_mse_weight * mse
            mse = mse.detach()
        return loss, [kl.detach(), mse, ce.detach()]

    def tokens(self, batch: torch.Tensor | SpeechBatch) -> int:
        return batch.shape[0] * batch.shape[-1]

    @torch.no_grad()
    def evaluate(self, model, cfg: TrainConfig, seq_len: int, rank: int, world: int,
                 device: torch.device) -> dict[str, float]:
        """Perplexity of the student and the teacher (TTT bypassed) and their KL on the first `llama.val_batches`
        batches of `llama.val_data` per process (in order), windows of `seq_len`; means over every process."""
        loader = build_llama_loader(cfg.llama.val_data, seq_len=seq_len, batch_size=cfg.batch_size,
                                    vocab_size=self.vocab_size, seed=cfg.seed, rank=rank, world_size=world,
                                    tokenizer=self.tokenizer, shuffle=False, stream=1, speech=self.speech)
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # student nll, teacher nll, tokens, kl * batches
        autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")  # as in training
        try:
            for _ in range(cfg.llama.val_batches):
                batch = next(loader).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    sums += self._val_sums(model, batch, cfg.llama.loss_chunk)
        finally:
            model.train(was_training)
        sums = all_mean(sums)
        tokens = max(float(sums[2]), 1.0)
        return {"ppl_student": math.exp(float(sums[0]) / tokens), "ppl_teacher": math.exp(float(sums[1]) / tokens),
                "kl": float(sums[3]) / cfg.llama.val_batches}

    @staticmethod
    def _val_sums(model, batch: torch.Tensor | SpeechBatch, chunk: int) -> torch.Tensor:
        """[student NLL sum, teacher NLL sum, labelled tokens, KL mean] of one batch (logits in slices of `chunk`
        positions when > 0)."""
        speech = _Speech(model, batch)
        batch = speech.tokens
        ids = batch[:, 0].clamp_min(0)
        if chunk:
            with speech.placed(), llama_train.FinalHidden(model) as student:
                model(input_ids=ids, use_cache=False)
            with llama_train.ttt_bypassed(model), speech.placed(), llama_train.FinalHidden(model) as teacher:
                model(input_ids=ids, use_cache=False)
            weight = student.weight()
            n = (batch[:, 1, 1:] != IGNORE).sum()
            kl, s_ce = chunked_losses(student.hidden, teacher.hidden, weight, batch, 1.0, chunk)
            _, t_ce = chunked_losses(teacher.hidden, None, weight, batch, 1.0, chunk)
            return torch.stack([s_ce.double() * n, t_ce.double() * n, n.double(), kl.double()])
        with speech.placed():
            student = model(input_ids=ids, use_cache=False).logits
        with llama_train.ttt_bypassed(model), speech.placed():
            teacher = model(input_ids=ids, use_cache=False).logits
        s_nll, n = next_token_nll(student, batch)
        t_nll, _ = next_token_nll(teacher, batch)
        kl = kl_teacher_student(teacher, student)
        return torch.stack([s_nll.double(), t_nll.double(), n.double(), kl.double()])

    def validate(self, model, cfg: TrainConfig, step: int, stage: int, rank: int, world: int,
                 device: torch.device) -> dict[str, float] | None:
        """At a stage's end: the student exported to `run_dir/stage_<i>` (`llama.export_stages`, not after the last
        stage: that is `export`), validation perplexity into `val.csv`, and a new lowest student perplexity exported
        to `run_dir/best` (with `best.json`)."""
        if cfg.llama.export_stages and step < cfg.total_steps:
            self.export(model, cfg, self.run_dir / f"stage_{stage}", rank)
        if cfg.llama.val_data is None:
            return None
        seq_len = stage_seq_len(cfg.stage_list()[stage], cfg)
        result = self.evaluate(model, cfg, seq_len, rank, world, device)
        path = self.run_dir / "val.csv"
        best_file = self.run_dir / BEST / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        improved = best is None or best["step"] >= step or result["ppl_student"] < best["ppl_student"]
        if improved:
            self.export(model, cfg, self.run_dir / BEST, rank)
        if rank == 0:
            truncate_log(path, lambda row: int(row["step"]) < step)  # a resume redoes this stage end
            new = not path.is_file()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(VAL_FIELDS)
                writer.writerow([step, stage, seq_len, *(f"{result[k]:.6f}" for k in VAL_FIELDS[3:])])
            if improved:
                best_file.write_text(json.dumps({"step": step, "stage": stage, **result}, indent=1) + "\n")
        barrier()
        return result

    def export(self, model, cfg: TrainConfig, out_dir: Path, rank: int) -> Path | None:
        """A transformers folder (config.json with the TTT fields, model.safetensors) that
        `from_pretrained_ttt(LlamaTTTForCausalLM, out_dir)` loads. With `lora.enable` the adapters are merged into
        model.safetensors, and `lora.safetensors` holds what trained (the adapters under peft's names, the TTT
        parameters), so that `ttt-speech eval llama` rebuilds the teacher as the base without them."""
        bad = nonfinite_parameters(model)
        if bad:
            raise CheckpointError(f"{out_dir}: not exporting non-finite weights ({', '.join(bad[:5])})")
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            if cfg.lora.enable:
                from safetensors.torch import save_file

                from ttt_speech.train.model import merge_lora

                trained = {n for n, p in model.named_parameters() if p.requires_grad}
                out_dir.mkdir(parents=True, exist_ok=True)
                save_file({k: state[k].contiguous() for k in sorted(trained)}, str(out_dir / LORA_FILE),
                          metadata={"format": "pt"})
                state = merge_lora(state, cfg.lora.scaling)
            llama_train.save_export(model, state, out_dir)
        barrier()
        return out_dir if rank == 0 else None

    def result(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"seq_len": [stage_seq_len(s, cfg) for s in cfg.stage_list()]}

