"""`python -m ttt_speech.data ...`: the same as `ttt-speech data ...` (librilight, manifest, encode)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ttt_speech.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in argv else []  # a top-level flag of `ttt-speech`
    return cli_main([*debug, "data", *(a for a in argv if a != "--debug")])


if __name__ == "__main__":
    sys.exit(main())
