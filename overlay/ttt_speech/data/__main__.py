"""`python -m ttt_speech.data`: build a manifest, or pre-encode one into code shards."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ttt_speech.cli import run_command

    return run_command(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.data", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of known errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    manifest = sub.add_parser("manifest", help="list the recordings of a folder that have alignments beside them")
    manifest.add_argument("audio_dir")
    manifest.add_argument("out", help="the jsonl manifest to write")
    manifest.add_argument("--pattern", default="**/*.wav", help="glob under audio_dir (default: %(default)s)")
    encode = sub.add_parser("encode", help="pre-encode a manifest's recordings with Mimi into code shards")
    encode.add_argument("manifest")
    encode.add_argument("codes_dir")
    encode.add_argument("--mimi", default="tiny-random", help="Mimi weights file or tiny-random")
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--num-codebooks", type=int, default=8)
    encode.add_argument("--shard-mb", type=float, default=256.0)
    args = parser.parse_args(argv)

    if args.command == "manifest":
        from ttt_speech.data.manifest import build_manifest

        count = build_manifest(args.audio_dir, args.out, args.pattern)
        print(f"wrote {args.out}: {count} recordings")
    else:
        import os

        os.environ.setdefault("NO_TORCH_COMPILE", "1")
        from ttt_speech.data.codes import pre_encode

        index = pre_encode(args.manifest, args.codes_dir, mimi=args.mimi, device=args.device,
                           num_codebooks=args.num_codebooks, shard_mb=args.shard_mb, verbose=True)
        print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
