"""Run the tiny Moshi through training and streaming; save every output to a file.

    python moshi_probe.py OUT.pt

Run by test_moshi_patch_identity.py twice: with the patched moshi installed in .venv, and with PYTHONPATH pointing
at the pristine pin. Deterministic: seeded construction, inputs and sampling; single-threaded.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared random-codes helper

import moshi  # noqa: E402
import torch  # noqa: E402
from moshi_codes import random_codes  # noqa: E402

from ttt_speech.integrations.moshi import build_lm, make_lm_gen  # noqa: E402


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = build_lm(seed=0)
    B, T = 2, 24
    codes = random_codes(model, B, T, seed=1)

    out = model(codes)
    loss = (out.logits[out.mask].float().logsumexp(-1).mean()
            + out.text_logits[out.text_mask].float().logsumexp(-1).mean())
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    text_logits = []
    lm_gen = make_lm_gen(model, on_text_logits_hook=lambda x: text_logits.append(x.clone()))
    tokens = []
    torch.manual_seed(2)
    with torch.no_grad(), lm_gen.streaming(B):
        for t in range(T):
            if t == T // 2:
                lm_gen.reset_streaming(torch.tensor([True, False]))
            step = lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
            if step is not None:
                tokens.append(step)
    torch.save({
        "moshi_file": moshi.__file__,
        "logits": out.logits.detach(), "text_logits": out.text_logits.detach(), "grads": grads,
        "stream_tokens": torch.cat(tokens, -1), "stream_text_logits": torch.cat(text_logits, 0),
    }, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
