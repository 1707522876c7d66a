"""`make eval-librilight`: does long-form NLL stay flat past the attention window, and does TTT change that?

For every checkpoint and every document (state reset per document), the teacher-forced NLL of each stream at each
frame (`eval.nll.frame_nll`). Then, per document:
- the mean NLL in bins at chosen positions (default around 1k, 2k, 4k, 8k, 16k, 24k frames);
- the mean past the window (frames >= W) and the window contrast: that mean minus the mean of the frames just
  before the window, [W/2, W) (`stats.window_contrast`); W is the reference checkpoint's attention context unless
  given;
- the slope of NLL against log(position) fitted past the window; the slope fitted from frame 0 is kept, labelled
  `slope_all_frames` (its warm-up hides a step at the window: `tests/eval/test_stats.py`);
- a finer log-spaced curve for the plot.
Every checkpoint is also compared *paired* with a reference (default the checkpoint named `base`, else the first):
the per-document differences, checkpoint minus reference, of each statistic above, on the same documents.
Means are over documents; 95% CIs come from a cluster bootstrap over speakers (documents of one speaker are one
cluster: `stats.cluster_bootstrap`), and are null where fewer than 3 speakers have data.

Report schema (`report.json`, version 2):
    {"version": 2, "mode": str, "step": int, "bins": [[lo, hi], ...], "window": int,
     "contrast_spans": {"before": [lo, hi], "after": [lo, null]}, "reference": str,
     "n_documents": int, "n_speakers": int, "documents": [{"id": str, "speaker": str, "frames": int}],
     "statistics": {"ci95": str, "n_boot": int, "seed": int, "min_clusters": int},
     "checkpoints": {name: {"path": str, "attention_context": int | null, "ttt": dict | null,
         "bins": [{"lo": int, "hi": int, "center": int, "n_docs": int, "n_speakers": int, "streams": {stream: EST}}],
         "past_window": {stream: EST}, "window_contrast": {stream: EST},
         "slope_past_window": {stream: EST}, "slope_all_frames": {stream: EST},
         "curve": [{"center": float, "streams": {stream: EST}}],
         "paired": null (the reference) | {"reference": str, "bins": [...], "past_window": ..., "window_contrast": ...,
                                           "slope_past_window": ..., "curve": [...]}}}}
    EST = {"mean": float | null, "ci95": [lo, hi] | null, "n_docs": int, "n_speakers": int}
streams: "text", "audio0".."audio7", and "audio" (the mean of the audio codebooks). null means no data (a bin past
every document's end) or no CI. `report.csv` has one row per (checkpoint, comparison, statistic, stream, bin).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_speech.constants import DTYPES, FRAME_RATE
from ttt_speech.errors import ConfigError, DataError
from ttt_speech.eval.nll import STREAMS, frame_nll
from ttt_speech.eval.stats import (  # noqa: F401  (mean_ci95, t975: the old import path)
    DEFAULT_BOOTSTRAP,
    MIN_CLUSTERS,
    Estimate,
    cluster_bootstrap,
    contrast_spans,
    mean_ci95,
    nan_mean,
    slope_vs_log_position,
    span_mean,
    speaker_from_name,
    t975,
)

DEFAULT_BINS = [1000, 2000, 4000, 8000, 16000, 24000]
ALL_STREAMS = [*STREAMS, "audio"]
PAIRED_KEYS = ("bins", "past_window", "window_contrast", "slope_past_window", "curve")


class DocumentsTooShortError(DataError):
    """No document reaches any bin: the report would be empty."""


def bin_edges(centers: list[int], rel_width: float = 0.25) -> list[tuple[int, int]]:
    """Bins [c (1 - w), c (1 + w)) around each center."""
    return [(int(round(c * (1 - rel_width))), int(round(c * (1 + rel_width)))) for c in centers]


def with_audio_mean(nll: np.ndarray) -> np.ndarray:
    """[9, T] -> [10, T]: the streams plus "audio", the nan-mean over the audio codebooks."""
    return np.concatenate([nll, nan_mean(nll[1:], axis=0)[None]], axis=0)


def curve_edges(max_frames: int, points: int = 24) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) frame ranges covering [0, max_frames)."""
    edges = np.unique(np.geomspace(1, max_frames + 1, points + 1).astype(int) - 1)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]


