"""LLaMA-Omni: the entry point its patched constructor calls when `config.use_ttt` is set.

`patches/llama-omni/0001-*.patch` makes `OmniSpeechLlamaForCausalLM.__init__` call `apply_ttt(self, config)`
before `post_init()`.
"""

from __future__ import annotations

from typing import Any


def apply_ttt(model: Any, config: Any) -> None:
    """Install TTT layers into `model.model.layers` as `config` asks.

    Not implemented yet (issue 5: "LLaMA-Omni: TTT in Llama decoder layers"). This raises rather than returning,
    so a config with `use_ttt: true` can never silently load as a plain Llama model.
    """
    raise NotImplementedError(
        f"config.use_ttt is set on {type(model).__name__}, but TTT layers for LLaMA-Omni are not implemented yet "
        "(ttt_speech issue 5). Remove `use_ttt` from config.json to load the model without TTT.")
