"""`ttt-speech`: the project's command line. Thin: each subcommand calls into the package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command; a known error (`ttt_speech.errors.TTTSpeechError`: config, data, checkpoint, divergence)
    prints one line and returns 2, unless `--debug` asks for the traceback."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    debug = argv is not None and "--debug" in argv or argv is None and "--debug" in sys.argv[1:]
    warnings.formatwarning = _one_line_warning
    try:
        return _main(argv)
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


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="ttt-speech", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of known errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="the whole pipeline on the tiny default: fine-tune with a resume, "
                           "plots, eval report (CPU, a few minutes)")
    quick.add_argument("--out", default="runs/quickstart")
    quick.add_argument("--steps", type=int, default=200)
    quick.add_argument("--seed", type=int, default=0)

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
    ll.add_argument("--step", type=int, default=1, help="frames per streaming call (1: frame by frame)")
    ll.add_argument("--bins", type=int, nargs="+", default=None, help="bin centres in frames")
    ll.add_argument("--max-frames", type=int)
    ll.add_argument("--device", default="cpu")
    ll.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    lm = data.add_parser("librilight", help="long-form manifest: a speaker's chapters concatenated in order")
    lm.add_argument("root")
    lm.add_argument("out_dir")
    lm.add_argument("--min-minutes", type=float, default=30.0)
    lm.add_argument("--max-files", type=int)

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
        from ttt_speech import quickstart

        quickstart.run(out=args.out, steps=args.steps, seed=args.seed)
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
    elif args.command == "eval":
        from ttt_speech.eval import librilight

        librilight.run(args.checkpoints, args.manifest, args.tokenizer, args.out, mimi=args.mimi,
                       codes_dir=args.codes_dir, mode=args.mode, step=args.step, bins=args.bins,
                       max_frames=args.max_frames, device=args.device, dtype=args.dtype)
    elif args.command == "data":
        from ttt_speech.data.librilight import build_librilight_long

        print(f"wrote {build_librilight_long(args.root, args.out_dir, args.min_minutes, max_files=args.max_files)}")
    elif args.command == "plot-monitor":
        from ttt_speech.train.monitor import plot_monitor

        for path in plot_monitor(args.run_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