def per_document(docs: list[np.ndarray], bins: list[tuple[int, int]], window: int, curve: list[tuple[int, int]],
                 before_start: int | None = None) -> dict[str, np.ndarray]:
    """Every per-document statistic of one checkpoint.

    Args:
        docs: per-frame NLL of each document, of shape [9, T_d] (`frame_nll`'s streams).

    Returns:
        "bins" [n_bins, S, D], "curve" [n_curve, S, D], and "past_window", "window_contrast", "slope_past_window",
        "slope_all_frames" [S, D], for the S = 10 streams of `ALL_STREAMS`; NaN where a document has no data.
    """
    full = [with_audio_mean(d) for d in docs]
    (b0, b1), (a0, _) = contrast_spans(window, before_start)
    S, D = len(ALL_STREAMS), len(full)
    out = {"bins": np.full((len(bins), S, D), np.nan), "curve": np.full((len(curve), S, D), np.nan)}
    for key in ("past_window", "window_contrast", "slope_past_window", "slope_all_frames"):
        out[key] = np.full((S, D), np.nan)
    for j, d in enumerate(full):
        for s in range(S):
            for key, spans in (("bins", bins), ("curve", curve)):
                for i, (lo, hi) in enumerate(spans):
                    out[key][i, s, j] = span_mean(d[s], lo, hi)
            past = span_mean(d[s], a0)
            out["past_window"][s, j] = past
            out["window_contrast"][s, j] = past - span_mean(d[s], b0, b1)
            out["slope_past_window"][s, j] = slope_vs_log_position(d[s], start=window)
            out["slope_all_frames"][s, j] = slope_vs_log_position(d[s])
    return out


def _est(values: np.ndarray, speakers: list[str], n_boot: int, seed: int) -> dict:
    e: Estimate = cluster_bootstrap(values, speakers, n_boot=n_boot, seed=seed)
    return {"mean": e.mean, "ci95": e.ci95, "n_docs": e.n, "n_speakers": e.n_clusters}


