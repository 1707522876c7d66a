"""The spoken-recall benchmark: does a Moshi-shaped model recall *speech* heard further back than it can attend?

`make samples` (`scripts/make_samples.py`) writes documents spoken by espeak-ng voices at several rates, in four
parts that each start on a Mimi frame boundary:

    "Please remember <A>."  |  filler sentences (>= 6 s)  |  "Again, <A>."  |  "And now <B>."

A and B are a name, a spoken digit string or a short phrase. The held-out documents use voices and content
(names, phrase words, digit strings) that no training document uses (`recall.json` records both).

Streams: the text stream from the exact word alignments (`data.interleave`, Moshi's inner monologue), and Mimi codes
(tiny-random by default, real Mimi given its weights) of the main channel (the right channel is silence). Each part
is encoded with a fresh Mimi state, so nothing about A reaches the filler's codes through Mimi's own context
(tiny Mimi: 64 frames; the real one: 250 per layer). `load_documents` checks, per document, that the first mention
(its codes and text tokens) ends more than the model's receptive field before the repeat starts; the test suite
checks that the window model's logits on the repeat are then bit-identical when the first mention is replaced.

Scored, per document (`score_document`): the NLL on the content of each mention, text (the content's tokens only,
not padding) and audio (the mean over the main speaker's codebooks, on the frames the content is spoken):
"first" (A the first time), "repeat" (A again, past the window: the recall), "unrelated" (B, new content at the
end). A model with memory has repeat < unrelated ~ first; one without has repeat ~ unrelated ~ first.

Statistics: per (variant, seed), the mean over held-out documents; across seeds the mean with a Student-t 95% CI,
paired differences against the window model per seed, gap closed per seed (as `eval.recall`). For a single seed
(the quickstart), the paired difference per document with a cluster-bootstrap CI over held-out voices.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt_speech.data.interleave import (
    END_OF_TEXT_PAD,
    TEXT_PAD,
    ZERO_TOKEN,
    interleave_text,
    start_frame,
    tokenize_words,
)
from ttt_speech.data.manifest import MAIN_SPEAKER, read_alignments
from ttt_speech.eval.nll import frame_nll
from ttt_speech.eval.recall import receptive_field
from ttt_speech.eval.stats import Estimate, cluster_bootstrap, paired_differences
from ttt_speech.integrations.moshi import MoshiTTTConfig, apply_ttt, build_lm, tiny_lm_kwargs
from ttt_speech.train.loss import moshi_loss

FRAME_RATE = 12.5
MENTIONS = ("first", "repeat", "unrelated")
VARIANTS = ("window", "full", "inplace", "inplace_next", "ttt_linear", "ttt_mlp")


@dataclasses.dataclass
class SpokenRecallConfig:
    """The model and training budget of the spoken-recall benchmark.

    Args:
        context: attention context of the main transformer (frames); its receptive field must end before every
            document's repeat (checked when loading).
        dim, layers, hidden_scale: the tiny Moshi (16 codebooks in, depformer) otherwise as `TINY_LM_KWARGS`.
        dep_q, depformer_layers: codebooks the depformer predicts (the first `dep_q` of the main speaker's 8; the
            rest are inputs only, as the user's are) and its depth: fewer is cheaper on a CPU.
        ttt_layers, chunk, inplace_lr, target: as `eval.recall.RecallConfig`.
        steps, batch, lr, warmup: AdamW on whole training documents (padded to the longest of the batch).
        first_codebook_weight_multiplier, text_padding_weight: moshi-finetune's loss weights.
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
    steps: int = 300
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 30
    first_codebook_weight_multiplier: float = 100.0
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
                                  gate_init=self.block_gate_init)
        raise ValueError(f"unknown spoken-recall variant {variant!r}; known: {', '.join(VARIANTS)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ttt_layers"] = list(self.ttt_layers)
        return d


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
    split: str
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
        """Frames from the last frame carrying the first mention to the repeat."""
        return self.repeat_start - (self.first_info_end - 1)


