"""The lock's `extra_requirements` (LLaMA-Omni's speech encoder, openai-whisper): which pins are missing, the
refusals, and that only LLaMA-Omni names one (never the default path)."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("upstream_tool_extras", REPO / "scripts" / "upstream.py")
upstream = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = upstream  # dataclasses look their module up
spec.loader.exec_module(upstream)


def test_missing_requirements_compares_installed_versions(tmp_path: Path) -> None:
    req = tmp_path / "extra.txt"
    torch_version = metadata.version("torch")
    req.write_text(f"# a comment\n\ntorch=={torch_version}  # pinned\nnumpy==0.0.1\nno-such-dist-ttt==1.0\n")
    assert upstream.missing_requirements(req) == ["numpy==0.0.1", "no-such-dist-ttt==1.0"]
    req.write_text("torch>=2\n")
    with pytest.raises(upstream.UpstreamError, match=r"extra.txt:1: expected a pinned `name==version`, got 'torch>=2'"):
        upstream.missing_requirements(req)
    with pytest.raises(upstream.UpstreamError, match=r"gone.txt: no such requirements file"):
        upstream.missing_requirements(tmp_path / "gone.txt")


def test_only_llama_omni_brings_extra_requirements_and_they_are_pinned() -> None:
    lock = tomllib.loads((REPO / "upstream.lock").read_text())
    assert {name for name, entry in lock.items() if "extra_requirements" in entry} == {"llama-omni"}
    (up,) = [u for u in upstream.load_lock(REPO / "upstream.lock", REPO) if u.name == "llama-omni"]
    assert up.extra_requirements == REPO / "requirements-llama-omni.txt"
    pins = [line.split("#")[0].strip() for line in up.extra_requirements.read_text().splitlines()]
    names = {p.split("==")[0] for p in pins if p}
    assert {"openai-whisper", "numba", "tiktoken"} <= names and "triton" not in names
    default = (REPO / "requirements.txt").read_text()
    assert "whisper" not in default and "numba" not in default
