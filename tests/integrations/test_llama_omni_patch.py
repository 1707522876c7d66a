"""The LLaMA-Omni patch: well formed against its pin, applied when a source is at hand, and its hook is loud."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ttt_speech.integrations.llama_omni import apply_ttt

REPO = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO / "patches" / "llama-omni"
TARGET = "omni_speech/model/language_model/omni_speech_llama.py"


def series() -> list[Path]:
    lines = (PATCH_DIR / "series").read_text().splitlines()
    return [PATCH_DIR / ln for ln in lines if ln and not ln.startswith("#")]


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


def test_apply_ttt_refuses_until_implemented() -> None:
    class Config:
        use_ttt = True

    with pytest.raises(NotImplementedError, match="use_ttt"):
        apply_ttt(object(), Config())


@pytest.mark.skipif(not os.environ.get("LLAMA_OMNI_SRC"),
                    reason="LLaMA-Omni is only on GitHub: set LLAMA_OMNI_SRC to a checkout or archive of the pin")
def test_series_applies_to_the_pinned_source(tmp_path: Path) -> None:
    shutil.copy(REPO / "upstream.lock", tmp_path / "upstream.lock")
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "upstream.py"), "apply", "llama-omni",
                           "--lock", str(tmp_path / "upstream.lock"), "--no-install"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    source = (tmp_path / "upstream" / "llama-omni" / TARGET).read_text()
    init = source[source.index("class OmniSpeechLlamaForCausalLM"):]
    assert init.index("apply_ttt(self, config)") < init.index("self.post_init()")
