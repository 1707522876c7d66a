#!/usr/bin/env python3
"""The fair long-range recall benchmark (`ttt_speech.eval.recall`): window vs full attention vs TTT variants on a
tiny Moshi-shaped model, 3 seeds, paired statistics, training curves. See docs/eval.md.

    python scripts/bench_recall.py [--out bench/recall] [--seeds 0 1 2] [--jobs 2 --threads 1] [--steps N] ...
    python scripts/bench_recall.py spoken [--out bench/recall-spoken] [--mimi PATH] ...   # the spoken-recall one

Writes `recall.json` (config, per-variant statistics, curves), `recall.png`, and one JSON per (variant, seed)
under `runs/` (an interrupted run resumes from them).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

from ttt_speech.eval import recall, recall_spoken  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:2] == ["spoken"]:
        recall_spoken.main(sys.argv[2:])
    else:
        recall.main(sys.argv[1:])
