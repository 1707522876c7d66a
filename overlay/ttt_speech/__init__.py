"""Test-Time Training for speech language models (Moshi, LLaMA-Omni)."""

__version__ = "0.1.0"
