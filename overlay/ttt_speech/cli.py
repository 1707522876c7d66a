"""`ttt-speech`: the project's command line. Thin: each subcommand calls into the package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ttt_speech.constants import DTYPE_NAMES

TTT_SPEC_HELP = ("the TTT config a checkpoint must carry (repeatable): a training config (its ttt: block), a TTT "
                 "config file, from_checkpoint (the default) or none (a base model); a checkpoint whose "
                 "ttt_config.json differs is an error naming the keys")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(_one_line_warning(message, category, filename, lineno).rstrip("\n"), file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a known error (`ttt_speech.errors.TTTSpeechError`: config, data, checkpoint, divergence)
    prints one line and returns 2, unless `--debug` asks for the traceback."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    return run_command(_main, argv)


def run_command(command, argv: list[str] | None) -> int:
    """`command(argv)`, with known errors as one line and exit status 2, Ctrl-C as "aborted" and 130, warnings as
    `warning: ...` lines; `--debug` anywhere in `argv` keeps the tracebacks."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    # one line each, on a line of its own even while a progress bar is drawn
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    showwarning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return command(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("aborted", file=sys.stderr)
        return 130
    except Exception as e:
        from ttt_speech.errors import TTTSpeechError

        if debug or not isinstance(e, TTTSpeechError):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning, warnings.showwarning = formatwarning, showwarning


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="ttt-speech", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of known errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="the whole pipeline on the tiny default: fine-tune with a resume, "
                           "plots, eval report (CPU, a few minutes)")
    quick.add_argument("--out", default=None, help="default runs/quickstart (runs/quickstart-llama with --llama)")
    quick.add_argument("--steps", type=int, default=None, help="default 200 (240 with --llama)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--llama", action="store_true", help="instead: distil a tiny random Llama's top-quarter "
                       "attention into TTT-Linear, with a resume; KL, perplexity by position and recall, teacher vs "
                       "student, in summary.json (CPU, about a minute)")

    ft = sub.add_parser("finetune", help="fine-tune from a YAML config; extra --key.sub=value override it",
                        epilog="examples: ttt-speech finetune configs/tiny.yaml --max_steps=50; "
                               "ttt-speech finetune configs/dailytalk.yaml --submitit slurm --partition gpu")
    ft.add_argument("config")
    ft.add_argument("--nproc", type=int, default=1, help="local processes (torchrun) when not using --submitit")
    ft.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY",
                    help="on resume, keys that may differ from the checkpoint's config (max_steps, optim.lr, ...)")
    ft.add_argument("--check", action="store_true", help="validate the config and overrides, then exit")
    ft.add_argument("--submitit", choices=["slurm", "local", "debug"], default=None)
    ft.add_argument("--partition")
    ft.add_argument("--nodes", type=int, default=1)
    ft.add_argument("--gpus-per-node", type=int, default=8)
    ft.add_argument("--time-min", type=int, default=60 * 24)
    ft.add_argument("--account")
    ft.add_argument("--constraint")
    ft.add_argument("--qos")

    plot = sub.add_parser("plot-monitor", help="PNG plots of a run's metrics.csv and ttt_stats.csv")
    plot.add_argument("run_dir")

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval_command", required=True)
    ll = ev.add_parser("librilight", help="NLL by position past the attention window (report: JSON, CSV, PNG)")
    ll.add_argument("--checkpoint", action="append", required=True, dest="checkpoints",
                    help="NAME=PATH (repeatable): a run's export/ folder, or a moshi safetensors file")
    ll.add_argument("--manifest", required=True, help="long-form audio manifest (ttt-speech data librilight)")
    ll.add_argument("--tokenizer", required=True)
    ll.add_argument("--mimi", default="tiny-random")
    ll.add_argument("--codes-dir")
    ll.add_argument("--out", required=True)
    ll.add_argument("--mode", choices=["streaming", "parallel"], default="streaming")
    ll.add_argument("--step", type=int, default=1,
                    help="frames per streaming call (1: frame by frame; above 1 only within the attention context)")
    ll.add_argument("--bins", type=int, nargs="+", default=None, help="bin centres in frames")
    ll.add_argument("--max-frames", type=int)
    ll.add_argument("--device", default="cpu")
    ll.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    ll.add_argument("--speakers", help="JSON {file: speaker} or the speakers.json of `data librilight` (default: "
                    "<speaker>_<k> file names; other documents are their own cluster)")
    ll.add_argument("--window", type=int, help="frames (default: the reference's attention context)")
    ll.add_argument("--reference", help="checkpoint the others are paired with (default: base, else the first)")
    ll.add_argument("--n-boot", type=int, default=10000, help="cluster-bootstrap replicates")
    ll.add_argument("--ttt", action="append", metavar="[NAME=]SPEC", help=TTT_SPEC_HELP)

    gen = ev.add_parser("generate", help="free-running LMGen for minutes: text/audio entropy and repetition over "
                        "time, base vs TTT with the same seeds (JSON, CSV, PNG)")
    gen.add_argument("--checkpoint", action="append", required=True, dest="checkpoints",
                     help="NAME=PATH (repeatable): a run's export/ folder, or a moshi safetensors file")
    gen.add_argument("--out", required=True)
    length = gen.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=float)
    length.add_argument("--frames", type=int)
    gen.add_argument("--manifest", help="the prompt and user stream come from one recording of this manifest "
                     "(default: no prompt, the user stream is Mimi's encoding of silence)")
    gen.add_argument("--index", type=int, default=0, help="which recording of --manifest")
    gen.add_argument("--prompt-frames", type=int, default=0, help="frames of the recording forced as the prompt")
    gen.add_argument("--tokenizer")
    gen.add_argument("--mimi", default="tiny-random")
    gen.add_argument("--codes-dir")
    gen.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    gen.add_argument("--batch-size", type=int, default=1, help="rows per seed (samples = seeds x rows)")
    gen.add_argument("--window-sec", type=float, default=10.0)
    gen.add_argument("--ngram", type=int, default=4)
    gen.add_argument("--reference")
    gen.add_argument("--temp", type=float, default=0.8)
    gen.add_argument("--temp-text", type=float, default=0.7)
    gen.add_argument("--top-k", type=int, default=250)
    gen.add_argument("--top-k-text", type=int, default=25)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    gen.add_argument("--ttt", action="append", metavar="[NAME=]SPEC", help=TTT_SPEC_HELP)

    lle = ev.add_parser("llama", help="a llama training run's student vs its teacher (TTT bypassed): perplexity by "
                        "position and the recall test (JSON)")
    lle.add_argument("run_dir")
    lle.add_argument("--export", help="the student (default RUN_DIR/export; RUN_DIR/best for the best)")
    lle.add_argument("--tokens", type=int, help="document length (default 4x the last stage's seq_len)")
    lle.add_argument("--docs", type=int, default=16)
    lle.add_argument("--bins", type=int, default=4)
    lle.add_argument("--turns", type=int, nargs="+", default=[0, 2, 6], help="filler turns of the recall test")
    lle.add_argument("--device", default="cpu")
    lle.add_argument("--out", help="default RUN_DIR/eval_llama.json")

    data = sub.add_parser("data", help="data preparation: librilight, manifest, encode").add_subparsers(
        dest="data_command", required=True)
    lm = data.add_parser("librilight", help="long-form manifest: a speaker's chapters concatenated in order")
    lm.add_argument("root")
    lm.add_argument("out_dir")
    lm.add_argument("--min-minutes", type=float, default=30.0)
    lm.add_argument("--max-files", type=int)
    lm.add_argument("--holdout-speakers", metavar="N|LIST",
                    help="hold out N speakers (drawn with --holdout-seed) or a comma-separated list (`1089,` for "
                         "one): train.jsonl and heldout.jsonl instead of long.jsonl")
    lm.add_argument("--holdout-seed", type=int, default=0)
    manifest = data.add_parser("manifest", help="list the recordings of a folder that have alignments beside them")
    manifest.add_argument("audio_dir")
    manifest.add_argument("out", help="the jsonl manifest to write")
    manifest.add_argument("--pattern", default="**/*.wav", help="glob under audio_dir (default: %(default)s)")
    encode = data.add_parser("encode", help="pre-encode a manifest's recordings with Mimi into code shards "
                             "(data.codes_dir)")
    encode.add_argument("manifest")
    encode.add_argument("codes_dir")
    encode.add_argument("--mimi", default="tiny-random", help="Mimi weights file or tiny-random")
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--num-codebooks", type=int, default=8)
    encode.add_argument("--shard-mb", type=float, default=256.0)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "finetune":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "finetune":
        extra = [x for x in extra if x != "--debug"]  # also accepted after the subcommand (see main)
        stray = [x for x in extra if not x.startswith("--") or "=" not in x]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)} (config overrides look like --key.sub=value)")
        if args.allow_config_change:
            extra = [*extra, f"--allow_config_change=[{', '.join(args.allow_config_change)}]"]

    if args.command == "quickstart":
        if args.llama:
            from ttt_speech import quickstart_llama

            quickstart_llama.run(out=args.out or "runs/quickstart-llama", steps=args.steps or 240, seed=args.seed)
            return 0
        from ttt_speech import quickstart

        quickstart.run(out=args.out or "runs/quickstart", steps=args.steps or 200, seed=args.seed)
    elif args.command == "finetune":
        from ttt_speech.launch import submit

        if args.check:
            cfg = submit.check(args.config, extra, nproc=args.nproc if args.submitit is None else None)
            print(f"{args.config}: ok ({cfg.total_steps} steps, run_dir {cfg.run_dir})")
            return 0
        if args.submitit is None:
            return submit.run_local(args.config, extra, nproc=args.nproc)
        slurm = submit.SlurmConfig(cluster=args.submitit, partition=args.partition, nodes=args.nodes,
                                   gpus_per_node=args.gpus_per_node, time_min=args.time_min, account=args.account,
                                   constraint=args.constraint, qos=args.qos)
        job = submit.submit(args.config, extra, slurm)
        print(f"submitted job {job.job_id}; logs in {job.paths.folder}")
        if args.submitit != "slurm":
            print(job.result())
    elif args.command == "eval" and args.eval_command == "librilight":
        from ttt_speech.eval import librilight

        librilight.run(args.checkpoints, args.manifest, args.tokenizer, args.out, mimi=args.mimi,
                       codes_dir=args.codes_dir, mode=args.mode, step=args.step, bins=args.bins,
                       max_frames=args.max_frames, device=args.device, dtype=args.dtype, speakers=args.speakers,
                       window=args.window, reference=args.reference, n_boot=args.n_boot, ttt=args.ttt)
    elif args.command == "eval" and args.eval_command == "llama":
        from ttt_speech.eval.llama_eval import evaluate_run

        result = evaluate_run(args.run_dir, export=args.export, tokens=args.tokens, docs=args.docs, bins=args.bins,
                              turns=args.turns, device=args.device, out=args.out)
        for row in result["perplexity_by_position"]["bins"]:
            d = row["student_minus_teacher"]
            print(f"positions {row['positions'][0]}-{row['positions'][1]}: NLL teacher {row['teacher_nll']:.3f}, "
                  f"student {row['student_nll']:.3f}, difference {d['mean']:+.3f} (CI {d['ci95']})")
        for row in result["recall"]:
            print(f"recall after {row['turns']} turns: answer NLL teacher {row['teacher_answer_nll']:.3f}, student "
                  f"{row['student_answer_nll']:.3f}")
    elif args.command == "eval" and args.eval_command == "generate":
        from ttt_speech.eval import generate

        frames = args.frames if args.frames is not None else int(round(args.minutes * 60 * generate.FRAME_RATE))
        sampling = {"temp": args.temp, "temp_text": args.temp_text, "top_k": args.top_k, "top_k_text": args.top_k_text}
        generate.run(args.checkpoints, args.out, frames, manifest=args.manifest, index=args.index,
                     prompt_frames=args.prompt_frames, tokenizer=args.tokenizer, mimi=args.mimi,
                     codes_dir=args.codes_dir, seeds=args.seeds, batch_size=args.batch_size,
                     window_frames=max(1, int(round(args.window_sec * generate.FRAME_RATE))), ngram=args.ngram,
                     reference=args.reference, sampling=sampling, device=args.device, dtype=args.dtype,
                     ttt=args.ttt)
        print(f"wrote {args.out}/generate.json, generate.csv, generate.png")
    elif args.command == "data" and args.data_command == "manifest":
        from ttt_speech.data.manifest import build_manifest

        count = build_manifest(args.audio_dir, args.out, args.pattern)
        print(f"wrote {args.out}: {count} recordings")
    elif args.command == "data" and args.data_command == "encode":
        from ttt_speech.data.codes import pre_encode

        index = pre_encode(args.manifest, args.codes_dir, mimi=args.mimi, device=args.device,
                           num_codebooks=args.num_codebooks, shard_mb=args.shard_mb, verbose=True)
        print(f"wrote {index}")
    elif args.command == "data":
        from ttt_speech.data.librilight import SPEAKERS_FILE, build_librilight_long, parse_holdout

        holdout = parse_holdout(args.holdout_speakers) if args.holdout_speakers is not None else None
        manifest = build_librilight_long(args.root, args.out_dir, args.min_minutes, max_files=args.max_files,
                                         holdout_speakers=holdout, holdout_seed=args.holdout_seed)
        extra_files = [manifest.parent / "heldout.jsonl"] if holdout is not None else []
        print(f"wrote {', '.join(str(p) for p in [manifest, *extra_files, manifest.parent / SPEAKERS_FILE])}")
    elif args.command == "plot-monitor":
        from ttt_speech.train.monitor import plot_monitor

        for path in plot_monitor(args.run_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