def _frame(sec: float) -> int:
    return int(round(sec * FRAME_RATE))


def _samples_meta(samples: Path) -> dict[str, Any]:
    path = samples / "recall.json"
    if not path.is_file():
        raise FileNotFoundError(f"no spoken-recall documents at {path}: run `make samples`")
    return json.loads(path.read_text())


PARTS = ("first", "filler", "repeat", "unrelated")
CODES_VERSION = 1  # of `encode_parts`, in the cache key


def encode_parts(mimi, wavs: Sequence[torch.Tensor],
                 parts: Sequence[dict[str, tuple[float, float]]]) -> list[torch.Tensor]:
    """Mimi codes of mono documents, each part encoded from a fresh Mimi state: per document [2 K, F] (its K
    codebooks, then the silent user channel's).

    The same part of every document is encoded in one batch, zero-padded at the end: Mimi's streaming encoder is
    causal, so the padding changes none of a part's own frames. The silent user channel is encoded once.

    Args:
        wavs: per document, audio of shape [S] at 24 kHz.
        parts: per document, {part: (start, end)} in seconds, on Mimi frame boundaries.
    """
    from ttt_speech.integrations.mimi import FRAME_SIZE, SAMPLE_RATE, encode

    per_part = []
    for name in PARTS:
        pieces = []
        for wav, spans in zip(wavs, parts, strict=True):
            a, b = (round(x * SAMPLE_RATE) for x in spans[name])
            if a % FRAME_SIZE or b % FRAME_SIZE:
                raise ValueError(f"part {name} {spans[name]} s is not on Mimi frame boundaries ({FRAME_SIZE} samples)")
            pieces.append(wav[a:b])
        longest = max(p.shape[0] for p in pieces)
        batch = torch.zeros(len(pieces), longest)
        for i, p in enumerate(pieces):
            batch[i, :p.shape[0]] = p
        codes = encode(mimi, batch)  # [N, K, F_max]
        per_part.append([codes[i, :, :p.shape[0] // FRAME_SIZE] for i, p in enumerate(pieces)])
    # the user channel is silence: its codes from a fresh state are a prefix of one long silence's
    longest = max(c.shape[-1] for doc_parts in per_part for c in doc_parts)
    silence = encode(mimi, torch.zeros(1, longest * FRAME_SIZE))[0]  # [K, F]
    per_part = [[torch.cat([c, silence[:, :c.shape[-1]]]) for c in doc_parts] for doc_parts in per_part]
    return [torch.cat(doc_parts, dim=-1) for doc_parts in zip(*per_part, strict=True)]


def load_documents(samples: str | Path, split: str, mimi: str = "tiny-random", cache: str | Path | None = None,
                   receptive: int | None = None) -> list[SpokenDoc]:
    """The documents of `split` ("train" or "heldout") with their streams; Mimi codes cached in `cache` (a folder).

    Args:
        receptive: the model's receptive field in frames: a document whose first mention ends within it of the
            repeat is an error (the window model could hear A).
    """
    import sentencepiece

    from ttt_speech.data.audio import load_audio
    from ttt_speech.data.codes import mimi_spec_id

    samples = Path(samples)
    meta = _samples_meta(samples)
    docs_meta = [d for d in meta["documents"] if d["split"] == split]
    if not docs_meta:
        raise ValueError(f"{samples / 'recall.json'}: no documents in split {split!r}")
    stamp = json.loads((samples / "samples.json").read_text())["settings"]
    key = hashlib.sha256(f"{CODES_VERSION}/{stamp}/{mimi_spec_id(mimi)}/{split}".encode()).hexdigest()[:16]
    cache_file = None if cache is None else Path(cache) / f"recall-codes-{split}-{key}.pt"
    if cache_file is not None and cache_file.is_file():
        codes = torch.load(cache_file)
    else:
        from ttt_speech.integrations.mimi import SAMPLE_RATE, load_mimi

        model = load_mimi(mimi)
        wavs = [load_audio(samples / d["path"], SAMPLE_RATE)[0] for d in docs_meta]  # [S] each, mono
        encoded = encode_parts(model, wavs, [{p: tuple(d["parts"][p]) for p in PARTS} for d in docs_meta])
        codes = {d["name"]: c.to(torch.int16) for d, c in zip(docs_meta, encoded, strict=True)}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(codes, cache_file)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(samples / "tokenizer.model"))
    docs = []
    for d in docs_meta:
        audio = codes[d["name"]].long()
        F = audio.shape[-1]
        words = read_alignments((samples / d["path"]).with_suffix(".json"))
        text = torch.tensor(interleave_text(tokenize_words(tokenizer, words, MAIN_SPEAKER), F, FRAME_RATE))
        stream = torch.cat([text[None], audio]).to(torch.long)
        is_content = [int(x) not in (TEXT_PAD, END_OF_TEXT_PAD) for x in text]
        text_frames, audio_frames = {}, {}
        for m, next_part in zip(MENTIONS, ("filler", "unrelated", None), strict=True):
            s, e = d["spans"][m]
            lo = start_frame(s, FRAME_RATE)
            # the mention's tokens run until the next word starts (interleave drops what is left then)
            later = [w.start for w in words if next_part is not None and w.start >= d["parts"][next_part][0]]
            hi = start_frame(min(later), FRAME_RATE) if later else F
            text_frames[m] = [t for t in range(lo, hi) if is_content[t]]
            audio_frames[m] = (lo, min(F, math.ceil(e * FRAME_RATE - 1e-6)))
        # the first part's codes end at the filler; its text tokens may run a frame or two into the filler's lead
        first_info_end = max(_frame(d["parts"]["filler"][0]), text_frames["first"][-1] + 1)
        doc = SpokenDoc(d["name"], split, d["voice"], d["rate"], d["kind"], stream, text_frames, audio_frames,
                        first_info_end, text_frames["repeat"][0])
        if receptive is not None and doc.distance <= receptive:
            raise ValueError(f"{samples / d['path']}: the repeat starts {doc.distance} frames after the first "
                             f"mention ends, within the model's receptive field of {receptive} frames; the window "
                             "model could hear it. Lower the context or lengthen the filler (MIN_FILLER_SEC)")
        docs.append(doc)
    return docs


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


def train(model: torch.nn.Module, docs: Sequence[SpokenDoc], cfg: SpokenRecallConfig, seed: int,
          progress: str | None = None) -> dict[str, list[float]]:
    """AdamW on whole training documents, `cfg.batch` per step, in an order that depends on `seed` only. Returns
    the per-step loss and the text NLL on the repeats of each step's batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    order: list[int] = []
    curve: dict[str, list[float]] = {"loss": [], "repeat_text_nll": []}
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        while len(order) < cfg.batch:
            order += torch.randperm(len(docs), generator=g).tolist()
        batch = [docs[i] for i in order[:cfg.batch]]
        del order[:cfg.batch]
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
            rep = [-logp[i, d.text_frames["repeat"], codes[i, 0, d.text_frames["repeat"]]].mean()
                   for i, d in enumerate(batch)]
        curve["loss"].append(loss.item())
        curve["repeat_text_nll"].append(torch.stack(rep).mean().item())
        if progress and (step + 1) % 50 == 0:
            print(f"  {progress} step {step + 1}/{cfg.steps}: loss {np.mean(curve['loss'][-25:]):.3f}, repeat text "
                  f"NLL {np.mean(curve['repeat_text_nll'][-25:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
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


def run_one(variant: str, seed: int, cfg: SpokenRecallConfig, train_docs: Sequence[SpokenDoc],
            eval_docs: Sequence[SpokenDoc], out: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one (variant, seed) on `train_docs` and score it on `eval_docs`; written to
    `out/runs/<variant>-s<seed>.json` when `out` is given (reused when its config matches)."""
    path = None if out is None else Path(out) / "runs" / f"{variant}-s{seed}.json"
    if path is not None and path.is_file():
        done = json.loads(path.read_text())
        if done.get("config") == cfg.to_dict() and done.get("documents") == [d.name for d in eval_docs]:
            return done
    t0 = time.perf_counter()
    model = build_variant(variant, cfg, seed)
    curve = train(model, train_docs, cfg, seed, progress=f"{variant} seed {seed}" if progress else None)
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
    """Per score (`text_repeat`, ...): `eval.recall.summarize` over seeds; for `text_repeat` and `audio_repeat`,
    also per variant and seed the paired per-document difference against the window model with its
    cluster-bootstrap CI over voices."""
    from ttt_speech.eval import recall

    out = {}
    for score in SCORES:
        extra = [s for s in SCORES if s != score]
        out[score] = recall.summarize(results, metric=score, curve="repeat_text_nll", extra=extra)
    windows = {r["seed"]: r for r in results if r["variant"] == "window"}
    for score in ("text_repeat", "audio_repeat"):
        for v, row in out[score].items():
            if v == "window":
                continue
            row["per_seed_document_ci"] = [
                {"seed": r["seed"], **_estimate_dict(paired_by_document(r, windows[r["seed"]], score))}
                for r in results if r["variant"] == v and r["seed"] in windows]
    return out


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    return {"mean": e.mean, "ci95": e.ci95, "n_documents": e.n, "n_clusters": e.n_clusters}


def format_tables(summary: dict[str, dict[str, Any]]) -> str:
    """The text and audio tables: repeat NLL (the recall) with the paired statistics, and first / unrelated."""
    from ttt_speech.eval import recall

    lines = []
    for stream in ("text", "audio"):
        rows = summary[f"{stream}_repeat"]
        lines.append(recall.format_table(rows, metric=f"{stream}_repeat", label=f"{stream} repeat", extra=None))
        lines.append(f"{'':<13} {'first':>8} {'repeat':>8} {'unrelated':>9}   (NLL on the mention, mean over seeds)")
        for v, row in rows.items():
            lines.append(f"{v:<13} {row[f'{stream}_first']['mean']:>8.3f} {row[f'{stream}_repeat']['mean']:>8.3f} "
                         f"{row[f'{stream}_unrelated']['mean']:>9.3f}")
        lines.append("")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], summary: dict[str, dict[str, Any]], path: Path, smooth: int = 10) -> Path:
    """Training curves (repeat text NLL per step) and, per variant, the first / repeat / unrelated NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    kernel = np.ones(smooth) / smooth
    variants = list(summary["text_repeat"])
    for i, v in enumerate(variants):
        curves = [np.convolve(r["curve"]["repeat_text_nll"], kernel, mode="valid") for r in results
                  if r["variant"] == v]
        for c in curves:
            axes[0].plot(np.arange(len(c)) + smooth, c, color=f"C{i}", alpha=0.25, lw=0.8)
        axes[0].plot(np.arange(len(curves[0])) + smooth, np.mean(curves, axis=0), color=f"C{i}", label=v)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(f"repeat text NLL, training batches ({smooth}-step mean)")
    axes[0].legend(fontsize=8)
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
    train_docs = load_documents(args.samples, "train", args.mimi, cache=args.out / "codes", receptive=rf)
    eval_docs = load_documents(args.samples, "heldout", args.mimi, cache=args.out / "codes", receptive=rf)
    print(f"spoken recall: {len(train_docs)} training documents, {len(eval_docs)} held-out (voices "
          f"{sorted({d.voice for d in eval_docs})}); window receptive field {rf} frames, closest repeat "
          f"{min(d.distance for d in [*train_docs, *eval_docs])} frames after its first mention", flush=True)
    results = [run_one(v, s, cfg, train_docs, eval_docs, args.out, progress=True)
               for s in args.seeds for v in args.variants]
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
    png = plot(results, summary, args.out / "recall_spoken.png")
    print(f"wrote {args.out / 'recall_spoken.json'} and {png}")
    return report
