"""`ttt-speech`: the project's command line. Thin: each subcommand calls into the package."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttt-speech", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="the patched Moshi on the tiny default: forward and streaming")
    quick.add_argument("--batch-size", type=int, default=2)
    quick.add_argument("--frames", type=int, default=48)
    quick.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    if args.command == "quickstart":
        from ttt_speech import quickstart

        quickstart.run(batch_size=args.batch_size, frames=args.frames, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