def estimates(stats: dict[str, np.ndarray], speakers: list[str], bins: list[tuple[int, int]],
              curve: list[tuple[int, int]], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Means over documents with cluster-bootstrap CIs for every statistic of `per_document` present in `stats`."""
    streams = lambda v: {name: _est(v[s], speakers, n_boot, seed) for s, name in enumerate(ALL_STREAMS)}
    out: dict = {}
    if "bins" in stats:
        out["bins"] = []
        for i, (lo, hi) in enumerate(bins):
            present = ~np.isnan(stats["bins"][i]).all(axis=0)  # [D]: the document has any stream in the bin
            out["bins"].append({"lo": lo, "hi": hi, "center": (lo + hi) // 2, "n_docs": int(present.sum()),
                                "n_speakers": len({sp for sp, p in zip(speakers, present, strict=True) if p}),
                                "streams": streams(stats["bins"][i])})
    for key in ("past_window", "window_contrast", "slope_past_window", "slope_all_frames"):
        if key in stats:
            out[key] = streams(stats[key])
    if "curve" in stats:
        out["curve"] = [{"center": float(math.sqrt((lo + 1) * hi)), "streams": streams(stats["curve"][i])}
                        for i, (lo, hi) in enumerate(curve)]
    return out


def resolve_speakers(doc_ids: list[str], speakers: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The speaker of each document, and the ids of documents whose speaker is unknown.

    A document's speaker is `speakers[key]` for its path, file name or stem (in that order), else `<speaker>` of a
    `<speaker>_<k>` file name (`ttt-speech data librilight`), else unknown: the document is its own cluster.
    """
    speakers = speakers or {}
    out, unknown = [], []
    for doc in doc_ids:
        path = Path(doc)
        found = next((speakers[k] for k in (doc, path.name, path.stem) if k in speakers), None)
        found = found or speaker_from_name(path)
        if found is None:
            unknown.append(doc)
            found = f"document:{doc}"
        out.append(str(found))
    return out, unknown


def load_speakers(path: str | Path) -> dict[str, str]:
    """A speakers file: `{"files": {name: speaker}}` (the `speakers.json` of `ttt-speech data librilight`) or a flat
    `{name: speaker}` object; `name` is a document's path, file name or stem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"speakers file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    mapping = data.get("files", data) if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f'{path}: expected {{"files": {{name: speaker}}}} or {{name: speaker}} with string speakers')
    return mapping


def check_lengths(documents: list[tuple[str, int]], bins: list[tuple[int, int]], window: int) -> list[str]:
    """Refuse documents that reach no bin (`DocumentsTooShortError`); return warnings for empty bins and for
    documents that end before the window.

    Args:
        documents: (id, frames) of each document.
    """
    longest_id, longest = max(documents, key=lambda d: d[1])
    first = min(lo for lo, _ in bins)
    if longest <= first:
        raise DocumentsTooShortError(
            f"all {len(documents)} documents are shorter than every bin: the longest, {longest_id}, has {longest} "
            f"frames ({longest / FRAME_RATE:.1f} s) and the first bin starts at frame {first}; pass --bins with "
            f"centres below {int(longest / 1.25)} or use longer documents")
    notes = []
    empty = [f"{lo}-{hi}" for lo, hi in bins if longest <= lo]
    if empty:
        notes.append(f"bins {', '.join(empty)} are past every document's end ({longest} frames): no data there")
    short = [d for d, n in documents if n <= window]
    if short:
        notes.append(f"{len(short)} of {len(documents)} documents end before the window ({window} frames): they "
                     "count in the bins but not past the window")
    return notes


def evaluate(models: dict[str, tuple[str, torch.nn.Module]], documents: list[tuple[str, torch.Tensor]],
             out_dir: str | Path, mode: str = "streaming", step: int = 1, bins: list[int] | None = None,
             device: str = "cpu", speakers: dict[str, str] | None = None, window: int | None = None,
             reference: str | None = None, before_start: int | None = None, n_boot: int = DEFAULT_BOOTSTRAP,
             seed: int = 0) -> dict:
    """Run every model over every document and write report.json, report.csv and nll_vs_position.png.

    Args:
        models: name -> (path, model).
        documents: (id, codes of shape [K, T]); the id is the audio path (its name gives the speaker).
        speakers: document path / name / stem -> speaker (see `resolve_speakers`).
        window: frames; default: the reference model's attention context.
        reference: the checkpoint the others are paired with; default "base" if present, else the first.
        before_start: first frame of the span before the window (default window // 2).
    """
    out_dir = Path(out_dir)
    if not models or not documents:
        raise ValueError(f"need checkpoints and documents, got {len(models)} and {len(documents)}")
    reference = reference or ("base" if "base" in models else next(iter(models)))
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the checkpoints {sorted(models)}")
    if window is None:
        window = models[reference][1].context
        if window is None:
            raise ConfigError(f"{reference}: attention context is unbounded; give the window (--window FRAMES)")
    edges = bin_edges(bins or DEFAULT_BINS)
    lengths = [(doc_id, int(codes.shape[-1])) for doc_id, codes in documents]
    for note in check_lengths(lengths, edges, window):
        print(f"eval-librilight: {note}")
    doc_speakers, unknown = resolve_speakers([d for d, _ in documents], speakers)
    if unknown:
        print(f"eval-librilight: {plural(len(unknown), 'document')} without a known speaker (no <speaker>_<k> "
              f"name, no --speakers entry), each its own cluster: {', '.join(Path(u).name for u in unknown[:5])}"
              + (", ..." if len(unknown) > 5 else ""))
    curve = curve_edges(max(n for _, n in lengths))
    (b0, b1), (a0, _) = contrast_spans(window, before_start)
    report = {"version": 2, "mode": mode, "step": step, "bins": [list(e) for e in edges], "window": window,
              "contrast_spans": {"before": [b0, b1], "after": [a0, None]}, "reference": reference,
              "n_documents": len(documents), "n_speakers": len(set(doc_speakers)),
              "documents": [{"id": d, "speaker": s, "frames": n}
                            for (d, n), s in zip(lengths, doc_speakers, strict=True)],
              "statistics": {"ci95": "percentile cluster bootstrap over speakers", "n_boot": n_boot, "seed": seed,
                             "min_clusters": MIN_CLUSTERS},
              "checkpoints": {}}
    per_doc: dict[str, dict[str, np.ndarray]] = {}
    with tqdm(total=len(models) * sum(n for _, n in lengths), desc="eval-librilight", unit="frame",
              unit_scale=True) as bar:
        for name, (_, model) in models.items():
            model.eval()
            nlls = []
            for _doc_id, codes in documents:
                nlls.append(frame_nll(model, codes[None].to(device), mode=mode, step=step)[0].cpu().numpy())
                bar.update(int(codes.shape[-1]))  # fresh state per document: frame_nll opens its own streaming
            per_doc[name] = per_document(nlls, edges, window, curve, before_start)
    for name, (path, model) in models.items():
        ttt = getattr(model, "ttt_config", None)
        entry = {"path": str(path), "attention_context": model.context,
                 "ttt": ttt.to_dict() if ttt is not None else None,
                 **estimates(per_doc[name], doc_speakers, edges, curve, n_boot, seed), "paired": None}
        if name != reference:
            diff = {k: per_doc[name][k] - per_doc[reference][k] for k in PAIRED_KEYS}
            entry["paired"] = {"reference": reference, **estimates(diff, doc_speakers, edges, curve, n_boot, seed)}
        report["checkpoints"][name] = entry
    report = _nan_to_none(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_csv(report, out_dir / "report.csv")
    plot_report(report, out_dir / "nll_vs_position.png")
    return report


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


CSV_COLUMNS = ["checkpoint", "comparison", "statistic", "stream", "bin_lo", "bin_hi", "mean", "ci95_lo", "ci95_hi",
               "n_docs", "n_speakers"]


def write_csv(report: dict, path: Path) -> None:
    """One row per (checkpoint, comparison, statistic, stream, bin); comparison is "absolute" or "minus <ref>"."""
    def row(name, comparison, statistic, stream, lo, hi, est):
        ci = est["ci95"] or [None, None]
        return [name, comparison, statistic, stream, lo, hi, est["mean"], ci[0], ci[1], est["n_docs"],
                est["n_speakers"]]

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for name, ck in report["checkpoints"].items():
            parts = [("absolute", ck)]
            if ck["paired"]:
                parts.append((f"minus {ck['paired']['reference']}", ck["paired"]))
            for comparison, stats in parts:
                for stream in ALL_STREAMS:
                    for b in stats["bins"]:
                        w.writerow(row(name, comparison, "bin", stream, b["lo"], b["hi"], b["streams"][stream]))
                    for key in ("past_window", "window_contrast", "slope_past_window", "slope_all_frames"):
                        if key in stats:
                            w.writerow(row(name, comparison, key, stream, report["window"], None, stats[key][stream]))


def _ci_label(report: dict) -> str:
    n = report["n_speakers"]
    return "95% CI over speakers" if n >= MIN_CLUSTERS else f"no CI: {plural(n, 'speaker')} (< {MIN_CLUSTERS})"


def plot_report(report: dict, path: Path) -> Path:
    """Top: NLL by position per checkpoint; bottom: the paired difference to the reference. CIs as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, curve, label):
        pts = [(c["center"], c["streams"][stream]) for c in curve if c["streams"][stream]["mean"] is not None]
        if not pts:
            return
        x = np.asarray([p[0] for p in pts])
        m = np.asarray([p[1]["mean"] for p in pts])
        (line,) = ax.plot(x, m, label=label)
        ci = [(xi, *est["ci95"]) for xi, est in pts if est["ci95"] is not None]
        if ci:
            cx, lo, hi = map(np.asarray, zip(*ci, strict=True))
            ax.fill_between(cx, lo, hi, alpha=0.2, color=line.get_color())

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    ref = report["reference"]
    for col, stream in enumerate(["text", "audio"]):
        top, bottom = axes[0, col], axes[1, col]
        for name, ck in report["checkpoints"].items():
            draw(top, ck["curve"], name)
            if ck["paired"]:
                past = ck["paired"]["past_window"][stream]
                label = f"{name} - {ref}"
                if past["mean"] is not None:
                    ci = past["ci95"]
                    label += f"; past the window {past['mean']:+.3f}" + (
                        f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no CI)")
                draw(bottom, ck["paired"]["curve"], label)
        bottom.axhline(0.0, color="k", lw=0.8)
        for ax in (top, bottom):
            ax.axvline(report["window"], color="gray", ls=":", lw=1)
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        suffix = "" if stream == "text" else " (mean of codebooks)"
        top.set_title(f"{stream} NLL{suffix}: mean over {plural(report['n_documents'], 'document')}, "
                      f"{_ci_label(report)}",
                      fontsize=9)
        top.set_ylabel("NLL (nats)")
        bottom.set_title(f"paired difference to {ref}, same documents ({_ci_label(report)})", fontsize=9)
        bottom.set_ylabel("NLL difference (nats)")
        bottom.set_xlabel("position (frames, 12.5 Hz)")
    fig.suptitle(f"NLL by position ({report['mode']}); dotted: the window ({report['window']} frames)")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.9, hspace=0.25, wspace=0.2)  # tight_layout: slow
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_documents(manifest: str | Path, tokenizer: str | Path, mimi: str = "tiny-random",
                   codes_dir: str | Path | None = None, max_frames: int | None = None,
                   device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Every recording of `manifest` as whole token streams [17, F] (text, then the 16 codebooks)."""
    from ttt_speech.data import DataConfig, build_loader

    loader = build_loader(DataConfig(train_manifest=str(manifest), duration_sec=10.0, shuffle=False,
                                     random_crop=False, tokenizer=str(tokenizer), mimi=mimi,
                                     codes_dir=str(codes_dir) if codes_dir else None, device=device, cache_files=1))
    docs = []
    for i, entry in enumerate(tqdm(loader.entries, desc="encoding documents", unit="doc")):
        stream = loader.recording_stream(i).long()
        docs.append((str(entry.path), stream[:, :max_frames] if max_frames else stream))
    return docs


def parse_checkpoints(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` (named by its folder) -> [(name, path)]; names must be distinct."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).name
        if name in dict(out):
            raise ConfigError(f"two checkpoints named {name!r}; name them NAME=PATH")
        out.append((name, path))
    return out


NO_TTT = "none"  # a `--ttt` config whose `ttt:` is null: the checkpoint must be a base model


def _read_ttt_spec(spec: str) -> dict | str:
    """One `--ttt` SPEC: `from_checkpoint`, `none`, or a YAML/JSON file: a training config (its `ttt:` block) or
    a TTT config (the keys of `ttt_config.json`)."""
    import yaml

    from ttt_speech.integrations.moshi import FROM_CHECKPOINT, MoshiTTTConfig

    if spec in (FROM_CHECKPOINT, NO_TTT):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--ttt {spec}: expected {FROM_CHECKPOINT}, {NO_TTT}, or a YAML/JSON file (a training "
                          f"config with a ttt: block, or a TTT config), and no such file exists")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot read the TTT config: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a TTT config must be a mapping, got {type(data).__name__}")
    if "ttt" in data or "model" in data:  # a training config
        data, where = data.get("ttt"), f"{path}: ttt"
        if data is None:
            return NO_TTT
        if data == FROM_CHECKPOINT:
            return FROM_CHECKPOINT
    else:
        where = str(path)
    return MoshiTTTConfig.from_dict(data, where=where).to_dict()  # strict: unknown keys and wrong types named


def parse_ttt_specs(specs: list[str] | None, names: list[str]) -> dict[str, dict | str]:
    """`--ttt [NAME=]SPEC` (repeatable) -> {checkpoint name: TTT config dict, `from_checkpoint` or `none`}. A SPEC
    without NAME applies to every checkpoint not named in another; a checkpoint with no SPEC takes its own
    (`from_checkpoint`)."""
    out: dict[str, dict | str] = {}
    default = None
    for item in specs or []:
        name, sep, spec = item.partition("=")
        if not sep:
            if default is not None:
                raise ConfigError(f"--ttt given twice without a checkpoint name ({default[0]!r}, {item!r}); name them "
                                  "NAME=SPEC")
            default = (item, _read_ttt_spec(item))
            continue
        if name not in names:
            raise ConfigError(f"--ttt {item}: no checkpoint named {name!r} (checkpoints: {', '.join(names)})")
        if name in out:
            raise ConfigError(f"--ttt given twice for checkpoint {name!r}")
        out[name] = _read_ttt_spec(spec)
    if default is not None:
        out = {n: out.get(n, default[1]) for n in names}
    return out


def check_checkpoint_ttt(path: str, ttt: dict | str | None) -> dict | str | None:
    """The stage hand-off check, before any document is encoded: a checkpoint carrying `ttt_config.json` must
    equal `ttt` (a difference is a `CheckpointMismatch` naming the keys; `from_checkpoint` or None takes the
    checkpoint's); `none` requires a base checkpoint. Returns the `ttt` argument of `load_any_lm`."""
    from ttt_speech.integrations.moshi import (
        TTT_CONFIG_FILE,
        MoshiTTTConfig,
        check_ttt_handoff,
        checkpoint_ttt_config,
    )

    if ttt == NO_TTT:
        if checkpoint_ttt_config(path) is not None:
            raise ConfigError(f"{path}: the given config has no TTT (ttt: null), but the checkpoint carries "
                              f"{TTT_CONFIG_FILE}; pass its training config or --ttt from_checkpoint")
        return None
    if isinstance(ttt, dict):
        check_ttt_handoff(MoshiTTTConfig.from_dict(ttt, where="--ttt"), path)
    return ttt


def load_checkpoint(path: str, ttt: dict | str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`load_any_lm(path, ttt=)` after `check_checkpoint_ttt`."""
    from ttt_speech.integrations.moshi import load_any_lm

    return load_any_lm(path, device=device, dtype=dtype, ttt=check_checkpoint_ttt(path, ttt))


def run(checkpoints: list[str], manifest: str, tokenizer: str, out_dir: str, mimi: str = "tiny-random",
        codes_dir: str | None = None, mode: str = "streaming", step: int = 1, bins: list[int] | None = None,
        max_frames: int | None = None, device: str = "cpu", dtype: str = "float32",
        speakers: str | None = None, window: int | None = None, reference: str | None = None,
        n_boot: int = DEFAULT_BOOTSTRAP, print_paired: bool = True, ttt: list[str] | None = None) -> dict:
    """`ttt-speech eval librilight`: checkpoints are `NAME=PATH` or `PATH` (named by its folder); `ttt`: the
    `--ttt [NAME=]SPEC` the checkpoints are checked against (`parse_ttt_specs`; default: each its own)."""
    torch_dtype = DTYPES[dtype]
    named = parse_checkpoints(checkpoints)
    ttt_of = parse_ttt_specs(ttt, [n for n, _ in named])
    for name, path in named:
        check_checkpoint_ttt(path, ttt_of.get(name))
    if reference is not None and reference not in dict(named):
        raise ConfigError(f"--reference {reference!r} is not among the checkpoints {[n for n, _ in named]}")
    edges = bin_edges(bins or DEFAULT_BINS)
    speaker_map = load_speakers(speakers) if speakers else None
    docs = load_documents(manifest, tokenizer, mimi, codes_dir, max_frames, device)
    try:  # before loading any model: refuse documents that reach no bin
        check_lengths([(d, int(c.shape[-1])) for d, c in docs], edges, window or 0)
    except DocumentsTooShortError as e:
        raise DocumentsTooShortError(f"{manifest}: {e}") from None
    models = {name: (path, load_checkpoint(path, ttt_of.get(name), device, torch_dtype)) for name, path in named}
    report = evaluate(models, docs, out_dir, mode=mode, step=step, bins=bins, device=device, speakers=speaker_map,
                      window=window, reference=reference, n_boot=n_boot)
    print_summary(report, paired=print_paired)
    return report


def _fmt(est: dict, width: int = 9, sign: bool = False) -> str:
    m = est["mean"]
    return f"{'-':>{width}}" if m is None else f"{m:>{'+' if sign else ''}{width}.3f}"


def paired_line(report: dict, name: str, streams: tuple[str, ...] = ("text", "audio")) -> str:
    """One line: `name` minus the reference past the window, per stream, with the CI or why there is none."""
    p = report["checkpoints"][name]["paired"]
    parts = []
    for stream in streams:
        est = p["past_window"][stream]
        if est["mean"] is None:
            parts.append(f"{stream} no data")
            continue
        ci = est["ci95"]
        parts.append(f"{stream} {est['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
    est = p["past_window"][streams[-1]]
    n_docs, n_spk = est["n_docs"], est["n_speakers"]
    ci_note = "95% CI over speakers" if n_spk >= MIN_CLUSTERS else f"no CI with {plural(n_spk, 'speaker')}"
    return (f"{name} - {p['reference']} past the window (frames >= {report['window']}), paired on "
            f"{plural(n_docs, 'document')}: {', '.join(parts)} ({ci_note})")


def _paired_row(stream: str, what: str, est: dict) -> str:
    if est["mean"] is None:
        return f"{stream:<6} {what:<16} {'no data':>8}"
    ci = est["ci95"]
    tail = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "no CI"
    return f"{stream:<6} {what:<16} {est['mean']:>+8.3f}  {tail:<18} {est['n_docs']:>5} {est['n_speakers']:>4}"


def print_summary(report: dict, streams: tuple[str, ...] = ("text", "audio"), paired: bool = True) -> None:
    """The absolute table (means), then (`paired`) each checkpoint's paired difference to the reference."""
    W = report["window"]
    print(f"NLL by position: {plural(report['n_documents'], 'document')}, {plural(report['n_speakers'], 'speaker')}; "
          f"window {W} frames; "
          f"{_ci_label(report)}")
    bins = [f"{b[0]}-{b[1]}" for b in report["bins"]]
    print(f"{'checkpoint':<14} {'stream':<6} " + " ".join(f"{b:>11}" for b in bins)
          + f" {f'>={W}':>9} {'contrast':>9} {'slope>W':>9} {'slope-all*':>10}")
    for name, ck in report["checkpoints"].items():
        for stream in streams:
            cells = " ".join(_fmt(b["streams"][stream], 11) for b in ck["bins"])
            print(f"{name:<14} {stream:<6} {cells} {_fmt(ck['past_window'][stream])} "
                  f"{_fmt(ck['window_contrast'][stream], sign=True)} {_fmt(ck['slope_past_window'][stream], sign=True)}"
                  f" {_fmt(ck['slope_all_frames'][stream], 10, sign=True)}")
    b0, b1 = report["contrast_spans"]["before"]
    print(f"  >={W}: mean past the window; contrast: that minus the mean over [{b0}, {b1}); "
          "slope: per log-frame, past the window; *slope-all: fitted from frame 0 (warm-up included)")
    for name, ck in report["checkpoints"].items():
        if not ck["paired"] or not paired:
            continue
        p = ck["paired"]
        print(f"paired difference {name} - {p['reference']}, per document on the same documents, then averaged "
              f"({_ci_label(report)}):")
        print(f"{'stream':<6} {'statistic':<16} {'diff':>8}  {'95% CI':<18} {'docs':>5} {'spk':>4}")
        for stream in streams:
            print(_paired_row(stream, f">={W}", p["past_window"][stream]))
            print(_paired_row(stream, "contrast", p["window_contrast"][stream]))
            for b in p["bins"]:
                print(_paired_row(stream, f"bin {b['lo']}-{b['hi']}", b["streams"][stream]))
