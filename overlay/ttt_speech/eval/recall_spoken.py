"""The spoken-recall benchmark: does a Moshi-shaped model recall *speech* heard further back than it can attend?

Documents (`eval.recall_docs`; audio by `make samples`) are spoken by one espeak-ng voice at one rate:

    "Please remember <A>."  |  filler sentences (>= 4 s)  |  "Again, <A>."  |  "And now <B>."

A and B are a name, a spoken digit string or a short phrase. Held-out documents use voices and content (names,
phrase words, digit strings) that training never uses.

Streams: the text stream from the exact word alignments (`data.interleave`, Moshi's inner monologue), and Mimi
codes (tiny-random by default, real Mimi given its weights) of the main channel; the user channel is silence. Every
word is a unit on Mimi frame boundaries, encoded from a fresh Mimi state (`Banks`), so a document's codes are its
units' codes put end to end: training draws a new document every step (`TrainingDocuments`) from the training
voices, rates and content, so a small model cannot learn a fixed set by heart, and nothing about A reaches later
frames through Mimi's own context (tiny Mimi: 64 frames; the real one: 250 per layer). `make_document` checks that
the first mention (its codes and text tokens) ends more than the model's receptive field before the repeat starts;
the test suite checks that the window model's logits on the repeat are then bit-identical when the first mention
is replaced.

Scored, per held-out document (`score_document`): the NLL on the content of each mention, text (the content's
tokens, not padding) and audio (the mean over the predicted codebooks of the main speaker, on the frames the
content is spoken): "first" (A the first time), "repeat" (A again, past the window: the recall), "unrelated" (B,
new content at the end). A model with memory has repeat < unrelated ~ first; one without has all three alike.

Statistics: per (variant, seed), the mean over held-out documents; across seeds the mean with a Student-t 95% CI,
paired differences against the window model per seed, gap closed per seed (`eval.recall.summarize`). Also the
per-document paired difference with a cluster-bootstrap CI over held-out voices, per seed (what the quickstart,
which trains one seed, reports) and pooled over seeds (`pooled_by_document`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_speech.constants import FRAME_RATE
from ttt_speech.data.interleave import (
    END_OF_TEXT_PAD,
    TEXT_PAD,
    ZERO_TOKEN,
    interleave_text,
    start_frame,
    tokenize_words,
)
from ttt_speech.data.manifest import MAIN_SPEAKER, Word
from ttt_speech.eval import recall
from ttt_speech.eval import recall_docs as rd
from ttt_speech.eval.nll import frame_nll
from ttt_speech.eval.recall import receptive_field, relevant_fields
from ttt_speech.eval.stats import Estimate, cluster_bootstrap, paired_differences
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, tiny_lm_kwargs
from ttt_speech.train.loss import moshi_loss

MENTIONS = rd.MENTIONS
VARIANTS = ("window", "full", "inplace", "inplace_next", "ttt_linear", "ttt_mlp")
CODES_VERSION = 1  # of `Banks`' encoding, in its cache key
SILENCE_FRAMES = 1024  # the longest document (frames)


@dataclasses.dataclass
class SpokenRecallConfig:
    """The model and training budget of the spoken-recall benchmark.

    Args:
        context: attention context of the main transformer (frames); its receptive field must end before every
            document's repeat (checked per document).
        dim, layers, hidden_scale: the tiny Moshi (16 codebooks in, depformer) otherwise as `TINY_LM_KWARGS`.
        dep_q, depformer_layers: codebooks the depformer predicts (the first `dep_q` of the main speaker's 8; the
            rest are inputs only, as the user's are) and its depth: fewer is cheaper on a CPU.
        ttt_layers, chunk, inplace_lr, target, block_base_lr, block_gate_init: as `eval.recall.RecallConfig`.
        steps, batch, lr, warmup: AdamW on `batch` freshly drawn training documents per step.
        eval_every: steps between two scorings of the held-out documents for the training curve.
        first_codebook_weight_multiplier, text_padding_weight: moshi-finetune's loss weights. Codebook 0 is not
            up-weighted (moshi-finetune: 100): tiny-random Mimi's codes are mostly unpredictable, and at 100x their
            loss would dominate the clipped gradient and slow the text down.
    """

    context: int = 10
    dim: int = 64
    layers: int = 4
    hidden_scale: float = 2.0
    dep_q: int = 4
    depformer_layers: int = 1
    ttt_layers: tuple[int, ...] = (1, 3)
    chunk: int = 16
    inplace_lr: float = 1.0
    target: str = "token_embeddings"
    block_base_lr: float = 1.0
    block_gate_init: float = 0.1
    steps: int = 250
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 50
    first_codebook_weight_multiplier: float = 1.0
    text_padding_weight: float = 0.5

    def __post_init__(self) -> None:
        self.ttt_layers = tuple(self.ttt_layers)

    def lm_kwargs(self, variant: str) -> dict[str, Any]:
        return tiny_lm_kwargs(dim=self.dim, num_layers=self.layers, hidden_scale=self.hidden_scale,
                              context=None if variant == "full" else self.context, dep_q=self.dep_q,
                              depformer_num_layers=self.depformer_layers)

    def ttt_config(self, variant: str) -> MoshiTTTConfig | None:
        if variant in ("window", "full"):
            return None
        layers = list(self.ttt_layers)
        if variant in ("inplace", "inplace_next"):
            return MoshiTTTConfig(kind="inplace", layers=layers, chunk_size=self.chunk, lr=self.inplace_lr,
                                  conv="centred" if variant == "inplace" else "next", target=self.target)
        if variant in ("ttt_linear", "ttt_mlp"):
            return MoshiTTTConfig(kind="block", layers=layers, ttt_layer_type=variant.removeprefix("ttt_"),
                                  ttt_mini_batch_size=self.chunk, ttt_base_lr=self.block_base_lr,
                                  gate_init=self.block_gate_init,
                                  # ttt-lm-pytorch's layer with the model's heads (the reference preset), as these
                                  # runs were made; the block's recall preset is the ablation's
                                  ttt_num_heads=None, ttt_share_qk=False, ttt_options={})
        raise ValueError(f"unknown spoken-recall variant {variant!r}; known: {', '.join(VARIANTS)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ttt_layers"] = list(self.ttt_layers)
        return d

    def relevant(self, variant: str) -> dict[str, Any]:
        """`to_dict` without the fields that do not change `variant` (a cached window run serves every target)."""
        return relevant_fields(self.to_dict(), variant)


@dataclasses.dataclass
class SpokenDoc:
    """One document: its stream [17, F] (text, 8 main codebooks, 8 user codebooks) and its scored frames.

    Args:
        text_frames: per mention, the frames holding the content's text tokens.
        audio_frames: per mention, (first, end) frames over which the content is spoken.
        first_info_end: one past the last frame that carries anything of the first mention (codes or text).
        repeat_start: the first scored frame of the repeat.
    """

    name: str
    voice: str
    rate: int
    kind: str
    stream: torch.Tensor
    text_frames: dict[str, list[int]]
    audio_frames: dict[str, tuple[int, int]]
    first_info_end: int
    repeat_start: int

    @property
    def distance(self) -> int:
        """Frames from the last frame carrying the first mention to the start of the repeat."""
        return self.repeat_start - (self.first_info_end - 1)


def _recall_meta(samples: Path) -> dict[str, Any]:
    path = samples / "recall.json"
    if not path.is_file():
        raise FileNotFoundError(f"no spoken-recall documents at {path}: run `make samples`")
    meta = json.loads(path.read_text())
    if meta.get("spec") != json.loads(json.dumps(rd.spec())):
        raise ValueError(f"{path} was made for other documents than ttt_speech.eval.recall_docs describes: run "
                         "`make samples` again")
    return meta


class Banks:
    """The Mimi codes of every word unit of every voice and rate (`recall/banks/*.wav`), and of silence, each
    unit encoded from a fresh Mimi state. Cached in `cache` (a folder) per sample set and Mimi.

    Args:
        samples: the sample set (`make samples`).
        mimi: "tiny-random" or real Mimi weights.
        batch: units encoded per Mimi call (zero-padded at the end: Mimi's streaming encoder is causal, so the
            padding changes none of a unit's frames).
    """

    def __init__(self, samples: str | Path, mimi: str = "tiny-random", cache: str | Path | None = None,
                 batch: int = 64, only: Sequence[tuple[str, int]] | None = None) -> None:
        import sentencepiece

        from ttt_speech.data.codes import mimi_spec_id

        self.samples = Path(samples)
        self.meta = _recall_meta(self.samples)
        if only is not None:  # a subset of the banks (tests)
            keep = {(v, r) for v, r in only}
            self.meta["banks"] = {k: b for k, b in self.meta["banks"].items() if (b["voice"], b["rate"]) in keep}
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(self.samples / "tokenizer.model"))
        self.index = {(b["voice"], b["rate"]): b["units"] for b in self.meta["banks"].values()}
        self.train_keys = sorted(k for k, b in zip(self.index, self.meta["banks"].values(), strict=True)
                                 if b["split"] == "train")
        stamp = json.loads((self.samples / "samples.json").read_text())["settings"]
        key = hashlib.sha256(f"{CODES_VERSION}/{stamp}/{mimi_spec_id(mimi)}/{sorted(self.index)}".encode()
                             ).hexdigest()[:16]
        path = None if cache is None else Path(cache) / f"recall-banks-{key}.pt"
        if path is not None and path.is_file():
            saved = torch.load(path)
        else:
            saved = self._encode(mimi, batch)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(saved, path)
        self.units = {(v, r): words for (v, r), words in zip(self.index, saved["units"], strict=True)}
        self.silence = saved["silence"].long()  # [K, SILENCE_FRAMES]

    def _encode(self, mimi: str, batch: int) -> dict[str, Any]:
        from ttt_speech.data.audio import load_audio
        from ttt_speech.integrations.mimi import encode as mimi_encode
        from ttt_speech.integrations.mimi import load_mimi

        model = load_mimi(mimi)
        pieces = []  # (bank number, word, audio [S])
        for n, bank in enumerate(self.meta["banks"].values()):
            audio = load_audio(self.samples / bank["path"], rd.SAMPLE_RATE)[0]
            for word, (start, frames, _) in bank["units"].items():
                pieces.append((n, word, audio[start * rd.FRAME_SAMPLES:(start + frames) * rd.FRAME_SAMPLES]))
        pieces.sort(key=lambda p: p[2].shape[0])
        codes: list[dict[str, torch.Tensor]] = [{} for _ in self.meta["banks"]]
        for i in range(0, len(pieces), batch):
            group = pieces[i:i + batch]
            x = torch.zeros(len(group), group[-1][2].shape[0])
            for j, (_, _, a) in enumerate(group):
                x[j, :a.shape[0]] = a
            c = mimi_encode(model, x)  # [b, K, F]
            for j, (n, word, a) in enumerate(group):
                codes[n][word] = c[j, :, :a.shape[0] // rd.FRAME_SAMPLES].to(torch.int16)
        silence = mimi_encode(model, torch.zeros(1, SILENCE_FRAMES * rd.FRAME_SAMPLES))[0].to(torch.int16)
        return {"units": codes, "silence": silence}

    def layout(self, plan: rd.DocumentPlan) -> rd.Layout:
        index = self.index[plan.voice, plan.rate]
        return rd.layout(plan, {w: u[1] for w, u in index.items()}, {w: u[2] for w, u in index.items()})

    def document(self, plan: rd.DocumentPlan, receptive: int | None = None) -> SpokenDoc:
        """The stream of `plan` and its scored frames.

        Args:
            receptive: the model's receptive field in frames: a document whose first mention ends within it of the
                repeat is an error (the window model could hear A).
        """
        lay = self.layout(plan)
        if lay.frames > SILENCE_FRAMES:
            raise ValueError(f"document {plan.name} has {lay.frames} frames, more than {SILENCE_FRAMES}")
        units = self.units[plan.voice, plan.rate]
        main = torch.cat([units[what].long() if kind == "word" else self.silence[:, :what]
                          for kind, what, _ in lay.units], dim=-1)  # [K, F]
        F = lay.frames
        words = [Word(w, a, b, MAIN_SPEAKER) for w, a, b in lay.words]
        text = torch.tensor(interleave_text(tokenize_words(self.tokenizer, words, MAIN_SPEAKER), F, FRAME_RATE))
        stream = torch.cat([text[None], main, self.silence[:, :F]]).to(torch.long)  # [1 + 2K, F]
        is_content = [int(x) not in (TEXT_PAD, END_OF_TEXT_PAD) for x in text]
        text_frames, audio_frames = {}, {}
        for m, next_part in zip(MENTIONS, ("filler", "unrelated", None), strict=True):
            s, e = lay.spans[m]
            lo = start_frame(s, FRAME_RATE)
            # the mention's tokens run until the next word starts (interleave drops what is left then)
            bound = math.inf if next_part is None else lay.parts[next_part][0] * rd.FRAME_SEC
            later = [a for _, a, _ in lay.words if a >= bound]
            hi = start_frame(min(later), FRAME_RATE) if later else F
            text_frames[m] = [t for t in range(lo, hi) if is_content[t]]
            audio_frames[m] = (lo, min(F, math.ceil(e * FRAME_RATE - 1e-6)))
        # the first part's codes end where the filler starts; its text tokens may run into the filler's lead
        first_info_end = max(lay.parts["filler"][0], text_frames["first"][-1] + 1)
        doc = SpokenDoc(plan.name, plan.voice, plan.rate, plan.kind, stream, text_frames, audio_frames,
                        first_info_end, text_frames["repeat"][0])
        if receptive is not None and doc.distance <= receptive:
            raise ValueError(f"spoken-recall document {plan.split}/{plan.name} ({plan.voice}, {plan.rate} wpm): the "
                             f"repeat starts {doc.distance} frames after the first mention ends, within the model's "
                             f"receptive field of {receptive} frames; the window model could hear it. Lower the "
                             "context or lengthen the filler (recall_docs.MIN_FILLER_SEC)")
        return doc

    def heldout(self, receptive: int | None = None, limit: int | None = None) -> list[SpokenDoc]:
        """The held-out documents (those `make samples` wrote), in order; the first `limit` of them."""
        return [self.document(plan, receptive) for plan in rd.fixed_documents("heldout")[:limit]]


class TrainingDocuments:
    """New training documents, drawn from the training voices, rates and content by a seeded generator."""

    def __init__(self, banks: Banks, seed: int, receptive: int | None = None) -> None:
        self.banks, self.receptive = banks, receptive
        self.rng = random.Random(seed)
        self.exclude = rd.heldout_digit_strings()

    def draw(self) -> SpokenDoc:
        rng = self.rng
        voice, rate = rng.choice(self.banks.train_keys)
        plan = rd.draw_document(rng, "train", voice, rate, rng.choice(rd.KINDS), exclude=self.exclude)
        return self.banks.document(plan, self.receptive)


def build_variant(variant: str, cfg: SpokenRecallConfig, seed: int) -> torch.nn.Module:
    """As `eval.recall.build_variant`: the same base initialisation for every variant, TTT seeded too."""
    model = build_lm(cfg.lm_kwargs(variant), seed=seed)
    ttt = cfg.ttt_config(variant)
    if ttt is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            apply_ttt(model, ttt)
        finally:
            torch.random.set_rng_state(state)
    return model


def collate(docs: Sequence[SpokenDoc]) -> torch.Tensor:
    """Streams padded with ZERO_TOKEN (masked out by moshi) to the longest: [B, 17, F]."""
    longest = max(d.stream.shape[-1] for d in docs)
    return torch.stack([torch.nn.functional.pad(d.stream, (0, longest - d.stream.shape[-1]), value=ZERO_TOKEN)
                        for d in docs])


def train(model: torch.nn.Module, docs: TrainingDocuments, cfg: SpokenRecallConfig,
          eval_docs: Sequence[SpokenDoc] = (), progress: str | None = None) -> dict[str, list[float]]:
    """AdamW on `cfg.batch` new documents per step.

    Returns the curves: per step the loss and the text NLL on the first mention and on the repeat of the step's
    (new) documents; every `cfg.eval_every` steps and at the end, the mean text NLL on the first mentions and the
    repeats of `eval_docs` (`eval_steps`, `eval_text_first`, `eval_text_repeat`). On training documents part of
    what a model learns is the training content itself; the held-out curve shows recall alone.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    curve: dict[str, list[float]] = {k: [] for k in ("loss", "first_text_nll", "repeat_text_nll", "eval_steps",
                                                     "eval_text_first", "eval_text_repeat")}

    def held_out(step: int) -> None:
        if eval_docs:
            scores = evaluate(model, eval_docs)
            curve["eval_steps"].append(step)
            curve["eval_text_first"].append(float(np.mean(scores["text_first"])))
            curve["eval_text_repeat"].append(float(np.mean(scores["text_repeat"])))
            model.train()

    model.train()
    t0 = time.perf_counter()
    held_out(0)
    bar = tqdm(range(cfg.steps), desc=progress, unit="step", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        batch = [docs.draw() for _ in range(cfg.batch)]
        codes = collate(batch)
        out = model(codes)
        loss, _ = moshi_loss(out, codes, text_padding_id=TEXT_PAD,
                             first_codebook_weight_multiplier=cfg.first_codebook_weight_multiplier,
                             text_padding_weight=cfg.text_padding_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            logp = torch.log_softmax(out.text_logits[:, 0].float(), dim=-1)  # [B, F, V]
            for m in ("first", "repeat"):
                nll = [-logp[i, d.text_frames[m], codes[i, 0, d.text_frames[m]]].mean() for i, d in enumerate(batch)]
                curve[f"{m}_text_nll"].append(torch.stack(nll).mean().item())
        curve["loss"].append(loss.item())
        bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}", refresh=False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held_out(step + 1)  # before the progress line, which prints it
            if progress:
                held = "" if not curve["eval_steps"] else \
                    f", held-out first {curve['eval_text_first'][-1]:.3f} repeat {curve['eval_text_repeat'][-1]:.3f}"
                bar.write(f"  {progress} step {step + 1}/{cfg.steps}: loss {np.mean(curve['loss'][-25:]):.3f}, "
                          f"training documents' first {np.mean(curve['first_text_nll'][-25:]):.3f} repeat "
                          f"{np.mean(curve['repeat_text_nll'][-25:]):.3f}{held} ({time.perf_counter() - t0:.0f} s)")
    bar.close()
    model.eval()
    return curve


@torch.no_grad()
def score_document(model: torch.nn.Module, doc: SpokenDoc) -> dict[str, float]:
    """NLL on each mention: `text_<mention>` (the content's text tokens) and `audio_<mention>` (the mean over the
    main speaker's codebooks on the frames the content is spoken)."""
    nll = frame_nll(model, doc.stream[None], mode="parallel")[0]  # [1 + dep_q, F]
    scores = {}
    for m in MENTIONS:
        scores[f"text_{m}"] = float(nll[0, doc.text_frames[m]].mean())
        lo, hi = doc.audio_frames[m]
        scores[f"audio_{m}"] = float(nll[1:, lo:hi].nanmean())
    return scores


def evaluate(model: torch.nn.Module, docs: Sequence[SpokenDoc]) -> dict[str, list[float]]:
    """Per document (in order), each score of `score_document`."""
    model.eval()
    rows = [score_document(model, d) for d in docs]
    return {k: [r[k] for r in rows] for k in rows[0]}


SCORES = [f"{s}_{m}" for s in ("text", "audio") for m in MENTIONS]


def run_one(variant: str, seed: int, cfg: SpokenRecallConfig, banks: Banks, eval_docs: Sequence[SpokenDoc],
            out: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one (variant, seed) on documents drawn with `seed` and score it on `eval_docs`; written to
    `out/runs/<variant>-s<seed>.json` when `out` is given (reused when the documents and every config field the
    variant uses match)."""
    path = None if out is None else Path(out) / "runs" / f"{variant}-s{seed}.json"
    if path is not None and path.is_file():
        done = json.loads(path.read_text())
        if relevant_fields(done.get("config", {}), variant) == cfg.relevant(variant) and \
                done.get("documents") == [d.name for d in eval_docs]:
            return done
    t0 = time.perf_counter()
    model = build_variant(variant, cfg, seed)
    receptive = receptive_field(cfg.lm_kwargs("window"))
    curve = train(model, TrainingDocuments(banks, seed, receptive), cfg, eval_docs,
                  progress=f"{variant} seed {seed}" if progress else None)
    result = {"variant": variant, "seed": seed, "config": cfg.to_dict(),
              "train_seconds": round(time.perf_counter() - t0, 1), "curve": curve,
              "documents": [d.name for d in eval_docs], "voices": [d.voice for d in eval_docs],
              **evaluate(model, eval_docs)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def paired_by_document(result: dict[str, Any], reference: dict[str, Any], score: str = "text_repeat",
                       n_boot: int = 10000) -> Estimate:
    """One seed: the per-document difference `result - reference` on the same documents, its mean, and a
    cluster-bootstrap 95% CI over voices (documents of one voice are one cluster)."""
    if result["documents"] != reference["documents"]:
        raise ValueError("paired comparison needs the same documents in the same order")
    diff = paired_differences(result[score], reference[score])
    return cluster_bootstrap(diff, result["voices"], n_boot=n_boot)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per score (`text_repeat`, ..., and `text_recall_gain` / `audio_recall_gain`: first minus repeat per
    document): `eval.recall.summarize` over seeds; for `text_repeat` and `audio_repeat`, also per variant the
    paired per-document difference against the window model with its cluster-bootstrap CI over voices, per seed
    (`per_seed_document_ci`) and pooled over seeds (`document_ci`)."""
    # per document, how much lower the repeat is than the first mention: recall within one model, free of how
    # well the model knows new content in general
    results = [{**r, **{f"{s}_recall_gain": list(np.subtract(r[f"{s}_first"], r[f"{s}_repeat"]))
                        for s in ("text", "audio")}} for r in results]
    out = {}
    for score in [*SCORES, "text_recall_gain", "audio_recall_gain"]:
        extra = [s for s in SCORES if s != score]
        out[score] = recall.summarize(results, metric=score, curve="eval_text_repeat", extra=extra)
    windows = {r["seed"]: r for r in results if r["variant"] == "window"}
    for score in ("text_repeat", "audio_repeat"):
        for v, row in out[score].items():
            if v == "window":
                continue
            runs = [r for r in results if r["variant"] == v and r["seed"] in windows]
            row["per_seed_document_ci"] = [
                {"seed": r["seed"], **_estimate_dict(paired_by_document(r, windows[r["seed"]], score))} for r in runs]
            if runs:
                row["document_ci"] = {"seeds": [r["seed"] for r in runs],
                                      **_estimate_dict(pooled_by_document(runs, windows, score))}
    return out


def pooled_by_document(results: Sequence[dict[str, Any]], windows: dict[int, dict[str, Any]],
                       score: str = "text_repeat", n_boot: int = 10000) -> Estimate:
    """Over seeds: per document, the mean over `results`' seeds of `result - window of the same seed`, then its
    mean with a cluster-bootstrap CI over voices. The spread between documents and voices, not between training
    seeds (for that, the t interval over seeds)."""
    for r in results:
        if r["documents"] != windows[r["seed"]]["documents"] or r["documents"] != results[0]["documents"]:
            raise ValueError("paired comparison needs the same documents in the same order")
    diffs = [paired_differences(r[score], windows[r["seed"]][score]) for r in results]
    return cluster_bootstrap(np.mean(diffs, axis=0), results[0]["voices"], n_boot=n_boot)


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    return {"mean": e.mean, "ci95": e.ci95, "n_documents": e.n, "n_clusters": e.n_clusters}


def format_tables(summary: dict[str, dict[str, Any]]) -> str:
    """The text and audio tables: repeat NLL (the recall) with the paired statistics, and first / unrelated."""
    lines = []
    for stream in ("text", "audio"):
        rows = summary[f"{stream}_repeat"]
        lines.append(recall.format_table(rows, metric=f"{stream}_repeat", label=f"{stream} repeat", extra=None))
        gains = summary[f"{stream}_recall_gain"]
        lines.append(f"{'':<13} {'first':>8} {'repeat':>8} {'unrelated':>9} {'first - repeat':>15} {'95% CI':>17}  "
                     "(NLL on the mention, mean over seeds)")
        for v, row in rows.items():
            g = gains[v][f"{stream}_recall_gain"]
            ci = "n/a" if g["ci95"] is None else f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"
            lines.append(f"{v:<13} {row[f'{stream}_first']['mean']:>8.3f} {row[f'{stream}_repeat']['mean']:>8.3f} "
                         f"{row[f'{stream}_unrelated']['mean']:>9.3f} {g['mean']:>+15.3f} {ci:>17}")
        paired = {v: row for v, row in rows.items() if "document_ci" in row}
        if paired:
            lines.append(f"{'':<13} {stream} repeat minus window, paired by document (cluster bootstrap over "
                         "voices), per seed and pooled over seeds:")
            for v, row in paired.items():
                cells = [f"s{c['seed']} {_fmt_estimate(c)}" for c in row["per_seed_document_ci"]]
                lines.append(f"{v:<13} " + "; ".join(cells) + f"; pooled {_fmt_estimate(row['document_ci'])}")
        lines.append("")
    return "\n".join(lines)


def _fmt_estimate(e: dict[str, Any]) -> str:
    ci = "no CI" if e["ci95"] is None else f"[{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"
    return f"{e['mean']:+.3f} {ci}"


def plot(results: Sequence[dict[str, Any]], summary: dict[str, dict[str, Any]], path: Path) -> Path:
    """Training curves (held-out text NLL on the first mention and the repeat) and, per variant, the first /
    repeat / unrelated NLL with CIs over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    variants = list(summary["text_repeat"])
    for i, v in enumerate(variants):
        runs = [r for r in results if r["variant"] == v]
        steps = runs[0]["curve"]["eval_steps"]
        for key, style in (("eval_text_repeat", "-"), ("eval_text_first", ":")):
            for r in runs:
                axes[0].plot(steps, r["curve"][key], style, color=f"C{i}", alpha=0.25, lw=0.8)
            axes[0].plot(steps, np.mean([r["curve"][key] for r in runs], axis=0), style, color=f"C{i}",
                         label=f"{v} {'repeat' if key.endswith('repeat') else 'first'}")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("text NLL on held-out documents")
    axes[0].legend(fontsize=7)
    axes[0].set_title("training curves (each seed faint)")
    width = 0.8 / 3
    for ax, stream in zip(axes[1:], ("text", "audio"), strict=True):
        for j, m in enumerate(MENTIONS):
            rows = summary[f"{stream}_{m}"]
            means = [rows[v][f"{stream}_{m}"]["mean"] for v in variants]
            err = np.array([[0, 0] if rows[v][f"{stream}_{m}"]["ci95"] is None else
                            [means[k] - rows[v][f"{stream}_{m}"]["ci95"][0],
                             rows[v][f"{stream}_{m}"]["ci95"][1] - means[k]] for k, v in enumerate(variants)]).T
            ax.bar(np.arange(len(variants)) + (j - 1) * width, means, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(np.arange(len(variants)), variants, rotation=20)
        ax.set_ylabel(f"{stream} NLL on the content (nats), 95% CI over seeds")
        ax.set_title(f"held-out documents: {stream}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    defaults = SpokenRecallConfig()
    ap = argparse.ArgumentParser(prog="bench_recall spoken", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/recall-spoken"))
    ap.add_argument("--samples", type=Path, default=Path("data/samples"))
    ap.add_argument("--mimi", default="tiny-random", help="tiny-random, or the path of real Mimi weights")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    for f in dataclasses.fields(SpokenRecallConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "ttt_layers":
            ap.add_argument(flag, type=int, nargs="+", default=list(default))
        elif f.name == "target":
            ap.add_argument(flag, default=default, help="In-Place target (e.g. token_embeddings, input_embeddings)")
        else:
            ap.add_argument(flag, type=float if isinstance(default, float) else int, default=default)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SpokenRecallConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpokenRecallConfig)})
    for v in args.variants:
        cfg.ttt_config(v)
    rf = receptive_field(cfg.lm_kwargs("window"))
    banks = Banks(args.samples, args.mimi, cache=args.out / "codes")
    eval_docs = banks.heldout(rf)
    print(f"spoken recall: {len(eval_docs)} held-out documents (voices {sorted({d.voice for d in eval_docs})}); "
          f"window receptive field {rf} frames, closest repeat {min(d.distance for d in eval_docs)} frames after "
          f"its first mention; {cfg.steps} steps x {cfg.batch} new training documents", flush=True)
    results = [run_one(v, s, cfg, banks, eval_docs, args.out, progress=True) for s in args.seeds for v in args.variants]
    summary = summarize(results)
    print(format_tables(summary))
    report = {"config": cfg.to_dict(), "mimi": args.mimi, "receptive_field": rf, "seeds": args.seeds,
              "n_documents": len(eval_docs), "voices": sorted({d.voice for d in eval_docs}),
              "ci_method": "per-seed means over the held-out documents, then Student t over seeds; paired "
                           "differences and gap closed computed per seed first; per seed also the per-document "
                           "paired difference with a cluster bootstrap over voices",
              "summary": summary, "curves": {f"{r['variant']}-s{r['seed']}": r["curve"] for r in results}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recall_spoken.json").write_text(json.dumps(report, indent=1) + "\n")
    recall.write_compact(report, args.out / "summary.json")
    png = plot(results, summary, args.out / "recall_spoken.png")
    print(f"wrote {args.out / 'recall_spoken.json'}, {args.out / 'summary.json'} (without the curves) and {png}")
    return report
