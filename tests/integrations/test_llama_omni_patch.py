"""The LLaMA-Omni patch: well formed against its pin; applied to the pinned source (when one is at hand), its
constructors route through `apply_ttt`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO / "patches" / "llama-omni"
TARGET = "omni_speech/model/language_model/omni_speech_llama.py"


def series() -> list[Path]:
    """The patch files named by `series` (a name, then optionally `# sha256:...`, per line)."""
    lines = (PATCH_DIR / "series").read_text().splitlines()
    return [PATCH_DIR / ln.split("#", 1)[0].strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_patch_is_well_formed_and_targets_the_pinned_path() -> None:
    pin = tomllib.loads((REPO / "upstream.lock").read_text())["llama-omni"]["source"]["commit"]
    (patch,) = series()
    text = patch.read_text()
    assert re.search(rf"^Upstream-Base: .*{pin}", text, re.M)
    assert re.findall(r"^diff --git a/(\S+) b/(\S+)$", text, re.M) == [(TARGET, TARGET)]
    hunk = text.split("\n@@", 1)[1]
    added = [ln[1:].strip() for ln in hunk.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert "apply_ttt(self, config)" in added
    assert 'if getattr(config, "use_ttt", False):' in added
    # the call lands before post_init(), so TTT parameters exist when weights are loaded
    after_call = hunk[hunk.index("apply_ttt(self, config)"):]
    assert "self.post_init()" in after_call


needs_source = pytest.mark.skipif(
    not os.environ.get("LLAMA_OMNI_SRC"),
    reason="LLaMA-Omni is only on GitHub: set LLAMA_OMNI_SRC to a checkout or archive of the pin")


@pytest.fixture(scope="module")
def patched_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("llama-omni")
    shutil.copy(REPO / "upstream.lock", tmp_path / "upstream.lock")
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "upstream.py"), "apply", "llama-omni",
                           "--lock", str(tmp_path / "upstream.lock"), "--no-install"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "upstream" / "llama-omni"


@needs_source
def test_series_applies_to_the_pinned_source(patched_checkout: Path) -> None:
    source = (patched_checkout / TARGET).read_text()
    init = source[source.index("class OmniSpeechLlamaForCausalLM"):]
    assert init.index("apply_ttt(self, config)") < init.index("self.post_init()")


# Runs in a fresh interpreter: omni_speech registers its config classes with transformers' Auto* at import. It
# imports the real patched modules (whisper is only imported when a config names a speech encoder).
ROUTING_PROBE = r"""
import sys
import tempfile

import torch
from omni_speech.model.language_model.omni_speech2s_llama import OmniSpeech2SConfig, OmniSpeech2SLlamaForCausalLM
from omni_speech.model.language_model.omni_speech_llama import OmniSpeechConfig, OmniSpeechLlamaForCausalLM

from ttt_speech.integrations.llama_omni import (LlamaTTTSelfAttention, from_pretrained_ttt, ttt_modules,
                                                ttt_state_dict)

torch.set_num_threads(1)
tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0)
ttt = dict(use_ttt=True, ttt_layers=[0, 2], ttt_mini_batch_size=4, ttt_base_lr=5.0)

assert not ttt_modules(OmniSpeechLlamaForCausalLM(OmniSpeechConfig(**tiny)))  # no use_ttt: untouched

torch.manual_seed(0)
model = OmniSpeechLlamaForCausalLM(OmniSpeechConfig(**tiny, **ttt)).eval()
assert sorted(ttt_modules(model)) == [0, 2], ttt_modules(model)
assert isinstance(model.model.layers[0].self_attn, LlamaTTTSelfAttention)

# the speech-to-speech class runs post_init() twice; TTT keeps its own init although the model's std is 1.0
s2s = OmniSpeech2SLlamaForCausalLM(OmniSpeech2SConfig(**(tiny | dict(initializer_range=1.0)), **ttt,
                                                      ttt_mode="gated_residual", ttt_initializer_range=0.02))
layer = s2s.model.layers[2].self_attn
assert sorted(ttt_modules(s2s)) == [0, 2] and hasattr(layer, "q_proj")
assert float(layer.ttt.q_proj.weight.std()) < 0.05 and float(layer.q_proj.weight.std()) > 0.5
assert torch.equal(layer.ttt.ttt_norm_weight, torch.ones_like(layer.ttt.ttt_norm_weight))
assert torch.equal(layer.ttt_gate, torch.full((64,), 0.1))

# LLaMA-Omni's generate (inputs_embeds only, its forward drops cache_position) equals recomputation
prompt = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
assert torch.equal(out[:, -8:], seq[:, 9:]), (out, seq)

# save_pretrained / from_pretrained through the LLaMA-Omni class keep config and TTT weights
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    loaded, report = from_pretrained_ttt(OmniSpeechLlamaForCausalLM, d)
    assert report.initialised == [] and sorted(ttt_modules(loaded)) == [0, 2]
    assert all(torch.equal(v, ttt_state_dict(model)[k]) for k, v in ttt_state_dict(loaded).items())
    # LLaMA-Omni registers its model types with Auto itself; through the hook Auto brings the TTT weights back too
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(d)
    assert type(auto) is OmniSpeechLlamaForCausalLM and sorted(ttt_modules(auto)) == [0, 2]
    assert all(torch.equal(v, ttt_state_dict(model)[k]) for k, v in ttt_state_dict(auto).items())
print("routing ok")
"""


@needs_source
def test_omni_speech_constructors_route_through_apply_ttt(patched_checkout: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(patched_checkout), str(REPO / "overlay")]))
    proc = subprocess.run([sys.executable, "-c", ROUTING_PROBE], capture_output=True, text=True, env=env,
                          cwd=patched_checkout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "routing ok" in proc.stdout
