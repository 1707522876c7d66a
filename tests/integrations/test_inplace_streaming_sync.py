"""In-Place TTT streaming without host syncs (issue 16): moshi's real `LMGen` steps the model with every host read of
a tensor value trapped, across chunk boundaries, rows paused by `exec_mask` and a row reset; the streamed outputs
still equal the parallel forward over the same inputs."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from host_sync import forbid_host_reads
from lmgen_record import record_main
from test_moshi_ttt import forward_text_input, random_codes, stream, ttt_model

from ttt_speech.integrations.moshi import build_lm, make_lm_gen, ttt_modules


def run_lm_gen(model, codes: torch.Tensor, trap: bool, pause_at: int = 5, reset_at: int = 9) -> list[torch.Tensor]:
    """Step `LMGen` (greedy) over the user codes; row 1 is paused for one frame at `pause_at`, row 0 reset before
    frame `reset_at`. Returns the input frames the model was fed and its text logits, per step."""
    lm_gen = make_lm_gen(model, use_sampling=False)
    B, T = codes.shape[0], codes.shape[-1]
    with torch.no_grad(), lm_gen.streaming(B):
        fed, logits = record_main(lm_gen)
        reset = torch.arange(B) == 0
        for t in range(T):
            mask = torch.arange(B) != (1 if t == pause_at else B)
            with forbid_host_reads() if trap else contextlib.nullcontext():
                if t == reset_at:
                    lm_gen.reset_streaming(reset)
                lm_gen.set_exec_mask(mask)
                lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
    return fed, logits


@pytest.mark.parametrize("bounds", [{}, {"decay": 0.9, "max_delta": 0.05, "clip_tau": 0.5},
                                    {"decay": 0.8, "clip_tau": 0.3}, {"centre_update": True, "conv": "next"}])
def test_lmgen_step_makes_no_host_read(bounds: dict) -> None:
    model = ttt_model(chunk_size=3, **bounds)
    codes = random_codes(model, 2, 14)
    fed, logits = run_lm_gen(model, codes, trap=True)
    ref_fed, ref_logits = run_lm_gen(model, codes, trap=False)
    for a, b in zip(fed + logits, ref_fed + ref_logits, strict=True):
        assert torch.equal(a, b)
    # the same frames through the parallel forward: row 1 without its paused frame, row 0 from its reset
    with torch.no_grad():
        seq1 = torch.cat([f[1:] for t, f in enumerate(fed) if t != 5], dim=2)
        _, full1 = model.forward_text(seq1)
        got1 = torch.cat([x[1:] for t, x in enumerate(logits) if t != 5], dim=2)
        torch.testing.assert_close(got1, full1, rtol=1e-5, atol=1e-5)
        _, full0 = model.forward_text(torch.cat([f[:1] for f in fed[9:]], dim=2))
        torch.testing.assert_close(torch.cat([x[:1] for x in logits[9:]], dim=2), full0, rtol=1e-5, atol=1e-5)


def test_base_model_lmgen_makes_no_host_read() -> None:
    """The control: moshi's own step, without TTT, passes the trap (so a failure above is ours)."""
    model = build_lm(seed=0).eval()
    run_lm_gen(model, random_codes(model, 2, 6), trap=True)


def test_training_length_is_checked_outside_the_step() -> None:
    """The warning past the training length reads the device counter at reset and at the end of the stream only."""
    model = ttt_model(chunk_size=2)
    gating = ttt_modules(model)[0]
    gating.trained_chunks = 2
    seq = forward_text_input(model, random_codes(model, 2, 12))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with model.streaming(2):
            with forbid_host_reads():
                for t in range(12):
                    model.forward_text(seq[:, :, t:t + 1])
            assert not caught
            model.reset_streaming(torch.tensor([True, False]))  # 6 chunk updates > 2: warned here, once
            assert len(caught) == 1 and "past the 2 chunk updates of 2 frames" in str(caught[0].message)
        assert len(caught) == 1
        with model.streaming(2):  # a short stream is not checked at all (the host's frame count bounds every row)
            with forbid_host_reads():
                for t in range(5):
                    model.forward_text(seq[:, :, t:t + 1])
        with model.streaming(2):
            for t in range(7):
                model.forward_text(seq[:, :, t:t + 1])
        assert len(caught) == 2  # 7 frames: 3 updates, warned when the stream ends


@pytest.mark.parametrize("graphed", [False, True])
def test_a_stream_warns_exactly_where_the_parallel_form_does(graphed: bool) -> None:
    """Updates in use, (T - 1) // C: 6 frames of chunk 2 use 2 updates (the third is applied on the last frame and
    read by none), 7 frames use 3; with trained_chunks 2 only the second warns, streamed or in one call. `graphed`:
    the host's frame count is not trusted, so the device counters alone decide."""
    model = ttt_model(chunk_size=2)
    gating = ttt_modules(model)[0]
    gating.trained_chunks = 2
    seq = forward_text_input(model, random_codes(model, 2, 7))
    for T in (6, 7):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.forward_text(seq[:, :, :T])
            parallel = len(caught)
            with model.streaming(2):
                for t in range(T):
                    model.forward_text(seq[:, :, t:t + 1])
                gating._streaming_state.graphed = graphed
        assert (parallel, len(caught) - parallel) == ((0, 0) if T == 6 else (1, 1))


def test_pieces_and_frames_mix_without_host_reads() -> None:
    """Multi-frame calls (prefill through streaming) are branch-free too, and mix with frames."""
    model = ttt_model(chunk_size=4, decay=0.9)
    seq = forward_text_input(model, random_codes(model, 2, 23))
    with torch.no_grad():
        full, _ = model.forward_text(seq)
    with forbid_host_reads():
        got = stream(model, seq, [1, 1, 6, 1, 9, 1, 1, 3])
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,split", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_lmgen_under_cuda_graphs_equals_parallel(monkeypatch, dtype: torch.dtype, split: bool) -> None:
    """moshi's `LMGen` captures `forward_text` with In-Place TTT in a CUDA graph and replays it (no
    NO_CUDA_GRAPH); its eager warm-up step runs with CUDA's sync debug mode raising on any sync (a sync during the
    capture is an error of its own). The streamed logits equal the parallel forward over the frames it fed (fp32
    1e-4 with TF32 off; bf16 as the GPU streaming test)."""
    from moshi.utils.compile import CUDAGraphed

    monkeypatch.delenv("NO_CUDA_GRAPH", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = ttt_model(chunk_size=3, split_product=split).to("cuda", dtype)
    codes = random_codes(model, 2, 14).cuda()
    lm_gen = make_lm_gen(model, use_sampling=False)
    with torch.no_grad(), lm_gen.streaming(2):
        main = lm_gen._streaming_state.graphed_main
        assert isinstance(main, CUDAGraphed) and not main.disable

        @contextlib.contextmanager
        def syncs_refused_while_eager():
            eager = main._graph is None and main.warmup_steps > 0
            torch.cuda.set_sync_debug_mode("error" if eager else "default")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")

        fed, logits = record_main(lm_gen, around=syncs_refused_while_eager)
        for t in range(codes.shape[-1]):
            lm_gen.step(codes[:, model.dep_q + 1:, t:t + 1])
        assert main._graph is not None  # captured, then replayed
    with torch.no_grad():
        _, full = model.forward_text(torch.cat(fed, dim=2))
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(torch.cat(logits, dim=2).float(), full.float(), rtol=tol, atol=tol)
